"""GPU check (issue 13, part 7): the EDSR-structured graph at full size (32 blocks, 256 channels, random weights,
upstream's ops and quint8 weight encoding; tests/edsr_graph.py) on one CUDA GPU, through our engines.

    python bench/gpu_check.py [--out FILE.md] [--runs 10] [--no-compile]   (bench/gpu_check.sh runs it)

Cases: 500x500 at x3 and 1920x1080 at x2, one whole image per forward (the network only: NCHW float in and out,
as `forward` gets it). Rows: torch fp16 and bf16 (channels-last, cuDNN autotune: our TorchEngine), the same
replayed as a CUDA graph, torch.compile (fp16, 500x500 only unless --compile-all), and onnxruntime's CUDA and
TensorRT execution providers (fp16) where this onnxruntime build has them. Latency is the median of --runs
timed forwards after warm-up; output Mpx/s counts output pixels; the fraction of peak is
2 x MACs x input pixels / latency / --peak-tflops (790 TFLOP/s: an H200's measured dense bf16). Every row is also
checked against torch fp32 (max |difference| in 0..255 levels of the network's BGR output).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from edsr_graph import build_edsr_graph  # noqa: E402
from models.catalog import CATALOG  # noqa: E402
from models.engines.torch_engine import TorchEngine  # noqa: E402

BLOCKS, CHANNELS = 32, 256  # upstream EDSR (Saafke/EDSR_Tensorflow): B32, F256


def macs_per_pixel(scale: int) -> int:
    """Counted from the graph's 3x3 convs: head 3->C, 2B body convs, the C->C after the body, tail C->3s^2."""
    c = CHANNELS
    return 9 * (3 * c + 2 * BLOCKS * c * c + c * c + c * 3 * scale * scale)


def timed(fn, runs: int) -> float:
    """Median seconds of `runs` calls of fn (which returns once the GPU is done)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_rows(spec, path: Path, blob: np.ndarray, runs: int, compile_it: bool) -> tuple[list, np.ndarray]:
    rows = []
    reference = TorchEngine(spec, path, device="cuda", precision="fp32")
    x32 = torch.from_numpy(blob).cuda().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        truth = reference._module(x32).float().cpu().numpy()
    del reference
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        engine = TorchEngine(spec, path, device="cuda", precision=precision)
        module = engine._module
        x = x32.to(dtype)
        with torch.inference_mode():
            for _ in range(3):  # cuDNN autotune for this shape
                module(x)
            torch.cuda.synchronize()

            def eager():
                module(x)
                torch.cuda.synchronize()

            out = module(x).float().cpu().numpy()
            rows.append((f"torch {precision}, channels-last", timed(eager, runs), np.abs(out - truth).max()))
            # the same forward replayed as one CUDA graph: no per-kernel launch cost
            static_x = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                module(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = module(static_x)

            def replay():
                graph.replay()
                torch.cuda.synchronize()

            replay()
            rows.append((f"torch {precision}, CUDA graph", timed(replay, runs),
                         np.abs(static_y.float().cpu().numpy() - truth).max()))
            del graph, static_y, static_x
        if compile_it and precision == "fp16":
            start = time.perf_counter()
            compiled = torch.compile(module, dynamic=False)  # default mode: max-autotune would not fit the budget
            with torch.inference_mode():
                compiled(x)
                torch.cuda.synchronize()
                took = time.perf_counter() - start

                def run_compiled():
                    compiled(x)
                    torch.cuda.synchronize()

                out = compiled(x).float().cpu().numpy()
                rows.append((f"torch fp16, torch.compile ({took:.0f} s to compile)", timed(run_compiled, runs),
                             np.abs(out - truth).max()))
            del compiled
        del engine, module, x
        torch.cuda.empty_cache()
    return rows, truth


def onnxruntime_rows(spec, path: Path, blob: np.ndarray, truth: np.ndarray, runs: int, cache: Path) -> list:
    try:
        import onnxruntime
    except ImportError:
        return [("onnxruntime: not installed", None, None)]
    from models.engines.onnx_engine import CUDA, TENSORRT, OnnxRuntimeEngine

    have = onnxruntime.get_available_providers()
    rows = []
    if CUDA not in have:
        return [(f"onnxruntime {onnxruntime.__version__}: no CUDA provider (the CPU wheel; onnxruntime-gpu is "
                 "needed)", None, None)]
    wanted = [("onnxruntime CUDA EP, fp16 graph", [CUDA])]
    if TENSORRT in have:
        wanted.append(("onnxruntime TensorRT EP, fp16", [TENSORRT, CUDA]))
    else:
        rows.append(("onnxruntime: no TensorRT provider in this build", None, None))
    import models.engines.onnx_engine as onnx_engine

    onnx_engine.TRT_MAX_SIDE = max(blob.shape[2:])  # TensorRT's profile must cover the whole image here
    for label, providers in wanted:
        # the engine picks TensorRT first where the build has it; here each provider is measured on its own
        original = onnx_engine.available_providers
        onnx_engine.available_providers = lambda providers=providers: providers
        try:
            start = time.perf_counter()
            engine = OnnxRuntimeEngine(spec, path, device="cuda", precision="fp16", cache_dir=cache)
            engine.forward(blob)  # TensorRT builds its engine for this shape here
            built = time.perf_counter() - start
        except Exception as exc:  # a provider that fails here is a row that says why, not a lost run
            rows.append((f"{label}: failed ({str(exc).splitlines()[0][:120]})", None, None))
            continue
        finally:
            onnx_engine.available_providers = original
        out = engine.forward(blob)
        rows.append((f"{label} (ready in {built:.0f} s)", timed(lambda: engine.forward(blob), runs),
                     np.abs(out - truth).max()))
        del engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile at 1920x1080 too")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU")
    torch.backends.cudnn.benchmark = True
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}; EDSR-structured graph B{BLOCKS} C{CHANNELS}, random weights; "
             f"median of {args.runs} forwards; peak {args.peak_tflops:g} TFLOP/s (bf16 dense)", "",
             f"| {'case':<18} | {'path':<52} | {'latency ms':>10} | {'out Mpx/s':>9} | {'% of peak':>9} | "
             f"{'max diff':>8} |",
             f"|{'-' * 20}|{'-' * 54}|{'-' * 11}:|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|"]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for scale, height, width in ((3, 500, 500), (2, 1080, 1920)):
            spec = CATALOG[f"edsr-x{scale}"]
            path = Path(tmp) / spec.filename
            build_edsr_graph(path, scale=scale, blocks=BLOCKS, channels=CHANNELS, seed=scale, quantized=True)
            blob = rng.normal(0, 40, (1, 3, height, width)).astype(np.float32)  # BGR minus the mean
            compile_it = not args.no_compile and (args.compile_all or height == 500)
            rows, truth = torch_rows(spec, path, blob, args.runs, compile_it)
            rows += onnxruntime_rows(spec, path, blob, truth, args.runs, Path(tmp) / "cache")
            flops = 2 * macs_per_pixel(scale) * height * width
            out_mpx = height * width * scale * scale / 1e6
            case = f"{width}x{height} x{scale}"
            for label, seconds, diff in rows:
                if seconds is None:
                    line = f"| {case:<18} | {label:<52} | {'-':>10} | {'-':>9} | {'-':>9} | {'-':>8} |"
                else:
                    line = (f"| {case:<18} | {label:<52} | {seconds * 1e3:10.1f} | {out_mpx / seconds:9.1f} | "
                            f"{100 * flops / seconds / (args.peak_tflops * 1e12):8.1f}% | {diff:8.2f} |")
                print(line, flush=True)
                lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
