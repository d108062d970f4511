"""Engines behind one interface; `load_engine` picks one per the settings, once per process."""

import logging

from models.catalog import get_model
from models.engines.base import Engine, choose_engine

log = logging.getLogger("superres.engine")


def load_engine(settings) -> tuple[Engine, "object"]:
    """Resolve the model, verify its file, and build the engine on the chosen device (ConfigError if impossible)."""
    from models.engines.opencv_engine import OpenCVEngine, opencv_has_cuda
    from models.files import default_model_dir, model_path, verify_file

    spec = get_model(settings.model)
    choice = choose_engine(settings.engine, settings.device, opencv_cuda=opencv_has_cuda(), torch_cuda=None)
    path = model_path(spec, settings.model_dir or default_model_dir())
    verify_file(spec, path)  # a wrong or truncated file is a start-up error, not a per-image one
    engine = OpenCVEngine(spec, path, device=choice.device, threads=settings.threads)
    log.info("engine ready", extra={"fields": {**engine.describe(), "model_file": str(path)}})
    return engine, spec
