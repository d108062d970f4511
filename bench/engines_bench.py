"""Engine benchmark (issue 5), all ratios measured in one run.

    .venv/bin/python bench/engines_bench.py [--model fsrcnn-x2] [--images 300] [--skip-rss]

1. Engines side by side on the same model and images: the seed's way (cv2.dnn_superres, one image at a time,
   inputs capped at 500 px), our OpenCV engine, our torch engine on the CPU, and on CUDA (fp32, fp16) when
   present. Output Mpx/s; the model's MACs per input pixel, counted from its layers; on CUDA the fraction of
   the GPU's dense fp16 tensor throughput achieved (MACs x 2 x pixels / time / peak; --peak-tflops).
2. Pipeline throughput (`superres upscale`, overlapped stages, PNG out) on a folder of >= 200 real images vs
   the bare engine on the same decoded pixels.
3. Peak RSS of `superres upscale` on one synthetic 2000^2 / 4000^2 / 8000^2 photo at x2 with a small model at
   full resolution: how memory grows with image size.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent

from models.catalog import get_model  # noqa: E402
from models.engines.opencv_engine import OpenCVEngine  # noqa: E402


def real_images(count: int) -> list[Path]:
    folders = [SHARED / "datasets" / "BSD100" / "HR"] + [
        SHARED / "datasets" / "BSD100" / "LR_bicubic" / f"X{s}" for s in (2, 3, 4)]
    paths = [p for folder in folders for p in sorted(folder.glob("*.png"))]
    return paths[:count]


def macs_per_pixel(model_file: Path, spec) -> float:
    """Count multiply-accumulates of every conv on a probe input (torch module built from the .pb)."""
    import torch

    from models.engines.torch_engine import TorchEngine

    engine = TorchEngine(spec, model_file)
    total = [0]

    def hook(module, _inputs, output):
        w = module.weight
        total[0] += output.numel() * w.shape[1] * w.shape[2] * w.shape[3]

    hooks = [m.register_forward_hook(hook) for m in engine._module.modules()
             if getattr(m, "weight", None) is not None and m.weight.dim() == 4]
    side = 64
    engine.forward(engine.probe_blob(side))
    for h in hooks:
        h.remove()
    del torch
    return total[0] / (side * side)


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def engines_table(args, spec, model_file, images) -> tuple[dict, float]:
    out_mpx = sum(i.shape[0] * i.shape[1] for i in images) * spec.scale**2 / 1e6
    seed = cv2.dnn_superres.DnnSuperResImpl_create()
    seed.readModel(str(model_file))
    seed.setModel(spec.algorithm, spec.scale)

    def seed_way():
        for image in images:
            h, w = image.shape[:2]
            if max(h, w) > 500:
                f = 500 / max(h, w)
                image = cv2.resize(image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            seed.upsample(image)

    rows = {"seed: dnn_superres, cap 500": timed(seed_way, 2)}
    opencv = OpenCVEngine(spec, model_file)
    rows["opencv engine (cpu)"] = timed(lambda: [opencv.upscale(i) for i in images], 2)
    try:
        import torch

        from models.engines.torch_engine import TorchEngine
    except ImportError:
        torch = None
    if torch is not None:
        cpu = TorchEngine(spec, model_file)
        rows["torch engine (cpu, fp32)"] = timed(lambda: [cpu.upscale(i) for i in images], 2)
        if torch.cuda.is_available():
            for precision in ("fp32", "fp16"):
                gpu = TorchEngine(spec, model_file, device="cuda", precision=precision)
                [gpu.upscale(i) for i in images[:4]]  # cuDNN autotune per shape
                rows[f"torch engine (cuda, {precision})"] = timed(lambda: [gpu.upscale(i) for i in images], 3)
    return rows, out_mpx


def pipeline_vs_engine(spec, model_file, paths) -> tuple[float, float]:
    images = [cv2.imread(str(p)) for p in paths]
    engine = OpenCVEngine(spec, model_file)
    bare = timed(lambda: [engine.upscale(i) for i in images])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i, p in enumerate(paths):
            shutil.copy(p, src / f"{i:03d}-{p.name}")
        env = {**os.environ, "SUPERRES_MODEL": spec.name, "SUPERRES_MODEL_DIR": str(SHARED / "models")}
        out = subprocess.run([str(BIN / "superres"), "upscale", str(src), "--out", str(Path(tmp) / "out")],
                             env=env, capture_output=True, text=True, check=True)
    pipeline = float(out.stdout.rsplit(";", 1)[1].split(" s,")[0])  # the run's own clock: items, not start-up
    return bare, pipeline


def peak_rss(spec, side: int) -> tuple[float, float]:
    """Peak RSS (GiB) of one `superres upscale` process on a side x side photo, and its wall seconds."""
    photo = cv2.imread(str(SHARED / "datasets" / "BSD100" / "HR" / "img_001.png"))
    big = cv2.resize(photo, (side, side), interpolation=cv2.INTER_CUBIC)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.png"
        cv2.imwrite(str(path), big, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        del big
        env = {**os.environ, "SUPERRES_MODEL": spec.name, "SUPERRES_MODEL_DIR": str(SHARED / "models")}
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "superres"), "upscale", str(path), "--out", str(Path(tmp) / "out"),
                                 "--max-pixels", str(side * side)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 2**20, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fsrcnn-x2")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--engine-images", type=int, default=40, help="images for the engines table")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense fp16/bf16 peak of the GPU")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    spec = get_model(args.model)
    model_file = SHARED / "models" / spec.filename
    paths = real_images(args.images)
    macs = macs_per_pixel(model_file, spec)

    images = [cv2.imread(str(p)) for p in paths[: args.engine_images]]
    in_px = sum(i.shape[0] * i.shape[1] for i in images)
    rows, out_mpx = engines_table(args, spec, model_file, images)
    print(f"model {spec.name}: {macs / 1e3:.1f} k MACs per input pixel (counted from its layers); "
          f"{len(images)} real images, {out_mpx:.1f} output Mpx; {os.cpu_count()} cores")
    print(f"| {'engine':<28} | {'seconds':>7} | {'out Mpx/s':>9} | {'vs seed':>7} | {'% of GPU peak':>13} |")
    print(f"|{'-' * 30}|{'-' * 8}:|{'-' * 10}:|{'-' * 8}:|{'-' * 14}:|")
    seed = rows["seed: dnn_superres, cap 500"]
    for name, seconds in rows.items():
        peak = ""
        if "cuda" in name:
            peak = f"{100 * macs * 2 * in_px / seconds / (args.peak_tflops * 1e12):.2f} %"
        print(f"| {name:<28} | {seconds:7.2f} | {out_mpx / seconds:9.1f} | {seed / seconds:7.2f} | {peak:>13} |")

    bare, pipeline = pipeline_vs_engine(spec, model_file, paths)
    print(f"\npipeline on {len(paths)} real images (read, hash, ledger, decode, tiles, engine, PNG encode, atomic "
          f"publish; overlapped) vs the bare engine on the same decoded pixels: {bare:.2f} s / {pipeline:.2f} s "
          f"= {100 * bare / pipeline:.0f} %")

    if not args.skip_rss:
        print(f"\n| {'input (x2, ' + spec.name + ')':<28} | {'peak RSS GiB':>12} | {'output GiB':>10} | {'seconds':>7} |")
        print(f"|{'-' * 30}|{'-' * 13}:|{'-' * 11}:|{'-' * 8}:|")
        for side in (2000, 4000, 8000):
            rss, seconds = peak_rss(spec, side)
            output = (side * spec.scale) ** 2 * 3 / 2**30
            print(f"| {f'{side}x{side}':<28} | {rss:12.2f} | {output:10.2f} | {seconds:7.1f} |")


if __name__ == "__main__":
    main()
