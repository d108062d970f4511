"""Pipeline benchmark (CPU): the seed's way vs our engine vs the whole pipeline, one run, as ratios.

    .venv/bin/python bench/pipeline_bench.py [--model fsrcnn-x3] [--images 100]

Rows (all on the same BSD100 LR images, read from ../shared/datasets):
- seed: cv2.dnn_superres DnnSuperResImpl, one image at a time, inputs capped at 500 px (they are smaller here)
- engine whole: our OpenCV engine on each whole image (no tiles); the same for the onnxruntime engine
- engine tiled: our engine through the tile planner (default tile, the model's context as overlap)
- pipeline: `superres upscale` in-process (the default engine: auto): read, sha256, ledger, decode, tiles, engine,
  PNG encode, atomic publish
Output Mpx/s counts output pixels; "vs engine" is the row's speed over the bare whole-image engine's.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"

from handler.cli import main as cli_main  # noqa: E402
from models.catalog import get_model  # noqa: E402
from models.engines.onnx_engine import OnnxRuntimeEngine  # noqa: E402
from models.engines.opencv_engine import OpenCVEngine  # noqa: E402
from pipeline.upscale import upscale_tiled  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fsrcnn-x3")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    spec = get_model(args.model)
    model_file = SHARED / "models" / spec.filename
    paths = sorted((SHARED / "datasets" / "BSD100" / "LR_bicubic" / f"X{min(spec.scale, 4)}").glob("*.png"))[: args.images]
    images = [cv2.imread(str(p)) for p in paths]
    out_mpx = sum(i.shape[0] * i.shape[1] for i in images) * spec.scale**2 / 1e6

    seed = cv2.dnn_superres.DnnSuperResImpl_create()
    seed.readModel(str(model_file))
    seed.setModel(spec.algorithm, spec.scale)
    engine = OpenCVEngine(spec, model_file)
    onnx_engine = OnnxRuntimeEngine(spec, model_file, cache_dir=Path(tempfile.mkdtemp()))
    for warm in images[:3]:
        seed.upsample(warm), engine.upscale(warm), onnx_engine.upscale(warm)

    rows = {}
    rows["seed (dnn_superres, cap 500)"] = timed(lambda: [seed.upsample(i) for i in images])
    rows["engine whole image"] = timed(lambda: [engine.upscale(i) for i in images])
    rows[f"engine tiled ({args.tile})"] = timed(
        lambda: [upscale_tiled(i, engine, args.tile, spec.context_px) for i in images])
    rows["onnxruntime whole image"] = timed(lambda: [onnx_engine.upscale(i) for i in images])
    rows[f"onnxruntime tiled ({args.tile})"] = timed(
        lambda: [upscale_tiled(i, onnx_engine, args.tile, spec.context_px) for i in images])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for p in paths:
            shutil.copy(p, src / p.name)
        out = Path(tmp) / "out"
        argv = ["upscale", str(src), "--out", str(out), "--model", args.model, "--model-dir", str(SHARED / "models"),
                "--tile", str(args.tile)]
        devnull = open(os.devnull, "w")
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = devnull
        try:
            start = time.perf_counter()
            cli_main(argv)
            # subtract the one-off model load so the row is per-item work
            load = timed(lambda: OpenCVEngine(spec, model_file))
            rows["pipeline (one-shot, PNG out)"] = time.perf_counter() - start - load
        finally:
            sys.stdout, sys.stderr = stdout, stderr

    base = rows["engine whole image"]
    print(f"model {args.model}, {len(images)} BSD100 LR images, {out_mpx:.1f} output Mpx, OpenCV threads {cv2.getNumThreads()}")
    print(f"| {'path':<30} | {'seconds':>8} | {'out Mpx/s':>9} | {'vs engine':>9} |")
    print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 10}:|{'-' * 10}:|")
    for name, seconds in rows.items():
        print(f"| {name:<30} | {seconds:8.2f} | {out_mpx / seconds:9.1f} | {base / seconds:9.2f} |")


if __name__ == "__main__":
    main()
