"""Our own models (fast-xN, quality-xN: trained by `python -m training`, bundled as ONNX files in
models/weights/): in the catalog at their counted cost, served like every other model by every installed
engine through `superres upscale` (tiles = untiled, alpha, 16-bit, gray), and no worse than the floor on Set5."""

import hashlib
import importlib.util
import re
import subprocess

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd
from handler.cli import main
from models.catalog import CATALOG, conv_macs, fsrcnn_layers, get_model
from models.files import BUNDLED_DIR, model_path, model_status
from models.graphdef import read_graphdef
from training.evaluate import y_psnr

OWN = [name for name, spec in CATALOG.items() if spec.bundled]
FAST = [n for n in OWN if n.startswith("fast-")]
ENGINES = ["opencv"] + [e for e, module in (("torch", "torch"), ("onnxruntime", "onnxruntime"))
                        if importlib.util.find_spec(module)]


def onnx_macs(path) -> int:
    """MACs per input pixel counted from the file: every Conv's weight (out x in per group x kh x kw), at LR size."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(n.op_type in ("Conv", "PRelu", "Relu", "Add", "DepthToSpace") for n in model.graph.node)
    return sum(int(np.prod(weights[n.input[1]].shape)) for n in model.graph.node if n.op_type == "Conv")


def pb_macs(path) -> int:
    """The same count for a GSoC .pb: Conv2D filters (kh x kw x in x out) at LR size."""
    graph = read_graphdef(path)
    consts = graph.constants
    total = 0
    for node in graph.nodes:
        if node.op == "Conv2D":
            total += int(np.prod(next(consts[i] for i in node.inputs if i in consts).shape))
        assert node.op != "Conv2DBackpropInput"  # Saafke's FSRCNN exports its deconv as conv + DepthToSpace
    return total


def test_catalog_entries():
    assert sorted(OWN) == ["fast-x2", "fast-x3", "fast-x4", "quality-x2", "quality-x3", "quality-x4"]
    for name in OWN:
        spec = get_model(name)
        assert spec.file_format == "onnx" and spec.filename == f"{name}.onnx" and spec.input_kind == "y"
        assert spec.url == "" and model_path(spec, SHARED_MODELS).parent == BUNDLED_DIR
        fsrcnn = get_model(f"fsrcnn-x{spec.scale}")
        limit = fsrcnn.macs_per_pixel * (1 if name.startswith("fast-") else 10)
        assert spec.macs_per_pixel <= limit, (name, spec.macs_per_pixel, limit)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_macs_are_counted_from_the_layers(scale):
    fsrcnn = get_model(f"fsrcnn-x{scale}")
    assert fsrcnn.macs_per_pixel == conv_macs(fsrcnn_layers(scale)) == pb_macs(SHARED_MODELS / fsrcnn.filename)
    small = get_model(f"fsrcnn-small-x{scale}")
    assert small.macs_per_pixel == pb_macs(SHARED_MODELS / small.filename)
    for name in (n for n in OWN if n.endswith(f"-x{scale}")):
        spec = get_model(name)
        assert spec.macs_per_pixel == onnx_macs(model_path(spec, SHARED_MODELS))


@pytest.mark.parametrize("name", OWN)
def test_bundled_files_are_small_and_verified(name):
    spec = get_model(name)
    path = model_path(spec, SHARED_MODELS)
    data = path.read_bytes()
    assert len(data) == spec.size and hashlib.sha256(data).hexdigest() == spec.sha256
    assert len(data) < 400_000
    assert model_status(spec, SHARED_MODELS) == "ok"
    assert (BUNDLED_DIR / f"{name.split('-')[0]}.md").is_file()  # the model card of its tier


def test_models_commands_know_bundled_models(tmp_path):
    def run(*args):
        result = subprocess.run([*superres_cmd(), "models", *args, "--model-dir", str(tmp_path)], env=cli_env(),
                                capture_output=True, text=True, timeout=120)
        return result.returncode, result.stdout + result.stderr

    code, out = run("pull", "fast-x3")
    assert code == 0 and "bundled" in out and list(tmp_path.iterdir()) == []  # nothing downloaded
    code, out = run("list")
    assert code == 0 and "MACs/px" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("fast-x3 "))
    assert f"{get_model('fast-x3').macs_per_pixel:,}" in row and "ok" in row and "bundled" in row
    code, out = run("verify")  # an empty model dir: the bundled ones are still there and checked
    assert code == 0 and re.search(r"^fast-x3\s+ok", out, re.M)


def _upscale(tmp_path, source, model, *extra) -> np.ndarray:
    out = tmp_path / f"out-{model}-{'-'.join(extra) or 'default'}"
    assert main(["upscale", str(source), "--out", str(out), "--model", model, "--model-dir", str(SHARED_MODELS),
                 *extra]) == 0
    return cv2.imread(str(out / source.name), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("model", ["fast-x3", "quality-x3", "fast-x4"])
def test_every_engine_and_tiles_give_the_same_picture(tmp_path, model):
    scale = get_model(model).scale
    source = DATASETS / "Set5" / "LR_bicubic" / f"X{scale}" / f"butterflyx{scale}.png"
    lr = cv2.imread(str(source))
    whole = {engine: _upscale(tmp_path, source, model, "--engine", engine) for engine in ENGINES}
    for engine, image in whole.items():
        assert image.shape == (lr.shape[0] * scale, lr.shape[1] * scale, 3), engine
        assert np.abs(image.astype(int) - whole["opencv"]).max() <= 1, engine
    for engine in ENGINES:
        tiled = _upscale(tmp_path, source, model, "--engine", engine, "--tile", "40")
        assert np.abs(tiled.astype(int) - whole[engine]).max() <= 1, engine  # seams everywhere, none visible


def test_alpha_sixteen_bit_and_gray(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photo = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X3" / "birdx3.png"))[:40, :50]
    rgba = np.dstack([photo, np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))])
    cv2.imwrite(str(src / "alpha.png"), rgba)
    cv2.imwrite(str(src / "deep.png"), photo.astype(np.uint16) * 257 + 77)
    cv2.imwrite(str(src / "gray.png"), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    out = tmp_path / "out"
    assert main(["upscale", str(src), "--out", str(out), "--model", "fast-x3", "--model-dir", str(SHARED_MODELS)]) == 0
    alpha = cv2.imread(str(out / "alpha.png"), cv2.IMREAD_UNCHANGED)
    assert alpha.shape == (120, 150, 4) and abs(int(alpha[60, 149, 3]) - 255) <= 3 and alpha[60, 0, 3] <= 3
    deep = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (120, 150, 3) and len(np.unique(deep % 257)) > 50
    gray = cv2.imread(str(out / "gray.png"), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (120, 150) and gray.dtype == np.uint8
    # the colour picture's luma and the gray picture agree: the network saw the same Y
    y = cv2.cvtColor(cv2.imread(str(out / "alpha.png")), cv2.COLOR_BGR2GRAY)
    assert np.abs(y.astype(int) - gray).mean() < 2


def _fsrcnn_reference(scale: int) -> float:
    """FSRCNN's Set5 score through OpenCV's own dnn_superres, from the shared README (not copied here)."""
    text = (DATASETS / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| FSRCNN |"))
    return float([c.strip() for c in row.strip("|").split("|")][scale - 1])


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_fast_models_stay_above_the_floor_on_set5(tmp_path, scale):
    """The shipped weights through `superres upscale`: at least 1.5 dB above FSRCNN (issue 14's floor)."""
    lr_dir = DATASETS / "Set5" / "LR_bicubic" / f"X{scale}"
    out = tmp_path / "out"
    assert main(["upscale", str(lr_dir), "--out", str(out), "--model", f"fast-x{scale}",
                 "--model-dir", str(SHARED_MODELS)]) == 0
    scores = []
    for lr_path in sorted(lr_dir.glob("*.png")):
        sr = cv2.imread(str(out / lr_path.name), cv2.IMREAD_UNCHANGED)
        hr = cv2.imread(str(DATASETS / "Set5" / "HR" / lr_path.name.replace(f"x{scale}.png", ".png")))
        scores.append(y_psnr(sr, hr[: sr.shape[0], : sr.shape[1]], scale))
    got = float(np.mean(scores))
    assert got >= _fsrcnn_reference(scale) + 1.5, f"fast-x{scale} Set5: {got:.2f} dB"
