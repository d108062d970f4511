"""A simulated GPU: a test and benchmark double with the engine interface (models/engines/base.py), never a
product engine.

It takes a fixed time per input megapixel (plus a fixed time per call, a kernel launch's worth) while using no
CPU (it sleeps, as a process waiting on a GPU does), returns an image of the right size (a nearest-neighbour
resize by default: what it returns is not the point, that it is the right size and kind is; cubic where the
output's encoding is measured), and batches like a GPU (its
default batch is several tiles). Every call is recorded as (start, end) so that a test or benchmark can say how
busy the engine was: busy seconds / (last end - first start).

In-process: `SimulatedGPU(spec, ms_per_mpx=...)`. In a real process (`superres watch`, `superres worker`):
set SUPERRES_TEST_ENGINE=<this file's path>:load (read only by handler/runtime.py, test-only) and
SIM_GPU_MS_PER_MPX, SIM_GPU_MS_PER_CALL, SIM_GPU_BATCH, SIM_GPU_LOG (a file: one "start end pixels" line per
call, in time.time() seconds, appended and flushed at once so that it survives a SIGTERM or SIGKILL)."""

import os
import threading
import time

import cv2
import numpy as np


class SimulatedGPU:
    name = "sim"
    device = "sim"

    def __init__(self, spec, *, ms_per_mpx: float = 50.0, ms_per_call: float = 0.0, batch: int = 4,
                 log_path: str | None = None, interpolation: int = cv2.INTER_NEAREST):
        self.spec = spec
        self.scale = spec.scale
        self.s_per_px = ms_per_mpx / 1000 / 1e6
        self.s_per_call = ms_per_call / 1000
        self.batch = batch
        self.interpolation = interpolation  # nearest: the least CPU; cubic: outputs that encode like real ones
        self.calls: list[tuple[float, float]] = []  # (start, end), time.time()
        self._lock = threading.Lock()  # a GPU runs one call at a time
        self._log = open(log_path, "a", buffering=1) if log_path else None

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale,
                "precision": "simulated", "ms_per_mpx": self.s_per_px * 1e9, "batch": self.batch}

    def default_batch(self) -> int:
        return self.batch

    def default_tile(self, batch: int) -> int:
        return 512  # a GPU's tile

    def upscale(self, image: np.ndarray) -> np.ndarray:
        return self.upscale_batch([image])[0]

    def upscale_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        pixels = sum(im.shape[0] * im.shape[1] for im in images)
        with self._lock:
            start = time.time()
            time.sleep(self.s_per_call + pixels * self.s_per_px)  # the GPU at work; the CPU is free
            outs = [cv2.resize(im, (im.shape[1] * self.scale, im.shape[0] * self.scale),
                               interpolation=self.interpolation) for im in images]
            end = time.time()
            self.calls.append((start, end))
            if self._log is not None:
                self._log.write(f"{start:.6f} {end:.6f} {pixels}\n")
        return outs


def busy_fraction(calls: list[tuple[float, float]]) -> float:
    """The engine's busy seconds over the span from its first call's start to its last call's end."""
    if not calls:
        return 0.0
    span = max(e for _, e in calls) - min(s for s, _ in calls)
    return sum(e - s for s, e in calls) / span if span > 0 else 1.0


def read_log(path) -> list[tuple[float, float]]:
    calls = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:  # a line cut short by a kill is left out
                calls.append((float(parts[0]), float(parts[1])))
    return calls


def load(settings):
    """The hook's factory: (engine, spec) for the settings' model, configured by the SIM_GPU_* variables."""
    from models.catalog import get_model

    spec = get_model(settings.model)
    engine = SimulatedGPU(spec, ms_per_mpx=float(os.environ.get("SIM_GPU_MS_PER_MPX", "50")),
                          ms_per_call=float(os.environ.get("SIM_GPU_MS_PER_CALL", "0")),
                          batch=int(os.environ.get("SIM_GPU_BATCH", "4")), log_path=os.environ.get("SIM_GPU_LOG"))
    return engine, spec
