"""Side by side or split: onnxruntime on a CPU, for each model, the throughput of runs on one session with all of
its threads (one run at a time, split across the cores) against runs on a session of one thread each, one per
core at once (what the stage runner's lanes do for thin models, models/engines/onnx_engine.py). Whole
`engine.upscale` calls (colour handling included) on a real photo's crop, best of --rounds, ratios in one run.

    .venv/bin/python bench/side_by_side_bench.py [--models fsrcnn-x4,fast-x3,espcn-x4,quality-x3,lapsrn-x4]
                                                 [--sides 96,256] [--rounds 3]
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from models.catalog import get_model  # noqa: E402
from models.engines.onnx_engine import OnnxRuntimeEngine  # noqa: E402
from models.files import model_path  # noqa: E402

WORK_GMAC = 4.0  # each measurement runs about this much network work, so cheap and heavy models take alike


def best_seconds(rounds: int, run) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="fsrcnn-x4,fast-x3,espcn-x4,quality-x3,lapsrn-x4")
    parser.add_argument("--sides", default="96,256")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as the engine's process has it (models/engines/__init__.py)
    cores = os.cpu_count() or 1
    photo = cv2.imread(str(SHARED / "datasets" / "Set14" / "LR_bicubic" / "X4" / "baboonx4.png"))
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "superres-side-by-side-bench"
    print(f"{cores} cores; onnxruntime: all threads on one run at a time, vs {cores} runs at once on one thread each")
    print("| model | macs/px | tile px | runs | all threads ms/run | one thread each ms/run | side by side vs split |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with ThreadPoolExecutor(cores) as pool:
        for name in args.models.split(","):
            spec = get_model(name)
            path = model_path(spec, SHARED / "models")
            if not path.is_file():
                print(f"| {name} | {spec.macs_per_pixel} | - | - | not present | | |")
                continue
            split = OnnxRuntimeEngine(spec, path, threads=0, lanes=1, cache_dir=cache)
            each = OnnxRuntimeEngine(spec, path, threads=1, lanes=cores, cache_dir=cache)
            for side in map(int, args.sides.split(",")):
                image = cv2.resize(photo, (side, side), interpolation=cv2.INTER_CUBIC)
                runs = max(cores, int(WORK_GMAC * 1e9 / (spec.macs_per_pixel * side * side)) // cores * cores)
                split.upscale(image), each.upscale(image)  # warm: first runs allocate
                split_s = best_seconds(args.rounds, lambda: [split.upscale(image) for _ in range(runs)])
                each_s = best_seconds(args.rounds, lambda: list(pool.map(lambda _: each.upscale(image), range(runs))))
                print(f"| {name} | {spec.macs_per_pixel} | {side} | {runs} | {split_s / runs * 1e3:.2f} | "
                      f"{each_s / runs * 1e3:.2f} | {split_s / each_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
