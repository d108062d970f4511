"""MATLAB-compatible `imresize(..., 'bicubic')` in numpy: the standard SR degradation.

MATLAB's bicubic is Keys' cubic with a = -0.5; when shrinking it stretches the kernel by 1/scale (antialiasing),
pads by mirroring (symmetric, edge pixel repeated), and resizes along the height first, then the width. For
uint8 input each pass is rounded half away from zero back to uint8, as MATLAB's `imresizemex` keeps the class:
that reproduces the benchmark LR files of Set5/Set14 exactly (tests/test_matlab_resize.py).
`cv2.resize(INTER_CUBIC)` differs on all three points (a = -0.75, no antialiasing), which is why the benchmark
LR images cannot be made with it (../shared/datasets/README.md).
"""

from __future__ import annotations

import math

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def contributions(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out_length, taps) and 0-based source indices (out_length, taps) along one axis, as MATLAB's
    `contributions()`: kernel widened by 1/scale when shrinking, mirrored indices, all-zero tap columns dropped."""
    kernel_width = 4.0
    if scale < 1:
        kernel_width /= scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in 1-based input coordinates
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if scale < 1 else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _resize_axis(image: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    weights, indices = contributions(image.shape[axis], out_length, scale)
    moved = np.moveaxis(image, axis, 0)  # (in_length, ...)
    gathered = moved[indices]  # (out_length, taps, ...)
    w = weights.reshape(weights.shape + (1,) * (moved.ndim - 1))
    return np.moveaxis((gathered * w).sum(axis=1), 0, axis)


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """`imresize(image, scale, 'bicubic')` for a 2-D or H x W x C image. uint8 in gives uint8 out (each pass
    rounded half away from zero and saturated); float in gives float64 out, unclipped."""
    out_h, out_w = math.ceil(image.shape[0] * scale), math.ceil(image.shape[1] * scale)
    as_uint8 = image.dtype == np.uint8
    work = image.astype(np.float64)
    for axis, length in ((0, out_h), (1, out_w)):  # MATLAB: the dimension of smaller scale first; equal: height
        work = _resize_axis(work, axis, length, scale)
        if as_uint8:
            work = np.clip(np.floor(work + 0.5), 0, 255)
    return work.astype(np.uint8) if as_uint8 else work


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left crop whose sides are multiples of `scale` (the benchmark's `HR_modcrop`)."""
    h, w = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:h, :w]
