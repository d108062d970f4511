"""training.imresize against MATLAB's own output: the benchmark LR files (EDSR's Set5/Set14, made with
`imresize(HR_modcrop, 1/s, 'bicubic')`, ../shared/datasets/README.md) are reproduced from their HR images,
bit for bit: MATLAB rounds to uint8 after each of its two passes, and so does training.imresize."""

import cv2
import numpy as np
import pytest

from conftest import DATASETS
from training.imresize import contributions, cubic, imresize, modcrop


def _pairs(dataset: str, scale: int):
    for hr_path in sorted((DATASETS / dataset / "HR").glob("*.png")):
        lr_path = DATASETS / dataset / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
        read = cv2.imread(str(hr_path), cv2.IMREAD_UNCHANGED), cv2.imread(str(lr_path), cv2.IMREAD_UNCHANGED)
        yield (hr_path.stem, *read)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_lr_files_are_reproduced_exactly(scale):
    for name, hr, lr in _pairs("Set5", scale):
        mine = imresize(modcrop(hr, scale), 1 / scale)
        assert mine.shape == lr.shape and mine.dtype == np.uint8, name
        assert np.array_equal(mine, lr), f"{name} x{scale}: max diff {np.abs(mine.astype(int) - lr).max()}"


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set14_lr_files_are_reproduced_exactly(scale):
    """Set14 too, gray bridge.png included (2-D in, 2-D out)."""
    for name, hr, lr in _pairs("Set14", scale):
        mine = imresize(modcrop(hr, scale), 1 / scale)
        assert mine.shape == lr.shape, name
        assert np.array_equal(mine, lr), f"{name} x{scale}: max diff {np.abs(mine.astype(int) - lr).max()}"


def test_cv2_cubic_is_not_the_standard_degradation():
    """The reason this module exists: OpenCV's cubic (a = -0.75, no antialiasing) is far from the LR files."""
    _, hr, lr = next(_pairs("Set5", 3))
    theirs = cv2.resize(modcrop(hr, 3), (lr.shape[1], lr.shape[0]), interpolation=cv2.INTER_CUBIC)
    assert np.abs(theirs.astype(int) - lr).max() > 20
    assert np.array_equal(imresize(modcrop(hr, 3), 1 / 3), lr)


def test_kernel_and_weights():
    assert cubic(np.array([0.0]))[0] == 1 and cubic(np.array([1.0, 2.0, 2.5])).tolist() == [0, 0, 0]
    assert cubic(np.array([0.5]))[0] == pytest.approx(0.5625)  # a = -0.5: 1.5/8 - 2.5/4 + 1
    weights, indices = contributions(12, 4, 1 / 3)
    assert np.allclose(weights.sum(axis=1), 1)
    assert indices.min() >= 0 and indices.max() <= 11  # mirrored at the edges, never outside
    # upscaling: integer scale puts output pixel centres at (r + 0.5) / s - 0.5 of an input pixel
    weights, indices = contributions(5, 15, 3)
    middle = weights[7]  # output 7 is the centre of input 2: all weight on it
    assert middle[indices[7] == 2].sum() == pytest.approx(1)


def test_float_and_shapes():
    image = np.random.default_rng(0).random((17, 23))
    out = imresize(image, 1 / 3)
    assert out.shape == (6, 8) and out.dtype == np.float64
    assert imresize(np.full((9, 9, 3), 77, np.uint8), 1 / 3).tolist() == np.full((3, 3, 3), 77).tolist()
    assert modcrop(np.zeros((10, 11)), 3).shape == (9, 9)
