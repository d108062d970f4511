"""PNG compression: bytes and encode time per setting (SUPERRES_PNG_COMPRESSION), through the pipeline's own
encoder (pipeline/codec.py), on upscaled-sized real photos. Ratios against `fast` (the default) in one run; the
last row is OpenCV's default PNG (libpng: zlib level 1, run-length, SUB filter), what `fast` was before.

    .venv/bin/python bench/png_compression_bench.py [--images 6] [--repeat 3]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from pipeline import codec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    images = []
    for p in sorted((SHARED / "datasets").glob("*/HR/*.png"))[:args.images]:
        data = p.read_bytes()
        image = codec.decode(data, codec.read_header(data))
        # an upscaled photo: smooth at the pixel level, as outputs are
        image.frames = [cv2.resize(image.frames[0], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)]
        images.append(image)
    mpx = sum(im.frames[0].shape[0] * im.frames[0].shape[1] for im in images) / 1e6
    rows = {}
    for level in codec.PNG_COMPRESSIONS:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            size = sum(len(codec.encode(im, "PNG", png_compression=level)) for im in images)
            best = min(best, time.perf_counter() - start)
        rows[level] = (best, size)
    best = float("inf")
    for _ in range(args.repeat):  # what "fast" was before pipeline/png.py: OpenCV's default PNG
        start = time.perf_counter()
        size = sum(len(cv2.imencode(".png", im.frames[0])[1]) for im in images)
        best = min(best, time.perf_counter() - start)
    rows["libpng fast (OpenCV's default)"] = (best, size)
    fast_s, fast_b = rows["fast"]
    print(f"{len(images)} photos (Set5/Set14 HR, x2 bicubic: {mpx:.1f} Mpx in all), best of {args.repeat}, "
          f"one thread, {os.cpu_count()} cores")
    print("| setting | ms / Mpx | bytes / px | size vs fast | time vs fast |")
    print("|---|---:|---:|---:|---:|")
    for level, (seconds, size) in rows.items():
        print(f"| {level} | {seconds / mpx * 1000:.0f} | {size / mpx / 1e6:.2f} | {size / fast_b:.2f} | "
              f"{seconds / fast_s:.1f}x |")


if __name__ == "__main__":
    main()
