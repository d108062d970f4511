"""Wide 3x3 convs as Winograd F(6, 3) (models/winograd.py): the rewritten graph computes what the direct convs
compute, on odd sizes, batches and every op that may sit between two convs; convs it cannot take stay as they are."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.winograd import rewrite, transform_matrices

CHANNELS = 24  # thin, to keep the tests fast: the rewrite is told to take convs this wide
SIZES = [(1, 1), (2, 3), (13, 7), (5, 9), (12, 18), (16, 16), (30, 26)]  # 12 x 18: whole tiles


class Graph:
    """A small ONNX graph in the making, NCHW, input "x" with `cin` channels."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.outputs = [], [], []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(self, x, cin, cout, name, kernel=3, **attrs):
        w = self.rng.standard_normal((cout, cin // attrs.get("group", 1), kernel, kernel)) / np.sqrt(kernel * kernel * cin)
        self.const(name + "/w", w)
        self.const(name + "/b", self.rng.standard_normal(cout) * 0.1)
        attrs.setdefault("pads", [kernel // 2] * 4) if "auto_pad" not in attrs else None
        self.nodes.append(helper.make_node("Conv", [x, name + "/w", name + "/b"], [name], kernel_shape=[kernel] * 2,
                                           **attrs))
        return name

    def op(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    def model(self, cin: int, outputs: list[tuple[str, int]]):
        info = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", c, None, None])  # noqa: E731
        graph = helper.make_graph(self.nodes, "g", [info("x", cin)], [info(n, c) for n, c in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def edsr_like() -> tuple:
    """Head conv from 3 channels, two residual blocks (conv, ReLU, conv, x0.1, + input), a per-channel constant
    added between two convs (it makes the border non-zero), LeakyReLU, a tensor read both inside the run and as a
    graph output, the long skip, a thin tail conv and DepthToSpace. Returns (model, its outputs)."""
    g, c = Graph(seed=1), CHANNELS
    g.const("scale", np.float32(0.1))
    g.const("shift", np.linspace(-2, 3, c).reshape(c, 1, 1))
    head = x = g.conv("x", 3, c, "head")
    for k in range(2):
        r = g.op("Relu", [g.conv(x, c, c, f"b{k}/c1")], f"b{k}/relu")
        x = g.op("Add", [g.op("Mul", [g.conv(r, c, c, f"b{k}/c2"), "scale"], f"b{k}/scaled"), x], f"b{k}/out")
    shifted = g.op("Add", [x, "shift"], "shifted")
    leaky = g.op("LeakyRelu", [g.conv(shifted, c, c, "after_shift")], "leaky", alpha=0.2)
    body = g.op("Add", [g.conv(leaky, c, c, "post"), head], "body")
    tail = g.conv(body, c, 12, "tail")
    y = g.op("DepthToSpace", [tail], "y", blocksize=2, mode="CRD")
    return g.model(3, [("y", 3), ("leaky", c)]), ["y", "leaky"]


def test_the_transforms_are_exact_for_every_tile_size():
    rng = np.random.default_rng(0)
    for m in (2, 4, 6):
        at, g, bt = transform_matrices(m)
        for _ in range(5):
            d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
            direct = [sum(k[j] * d[i + j] for j in range(3)) for i in range(m)]
            assert np.allclose(at @ ((g @ k) * (bt @ d)), direct, atol=1e-12)
    # F(4, 3)'s input transform is the one published by Lavin & Gray (2015)
    lavin = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
             [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    assert np.array_equal(transform_matrices(4)[2], lavin)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_residual_run_computes_what_the_direct_convs_compute(batch):
    model, outputs = edsr_like()
    rewritten, count = rewrite(copy.deepcopy(model), min_channels=16)
    assert count == 8  # head, 2 x 2 in the blocks, after_shift, post and the tail (24 -> 12: wide enough in)
    # the only convs left are the transforms' own
    kernels = {tuple(helper.get_attribute_value(a)) for n in rewritten.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "kernel_shape"}
    assert kernels == {(1, 3, 1)}
    # the residual scaling went into the second conv of each block: nothing reads the factor any more
    assert "scale" not in {i for n in rewritten.graph.node for i in n.input}
    direct, ours = session(model), session(rewritten)
    rng = np.random.default_rng(batch)
    for h, w in SIZES:
        x = rng.uniform(-120, 120, (batch, 3, h, w)).astype(np.float32)
        for want, got in zip(direct.run(outputs, {"x": x}), ours.run(outputs, {"x": x})):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), (h, w)


def test_positions_beyond_the_image_never_reach_the_next_conv():
    """13 x 7 is not whole tiles: after `+ shift` the padding positions hold the shift, and the next conv must read
    zeros there, as the direct conv does. Compared at the image's edge, where that padding is read."""
    model, outputs = edsr_like()
    rewritten, _ = rewrite(copy.deepcopy(model), min_channels=16)
    x = np.random.default_rng(3).uniform(-120, 120, (1, 3, 13, 7)).astype(np.float32)
    want = session(model).run(["leaky"], {"x": x})[0]
    got = session(rewritten).run(["leaky"], {"x": x})[0]
    edge = (slice(None), slice(None), slice(-2, None))
    assert np.abs(got[edge] - want[edge]).max() <= 2e-5 * np.abs(want).max()


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, {"group": 2}, {"kernel": 5},
    {"auto_pad": "SAME_UPPER"}, {"pads": [0, 0, 0, 0]}, {"thin": True},
], ids=lambda a: "-".join(a))
def test_convs_it_cannot_take_are_left_as_they_are(attrs):
    attrs = dict(attrs)
    g = Graph()
    c = 8 if attrs.pop("thin", False) else CHANNELS
    first = g.conv("x", 4, c, "first", kernel=attrs.pop("kernel", 3), **attrs)
    model = g.model(4, [(first, c)])
    before = copy.deepcopy(model)
    rewritten, count = rewrite(model, min_channels=16)
    assert count == 0 and rewritten.graph == before.graph


def test_the_rewrite_keeps_the_graphs_names_and_adds_none_that_clash():
    model, outputs = edsr_like()
    rewritten, _ = rewrite(copy.deepcopy(model), min_channels=16)
    produced = [o for n in rewritten.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    assert [o.name for o in rewritten.graph.output] == outputs
    assert [i.name for i in rewritten.graph.input] == ["x"]
