"""Engines behind one interface; `load_engine` picks one per the settings, once per process."""

import importlib.util
import logging
import os

from models.catalog import get_model
from models.engines.base import Engine, Hardware, choose_engine

log = logging.getLogger("superres.engine")


def probe_hardware(engine: str, device: str) -> Hardware:
    """Look only as far as the choice needs: importing torch costs a second or two, so not for opencv on the CPU,
    and not where there is no NVIDIA driver at all (no /dev/nvidiactl: CUDA cannot work)."""
    from models.engines.opencv_engine import opencv_has_cuda

    torch_installed = importlib.util.find_spec("torch") is not None
    torch_cuda = False
    driver = os.path.exists("/dev/nvidiactl")
    if torch_installed and (driver or device == "cuda") and not (engine == "opencv" or device == "cpu"):
        import torch

        torch_cuda = torch.cuda.is_available()
    return Hardware(opencv_cuda=opencv_has_cuda(), torch_installed=torch_installed, torch_cuda=torch_cuda)


def load_engine(settings) -> tuple[Engine, "object"]:
    """Resolve the model, verify its file, and build the engine on the chosen device (ConfigError if impossible)."""
    from models.files import default_model_dir, model_path, verify_file

    spec = get_model(settings.model)
    choice = choose_engine(settings.engine, settings.device, probe_hardware(settings.engine, settings.device),
                           fastest_on_cpu=spec.fastest_cpu_engine)
    path = model_path(spec, settings.model_dir or default_model_dir())
    verify_file(spec, path)  # a wrong or truncated file is a start-up error, not a per-image one
    if choice.engine == "torch":
        from models.engines.torch_engine import TorchEngine

        precision = settings.precision if settings.precision != "auto" else ("fp16" if choice.device == "cuda" else "fp32")
        engine = TorchEngine(spec, path, device=choice.device, precision=precision, threads=settings.threads)
    else:
        from models.engines.opencv_engine import OpenCVEngine

        engine = OpenCVEngine(spec, path, device=choice.device, threads=settings.threads)
    log.info("engine ready", extra={"fields": {**engine.describe(), "model_file": str(path)}})
    return engine, spec
