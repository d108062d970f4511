"""The EDSR-structured graph from tests/edsr_graph.py: OpenCV reads it as it reads the real EDSR files, it
computes what a numpy EDSR computes from the same (dequantized) weights, and our OpenCV engine matches
dnn_superres on it."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import lr_image
from edsr_graph import (DT_FLOAT, DT_QUINT8, OUTPUT_NAME, GraphWriter, attr_ints, attr_s, attr_type,
                        build_edsr_graph, dequantize_min_first, edsr_weights, quantize_min_first)
from models.catalog import ModelSpec
from models.engines.dnn_superres_io import EDSR_MEAN_BGR
from models.engines.opencv_engine import OpenCVEngine

# Registers dnn_superres' DepthToSpace with cv2.dnn; OpenCV 5's own DepthSpaceLayer wants a "blocksize"
# param the TF importer does not give it, so plain readNetFromTensorflow fails at forward without this.
cv2.dnn_superres.DnnSuperResImpl_create()


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A textured 24x20 (rows x cols) crop of a real image, read in place from ../shared."""
    return np.ascontiguousarray(lr_image("baby", 2)[120:144, 100:120])


def _superres(path: Path, scale: int) -> cv2.dnn_superres.DnnSuperResImpl:
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(path))
    sr.setModel("edsr", scale)
    return sr


def _spec(scale: int) -> ModelSpec:
    return ModelSpec(name=f"edsr-x{scale}", algorithm="edsr", scale=scale, filename=f"EDSR_x{scale}.pb", url="",
                     size=None, sha256=None, git_blob_sha1=None, input_kind="bgr", context_px=72, macs_per_pixel=0)


# ---- Dequantize(MIN_FIRST) ----

def _dequantize_in_opencv(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """OpenCV's own decoding: a 1x1 Conv2D whose kernel [1,1,1,N] is the Dequantize output, fed 1.0."""
    g = GraphWriter(quantized=True)
    x = g.placeholder("in", 1)
    inputs = (g.const("w_quantized_const", q.reshape(1, 1, 1, -1)),
              g.const("w_quantized_min", np.array(lo, np.float32)),
              g.const("w_quantized_max", np.array(hi, np.float32)))
    w = g.add("w", "Dequantize", inputs, {"T": attr_type(DT_QUINT8), "mode": attr_s("MIN_FIRST")})
    g.add("conv", "Conv2D", (x, w), {"T": attr_type(DT_FLOAT), "data_format": attr_s("NHWC"),
                                     "padding": attr_s("SAME"), "strides": attr_ints([1, 1, 1, 1])})
    net = cv2.dnn.readNetFromTensorflow(np.frombuffer(g.to_bytes(), np.uint8))
    net.setInput(np.ones((1, 1, 1, 1), np.float32))
    return net.forward().ravel()


def test_dequantize_min_first_known_values():
    # min -1, max 1 - 1/128: step exactly 1/128, so every decoded value is exact
    q = np.array([0, 1, 127, 128, 255], np.uint8)
    expected = np.array([-1.0, -0.9921875, -0.0078125, 0.0, 0.9921875], np.float32)
    assert np.array_equal(dequantize_min_first(q, -1.0, 0.9921875), expected)
    # An off-grid min is rounded to a multiple of the step so that 0.0 stays exact: the point of MIN_FIRST.
    step = np.float32(1.123 / 255)
    zero_q = np.uint8(round(0.123 / float(step)))  # 28
    assert dequantize_min_first(np.array([zero_q]), -0.123, 1.0)[0] == 0.0
    assert dequantize_min_first(np.array([0]), -0.123, 1.0)[0] == pytest.approx(-28 * step, abs=1e-7)


def test_quantize_then_dequantize_is_within_half_a_step():
    values = np.random.default_rng(1).normal(0, 0.05, 1000).astype(np.float32)
    q, lo, hi = quantize_min_first(values)
    assert lo == values.min() and hi == values.max()  # this range already contains 0
    assert abs(dequantize_min_first(q, lo, hi) - values).max() <= (hi - lo) / 255 * 0.5 + 1e-7
    # quantize_weights widens the range to contain 0
    assert quantize_min_first(np.array([0.5, 1.0], np.float32))[1:] == (0.0, 1.0)


@pytest.mark.parametrize("lo, hi", [(-1.0, 0.9921875), (-0.123, 1.0), (-0.2, 0.0)])
def test_opencv_decodes_dequantize_as_we_do(lo, hi):
    q = np.arange(256, dtype=np.uint8)
    np.testing.assert_allclose(_dequantize_in_opencv(q, lo, hi), dequantize_min_first(q, lo, hi), rtol=0, atol=1e-6)


def test_opencv_refuses_other_dequantize_modes():
    g = GraphWriter(quantized=True)
    g.placeholder("in", 1)
    inputs = (g.const("w_q", np.zeros((1, 1, 1, 1), np.uint8)), g.const("w_min", np.array(-1, np.float32)),
              g.const("w_max", np.array(1, np.float32)))
    w = g.add("w", "Dequantize", inputs, {"T": attr_type(DT_QUINT8), "mode": attr_s("MIN_COMBINED")})
    g.add("conv", "Conv2D", ("in", w), {"T": attr_type(DT_FLOAT), "data_format": attr_s("NHWC"),
                                        "padding": attr_s("SAME"), "strides": attr_ints([1, 1, 1, 1])})
    with pytest.raises(cv2.error, match="MIN_FIRST"):
        cv2.dnn.readNetFromTensorflow(np.frombuffer(g.to_bytes(), np.uint8))


# ---- the EDSR graph ----

def test_graph_as_opencv_sees_it(tmp_path):
    path = tmp_path / "EDSR_x2.pb"
    build_edsr_graph(path, scale=2, blocks=3, channels=32)
    build_edsr_graph(tmp_path / "float.pb", scale=2, blocks=3, channels=32, quantized=False)
    net = cv2.dnn.readNetFromTensorflow(str(path))
    types = [net.getLayer(name).type for name in net.getLayerNames()]
    assert net.getUnconnectedOutLayersNames() == (OUTPUT_NAME,)
    # Dequantize/Const nodes are folded into the weights at import; what is left is EDSR's compute graph.
    assert types.count("Convolution") == 2 * 3 + 3 and types.count("ReLU") == 3
    assert types.count("DepthToSpace") == 1 and "Dequantize" not in types
    # the weights really are quint8: one byte each instead of four
    assert path.stat().st_size < 0.3 * (tmp_path / "float.pb").stat().st_size


def _conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """TF Conv2D, 'SAME', stride 1, HWC input, HWIO kernel."""
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, kernel.shape[3]), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy:dy + h, dx:dx + w] @ kernel[dy, dx]
    return out + bias


def _depth_to_space(x: np.ndarray, bs: int) -> np.ndarray:
    """TF DepthToSpace (DCR): output[h*bs+i, w*bs+j, c] = input[h, w, (i*bs+j)*C + c]."""
    h, w, d = x.shape
    c = d // (bs * bs)
    return x.reshape(h, w, bs, bs, c).transpose(0, 2, 1, 3, 4).reshape(h * bs, w * bs, c)


def _edsr_numpy(bgr: np.ndarray, w: dict, scale: int, blocks: int) -> np.ndarray:
    x = bgr.astype(np.float32) - EDSR_MEAN_BGR
    x = out1 = _conv3x3_same(x, w["resFilter_one"], w["BiasOne"])
    for i in range(blocks):
        y = np.maximum(_conv3x3_same(x, w[f"resFilter{2 * i}"], w[f"resBias{2 * i}"]), 0)
        x = x + _conv3x3_same(y, w[f"resFilter{2 * i + 1}"], w[f"resBias{2 * i + 1}"]) * np.float32(0.1)
    x = _conv3x3_same(x, w["resFilter_two"], w["BiasTwo"]) + out1
    x = _depth_to_space(_conv3x3_same(x, w["resFilter_three"], w["BiasThree"]), scale)
    return np.clip(np.rint(x + EDSR_MEAN_BGR), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("quantized", [True, False])
def test_opencv_computes_numpy_edsr(tmp_path, crop, scale, quantized):
    blocks, channels, seed = 3, 8, scale
    path = tmp_path / f"EDSR_x{scale}.pb"
    build_edsr_graph(path, scale=scale, blocks=blocks, channels=channels, seed=seed, quantized=quantized)
    weights = edsr_weights(scale=scale, blocks=blocks, channels=channels, seed=seed)
    if quantized:  # what the file holds: the weights after quantize_weights and Dequantize
        weights = {k: dequantize_min_first(*quantize_min_first(v)) for k, v in weights.items()}
    expected = _edsr_numpy(crop, weights, scale, blocks)
    out = _superres(path, scale).upsample(crop)
    assert out.shape == expected.shape == (24 * scale, 20 * scale, 3)
    # Float sums in another order: a value near .5 may round the other way, never further. The 1 % bound
    # also proves the file's weights are the dequantized ones: the float weights put ~7 % one level off.
    diff = np.abs(out.astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert 0 < out.min() and out.max() < 255  # not saturated, so the comparison means something
    assert out.std() > 5  # and not flat


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_engine_matches_dnn_superres(tmp_path, crop, scale):
    path = tmp_path / f"EDSR_x{scale}.pb"
    build_edsr_graph(path, scale=scale, seed=10 + scale)
    reference = _superres(path, scale).upsample(crop)
    engine = OpenCVEngine(_spec(scale), path)
    out = engine.upscale(crop)
    assert reference.shape == (24 * scale, 20 * scale, 3) and reference.dtype == np.uint8
    assert out.dtype == np.uint8 and np.array_equal(out, reference)

    # Gray: dnn_superres refuses 1-channel input for EDSR ("multiple of 3"). The engine runs gray as BGR
    # and converts its float result to gray before rounding; the reference rounds to uint8 BGR first and
    # then converts, so the two may differ by one level.
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    gray_ref = cv2.cvtColor(_superres(path, scale).upsample(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)),
                            cv2.COLOR_BGR2GRAY)
    gray_out = engine.upscale(gray)
    assert gray_out.shape == gray_ref.shape == (24 * scale, 20 * scale) and gray_out.dtype == np.uint8
    assert np.abs(gray_out.astype(int) - gray_ref).max() <= 1


def test_builder_rejects_scales_upstream_does_not_have(tmp_path):
    with pytest.raises(ValueError):
        build_edsr_graph(tmp_path / "x.pb", scale=8)
