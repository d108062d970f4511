"""A frozen TensorFlow graph prepared for lowering: the exact rewrites and the walk from the one input to the
output at the model's scale, shared by every engine that runs the `.pb` networks without TensorFlow.

Pure numpy on `models.graphdef`'s reading (no torch, no onnx), so the CPU image without torch can use it. The
rewrites (all exact; see models/engines/torch_engine.py's docstring for why a lowering and not one module per
family):

- Conv2D + Add/BiasAdd of a constant [C] or [1] -> one conv with bias (`_Conv`, weight HWIO, bias or None);
- relu(x) + alpha * (x - |x|) * 0.5 -> `_PReLU` (FSRCNN), relu(x) - c * relu(-x) -> `_LeakyReLU` (LapSRN);
- conv -> DepthToSpace(b) [-> Add(constant)] -> the conv's output channels permuted from TF's DCR order to
  CRD (torch's pixel_shuffle, ONNX DepthToSpace mode CRD) and the bias folded in (`_PixelShuffle`);
- Identity and the exports' final NHWC->NCHW Transpose resolved as aliases: every tensor is NCHW inside.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from models.graphdef import Graph, Node
from pipeline.errors import ConfigError

ALIASES = {"Identity", "StopGradient", "Snapshot"}

class Net:
    """A Graph as the rewrites see it: constants apart, Identity and the final NHWC->NCHW Transpose resolved
    to their inputs, node inputs as plain node names."""

    def __init__(self, graph: Graph):
        self.consts = dict(graph.constants)
        self.nodes: dict[str, Node] = {}
        for n in graph.nodes:
            if n.name in self.consts:
                continue
            if n.op in ALIASES or (n.op == "Transpose" and self._is_output_transpose(n)):
                continue  # resolved below, as aliases
            self.nodes[n.name] = replace(n, inputs=list(n.data_inputs), attrs=dict(n.attrs))
        self.alias: dict[str, str] = {}
        for n in graph.nodes:
            if n.name not in self.consts and n.name not in self.nodes:
                self.alias[n.name] = n.data_inputs[0]
        for n in self.nodes.values():
            n.inputs = [self.resolve(i) for i in n.inputs]

    def _is_output_transpose(self, n: Node) -> bool:
        # The exports end NHWC -> NCHW (NCHW_output*). Internally every tensor is NCHW already.
        perm = self.consts.get(n.data_inputs[1]) if len(n.data_inputs) == 2 else None
        return perm is not None and list(perm.reshape(-1)) == [0, 3, 1, 2]

    def resolve(self, name: str) -> str:
        seen = set()
        while name in self.alias and name not in seen:
            seen.add(name)
            name = self.alias[name]
        return name

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if name in n.inputs]

    def only_consumer(self, name: str) -> Node | None:
        users = self.consumers(name)
        return users[0] if len(users) == 1 and users[0].inputs.count(name) == 1 else None

    def node(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def op_is(self, name: str, *ops: str) -> Node | None:
        n = self.nodes.get(name)
        return n if n is not None and n.op in ops else None

    def split_const(self, node: Node) -> tuple[str | None, np.ndarray | None]:
        """(the non-constant input, the constant) of a two-input op with exactly one constant input."""
        if len(node.inputs) != 2:
            return None, None
        a, b = node.inputs
        if a in self.consts and b not in self.consts:
            return b, self.consts[a]
        if b in self.consts and a not in self.consts:
            return a, self.consts[b]
        return None, None

    def single_use(self, *names: str, within: set[str]) -> bool:
        return all({c.name for c in self.consumers(n)} <= within for n in names)


def scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def fuse_prelu(net: Net) -> None:
    """relu(x) + alpha * (x - |x|) * 0.5   ->   prelu(x, alpha)   (FSRCNN's export)."""
    for add in list(net.nodes.values()):
        if add.op not in ("Add", "AddV2") or add.name not in net.nodes:
            continue
        for r_name, m1_name in (add.inputs, add.inputs[::-1]):
            relu, m1 = net.op_is(r_name, "Relu"), net.op_is(m1_name, "Mul")
            if relu is None or m1 is None:
                continue
            x = relu.inputs[0]
            m0_name, half = net.split_const(m1)
            m0 = net.op_is(m0_name, "Mul") if m0_name else None
            if m0 is None or scalar(half) != 0.5:
                continue
            sub_name, alpha = net.split_const(m0)
            sub = net.op_is(sub_name, "Sub") if sub_name else None
            if sub is None or alpha is None or alpha.ndim > 1 or sub.inputs[0] != x:
                continue
            ab = net.op_is(sub.inputs[1], "Abs")
            if ab is None or ab.inputs[0] != x:
                continue
            inner = {relu.name, m1.name, m0.name, sub.name, ab.name}
            if not net.single_use(*inner, within=inner | {add.name}):
                continue
            for name in inner:
                del net.nodes[name]
            net.nodes[add.name] = Node(add.name, "_PReLU", [x], {"alpha": alpha.astype(np.float32).reshape(-1)})
            break


def fuse_leaky(net: Net) -> None:
    """relu(x) - c * relu(-1 * x)   ->   leaky_relu(x, c)   (LapSRN's export)."""
    for sub in list(net.nodes.values()):
        if sub.op != "Sub" or sub.name not in net.nodes:
            continue
        relu, mul = net.op_is(sub.inputs[0], "Relu"), net.op_is(sub.inputs[1], "Mul")
        if relu is None or mul is None:
            continue
        x = relu.inputs[0]
        relu_neg_name, slope = net.split_const(mul)
        relu_neg = net.op_is(relu_neg_name, "Relu") if relu_neg_name else None
        if relu_neg is None or scalar(slope) is None:
            continue
        neg = net.op_is(relu_neg.inputs[0], "Mul", "Neg")
        if neg is None:
            continue
        if neg.op == "Mul":
            y, minus_one = net.split_const(neg)
            if y != x or scalar(minus_one) != -1.0:
                continue
        elif neg.inputs[0] != x:
            continue
        inner = {relu.name, mul.name, relu_neg.name, neg.name}
        if not net.single_use(*inner, within=inner | {sub.name}):
            continue
        for name in inner:
            del net.nodes[name]
        net.nodes[sub.name] = Node(sub.name, "_LeakyReLU", [x], {"slope": scalar(slope)})


def channel_vector(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant that adds per output channel: shape [C], [1] or scalar -> float32 [C]."""
    if value is None or value.dtype.kind != "f" or value.ndim > 1 or value.size not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float32).reshape(-1), (channels,)).copy()


def fuse_conv_bias(net: Net) -> None:
    """Conv2D followed by Add/BiasAdd of a constant vector -> one conv with bias."""
    for conv in list(net.nodes.values()):
        if conv.op != "Conv2D" or conv.name not in net.nodes:
            continue
        weight = net.const(conv.inputs[1])
        if weight is None or weight.ndim != 4:
            continue
        conv.attrs["_weight"] = weight
        conv.attrs.setdefault("_bias", None)
        conv.op = "_Conv"
        conv.inputs = conv.inputs[:1]
        user = net.only_consumer(conv.name)
        if user is None or user.op not in ("Add", "AddV2", "BiasAdd"):
            continue
        other, value = net.split_const(user)
        bias = channel_vector(value, weight.shape[3])
        if other != conv.name or bias is None:
            continue
        # the Add takes the conv's place: same name for its consumers, same inputs as the conv
        del net.nodes[conv.name]
        net.nodes[user.name] = Node(user.name, "_Conv", conv.inputs, {**conv.attrs, "_bias": bias})


def fuse_depth_to_space(net: Net) -> None:
    """conv -> DepthToSpace(b) [-> Add(constant [C] or [1])]  ->  conv (channels permuted) -> pixel_shuffle.

    TF's DepthToSpace reads depth index (dy*b + dx)*C + c for output channel c at offset (dy, dx) (DCR);
    torch's pixel_shuffle reads c*b*b + dy*b + dx (CRD). Reordering the conv's output channels (and its bias)
    turns one into the other. A bias added after the move is added to the conv's instead (the same sum; exact
    when the conv has no bias of its own, as in FSRCNN, else one float rounding apart).
    """
    for d2s in list(net.nodes.values()):
        if d2s.op != "DepthToSpace" or d2s.name not in net.nodes:
            continue
        if d2s.attrs.get("data_format", "NHWC") != "NHWC":
            raise ConfigError(f"DepthToSpace {d2s.name!r}: data_format {d2s.attrs.get('data_format')} is not supported")
        conv = net.op_is(d2s.inputs[0], "_Conv")
        if conv is None or net.only_consumer(conv.name) is not d2s:
            continue
        b = int(d2s.attrs["block_size"])
        weight, bias = conv.attrs["_weight"], conv.attrs["_bias"]
        depth = weight.shape[3]
        if depth % (b * b):
            raise ConfigError(f"DepthToSpace {d2s.name!r}: {depth} channels do not split into blocks of {b}x{b}")
        channels = depth // (b * b)
        perm = np.array([k * channels + c for c in range(channels) for k in range(b * b)])
        weight = weight[..., perm]
        bias = None if bias is None else bias[perm]
        out_name = d2s.name
        user = net.only_consumer(d2s.name)
        if user is not None and user.op in ("Add", "AddV2", "BiasAdd"):
            other, value = net.split_const(user)
            after = channel_vector(value, channels)
            if other == d2s.name and after is not None:
                # output channel c of the shuffle comes from conv channels c*b*b .. c*b*b + b*b - 1
                bias = (0 if bias is None else bias) + np.repeat(after, b * b)
                del net.nodes[d2s.name]
                out_name = user.name
        del net.nodes[conv.name]
        net.nodes[conv.name] = Node(conv.name, "_Conv", conv.inputs,
                                    {**conv.attrs, "_weight": weight, "_bias": None if bias is None
                                     else np.asarray(bias, np.float32)})
        net.nodes[out_name] = Node(out_name, "_PixelShuffle", [conv.name], {"block_size": b})


# ----------------------------------------------------------------------------------------------------------
# torch steps


def same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size/stride); total padding split with the smaller half first."""
    k_eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


def hw_attr(node: Node, key: str) -> tuple[int, int]:
    values = node.attrs.get(key) or [1, 1, 1, 1]
    if node.attrs.get("data_format", "NHWC") != "NHWC":
        raise ConfigError(f"{node.op} {node.name!r}: data_format {node.attrs.get('data_format')} is not supported")
    return int(values[1]), int(values[2])


def nchw_const(value: np.ndarray) -> np.ndarray:
    """A constant broadcast against NHWC tensors, rearranged to broadcast against NCHW ones."""
    value = np.asarray(value, np.float32)
    if value.ndim == 0 or value.size == 1:
        return value.reshape(())
    if value.ndim == 1:
        return value.reshape(1, -1, 1, 1)
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(0, 3, 1, 2))
    if value.ndim == 3:  # [H, W, C]
        return np.ascontiguousarray(value.transpose(2, 0, 1))[None]
    raise ConfigError(f"a constant of shape {value.shape} cannot be broadcast against an image tensor")


def spatial_scales(net: Net, order: list[Node]) -> dict[str, Fraction]:
    """Spatial scale of every tensor relative to the input (DepthToSpace multiplies, strides divide)."""
    scale: dict[str, Fraction] = {}
    for n in order:
        ins = [scale[i] for i in n.inputs if i in scale]
        s = ins[0] if ins else Fraction(1)
        if n.op in ("DepthToSpace", "_PixelShuffle"):
            s *= int(n.attrs["block_size"])
        elif n.op in ("_Conv", "Conv2D"):
            s /= hw_attr(n, "strides")[0]
        elif n.op == "Conv2DBackpropInput":
            s *= hw_attr(n, "strides")[0]
        scale[n.name] = s
    return scale


def topological(net: Net, roots: list[str]) -> list[Node]:
    order, done, stack = [], set(), [(r, False) for r in reversed(roots)]
    while stack:
        name, expanded = stack.pop()
        if name in done or name not in net.nodes:
            continue
        if expanded:
            done.add(name)
            order.append(net.nodes[name])
            continue
        stack.append((name, True))
        for i in reversed(net.nodes[name].inputs):
            if i not in done and i in net.nodes:
                stack.append((i, False))
    return order




@dataclass
class Plan:
    """What a lowering walks: the rewritten nodes from the one input to the chosen output, in order."""

    net: Net
    order: list[Node]  # topological, the Placeholder first among its dependants
    placeholder: str
    output: str
    in_channels: int | None  # from the Placeholder's shape; None where the export leaves it open


def plan_graph(graph: Graph, scale: int) -> Plan:
    """Rewrite `graph` and pick the output that is `scale` times the input (LapSRN has one per level)."""
    net = Net(graph)
    fuse_prelu(net)
    fuse_leaky(net)
    fuse_conv_bias(net)
    fuse_depth_to_space(net)

    # outputs: what nothing consumes (exports may also carry training leftovers; only the chosen output's
    # ancestors are lowered, so those never matter)
    used = {i for n in net.nodes.values() for i in n.inputs}
    sinks = [net.resolve(n.name) for n in graph.nodes
             if n.name not in used and n.op not in ("Const", "Dequantize") and n.name not in net.consts]
    sinks = list(dict.fromkeys(s for s in sinks if s in net.nodes and net.nodes[s].op != "Placeholder"))
    scales = spatial_scales(net, topological(net, sinks))
    wanted = [s for s in sinks if scales.get(s) == scale]
    if not wanted:
        found = ", ".join(f"x{scales[s]}" for s in sinks if s in scales) or "nothing"
        raise ConfigError(f"upscales {found}, not x{scale}: wrong file for this model name")
    output = wanted[0]
    order = topological(net, [output])
    placeholders = [n.name for n in order if n.op == "Placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"the output {output!r} depends on {len(placeholders)} inputs (Placeholder), expected one")
    placeholder = placeholders[0]
    in_shape = next(n for n in graph.nodes if n.name == placeholder).attrs.get("shape")
    in_channels = in_shape[-1] if in_shape and len(in_shape) == 4 and in_shape[-1] > 0 else None
    for n in order:
        if n.name == placeholder:
            continue
        for i in n.inputs:
            if i not in net.consts and i not in net.nodes:
                raise ConfigError(f"{n.op} {n.name!r}: input {i!r} is not computed by the graph")
    return Plan(net, order, placeholder, output, in_channels)
