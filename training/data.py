"""Training data: HR images from ../shared/datasets/train, LR made the standard way, luma patches.

Degradation: LR = MATLAB `imresize(modcrop(HR), 1/s, 'bicubic')` on the uint8 BGR image (training.imresize),
exactly how the benchmark LR files were made. The network sees what the pipeline feeds it: Y of cv2's YCrCb of
the uint8 LR image, times 1/255; its target is the unrounded Y of the HR image (same BT.601 full-range weights).

A validation split is held out of the training images (every 20th BSDS200 id): design choices are measured on
it, never on the benchmark sets (Set5/Set14/BSD100 are for evaluation only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.imresize import imresize, modcrop

# T91's t65 is a byte-identical copy of t36 (../shared/datasets/train/README.md): kept once.
_DUPLICATES = {"T91/t65.png"}
VALIDATION_EVERY = 20  # every 20th BSDS200 image, in sorted order, is validation (10 of 199)


@dataclass(frozen=True)
class Pair:
    name: str
    lr: np.ndarray  # H x W float32 luma in [0, 1]
    hr: np.ndarray  # sH x sW float32 luma in [0, 1]


def image_list(train_dir: Path) -> tuple[list[Path], list[Path]]:
    """(training, validation) image paths: T91 + BSDS200, validation = every 20th BSDS200 image."""
    t91 = sorted((train_dir / "T91").glob("*.png"))
    bsds = sorted((train_dir / "BSDS200").glob("*.png"))
    if not t91 or not bsds:
        raise FileNotFoundError(f"no T91/ or BSDS200/ PNGs under {train_dir}")
    validation = bsds[::VALIDATION_EVERY]
    training = [p for p in t91 + bsds if p not in validation and f"{p.parent.name}/{p.name}" not in _DUPLICATES]
    return training, validation


def luma(bgr: np.ndarray) -> np.ndarray:
    """Y of YCrCb in [0, 1], unrounded (the pipeline's Y, before its uint8 rounding)."""
    return cv2.cvtColor(bgr.astype(np.float32) / 255.0, cv2.COLOR_BGR2YCrCb)[:, :, 0]


def make_pair(path: Path, scale: int, shrink: float = 1.0) -> Pair:
    """The HR image (first shrunk by `shrink` with the same MATLAB bicubic, for scale augmentation) and its LR."""
    hr_bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if shrink != 1.0:
        hr_bgr = imresize(hr_bgr, shrink)
    hr_bgr = modcrop(hr_bgr, scale)
    lr_bgr = imresize(hr_bgr, 1 / scale)
    lr_y = cv2.cvtColor(lr_bgr, cv2.COLOR_BGR2YCrCb)[:, :, 0].astype(np.float32) * np.float32(1 / 255)
    suffix = "" if shrink == 1.0 else f"@{shrink:g}"
    return Pair(f"{path.parent.name}/{path.stem}{suffix}", lr_y, luma(hr_bgr))


def load_pairs(paths: list[Path], scale: int, shrinks: tuple[float, ...] = (1.0,)) -> list[Pair]:
    """One pair per image and shrink factor: FSRCNN's scale augmentation (each HR image also at 0.9, 0.8, 0.7
    and 0.6 of its size: more, and more varied, texture scales from the same 279 images)."""
    return [make_pair(p, scale, s) for p in paths for s in shrinks]


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square patch (k in 0..7)."""
    if k & 4:
        a = a[:, ::-1]
    return np.rot90(a, k & 3)


class PatchSampler:
    """Random LR/HR luma patch batches, images drawn in proportion to their area, each patch in a random one of
    the 8 flips/rotations. Seeded: the same seed gives the same batches.

    `context` LR pixels along each side of a patch are input only, left out of the loss (mask 0), except where
    that side is the image's own edge: there the network's zero padding is what it will meet in use. Without it
    most of a small patch's loss falls on pixels that see padding where the image goes on (a 32 px patch through
    six 3x3 convolutions: 61 %), which no whole image asks of the network. One side in four is put at the edge
    so the edge is still learned."""

    EDGE_CHANCE = 0.25

    def __init__(self, pairs: list[Pair], scale: int, patch: int, seed: int, context: int = 0):
        usable = [p for p in pairs if min(p.lr.shape) >= patch]
        if not usable:
            raise ValueError(f"no training image is at least {patch} px (LR) on both sides")
        if not 0 <= 2 * context < patch:
            raise ValueError(f"context {context} leaves nothing of a {patch} px patch to learn from")
        self.pairs, self.scale, self.patch, self.context = usable, scale, patch, context
        areas = np.array([(p.lr.shape[0] - patch + 1) * (p.lr.shape[1] - patch + 1) for p in usable], np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def _start(self, length: int) -> tuple[int, int, int]:
        """(start, first, end): the window's start in the image, and the part of it in the loss."""
        p, c, last = self.patch, self.context, length - self.patch
        start = int(self.rng.integers(0, last + 1))
        if c and self.rng.random() < self.EDGE_CHANCE:
            start = 0 if self.rng.random() < 0.5 else last
        return start, 0 if start == 0 else c, p if start == last else p - c

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lr, hr, mask): N x 1 x p x p, N x 1 x sp x sp, and the HR pixels in the loss (1) or not (0)."""
        s, p = self.scale, self.patch
        lrs = np.empty((size, 1, p, p), np.float32)
        hrs = np.empty((size, 1, p * s, p * s), np.float32)
        masks = np.zeros((size, 1, p * s, p * s), np.float32)
        for i, index in enumerate(self.rng.choice(len(self.pairs), size=size, p=self.weights)):
            pair = self.pairs[index]
            y, top, bottom = self._start(pair.lr.shape[0])
            x, left, right = self._start(pair.lr.shape[1])
            k = int(self.rng.integers(0, 8))
            mask = np.zeros((p * s, p * s), np.float32)
            mask[top * s:bottom * s, left * s:right * s] = 1
            lrs[i, 0] = _dihedral(pair.lr[y:y + p, x:x + p], k)
            hrs[i, 0] = _dihedral(pair.hr[y * s:(y + p) * s, x * s:(x + p) * s], k)
            masks[i, 0] = _dihedral(mask, k)
        return lrs, hrs, masks


def psnr(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """PSNR in dB of two [0, 1] images after shaving `border` pixels each side."""
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")
