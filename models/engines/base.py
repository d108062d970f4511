"""The engine interface and device selection.

Contract: `upscale(image)` takes HxW (gray) or HxWx3 (BGR), uint8 or uint16, and returns the same kind
`scale` times larger, computed exactly as OpenCV's `dnn_superres` would for that model. Alpha, tiling and
formats are the pipeline's business, not the engine's.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.errors import ConfigError


ENGINES = ("auto", "opencv", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")


class Engine(Protocol):
    name: str  # "opencv" | "onnxruntime" | "torch"
    device: str  # "cpu" | "cuda"
    scale: int

    def upscale(self, image: np.ndarray) -> np.ndarray: ...

    def upscale_batch(self, images: list[np.ndarray]) -> list[np.ndarray]: ...

    def default_batch(self) -> int: ...

    def default_tile(self, batch: int) -> int: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    device: str
    note: str = ""  # why a GPU that is present is not used (said as a warning at start-up), else ""


@dataclass(frozen=True)
class Hardware:
    """What this process can use. `torch_installed` False: the CPU image, without the gpu extra.
    `onnxruntime_cuda`: the onnxruntime build has the CUDA provider (onnxruntime-gpu) and a driver is present.
    `gpu_present`: an NVIDIA driver is there (/dev/nvidiactl), whether or not an engine can use it."""

    opencv_cuda: bool
    torch_installed: bool
    torch_cuda: bool
    onnxruntime_installed: bool = False
    onnxruntime_cuda: bool = False
    gpu_present: bool = False

    def installed(self, engine: str) -> bool:
        return {"opencv": True, "torch": self.torch_installed, "onnxruntime": self.onnxruntime_installed}[engine]

    def cuda(self, engine: str) -> bool:
        return {"opencv": self.opencv_cuda, "torch": self.torch_cuda, "onnxruntime": self.onnxruntime_cuda}[engine]


# auto on a GPU: torch first (channels-last fp16/bf16, its OOM handling), then onnxruntime (CUDA/TensorRT), then
# OpenCV's CUDA backend (a source build only). The GPU order is not measured here (no GPU): bench/gpu_check.sh.
GPU_ORDER = ("torch", "onnxruntime", "opencv")
_NOT_INSTALLED = {
    "torch": "PyTorch is not installed (install the gpu extra: pip install 'superres[gpu]')",
    "onnxruntime": "onnxruntime is not installed (pip install onnxruntime)",
}
_NO_CUDA = {
    "opencv": "this OpenCV build has no CUDA support (the PyPI opencv wheels are CPU-only: "
              "cv2.cuda.getCudaEnabledDeviceCount() is 0)",
    "torch": "torch.cuda.is_available() is False (no usable NVIDIA GPU or driver)",
    "onnxruntime": "onnxruntime has no CUDA execution provider here (the CPU wheel 'onnxruntime', or no NVIDIA "
                   "driver; for CUDA, install 'onnxruntime-gpu' in its place)",
}


# A run known to need less engine work than this (GMAC: input pixels x the model's MACs per pixel) finishes first
# on OpenCV's engine: its library is loaded anyway (decoding), while onnxruntime's import, session and first run
# take ~40 ms more and win back ~12 ms per GMAC on FSRCNN-sized convolutions, 2-5 on EDSR's (docs/benchmarks.md).
SMALL_RUN_GMAC = 2.0
QUICKEST_TO_START = "opencv"


def choose_engine(engine: str, device: str, hw: Hardware, *,
                  fastest_on_cpu: str | tuple[str, ...] = "opencv", work_gmac: float | None = None,
                  precision: str = "auto") -> EngineChoice:
    """Pure selection rules. Never a silent CPU run: asking for cuda where nothing can use a GPU is a ConfigError,
    and auto on a machine with a GPU that no installed engine can use says why (`EngineChoice.note`).

    auto picks CUDA when a GPU is usable (`GPU_ORDER`). On a CPU it weighs what the user will wait for, end to
    end: the first installed engine of the model's measured order (`ModelSpec.fastest_cpu_engine`: one name or
    several, fastest first), except for a run whose whole engine work is known before the engine loads
    (`work_gmac`: a one-shot of a few small files) and is under SMALL_RUN_GMAC: that one is over before the
    faster engine has paid for its start. The engines differ by at most a rounding level on a few pixels; the
    ledger counts either's output as the result for that input and settings. bf16 on a CPU: torch's engine, the
    one that computes it.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: use {', '.join(ENGINES[:-1])} or {ENGINES[-1]}")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if engine != "auto" and not hw.installed(engine):
        raise ConfigError(f"--engine {engine}: {_NOT_INSTALLED[engine]}")
    candidates = GPU_ORDER if engine == "auto" else (engine,)
    if device in ("auto", "cuda"):
        for name in candidates:
            if hw.installed(name) and hw.cuda(name):
                return EngineChoice(name, "cuda")
    reasons = [_NO_CUDA[name] if hw.installed(name) else _NOT_INSTALLED[name] for name in candidates]
    if device == "cuda":
        raise ConfigError("--device cuda: no engine can use a GPU here: " + "; ".join(reasons) + "; run with --device cpu")
    note = ""
    if device == "auto" and hw.gpu_present:
        note = "a GPU is present but not used: " + "; ".join(reasons)
    if engine != "auto":
        return EngineChoice(engine, "cpu", note)
    if precision == "bf16":
        if not hw.installed("torch"):
            raise ConfigError(f"precision bf16 on the CPU needs torch's engine: {_NOT_INSTALLED['torch']}")
        return EngineChoice("torch", "cpu", note)
    if work_gmac is not None and work_gmac < SMALL_RUN_GMAC and precision in ("auto", "fp32"):
        return EngineChoice(QUICKEST_TO_START, "cpu", note)
    order = (fastest_on_cpu,) if isinstance(fastest_on_cpu, str) else tuple(fastest_on_cpu)
    pick = next((name for name in order if name in ENGINES[1:] and hw.installed(name)), "opencv")
    return EngineChoice(pick, "cpu", note)
