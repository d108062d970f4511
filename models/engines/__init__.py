"""Engines behind one interface; `load_engine` picks one per the settings, once per process."""

import importlib.util
import logging
import os

from models.catalog import get_model
from models.engines.base import Engine, Hardware, choose_engine

log = logging.getLogger("superres.engine")


def probe_hardware(engine: str, device: str) -> Hardware:
    """Look only as far as the choice needs: importing torch costs a second or two, so not for another engine or
    the CPU, and not where there is no NVIDIA driver at all (no /dev/nvidiactl: CUDA cannot work)."""
    from models.engines.opencv_engine import opencv_has_cuda

    torch_installed = importlib.util.find_spec("torch") is not None
    onnxruntime_installed = importlib.util.find_spec("onnxruntime") is not None
    driver = os.path.exists("/dev/nvidiactl")
    wants_gpu = device == "cuda" or (device == "auto" and driver)
    torch_cuda = False
    if torch_installed and wants_gpu and engine in ("auto", "torch"):
        import torch

        torch_cuda = torch.cuda.is_available()
    onnxruntime_cuda = False
    if onnxruntime_installed and wants_gpu and engine in ("auto", "onnxruntime"):
        from models.engines.onnx_engine import onnxruntime_has_cuda

        onnxruntime_cuda = driver and onnxruntime_has_cuda()
    return Hardware(opencv_cuda=opencv_has_cuda(), torch_installed=torch_installed, torch_cuda=torch_cuda,
                    onnxruntime_installed=onnxruntime_installed, onnxruntime_cuda=onnxruntime_cuda,
                    gpu_present=driver)


def load_engine(settings, *, work_pixels: int | None = None) -> tuple[Engine, "object"]:
    """Resolve the model, verify its file, and build the engine on the chosen device (ConfigError if impossible).
    `work_pixels`: the input pixels of the whole run where they are known before it starts (a small one-shot)."""
    from models.files import default_model_dir, model_path, verify_file

    spec = get_model(settings.model)
    work_gmac = None if work_pixels is None else work_pixels * spec.macs_per_pixel / 1e9
    choice = choose_engine(settings.engine, settings.device, probe_hardware(settings.engine, settings.device),
                           fastest_on_cpu=spec.fastest_cpu_engine, work_gmac=work_gmac, precision=settings.precision)
    if choice.note:
        log.warning(choice.note)
    path = model_path(spec, settings.model_dir or default_model_dir())
    verify_file(spec, path)  # a wrong or truncated file is a start-up error, not a per-image one
    # auto: fp16 on CUDA where the engine has it (OpenCV DNN computes fp32), fp32 on a CPU; each engine refuses
    # what it cannot compute, never a silent fp32 run
    half = choice.device == "cuda" and choice.engine != "opencv"
    precision = settings.precision if settings.precision != "auto" else ("fp16" if half else "fp32")
    if choice.engine == "onnxruntime":
        from models.engines.onnx_engine import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(spec, path, device=choice.device, precision=precision, threads=settings.threads,
                                   lanes=settings.lanes)
    elif choice.engine == "torch":
        from models.engines.torch_engine import TorchEngine

        engine = TorchEngine(spec, path, device=choice.device, precision=precision, threads=settings.threads)
    else:
        from models.engines.opencv_engine import OpenCVEngine

        engine = OpenCVEngine(spec, path, device=choice.device, precision=precision, threads=settings.threads)
    if choice.device == "cpu" and choice.engine != "opencv":
        import cv2

        # OpenCV's pool then only splits our colour conversions and resizes of one tile (too small to split) and
        # its threads spin after each call, on the cores the network and the other stages need: ~12 % of a
        # small-image run's CPU (docs/benchmarks.md). OpenCV's own DNN engine keeps it: that is its parallelism.
        cv2.setNumThreads(1)
    small = {"run_gmac": round(work_gmac, 3)} if work_gmac is not None else {}  # the run auto weighed (small-run rule)
    log.info("engine ready", extra={"fields": {**engine.describe(), "model_file": str(path), **small}})
    return engine, spec
