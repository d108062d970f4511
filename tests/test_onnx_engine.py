"""Models shipped as ONNX graphs run in the OpenCV engine (cv2.dnn.readNetFromONNX) with dnn_superres's pre- and
post-processing; the onnxruntime engine runs every model and equals the OpenCV engine within 1 level."""

from dataclasses import replace

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from conftest import SHARED_MODELS, lr_image
from models.catalog import CATALOG
from models.engines.opencv_engine import OpenCVEngine
from pipeline.errors import ConfigError


def write_luma_onnx(path, scale: int, *, batch="N", seed: int | None = None):
    """A luma model of the shape the project's own models have: 1 channel in, Conv/PRelu/Relu/Add/DepthToSpace.

    seed None: the identity network (a 1x1 conv to scale^2 copies + DepthToSpace), i.e. nearest-neighbour
    upscaling, so its output is known exactly; otherwise random weights with a residual Add."""
    rng = np.random.default_rng(seed)
    s2 = scale * scale
    if seed is None:
        inits = [numpy_helper.from_array(np.ones((s2, 1, 1, 1), np.float32), "w"),
                 numpy_helper.from_array(np.zeros(s2, np.float32), "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                 helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=scale, mode="DCR")]
    else:
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w1"),
                 numpy_helper.from_array(rng.normal(0, 0.05, 8).astype(np.float32), "b1"),
                 numpy_helper.from_array(np.full((8, 1, 1), 0.25, np.float32), "a1"),
                 numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2"),
                 numpy_helper.from_array(rng.normal(0, 0.05, 8).astype(np.float32), "b2"),
                 numpy_helper.from_array(rng.normal(0, 0.1, (s2, 8, 3, 3)).astype(np.float32), "w3"),
                 numpy_helper.from_array(np.full(s2, 0.0, np.float32), "b3"),
                 numpy_helper.from_array(np.ones((s2, 1, 1, 1), np.float32), "wid"),
                 numpy_helper.from_array(np.zeros(s2, np.float32), "bid")]
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
                 helper.make_node("PRelu", ["c1", "a1"], ["p1"]),
                 helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c2"], ["r2"]),
                 helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["x", "wid", "bid"], ["skip"]),
                 helper.make_node("Add", ["c3", "skip"], ["sum"]),
                 helper.make_node("DepthToSpace", ["sum"], ["y"], blocksize=scale, mode="DCR")]
    graph = helper.make_graph(nodes, "luma", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def onnx_spec(name: str, scale: int, filename: str):
    """A catalog-shaped spec for a luma model stored as an ONNX file."""
    base = replace(CATALOG[f"fsrcnn-x{scale}"], name=name, filename=filename, sha256=None, size=None)
    return replace(base, file_format="onnx") if hasattr(base, "file_format") else base


@pytest.mark.parametrize("scale", [2, 3])
def test_opencv_engine_runs_an_onnx_luma_model(tmp_path, scale):
    path = write_luma_onnx(tmp_path / f"nearest_x{scale}.onnx", scale)
    engine = OpenCVEngine(onnx_spec(f"nearest-x{scale}", scale, path.name), path)
    gray = cv2.cvtColor(lr_image("butterfly", 4)[:37, :41], cv2.COLOR_BGR2GRAY)
    out = engine.upscale(gray)
    assert np.array_equal(out, np.repeat(np.repeat(gray, scale, 0), scale, 1))
    colour = lr_image("bird", 4)[:20, :30]
    out = engine.upscale(colour)
    assert out.shape == (20 * scale, 30 * scale, 3)
    # luma nearest, chroma bilinear: each output block's Y equals the input pixel's Y (within YCrCb rounding)
    y_out = cv2.cvtColor(out, cv2.COLOR_BGR2YCrCb)[::scale, ::scale, 0].astype(int)
    y_in = cv2.cvtColor(colour, cv2.COLOR_BGR2YCrCb)[:, :, 0].astype(int)
    assert np.abs(y_out - y_in).max() <= 2


def test_opencv_engine_says_which_onnx_file_it_cannot_read(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="cannot read model file"):
        OpenCVEngine(onnx_spec("broken-x2", 2, bad.name), bad)


def test_opencv_engine_refuses_an_onnx_file_of_another_scale(tmp_path):
    path = write_luma_onnx(tmp_path / "x2.onnx", 2)
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        OpenCVEngine(onnx_spec("wrong-x3", 3, path.name), path)
