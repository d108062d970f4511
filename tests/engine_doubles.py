"""Engine doubles for SUPERRES_TEST_ENGINE=tests/engine_doubles.py:FACTORY (handler/runtime.py reads it; test-only):

- `broken`: loads, then fails on every call, as a GPU does once it is lost;
- `slow_start`: the real engine, after SLOW_START_S seconds (a big model's load or a CUDA start-up)."""

import os
import time


class BrokenEngine:
    name = "broken"
    device = "sim"

    def __init__(self, spec):
        self.spec = spec
        self.scale = spec.scale

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale}

    def default_batch(self) -> int:
        return 1

    def default_tile(self, batch: int) -> int:
        return 256

    def upscale(self, image):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    def upscale_batch(self, images):
        return [self.upscale(image) for image in images]


def broken(settings):
    from models.catalog import get_model

    spec = get_model(settings.model)
    return BrokenEngine(spec), spec


def slow_start(settings):
    from models.engines import load_engine

    time.sleep(float(os.environ.get("SLOW_START_S", "3")))
    return load_engine(settings)
