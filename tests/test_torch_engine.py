"""The torch engine: weights read from the .pb files by models.graphdef (no TensorFlow), output matching the
OpenCV engine (itself bit-exact with cv2.dnn_superres) on real images, for every shared model and for an
EDSR-structured graph with quint8 + Dequantize weights. CPU, fp32."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cv2
from conftest import DATASETS, SHARED_MODELS
from edsr_graph import (DT_FLOAT, GraphWriter, attr_ints, attr_s, attr_type, build_edsr_graph, edsr_weights,
                        quantize_min_first)
from edsr_graph import dequantize_min_first as opencv_dequantize
from models.catalog import CATALOG
from models.engines.opencv_engine import OpenCVEngine
from models.engines.torch_engine import TorchEngine, _same_pads, build_module, torch_has_cuda
from models.graphdef import GraphDefError, dequantize_min_first, parse_graphdef, read_graphdef
from pipeline.errors import ConfigError, InputRejected

PRESENT = [s for s in CATALOG.values() if (SHARED_MODELS / s.filename).exists()]
SET5 = ["baby", "bird", "butterfly", "head", "woman"]
MAX_LEVELS = 1  # float32 differences (~1e-6) only ever flip a rounding: one level, never two


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def compare(ours: np.ndarray, theirs: np.ndarray, peak: float = 255.0) -> tuple[int, float]:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    return int(np.abs(ours.astype(np.int64) - theirs).max()), psnr(ours, theirs, peak)


def lr(name: str, scale: int, dataset: str = "Set5") -> np.ndarray:
    scale = min(scale, 4)  # the sets have X2..X4 LR files; x8 models get the X4 ones
    path = DATASETS / dataset / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def engines(spec, path=None):
    path = path or SHARED_MODELS / spec.filename
    return TorchEngine(spec, path), OpenCVEngine(spec, path)


@pytest.mark.parametrize("spec", PRESENT, ids=lambda s: s.name)
def test_matches_opencv_engine_on_real_images(spec):
    torch_engine, opencv_engine = engines(spec)
    i = PRESENT.index(spec)
    colour = lr(SET5[i % 5], spec.scale)[:60, 3:53]  # 60x50 colour crop of a Set5 LR image (all are >= 64x57)
    gray = lr("bridge", spec.scale, "Set14")[20:57, 30:71]  # Set14 bridge is single-channel; odd sizes
    assert colour.shape == (60, 50, 3) and gray.shape == (37, 41)
    for image in (colour, gray):
        ours, theirs = torch_engine.upscale(image), opencv_engine.upscale(image)
        assert ours.shape == (image.shape[0] * spec.scale, image.shape[1] * spec.scale) + image.shape[2:]
        levels, db = compare(ours, theirs)
        print(f"{spec.name} {'colour' if image.ndim == 3 else 'gray'}: max |torch - opencv| = {levels}, "
              f"PSNR {db:.1f} dB, {np.mean(ours != theirs):.2e} of values differ")
        assert db >= 50 and levels <= MAX_LEVELS


@pytest.mark.parametrize("name", ["fsrcnn-x2", "espcn-x3", "lapsrn-x4"])
def test_sixteen_bit_stays_sixteen_bit_and_matches_opencv(name):
    spec = CATALOG[name]
    torch_engine, opencv_engine = engines(spec)
    colour = lr("bird", spec.scale)[:40, :36].astype(np.uint16) * 257 + 123  # real 16-bit values
    gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    for image in (colour, gray):
        ours, theirs = torch_engine.upscale(image), opencv_engine.upscale(image)
        assert ours.dtype == np.uint16
        levels, db = compare(ours, theirs, 65535.0)
        assert db >= 50 and levels <= MAX_LEVELS  # in 16-bit levels
        assert len(np.unique(ours % 257)) > 10  # real 16-bit output, not 8-bit scaled up


@pytest.mark.parametrize("name", ["fsrcnn-small-x3", "espcn-x4", "lapsrn-x4", "lapsrn-x8"])
def test_one_pixel_image(name):
    spec = CATALOG[name]
    torch_engine, opencv_engine = engines(spec)
    for image in (np.full((1, 1, 3), (30, 128, 220), np.uint8), np.full((1, 1), 77, np.uint8)):
        ours = torch_engine.upscale(image)
        assert ours.shape == (spec.scale, spec.scale) + image.shape[2:]
        assert compare(ours, opencv_engine.upscale(image))[0] <= MAX_LEVELS


def test_batch_equals_one_by_one():
    spec = CATALOG["espcn-x2"]
    engine = TorchEngine(spec, SHARED_MODELS / spec.filename)
    tiles = [lr(name, 2)[:24, :32] for name in SET5[:3]]
    for batched, single in zip(engine.upscale_batch(tiles), tiles):
        assert np.array_equal(batched, engine.upscale(single))


# ---- the GraphDef reader --------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", ["FSRCNN_x3.pb", "FSRCNN-small_x2.pb", "ESPCN_x4.pb", "LapSRN_x2.pb"])
def test_graphdef_conv_weights_are_those_opencv_loads(filename):
    graph = read_graphdef(SHARED_MODELS / filename)
    cv2.dnn_superres.DnnSuperResImpl_create()  # registers DepthToSpace with cv2.dnn
    net = cv2.dnn.readNetFromTensorflow(str(SHARED_MODELS / filename))
    convs = [n for n in graph.nodes if n.op == "Conv2D"]
    checked = 0
    for name in net.getLayerNames():
        layer = net.getLayer(net.getLayerId(name))
        if layer.type != "Convolution":
            continue
        node = graph.node(name)
        assert node.op == "Conv2D" and node.attrs["padding"] == "SAME" and node.attrs["strides"] == [1, 1, 1, 1]
        hwio = graph.constants[node.data_inputs[1]]
        oihw = layer.blobs[0]
        assert hwio.dtype == np.float32 and hwio.transpose(3, 2, 0, 1).shape == oihw.shape
        assert np.array_equal(hwio.transpose(3, 2, 0, 1), oihw)
        checked += 1
    assert checked == len(convs) > 0


def test_graphdef_reader_decodes_nodes_attrs_and_constants():
    graph = read_graphdef(SHARED_MODELS / "LapSRN_x4.pb")
    ops = {n.op for n in graph.nodes}
    assert {"Placeholder", "Const", "Conv2D", "DepthToSpace", "Transpose", "Relu", "Mul", "Sub", "Add"} <= ops
    (placeholder,) = [n for n in graph.nodes if n.op == "Placeholder"]
    assert placeholder.attrs["dtype"] == 1  # DT_FLOAT
    d2s = next(n for n in graph.nodes if n.op == "DepthToSpace")
    assert d2s.attrs["block_size"] == 2 and d2s.attrs["data_format"] == "NHWC"
    assert graph.constants["NCHW_output/perm"].tolist() == [0, 3, 1, 2]  # int32 tensor
    assert graph.constants["mul_1/x"].shape == () and graph.constants["mul_1/x"] == np.float32(0.2)
    outputs = {n.name for n in graph.nodes if n.op == "Transpose"}
    assert outputs == {"NCHW_output", "NCHW_output_2x", "NCHW_output_4x"}
    topo = [n.name for n in graph.topological()]
    assert all(topo.index(i) < topo.index(n.name) for n in graph.nodes for i in n.data_inputs)
    with pytest.raises(GraphDefError):
        parse_graphdef(b"\x89PNG\r\n\x1a\n not a graph")


def test_dequantize_min_first_is_tensorflows_formula():
    q = np.arange(256, dtype=np.uint8)
    out = dequantize_min_first(q, -0.26, 0.74)
    step = 1.0 / 255
    # min is snapped to the grid: -0.26 / step = -66.3 -> -66 steps, so 0.0 falls on q = 66
    assert abs(out[0] - (-66 * step)) < 1e-7 and out[0] != np.float32(-0.26)
    assert out[66] == 0.0
    assert np.allclose(np.diff(out.astype(np.float64)), step, rtol=0, atol=2e-7)  # float32 values near 1
    assert np.all(dequantize_min_first(q, 0.5, 0.5) == np.float32(0.5))
    # OpenCV's float32 variant of the same formula (as the EDSR graph builder writes it) agrees to 1e-4 step
    values = np.random.default_rng(3).normal(0, 0.05, 5000).astype(np.float32)
    q, lo, hi = quantize_min_first(values)
    ours, theirs = dequantize_min_first(q, lo, hi), opencv_dequantize(q, lo, hi)
    assert np.abs(ours - theirs).max() <= 1e-4 * (hi - lo) / 255
    assert np.abs(ours - values).max() <= 0.5001 * (hi - lo) / 255  # within half a step of the float weights


# ---- EDSR: an EDSR-structured graph with quint8 + Dequantize weights (the real files are ~40 MB) ----------

@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_structured_graph_matches_opencv(tmp_path, scale):
    spec = CATALOG[f"edsr-x{scale}"]
    path = tmp_path / spec.filename
    build_edsr_graph(path, scale=scale, blocks=3, channels=16, seed=scale, quantized=True)
    graph = read_graphdef(path)
    assert sum(n.op == "Dequantize" for n in graph.nodes) == 2 * (2 * 3 + 3)
    for name, value in edsr_weights(scale=scale, blocks=3, channels=16, seed=scale).items():
        restored = graph.constants[name]
        assert restored.dtype == np.float32 and restored.shape == value.shape
        assert np.abs(restored - value).max() <= 0.51 * (max(value.max(), 0) - min(value.min(), 0)) / 255 + 1e-7
    torch_engine, opencv_engine = engines(spec, path)
    colour = lr("butterfly", scale)[:30, :26]
    for image in (colour, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), colour.astype(np.uint16) * 257):
        ours, theirs = torch_engine.upscale(image), opencv_engine.upscale(image)
        levels, db = compare(ours, theirs, float(np.iinfo(image.dtype).max))
        print(f"edsr-x{scale} {image.shape} {image.dtype}: max |torch - opencv| = {levels}, PSNR {db:.1f} dB")
        assert db >= 50 and levels <= MAX_LEVELS
    one = torch_engine.upscale(np.full((1, 1, 3), 90, np.uint8))
    assert one.shape == (scale, scale, 3)


# ---- Conv2DBackpropInput (TF's transposed conv; no shared file uses it, the engine supports it) ------------

@pytest.mark.parametrize("h, w, k, s, out_h, out_w, padding", [
    (5, 7, 4, 2, 10, 14, "SAME"), (5, 7, 3, 2, 9, 13, "SAME"), (4, 4, 5, 3, 12, 12, "SAME"),
    (5, 6, 4, 2, 12, 14, "VALID")])
def test_conv2d_backprop_input_is_the_gradient_of_tfs_conv(tmp_path, h, w, k, s, out_h, out_w, padding):
    rng = np.random.default_rng(k * 10 + s)
    kernel = rng.normal(0, 0.3, (k, k, 3, 2)).astype(np.float32)  # [kh, kw, out_channels, in_channels]
    g = GraphWriter(quantized=False)
    x = g.placeholder("input", 2)
    sizes = g.const("sizes", np.array([1, out_h, out_w, 3], np.int32))
    g.add("deconv", "Conv2DBackpropInput", (sizes, g.const("filter", kernel), x), {
        "T": attr_type(DT_FLOAT), "data_format": attr_s("NHWC"), "padding": attr_s(padding),
        "strides": attr_ints([1, s, s, 1]), "dilations": attr_ints([1, 1, 1, 1])})
    (tmp_path / "deconv.pb").write_bytes(g.to_bytes())
    module = build_module(read_graphdef(tmp_path / "deconv.pb"), s)  # the output is (about) stride x the input
    blob = rng.normal(0, 1, (1, 2, h, w)).astype(np.float32)
    with torch.inference_mode():
        ours = module(torch.from_numpy(blob)).numpy()
    # reference: d/dz of TF's conv (its SAME padding) applied to z of size out_h x out_w
    z = torch.zeros(1, 3, out_h, out_w, dtype=torch.float64, requires_grad=True)
    pads = (*_same_pads(out_w, k, s, 1), *_same_pads(out_h, k, s, 1)) if padding == "SAME" else (0, 0, 0, 0)
    y = F.conv2d(F.pad(z, pads), torch.from_numpy(kernel.transpose(3, 2, 0, 1)).double(), stride=s)
    (reference,) = torch.autograd.grad(y, z, torch.from_numpy(blob).double())
    assert ours.shape == reference.shape and np.abs(ours - reference.numpy()).max() < 1e-5
    cv2.dnn_superres.DnnSuperResImpl_create()
    net = cv2.dnn.readNetFromTensorflow(str(tmp_path / "deconv.pb"))
    net.setInput(blob)
    assert np.abs(net.forward() - ours).max() < 1e-5


# ---- configuration and input errors -------------------------------------------------------------------

def test_wrong_scale_file_is_a_start_up_error(tmp_path):
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        TorchEngine(CATALOG["fsrcnn-x3"], SHARED_MODELS / "FSRCNN_x2.pb")
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        TorchEngine(replace(CATALOG["lapsrn-x8"], scale=3), SHARED_MODELS / "LapSRN_x8.pb")  # x2, x4, x8 only
    with pytest.raises(ConfigError, match="wrong file"):  # a luma model file under an EDSR name
        TorchEngine(CATALOG["edsr-x2"], SHARED_MODELS / "ESPCN_x2.pb")
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="cannot read model file"):
        TorchEngine(CATALOG["espcn-x2"], junk)


def test_precision_and_device_rules():
    spec = CATALOG["espcn-x2"]
    path = SHARED_MODELS / spec.filename
    with pytest.raises(ConfigError, match="CUDA"):
        TorchEngine(spec, path, precision="fp16")  # the CPU path is fp32 only
    with pytest.raises(ConfigError, match="unknown precision"):
        TorchEngine(spec, path, precision="int8")
    if not torch_has_cuda():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            TorchEngine(spec, path, device="cuda", precision="bf16")
    info = TorchEngine(spec, path).describe()
    assert info["engine"] == "torch" and info["device"] == "cpu" and info["precision"] == "fp32"


def test_bad_inputs_are_rejected_up_front():
    spec = CATALOG["fsrcnn-small-x2"]
    engine = TorchEngine(spec, SHARED_MODELS / spec.filename)
    with pytest.raises(InputRejected):
        engine.upscale(np.zeros((4, 4, 4), np.uint8))  # alpha is split off before the engine
    with pytest.raises(InputRejected):
        engine.upscale(np.zeros((4, 4, 3), np.float32))
