"""Y-PSNR of models on the benchmark sets (Set5, Set14, BSD100), the standard way: LR files from
../shared/datasets, the whole LR image through the engine (our dnn_superres pre/post-processing), Y = BT.601 as
MATLAB's rgb2ycbcr (gray: the gray value), `scale` pixels shaved at each border, mean over the images.

"bicubic" is MATLAB-style bicubic upscaling (training.imresize), which reproduces the literature's baselines.
GSoC `.pb` models run in the OpenCV engine (as ../shared/datasets/README.md's reference numbers), ONNX models
in the torch engine's lowering; with a `precision` (fp32, bf16) every model runs in the torch engine on the CPU
at that precision, to measure what bf16 costs. For evaluation only: nothing here feeds back into training.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from training.imresize import imresize

SETS = ("Set5", "Set14", "BSD100")


def y_channel(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image.astype(np.float64)
    b, g, r = (image[:, :, i].astype(np.float64) for i in range(3))
    return 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255


def y_psnr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    a = y_channel(sr)[border:-border, border:-border]
    b = y_channel(hr)[border:-border, border:-border]
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def benchmark_pairs(datasets: Path, name: str, scale: int):
    """(LR, HR cropped to s x LR) uint8 images of one set, in file order."""
    for lr_path in sorted((datasets / name / "LR_bicubic" / f"X{scale}").glob("*.png")):
        lr = cv2.imread(str(lr_path), cv2.IMREAD_UNCHANGED)
        hr = cv2.imread(str(datasets / name / "HR" / lr_path.name.replace(f"x{scale}.png", ".png")),
                        cv2.IMREAD_UNCHANGED)
        yield lr, hr[: lr.shape[0] * scale, : lr.shape[1] * scale]


def make_upscaler(model: str, scale: int, shared_models: Path, weights_dir: Path | None = None,
                  precision: str | None = None):
    """A function uint8 image -> upscaled uint8 image, for a catalog name or "bicubic"; `precision`: the torch
    engine at that precision for every model (None: OpenCV for `.pb` files, torch fp32 for ONNX)."""
    if model == "bicubic":
        return lambda image: imresize(image, scale)
    from models.catalog import get_model
    from models.files import model_path

    spec = get_model(model)
    if spec.file_format == "onnx" or precision:
        from models.engines.torch_engine import TorchEngine

        if spec.file_format == "onnx":
            path = (weights_dir / spec.filename) if weights_dir else model_path(spec, shared_models)
            spec = replace(spec, bundled=False)
        else:
            path = shared_models / spec.filename
        return TorchEngine(spec, path, precision=precision or "fp32").upscale
    from models.engines.opencv_engine import OpenCVEngine

    return OpenCVEngine(spec, shared_models / spec.filename).upscale


def evaluate(model: str, scale: int, datasets: Path, shared_models: Path, weights_dir: Path | None = None,
             sets: tuple[str, ...] = SETS, precision: str | None = None) -> dict[str, float]:
    upscale = make_upscaler(model, scale, shared_models, weights_dir, precision)
    return {name: float(np.mean([y_psnr(upscale(lr), hr, scale) for lr, hr in benchmark_pairs(datasets, name, scale)]))
            for name in sets}
