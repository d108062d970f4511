"""The engine interface and device selection.

Contract: `upscale(image)` takes HxW (gray) or HxWx3 (BGR), uint8 or uint16, and returns the same kind
`scale` times larger, computed exactly as OpenCV's `dnn_superres` would for that model. Alpha, tiling and
formats are the pipeline's business, not the engine's.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.errors import ConfigError


class Engine(Protocol):
    name: str  # "opencv" | "torch"
    device: str  # "cpu" | "cuda"
    scale: int

    def upscale(self, image: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    device: str


def choose_engine(engine: str, device: str, *, opencv_cuda: bool, torch_cuda: bool | None) -> EngineChoice:
    """Pure selection rules. `torch_cuda` is None when torch is not installed.

    Never a silent CPU run: asking for cuda where no engine can use a GPU is a ConfigError.
    """
    if engine not in ("auto", "opencv", "torch"):
        raise ConfigError(f"unknown engine {engine!r}: use auto, opencv or torch")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if engine == "torch":
        raise ConfigError("the torch engine is not available in this build yet; use --engine opencv")
    if device == "cuda" and not opencv_cuda:
        raise ConfigError(
            "--device cuda: this OpenCV build has no CUDA support (the PyPI opencv wheels are CPU-only: "
            "cv2.cuda.getCudaEnabledDeviceCount() is 0); run with --device cpu"
        )
    if device == "auto":
        device = "cuda" if opencv_cuda else "cpu"
    return EngineChoice("opencv", device)
