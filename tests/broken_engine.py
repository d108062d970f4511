"""A test double for SUPERRES_TEST_ENGINE (handler/runtime.py): an engine that loads and then fails on every
call, as a GPU does once it is lost. `load` is the hook's factory."""


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


def load(settings):
    from models.catalog import get_model

    spec = get_model(settings.model)
    return BrokenEngine(spec), spec
