"""The OpenCV engine reproduces cv2.dnn_superres exactly, checks its inputs up front, and picks devices honestly."""

import os
import re
import shutil

import cv2
import numpy as np
import pytest

from conftest import SHARED_MODELS, lr_image
from models.catalog import CATALOG
from models.engines.base import EngineChoice, Hardware, choose_engine
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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_one_call_conversion_rounds_and_saturates_as_numpy_does(dtype):
    from models.engines.dnn_superres_io import scaled_to_uint, to_uint

    maxval = np.float32(np.iinfo(dtype).max)
    # every k + 0.5 level (ties: half to even), the floats either side of them, and values past both ends
    levels = np.arange(-3, int(maxval) + 4, 1 if dtype == np.uint8 else 37, dtype=np.float64)
    ties = ((levels + 0.5) / float(maxval)).astype(np.float32)
    near = np.concatenate([np.nextafter(ties, np.float32(-2)), ties, np.nextafter(ties, np.float32(2))])
    noise = np.random.default_rng(7).uniform(-0.25, 1.25, 50_000).astype(np.float32)
    for values in (near.reshape(3, -1), noise.reshape(250, 200)):
        expected = to_uint(values * maxval, dtype)
        got = scaled_to_uint(values, maxval, dtype)
        assert got.dtype == dtype and got.shape == values.shape
        assert np.array_equal(got, expected), f"{int((got != expected).sum())} values differ"


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


NONE = Hardware(opencv_cuda=False, torch_installed=False, torch_cuda=False)  # the CPU image
TORCH_CPU = Hardware(opencv_cuda=False, torch_installed=True, torch_cuda=False)
GPU = Hardware(opencv_cuda=False, torch_installed=True, torch_cuda=True)
OPENCV_CUDA = Hardware(opencv_cuda=True, torch_installed=False, torch_cuda=False)


@pytest.mark.parametrize(
    "engine, device, hw, expect",
    [
        ("auto", "auto", NONE, ("opencv", "cpu")),
        ("auto", "cpu", NONE, ("opencv", "cpu")),
        ("auto", "auto", TORCH_CPU, ("opencv", "cpu")),
        ("torch", "auto", TORCH_CPU, ("torch", "cpu")),
        ("torch", "cpu", GPU, ("torch", "cpu")),
        ("auto", "auto", GPU, ("torch", "cuda")),
        ("auto", "cuda", GPU, ("torch", "cuda")),
        ("auto", "cpu", GPU, ("opencv", "cpu")),
        ("opencv", "auto", GPU, ("opencv", "cpu")),
        ("opencv", "auto", OPENCV_CUDA, ("opencv", "cuda")),
        ("auto", "cuda", OPENCV_CUDA, ("opencv", "cuda")),
    ],
)
def test_engine_choice(engine, device, hw, expect):
    choice = choose_engine(engine, device, hw)
    assert (choice.engine, choice.device) == expect


@pytest.mark.parametrize(
    "engine, device, hw, expect",
    [
        ("auto", "auto", TORCH_CPU, ("torch", "cpu")),  # measured faster for this model, and installed
        ("auto", "cpu", TORCH_CPU, ("torch", "cpu")),
        ("auto", "auto", NONE, ("opencv", "cpu")),  # the CPU image: no torch
        ("opencv", "auto", TORCH_CPU, ("opencv", "cpu")),  # asked for
        ("auto", "auto", GPU, ("torch", "cuda")),
    ],
)
def test_auto_on_a_cpu_takes_the_models_fastest_installed_engine(engine, device, hw, expect):
    choice = choose_engine(engine, device, hw, fastest_on_cpu="torch")
    assert (choice.engine, choice.device) == expect


@pytest.mark.parametrize(
    "engine, device, hw, words",
    [
        ("auto", "cuda", NONE, "PyTorch is not installed"),
        ("auto", "cuda", TORCH_CPU, "torch.cuda.is_available() is False"),
        ("opencv", "cuda", GPU, "no CUDA support"),
        ("torch", "cuda", OPENCV_CUDA, "not installed"),
        ("torch", "auto", NONE, "install the gpu extra"),
    ],
)
def test_cuda_without_a_usable_gpu_is_an_error_never_a_cpu_run(engine, device, hw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        choose_engine(engine, device, hw)


# ---- onnxruntime in the selection rules ---------------------------------------------------------------------


ORT_CPU = Hardware(opencv_cuda=False, torch_installed=False, torch_cuda=False, onnxruntime_installed=True)
ORT_AND_TORCH_CPU = Hardware(opencv_cuda=False, torch_installed=True, torch_cuda=False, onnxruntime_installed=True)
ORT_CUDA = Hardware(opencv_cuda=False, torch_installed=False, torch_cuda=False, onnxruntime_installed=True,
                    onnxruntime_cuda=True, gpu_present=True)
ALL_CUDA = Hardware(opencv_cuda=False, torch_installed=True, torch_cuda=True, onnxruntime_installed=True,
                    onnxruntime_cuda=True, gpu_present=True)
GPU_UNUSABLE = Hardware(opencv_cuda=False, torch_installed=False, torch_cuda=False, onnxruntime_installed=True,
                        gpu_present=True)  # a driver, but the CPU wheels


@pytest.mark.parametrize(
    "engine, device, hw, expect",
    [
        ("onnxruntime", "auto", ORT_CPU, ("onnxruntime", "cpu")),
        ("onnxruntime", "auto", ORT_CUDA, ("onnxruntime", "cuda")),
        ("onnxruntime", "cpu", ORT_CUDA, ("onnxruntime", "cpu")),
        ("auto", "auto", ORT_CUDA, ("onnxruntime", "cuda")),  # no torch: onnxruntime is the GPU path
        ("auto", "cuda", ORT_CUDA, ("onnxruntime", "cuda")),
        ("auto", "auto", ALL_CUDA, ("torch", "cuda")),  # torch first on a GPU
        ("onnxruntime", "cuda", ALL_CUDA, ("onnxruntime", "cuda")),
        ("auto", "cpu", ALL_CUDA, ("onnxruntime", "cpu")),
        ("auto", "auto", ORT_AND_TORCH_CPU, ("onnxruntime", "cpu")),
    ],
)
def test_onnxruntime_choices(engine, device, hw, expect):
    choice = choose_engine(engine, device, hw, fastest_on_cpu="onnxruntime")
    assert (choice.engine, choice.device) == expect and choice.note == ""


@pytest.mark.parametrize(
    "engine, device, hw, words",
    [
        ("onnxruntime", "auto", NONE, "onnxruntime is not installed"),
        ("onnxruntime", "cuda", ORT_CPU, "onnxruntime has no CUDA execution provider"),
        ("auto", "cuda", ORT_CPU, "onnxruntime has no CUDA execution provider"),
        ("auto", "cuda", GPU_UNUSABLE, "run with --device cpu"),
        ("tensorrt", "auto", ORT_CUDA, "unknown engine"),
    ],
)
def test_onnxruntime_on_cuda_without_its_provider_is_an_error(engine, device, hw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        choose_engine(engine, device, hw, fastest_on_cpu="onnxruntime")


def test_a_present_gpu_that_nothing_can_use_is_said_not_silently_skipped():
    choice = choose_engine("auto", "auto", GPU_UNUSABLE, fastest_on_cpu="onnxruntime")
    assert (choice.engine, choice.device) == ("onnxruntime", "cpu")
    assert "GPU is present but not used" in choice.note and "onnxruntime-gpu" in choice.note
    assert choose_engine("auto", "cpu", GPU_UNUSABLE).note == ""  # asked for the CPU: nothing to say


def test_the_catalogs_cpu_choice_is_onnxruntime_unless_the_run_is_known_small():
    """docs/benchmarks.md: onnxruntime is the fastest installed engine end to end on the catalog's graphs; torch is
    never picked on a CPU for fp32. A run known to be small (a one-shot of a few small files) is over before
    onnxruntime has paid for its start: OpenCV's engine. A long-running mode knows no size: onnxruntime."""
    from models.engines.base import SMALL_RUN_GMAC

    for spec in CATALOG.values():
        def pick(**kw):
            return choose_engine("auto", "auto", ORT_AND_TORCH_CPU, fastest_on_cpu=spec.fastest_cpu_engine, **kw).engine
        assert pick() == "onnxruntime", spec.name
        assert pick(work_gmac=SMALL_RUN_GMAC) == "onnxruntime" and pick(work_gmac=SMALL_RUN_GMAC / 2) == "opencv"
        assert pick(work_gmac=0.0, precision="fp32") == "opencv"
        assert choose_engine("auto", "auto", NONE, fastest_on_cpu=spec.fastest_cpu_engine).engine == "opencv"


def test_a_small_run_still_gets_the_engine_asked_for_and_a_usable_gpu():
    assert choose_engine("onnxruntime", "auto", ORT_CPU, work_gmac=0.01) == EngineChoice("onnxruntime", "cpu")
    assert choose_engine("auto", "auto", ALL_CUDA, fastest_on_cpu="onnxruntime", work_gmac=0.01).device == "cuda"


def test_bf16_on_a_cpu_goes_to_torch_whatever_the_size_of_the_run():
    for work in (None, 0.01, 100.0):
        assert choose_engine("auto", "cpu", ORT_AND_TORCH_CPU, fastest_on_cpu="onnxruntime", work_gmac=work,
                             precision="bf16") == EngineChoice("torch", "cpu")
    with pytest.raises(ConfigError, match="bf16 on the CPU needs torch"):
        choose_engine("auto", "cpu", ORT_CPU, fastest_on_cpu="onnxruntime", precision="bf16")


_OPENCV_POOL_PROBE = """
import sys
import cv2
from models.engines import load_engine
from pipeline.settings import load_settings
before = cv2.getNumThreads()
load_engine(load_settings(model="fsrcnn-small-x2", model_dir=sys.argv[2], engine=sys.argv[1], device="cpu"))
print(before, cv2.getNumThreads())
"""


@pytest.mark.parametrize("engine, pool_kept", [("onnxruntime", False), ("opencv", True)])
def test_opencvs_thread_pool_is_left_to_opencvs_own_engine(engine, pool_kept):
    """On a CPU, OpenCV's pool only serves the network where OpenCV's DNN is the engine; with another engine its
    spinning threads would take the cores from the network and the stages."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _OPENCV_POOL_PROBE, engine, str(SHARED_MODELS)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)
    before, after = map(int, done.stdout.split())
    assert after == (before if pool_kept else 1)
