"""The OpenCV engine reproduces cv2.dnn_superres exactly, checks its inputs up front, and picks devices honestly."""

import shutil

import cv2
import numpy as np
import pytest

from conftest import SHARED_MODELS, lr_image
from models.catalog import CATALOG
from models.engines.base import choose_engine
from models.engines.opencv_engine import OpenCVEngine
from pipeline.errors import ConfigError

PRESENT = [s for s in CATALOG.values() if (SHARED_MODELS / s.filename).exists()]


def reference(spec, image):
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(SHARED_MODELS / spec.filename))
    sr.setModel(spec.algorithm, spec.scale)
    return sr.upsample(image)


@pytest.mark.parametrize("spec", PRESENT, ids=lambda s: s.name)
def test_bit_exact_with_dnn_superres_on_colour_and_gray(spec):
    engine = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    colour = lr_image("butterfly", 4)[:37, :41]  # odd sizes on purpose
    gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    for image in (colour, gray):
        ours, theirs = engine.upscale(image), reference(spec, image)
        assert ours.shape == theirs.shape == (image.shape[0] * spec.scale, image.shape[1] * spec.scale) + image.shape[2:]
        assert np.array_equal(ours, theirs), f"max diff {np.abs(ours.astype(int) - theirs).max()}"


def test_sixteen_bit_keeps_depth_and_matches_eight_bit():
    spec = CATALOG["fsrcnn-x2"]
    engine = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    image8 = lr_image("bird", 2)[:50, :60]
    out16 = engine.upscale(image8.astype(np.uint16) * 257)
    assert out16.dtype == np.uint16
    out8 = engine.upscale(image8)
    # same picture, finer steps: within a couple of 8-bit levels everywhere
    diff = np.abs(out16.astype(np.float64) / 257 - out8)
    assert diff.max() < 3.5 and diff.mean() < 0.75  # the 8-bit path rounds to 8 bits twice (YCrCb, output)
    assert len(np.unique(out16 % 257)) > 10  # real 16-bit values, not 8-bit scaled up


def test_one_pixel_image():
    spec = CATALOG["espcn-x3"]
    out = OpenCVEngine(spec, SHARED_MODELS / spec.filename).upscale(np.full((1, 1, 3), 128, np.uint8))
    assert out.shape == (3, 3, 3)


def test_wrong_scale_file_is_a_start_up_error(tmp_path):
    spec = CATALOG["fsrcnn-x3"]
    wrong = tmp_path / spec.filename
    shutil.copy(SHARED_MODELS / "FSRCNN_x2.pb", wrong)  # an x2 file under the x3 name
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        OpenCVEngine(spec, wrong)


def test_bgra_and_float_are_refused_with_a_message():
    spec = CATALOG["fsrcnn-x2"]
    engine = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    with pytest.raises(Exception, match="alpha is split off"):
        engine.upscale(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(Exception, match="not supported"):
        engine.upscale(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize(
    "engine, device, opencv_cuda, expect",
    [
        ("auto", "auto", False, ("opencv", "cpu")),
        ("auto", "cpu", False, ("opencv", "cpu")),
        ("opencv", "auto", True, ("opencv", "cuda")),
        ("auto", "cuda", True, ("opencv", "cuda")),
        ("opencv", "cpu", True, ("opencv", "cpu")),
    ],
)
def test_engine_choice(engine, device, opencv_cuda, expect):
    choice = choose_engine(engine, device, opencv_cuda=opencv_cuda, torch_cuda=None)
    assert (choice.engine, choice.device) == expect


def test_cuda_without_a_cuda_build_is_an_error_never_a_cpu_run():
    with pytest.raises(ConfigError, match="no CUDA support"):
        choose_engine("auto", "cuda", opencv_cuda=False, torch_cuda=None)
