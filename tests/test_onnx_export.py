"""`superres models export NAME --onnx FILE` writes the network itself (NCHW float32, dynamic sizes) as a real
ONNX file that onnxruntime and OpenCV run to the OpenCV engine's numbers; the converter covers the TF ops the
engines support."""

import subprocess

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from conftest import SHARED_MODELS, cli_env, superres_cmd
from edsr_graph import DT_FLOAT, GraphWriter, attr_ints, attr_s, attr_type, build_edsr_graph
from models.catalog import CATALOG
from models.engines.opencv_engine import OpenCVEngine
from models.graph_rewrite import plan_graph
from models.graphdef import read_graphdef
from models.onnx_export import INPUT_NAME, OUTPUT_NAME, graph_to_onnx

PRESENT = [s for s in CATALOG.values() if (SHARED_MODELS / s.filename).exists() and s.filename.endswith(".pb")]
PLAIN_OPS = {"Conv", "ConvTranspose", "PRelu", "LeakyRelu", "Relu", "Tanh", "Sigmoid", "Abs", "Neg",
             "DepthToSpace", "Add", "Sub", "Mul", "Div", "Max", "Min", "Cast"}


def run(*args, **env):
    return subprocess.run(superres_cmd() + list(args), env=cli_env(**env), capture_output=True, text=True,
                          timeout=120)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def session(path_or_model) -> onnxruntime.InferenceSession:
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["fsrcnn-x3", "lapsrn-x4"])
def test_models_export_writes_the_network_with_dynamic_sizes(tmp_path, name):
    spec = CATALOG[name]
    target = tmp_path / f"{name}.onnx"
    done = run("models", "export", name, "--onnx", str(target))
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout
    assert target.stat().st_mode & 0o777 == 0o644  # an ordinary file for the user, not mkstemp's 0600
    model = onnx.load(str(target))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp) == ["batch", 1, "height", "width"] and dims(out) == ["batch", 1, "out_height", "out_width"]
    assert {n.op_type for n in model.graph.node} <= PLAIN_OPS
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["source_sha256"] == spec.sha256 and meta["scale"] == str(spec.scale)
    # the network only: the same numbers as OpenCV's on the same blob, at sizes never seen at export
    reference = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 23, 31), (1, 1, 64, 48)]:
        blob = rng.random(shape, dtype=np.float32)
        ours = session(str(target)).run(None, {INPUT_NAME: blob})[0]
        theirs = reference.forward(blob)
        assert ours.shape == theirs.shape == (1, 1, shape[2] * spec.scale, shape[3] * spec.scale)
        assert np.abs(ours - theirs).max() < 1e-4
    batch = rng.random((3, 1, 16, 16), dtype=np.float32)
    assert session(str(target)).run(None, {INPUT_NAME: batch})[0].shape[0] == 3


@pytest.mark.parametrize("spec", PRESENT, ids=lambda s: s.name)
def test_every_shared_model_converts_to_plain_ops_that_opencv_reads_too(spec):
    model = graph_to_onnx(plan_graph(read_graphdef(SHARED_MODELS / spec.filename), spec.scale), 1)
    assert {n.op_type for n in model.graph.node} <= PLAIN_OPS
    # no PReLU/LeakyReLU idiom left as elementwise chains (FSRCNN: 7 PReLUs; LapSRN: LeakyReLUs)
    assert not {"Abs", "Neg"} & {n.op_type for n in model.graph.node}
    blob = np.random.default_rng(2).random((1, 1, 20, 24), dtype=np.float32)
    net = cv2.dnn.readNetFromONNX(np.frombuffer(model.SerializeToString(), np.uint8))
    net.setInput(blob)
    ours = session(model).run(None, {INPUT_NAME: blob})[0]
    assert np.abs(net.forward() - ours).max() < 1e-4


def test_edsr_structured_graph_exports_bgr_in_and_out(tmp_path):
    spec = CATALOG["edsr-x3"]
    build_edsr_graph(tmp_path / spec.filename, scale=3, blocks=2, channels=8, seed=3, quantized=True)
    target = tmp_path / "edsr.onnx"
    done = run("models", "export", "edsr-x3", "--onnx", str(target), "--model-dir", str(tmp_path))
    # EDSR's file is verified by its git blob id: a test graph is not it, and export says so (exit 2, one line)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "corrupt" in done.stderr
    model = graph_to_onnx(plan_graph(read_graphdef(tmp_path / spec.filename), 3), 3)
    assert dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(model.graph.output[0]) == ["batch", 3, "out_height", "out_width"]
    blob = np.random.default_rng(3).normal(0, 40, (1, 3, 14, 17)).astype(np.float32)
    theirs = OpenCVEngine(spec, tmp_path / spec.filename).forward(blob)
    assert np.abs(session(model).run(None, {INPUT_NAME: blob})[0] - theirs).max() < 1e-3


def test_fp16_export_has_half_weights_and_float_edges(tmp_path):
    target = tmp_path / "half.onnx"
    assert run("models", "export", "espcn-x2", "--onnx", str(target), "--fp16").returncode == 0
    model = onnx.load(str(target))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert weights and all(w.dtype == np.float16 for w in weights)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    blob = np.random.default_rng(4).random((1, 1, 20, 20), dtype=np.float32)
    reference = OpenCVEngine(CATALOG["espcn-x2"], SHARED_MODELS / "ESPCN_x2.pb").forward(blob)
    assert np.abs(session(str(target)).run(None, {INPUT_NAME: blob})[0] - reference).max() < 5e-3


def test_export_mistakes_are_one_line_and_exit_2(tmp_path):
    for args, words in [
        (("models", "export", "nosuch-x2", "--onnx", str(tmp_path / "a.onnx")), "unknown model"),
        (("models", "export", "fsrcnn-x2", "--onnx", str(tmp_path / "no" / "a.onnx")), "does not exist"),
        (("models", "export", "fsrcnn-x2", "--onnx", str(tmp_path)), "is a folder"),
        (("models", "export", "edsr-x2", "--onnx", str(tmp_path / "e.onnx")), "superres models pull edsr-x2"),
    ]:
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("**/*.onnx")) and not list(tmp_path.glob("**/.*.tmp"))


@pytest.mark.parametrize("h, w, k, s, out_h, out_w", [(5, 7, 4, 2, 10, 14), (5, 7, 3, 2, 9, 13), (4, 4, 5, 3, 12, 12)])
def test_conv2d_backprop_input_exports_as_tfs_transposed_conv(tmp_path, h, w, k, s, out_h, out_w):
    """No shared file uses it; OpenCV's TF importer is the reference (as in the torch engine's test)."""
    rng = np.random.default_rng(k * 10 + s)
    kernel = rng.normal(0, 0.3, (k, k, 3, 2)).astype(np.float32)  # [kh, kw, out_channels, in_channels]
    g = GraphWriter(quantized=False)
    x = g.placeholder("input", 2)
    sizes = g.const("sizes", np.array([1, out_h, out_w, 3], np.int32))
    g.add("deconv", "Conv2DBackpropInput", (sizes, g.const("filter", kernel), x), {
        "T": attr_type(DT_FLOAT), "data_format": attr_s("NHWC"), "padding": attr_s("SAME"),
        "strides": attr_ints([1, s, s, 1]), "dilations": attr_ints([1, 1, 1, 1])})
    (tmp_path / "deconv.pb").write_bytes(g.to_bytes())
    model = graph_to_onnx(plan_graph(read_graphdef(tmp_path / "deconv.pb"), s), 2)
    blob = rng.normal(0, 1, (1, 2, h, w)).astype(np.float32)
    ours = session(model).run(None, {INPUT_NAME: blob})[0]
    cv2.dnn_superres.DnnSuperResImpl_create()
    net = cv2.dnn.readNetFromTensorflow(str(tmp_path / "deconv.pb"))
    net.setInput(blob)
    theirs = net.forward()
    assert ours.shape == theirs.shape == (1, 3, out_h, out_w) and np.abs(ours - theirs).max() < 1e-5
