"""Engine benchmark (issues 5 and 13), every ratio measured in one run.

    .venv/bin/python bench/engines_bench.py [--models fsrcnn-x2,espcn-x3,...] [--rounds 5] [--skip-rss]

1. Engine only, 500x500 inputs (crops of the Set14 HR photos that are at least that large): each engine's
   `upscale` (pre/post-processing included, one whole 500x500 image per call, no tiles) on every model given,
   and on an EDSR-structured graph (tests/edsr_graph.py: upstream's ops and quint8 weights, fewer blocks and
   channels, random weights; the real files cannot be downloaded here). Medians of interleaved rounds; MACs
   per input pixel from the catalog (EDSR-structured: counted from its convs). OpenCV DNN is the reference.
   torch runs fp32, and bf16 too where the CPU computes bf16 natively (AVX512-BF16, AMX, ARM BF16). Where the
   default onnxruntime graph has Winograd convs (models/winograd.py: EDSR's width), a row with onnxruntime's
   own convs too.
2. Peak RSS of one `superres upscale` process on one synthetic photo at x2 (fsrcnn-x2, full resolution, the
   default engine), 2000^2 / 4000^2 / 8000^2: how memory grows with the image.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent

from models.catalog import CATALOG, get_model  # noqa: E402
from models.engines.onnx_engine import OnnxRuntimeEngine  # noqa: E402
from models.engines.opencv_engine import OpenCVEngine  # noqa: E402
from models.files import model_path  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402

DEFAULT_MODELS = "fsrcnn-small-x3,fsrcnn-x2,fsrcnn-x4,espcn-x2,espcn-x3,lapsrn-x2,fast-x3"


def crops(side: int, count: int) -> list[np.ndarray]:
    """side x side crops of real photos (Set14 HR), centred."""
    out = []
    for path in sorted((SHARED / "datasets" / "Set14" / "HR").glob("*.png")):
        image = cv2.imread(str(path))
        h, w = image.shape[:2]
        if h >= side and w >= side:
            y, x = (h - side) // 2, (w - side) // 2
            out.append(np.ascontiguousarray(image[y:y + side, x:x + side]))
    if len(out) < count:
        raise SystemExit(f"only {len(out)} Set14 HR photos are {side}x{side} or larger")
    return out[:count]


def engines_for(spec, model_file: Path, cache: Path) -> dict:
    engines = {"opencv (cv2.dnn)": OpenCVEngine(spec, model_file),
               "onnxruntime (cpu)": OnnxRuntimeEngine(spec, model_file, cache_dir=cache)}
    if engines["onnxruntime (cpu)"].winograd_convs:  # what the Winograd convs bring, in the same run
        engines["ort, direct convs"] = OnnxRuntimeEngine(spec, model_file, cache_dir=cache, winograd=False)
    try:
        from models.engines.torch_engine import TorchEngine, cpu_has_native_bf16
    except ImportError:  # the CPU image: no torch
        return engines
    if spec.filename.endswith(".pb"):
        engines["torch (cpu, fp32)"] = TorchEngine(spec, model_file)
        if cpu_has_native_bf16():  # opt-in --precision bf16: only where the CPU computes bf16 natively
            engines["torch (cpu, bf16)"] = TorchEngine(spec, model_file, precision="bf16")
    return engines


def measure(engines: dict, images: list[np.ndarray], rounds: int) -> dict[str, float]:
    """Median seconds per image of each engine, rounds interleaved (a busy machine slows them alike)."""
    for engine in engines.values():
        engine.upscale(images[0])  # first-call allocations, cuDNN/oneDNN plans
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            for image in images:
                engine.upscale(image)
            times[name].append((time.perf_counter() - start) / len(images))
    return {name: statistics.median(values) for name, values in times.items()}


def edsr_structured(folder: Path, blocks: int, channels: int):
    """An EDSR_x2.pb-structured graph and its spec; MACs per input pixel counted from its convs."""
    from edsr_graph import build_edsr_graph

    spec = CATALOG["edsr-x2"]
    path = folder / spec.filename
    build_edsr_graph(path, scale=2, blocks=blocks, channels=channels, seed=0, quantized=True)
    macs = 9 * (3 * channels + 2 * blocks * channels * channels + channels * channels + channels * 3 * 4)
    return spec, path, macs


def engine_table(args) -> None:
    images = crops(args.side, args.crops)
    print(f"\n1. engine only: {len(images)} crops {args.side}x{args.side} of Set14 HR photos, one image per call, "
          f"median of {args.rounds} interleaved rounds; {os.cpu_count()} cores, OpenCV {cv2.__version__}")
    print(f"| {'model':<28} | {'MACs/px':>9} | {'engine':<18} | {'s/image':>7} | {'out Mpx/s':>9} | "
          f"{'vs OpenCV DNN':>13} |")
    print(f"|{'-' * 30}|{'-' * 10}:|{'-' * 20}|{'-' * 8}:|{'-' * 10}:|{'-' * 14}:|")
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name in [m for m in args.models.split(",") if m]:
            spec = get_model(name)
            path = model_path(spec, SHARED / "models")
            if not path.exists():
                print(f"| {name:<28} | (model file not here: skipped) |")
                continue
            cases.append((spec.name, spec, path, spec.macs_per_pixel, images))
        if args.edsr_blocks:
            spec, path, macs = edsr_structured(Path(tmp), args.edsr_blocks, args.edsr_channels)
            label = f"EDSR-structured B{args.edsr_blocks} C{args.edsr_channels} x2"
            cases.append((label, spec, path, macs, images[:args.edsr_crops]))
        for label, spec, path, macs, some in cases:
            try:
                engines = engines_for(spec, path, Path(tmp) / "cache")
            except ConfigError as exc:  # a model file being rewritten, a damaged one: the row says so
                print(f"| {label:<28} | (not loaded: {exc.message[:80]}) |")
                continue
            result = measure(engines, some, args.rounds)
            reference = result["opencv (cv2.dnn)"]
            out_mpx = args.side * args.side * spec.scale ** 2 / 1e6
            for engine, seconds in result.items():
                print(f"| {label:<28} | {macs:>9,} | {engine:<18} | {seconds:7.3f} | {out_mpx / seconds:9.2f} | "
                      f"{reference / seconds:12.2f}x |")


def peak_rss(side: int) -> tuple[float, float, str]:
    """Peak RSS (GiB) of one `superres upscale` process on a side x side photo, its wall seconds, its engine."""
    photo = cv2.imread(str(SHARED / "datasets" / "BSD100" / "HR" / "img_001.png"))
    big = cv2.resize(photo, (side, side), interpolation=cv2.INTER_CUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.png"
        cv2.imwrite(str(path), big, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        del big
        env = {**os.environ, "SUPERRES_MODEL": "fsrcnn-x2", "SUPERRES_MODEL_DIR": str(SHARED / "models"),
               "XDG_CACHE_HOME": str(Path(tmp) / "cache"), "SUPERRES_METRICS_PORT": "0"}
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "superres"), "upscale", str(path), "--out", str(Path(tmp) / "out"),
                                 "--max-pixels", str(side * side), "-v"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        log = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        assert os.waitstatus_to_exitcode(status) == 0, log[-2000:]
    engine = next((word.split("=", 1)[1] for line in log.splitlines() if "engine ready" in line
                   for word in line.split() if word.startswith("engine=")), "?")
    return usage.ru_maxrss / 2**20, seconds, engine  # ru_maxrss is in KiB on Linux


def rss_table() -> None:
    print("\n2. peak RSS of one `superres upscale` process, one photo at x2 (fsrcnn-x2, tile policy, default engine)")
    print(f"| {'input':<12} | {'engine':<12} | {'peak RSS GiB':>12} | {'output GiB':>10} | {'seconds':>7} |")
    print(f"|{'-' * 14}|{'-' * 14}|{'-' * 13}:|{'-' * 11}:|{'-' * 8}:|")
    for side in (2000, 4000, 8000):
        rss, seconds, engine = peak_rss(side)
        output = (side * 2) ** 2 * 3 / 2**30
        print(f"| {f'{side}x{side}':<12} | {engine:<12} | {rss:12.2f} | {output:10.2f} | {seconds:7.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--side", type=int, default=500)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--edsr-blocks", type=int, default=4, help="0: no EDSR-structured row")
    parser.add_argument("--edsr-channels", type=int, default=64)
    parser.add_argument("--edsr-crops", type=int, default=1)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    engine_table(args)
    if not args.skip_rss:
        rss_table()


if __name__ == "__main__":
    main()
