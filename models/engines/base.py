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


@dataclass(frozen=True)
class Hardware:
    """What this process can use. `torch_installed` False: the CPU image, without the gpu extra."""

    opencv_cuda: bool
    torch_installed: bool
    torch_cuda: bool


def choose_engine(engine: str, device: str, hw: Hardware, *, fastest_on_cpu: str = "opencv") -> EngineChoice:
    """Pure selection rules. Never a silent CPU run: asking for cuda where nothing can use a GPU is a ConfigError.

    auto picks CUDA when a GPU is usable (torch first: it is our GPU path); on a CPU the model's measured
    fastest engine among those installed (`ModelSpec.fastest_cpu_engine`).
    """
    if engine not in ("auto", "opencv", "torch"):
        raise ConfigError(f"unknown engine {engine!r}: use auto, opencv or torch")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if engine == "torch" and not hw.torch_installed:
        raise ConfigError("--engine torch: PyTorch is not installed (install the gpu extra: pip install 'superres[gpu]')")
    if device == "cuda":
        if engine in ("auto", "torch") and hw.torch_cuda:
            return EngineChoice("torch", "cuda")
        if engine in ("auto", "opencv") and hw.opencv_cuda:
            return EngineChoice("opencv", "cuda")
        why = {
            "opencv": "this OpenCV build has no CUDA support (the PyPI opencv wheels are CPU-only: "
                      "cv2.cuda.getCudaEnabledDeviceCount() is 0)",
            "torch": "torch.cuda.is_available() is False (no usable NVIDIA GPU or driver)",
        }
        reasons = [why["torch"]] if hw.torch_installed else ["PyTorch is not installed (the gpu extra)"]
        if engine != "torch":
            reasons.append(why["opencv"])
        raise ConfigError("--device cuda: no engine can use a GPU here: " + "; ".join(reasons) + "; run with --device cpu")
    if engine == "torch":
        return EngineChoice("torch", "cuda" if device == "auto" and hw.torch_cuda else "cpu")
    if device == "auto" and engine == "auto" and hw.torch_cuda:
        return EngineChoice("torch", "cuda")
    if device == "auto" and hw.opencv_cuda:
        return EngineChoice("opencv", "cuda")
    if engine == "auto" and fastest_on_cpu == "torch" and hw.torch_installed:
        return EngineChoice("torch", "cpu")
    return EngineChoice("opencv", "cpu")
