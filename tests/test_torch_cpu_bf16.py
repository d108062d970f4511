"""bf16 on the CPU (torch engine, opt-in): chosen only where the CPU computes bf16 natively (AVX512-BF16 or AMX on
x86, BF16 on ARM), a one-line ConfigError elsewhere; on a real image through real graphs, within measured bounds
of the same engine in fp32. The numeric tests need such a CPU (this machine's AMD EPYC and CI's have
avx512_bf16); elsewhere they skip and say why."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, SHARED_MODELS, cli_env, lr_image, superres_cmd  # noqa: E402
from edsr_graph import build_edsr_graph  # noqa: E402
from models import engines  # noqa: E402
from models.catalog import CATALOG  # noqa: E402
from models.engines import torch_engine  # noqa: E402
from models.engines.torch_engine import TorchEngine, cpu_has_native_bf16  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402

native = pytest.mark.skipif(not cpu_has_native_bf16(),
                            reason="this CPU has no native bf16 (AVX512-BF16/AMX or ARM BF16): bf16 is refused here")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float]:
    """max and mean |a - b| in levels, and the PSNR of one against the other."""
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    diff = np.abs(a.astype(np.int64) - b)
    return int(diff.max()), float(diff.mean()), psnr(a, b)


def settings(**values):
    return load_settings(model_dir=SHARED_MODELS, device="cpu", **values)


# -- which precision, where --------------------------------------------------------------------------------


@native
def test_bf16_on_a_cpu_with_native_bf16_builds_a_bf16_channels_last_module():
    engine, _ = engines.load_engine(settings(model="espcn-x3", engine="torch", precision="bf16"))
    assert isinstance(engine, TorchEngine)
    assert engine.describe()["precision"] == "bf16" and engine.describe()["device"] == "cpu"
    weights = [p for p in engine._module.parameters() if p.dim() == 4]
    assert weights and all(p.dtype == torch.bfloat16 for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    out = engine.forward(engine.probe_blob(16))
    assert out.dtype == np.float32 and out.shape == (1, 1, 48, 48)  # back in float32 for the colour code


def test_bf16_where_the_cpu_lacks_it_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(torch_engine, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"needs native bf16 .* use --precision fp32"):
        engines.load_engine(settings(model="espcn-x3", engine="torch", precision="bf16"))
    # the CLI, a real process with the same check answering no: exit 2, the reason on one line, no traceback
    lacking = ("import sys; import models.engines.torch_engine as t; t.cpu_has_native_bf16 = lambda: False; "
               "from handler.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", lacking, "info", "--model", "espcn-x3", "--engine", "torch",
                             "--device", "cpu", "--precision", "bf16"], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("superres: error: precision bf16 on the CPU needs native bf16")
    assert len(result.stderr.strip().splitlines()) == 1 and "--precision fp32" in result.stderr


def test_fp16_on_the_cpu_stays_refused_and_auto_stays_fp32():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        engines.load_engine(settings(model="espcn-x3", engine="torch", precision="fp16"))
    engine, _ = engines.load_engine(settings(model="espcn-x3", engine="torch", precision="auto"))
    assert engine.describe()["precision"] == "fp32"
    assert all(p.dtype == torch.float32 for p in engine._module.parameters())


@pytest.mark.parametrize("engine", ["opencv", "onnxruntime"])
def test_the_other_engines_refuse_bf16_and_name_the_one_that_has_it(engine):
    with pytest.raises(ConfigError, match=f"--engine {engine}: precision bf16 is not supported.*--engine torch"):
        engines.load_engine(settings(model="espcn-x3", engine=engine, precision="bf16"))


def test_opencv_refuses_fp16_rather_than_run_fp32_silently():
    with pytest.raises(ConfigError, match="--engine opencv: precision fp16 is not supported"):
        engines.load_engine(settings(model="espcn-x3", engine="opencv", precision="fp16"))


# -- numerics: bf16 against fp32 of the same engine, real images -----------------------------------------
# Measured on this machine (AMD EPYC, avx512_bf16), bf16 vs fp32: EDSR-structured B2 C64 on a Set5 baby x2 crop
# max 1 level, mean 0.13, 57.0 dB; ESPCN-x3 (Y in 0..1: bf16 keeps 8 bits, about 1/256 near white) on the five
# Set5 x3 images max 2-3, mean 0.22-0.31, 53.2-54.8 dB. Broken paths, measured: NHWC memory read as NCHW gives
# mean 37.7 levels (13.5 dB); EDSR's output left in bf16 through the mean added back, mean 0.235 and 54.4 dB;
# no conversion back to float32, a TypeError. The EDSR bounds catch all three; the rounding is round-to-nearest
# and the sums float32 on every oneDNN bf16 kernel, so another such CPU lands close to the same numbers.


@native
def test_bf16_edsr_structured_graph_on_a_real_photo_is_close_to_fp32(tmp_path):
    spec = CATALOG["edsr-x2"]
    path = tmp_path / spec.filename
    build_edsr_graph(path, scale=2, blocks=2, channels=64, seed=0, quantized=True)
    image = lr_image("baby", 2)[:96, :128]
    fp32 = TorchEngine(spec, path).upscale(image)
    bf16 = TorchEngine(spec, path, precision="bf16").upscale(image)
    worst, mean, db = levels(bf16, fp32)
    print(f"EDSR-structured B2 C64, baby x2 crop: max {worst}, mean {mean:.3f}, {db:.1f} dB")
    assert worst <= 2 and mean <= 0.2 and db >= 55
    assert mean > 0  # it really ran in bf16: fp32 throughout would be identical


@native
@pytest.mark.parametrize("name", ["baby", "bird", "butterfly", "head", "woman"])
def test_bf16_espcn_on_set5_is_close_to_fp32(name):
    spec = CATALOG["espcn-x3"]
    image = lr_image(name, 3)
    fp32 = TorchEngine(spec, SHARED_MODELS / spec.filename).upscale(image)
    bf16 = TorchEngine(spec, SHARED_MODELS / spec.filename, precision="bf16").upscale(image)
    worst, mean, db = levels(bf16, fp32)
    print(f"espcn-x3 {name}: max {worst}, mean {mean:.3f}, {db:.1f} dB")
    assert worst <= 4 and mean <= 0.4 and db >= 51
    assert mean > 0


@native
def test_superres_upscale_in_bf16_as_a_real_process(tmp_path):
    """`superres upscale --engine torch --precision bf16`: exit 0, the engine logged as bf16, the file equal to
    the in-process bf16 engine's output."""
    src = tmp_path / "birdx3.png"
    image = lr_image("bird", 3)
    cv2.imwrite(str(src), image)
    result = subprocess.run([*superres_cmd(), "upscale", str(src), "--out", str(tmp_path / "out"), "--model",
                             "espcn-x3", "--engine", "torch", "--device", "cpu", "--precision", "bf16", "-v"],
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ready = [line for line in result.stderr.splitlines() if "engine ready" in line]
    assert len(ready) == 1 and "engine=torch" in ready[0] and "precision=bf16" in ready[0]
    written = cv2.imread(str(tmp_path / "out" / "birdx3.png"), cv2.IMREAD_UNCHANGED)
    spec = CATALOG["espcn-x3"]
    expected = TorchEngine(spec, SHARED_MODELS / spec.filename, precision="bf16").upscale(image)
    assert np.array_equal(written, expected)


@native
def test_evaluate_with_a_precision_runs_the_torch_engine_and_bf16_costs_little():
    """`python -m training evaluate --precision`: measured on Set5 x3, espcn-x3 30.527 dB in fp32 (OpenCV
    30.527), 30.524 in bf16."""
    from conftest import DATASETS
    from training.evaluate import evaluate

    scores = {p: evaluate("espcn-x3", 3, DATASETS, SHARED_MODELS, sets=("Set5",), precision=p)["Set5"]
              for p in (None, "fp32", "bf16")}
    print(scores)
    assert 30 < scores[None] < 31
    assert abs(scores["fp32"] - scores[None]) < 0.01  # torch fp32 is within a level of OpenCV
    assert scores["bf16"] != scores["fp32"] and abs(scores["fp32"] - scores["bf16"]) < 0.05  # bf16 did run
