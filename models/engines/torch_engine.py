"""The PyTorch engine: the model's TensorFlow graph, read from the same `.pb` file by `models.graphdef` (no
TensorFlow), lowered once into a torch module, with `dnn_superres`'s pre- and post-processing written out as in
the OpenCV engine. fp32 on the CPU; on CUDA fp16/bf16 (or fp32 without TF32), channels-last, cuDNN autotuning.

How the network is built — a graph lowered to a module, not one hand-written module per family:
the four families' exports differ in ways a hand-written module would have to re-discover from the graph
anyway (LapSRN: an image branch and a feature branch per pyramid level joined by Adds, one-element biases
broadcast over 64 channels, LeakyReLU written as relu(x) - 0.2*relu(-x), one output per level; FSRCNN: PReLU
written as relu(x) + alpha*(x - |x|)*0.5 and a scalar bias after DepthToSpace; EDSR: Dequantize'd weights, and
its real files cannot be seen here). So the graph is walked from its input to the wanted output and each op
becomes a torch step, after a few exact rewrites:

- Conv2D + Add/BiasAdd of a constant [C] or [1] -> one conv with bias;
- the PReLU idiom above -> F.prelu and the LeakyReLU idiom -> F.leaky_relu (bit-identical to the ops they
  replace: x - |x| = 2x and *0.5 are exact);
- Conv -> DepthToSpace -> Add(constant bias) -> the bias folded into the conv (adding before or after a
  pixel move is the same);
- DepthToSpace (DCR order in TF/OpenCV) of a conv's output -> the conv's output channels permuted so torch's
  pixel_shuffle (CRD order) gives the same picture (no-op for one channel).

Anything else is run op by op (Add, Sub, Mul, RealDiv, Maximum, Minimum, Relu, Abs, Neg, Tanh, Sigmoid,
DepthToSpace, Conv2DBackpropInput); an op outside that list is a ConfigError when the engine is built.
Padding follows TF exactly: 'SAME' pads total = (out-1)*stride + k_eff - in, before = total // 2, so odd kernels
pad k//2 and LapSRN's 4x4 kernels pad 1 before and 2 after.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.catalog import ModelSpec
from models.engines.dnn_superres_io import DnnSuperResIO
from models.graphdef import Graph, GraphDefError, Node, read_graphdef
from pipeline.errors import ConfigError, DeviceOutOfMemory

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BINARY = {"Add", "AddV2", "BiasAdd", "Sub", "Mul", "RealDiv", "Maximum", "Minimum"}
_UNARY = {"Relu", "Abs", "Neg", "Tanh", "Sigmoid"}
_ALIASES = {"Identity", "StopGradient", "Snapshot"}


def torch_has_cuda() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver reads as "no GPU", never as a crash at start-up
        return False


# ----------------------------------------------------------------------------------------------------------
# graph rewriting (on the parsed nodes; every rewrite is exact)


class _Net:
    """A Graph as the rewrites see it: constants apart, Identity and the final NHWC->NCHW Transpose resolved
    to their inputs, node inputs as plain node names."""

    def __init__(self, graph: Graph):
        self.consts = dict(graph.constants)
        self.nodes: dict[str, Node] = {}
        for n in graph.nodes:
            if n.name in self.consts:
                continue
            if n.op in _ALIASES or (n.op == "Transpose" and self._is_output_transpose(n)):
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


def _scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _fuse_prelu(net: _Net) -> None:
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
            if m0 is None or _scalar(half) != 0.5:
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


def _fuse_leaky(net: _Net) -> None:
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
        if relu_neg is None or _scalar(slope) is None:
            continue
        neg = net.op_is(relu_neg.inputs[0], "Mul", "Neg")
        if neg is None:
            continue
        if neg.op == "Mul":
            y, minus_one = net.split_const(neg)
            if y != x or _scalar(minus_one) != -1.0:
                continue
        elif neg.inputs[0] != x:
            continue
        inner = {relu.name, mul.name, relu_neg.name, neg.name}
        if not net.single_use(*inner, within=inner | {sub.name}):
            continue
        for name in inner:
            del net.nodes[name]
        net.nodes[sub.name] = Node(sub.name, "_LeakyReLU", [x], {"slope": _scalar(slope)})


def _channel_vector(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant that adds per output channel: shape [C], [1] or scalar -> float32 [C]."""
    if value is None or value.dtype.kind != "f" or value.ndim > 1 or value.size not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float32).reshape(-1), (channels,)).copy()


def _fuse_conv_bias(net: _Net) -> None:
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
        bias = _channel_vector(value, weight.shape[3])
        if other != conv.name or bias is None:
            continue
        # the Add takes the conv's place: same name for its consumers, same inputs as the conv
        del net.nodes[conv.name]
        net.nodes[user.name] = Node(user.name, "_Conv", conv.inputs, {**conv.attrs, "_bias": bias})


def _fuse_depth_to_space(net: _Net) -> None:
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
            after = _channel_vector(value, channels)
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


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size/stride); total padding split with the smaller half first."""
    k_eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


def _hw_attr(node: Node, key: str) -> tuple[int, int]:
    values = node.attrs.get(key) or [1, 1, 1, 1]
    if node.attrs.get("data_format", "NHWC") != "NHWC":
        raise ConfigError(f"{node.op} {node.name!r}: data_format {node.attrs.get('data_format')} is not supported")
    return int(values[1]), int(values[2])


class _Conv(nn.Module):
    def __init__(self, node: Node):
        super().__init__()
        weight = node.attrs["_weight"]  # TF HWIO -> torch OIHW
        self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight.transpose(3, 2, 0, 1))),
                                   requires_grad=False)
        bias = node.attrs.get("_bias")
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
        self.stride = _hw_attr(node, "strides")
        self.dilation = _hw_attr(node, "dilations")
        self.kernel = weight.shape[:2]
        self.same = node.attrs.get("padding", "VALID") == "SAME"
        if node.attrs.get("padding") not in ("SAME", "VALID"):
            raise ConfigError(f"Conv2D {node.name!r}: padding {node.attrs.get('padding')!r} is not supported")
        # stride 1: the padding does not depend on the input size
        self.static_pads = None
        if not self.same:
            self.static_pads = (0, 0, 0, 0)
        elif self.stride == (1, 1):
            self.static_pads = (*_same_pads(1, self.kernel[0], 1, self.dilation[0]),
                                *_same_pads(1, self.kernel[1], 1, self.dilation[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_pads is not None:
            top, bottom, left, right = self.static_pads
        else:
            top, bottom = _same_pads(x.shape[2], self.kernel[0], self.stride[0], self.dilation[0])
            left, right = _same_pads(x.shape[3], self.kernel[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)


class _ConvTranspose(nn.Module):
    """Conv2DBackpropInput: the gradient of a TF conv whose input had `output_sizes`.

    Full transposed conv ((in-1)*stride + k_eff), then the window TF's forward conv padded away is cut off:
    rows [pad_before, pad_before + out) with pad_before = total // 2 of the forward conv's SAME padding
    (0 for VALID); rows past the full result are zeros.
    """

    def __init__(self, node: Node, weight: np.ndarray, out_hw: tuple[int, int] | None):
        super().__init__()
        # TF filter [kh, kw, out_channels, in_channels] -> torch conv_transpose weight [in, out, kh, kw]
        self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight.transpose(3, 2, 0, 1))),
                                   requires_grad=False)
        self.stride = _hw_attr(node, "strides")
        self.dilation = _hw_attr(node, "dilations")
        self.kernel = weight.shape[:2]
        self.same = node.attrs.get("padding") == "SAME"
        self.out_hw = out_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = F.conv_transpose2d(x, self.weight, None, self.stride, 0, 0, 1, self.dilation)
        crops = []
        for axis in (0, 1):
            size_in, k, s, d = x.shape[2 + axis], self.kernel[axis], self.stride[axis], self.dilation[axis]
            k_eff = (k - 1) * d + 1
            if self.out_hw is not None:
                out = self.out_hw[axis]
            else:
                out = size_in * s if self.same else (size_in - 1) * s + k_eff
            before = 0
            if self.same:
                before = max((size_in - 1) * s + k_eff - out, 0) // 2
            crops.append((before, out))
        (top, out_h), (left, out_w) = crops
        full = full[:, :, top:top + out_h, left:left + out_w]
        pad_h, pad_w = out_h - full.shape[2], out_w - full.shape[3]
        if pad_h or pad_w:
            full = F.pad(full, (0, pad_w, 0, pad_h))
        return full


class _Binary(nn.Module):
    def __init__(self, op: str, const: np.ndarray | None = None, const_first: bool = False):
        super().__init__()
        self.op, self.const_first = op, const_first
        if const is not None:
            self.register_buffer("const", torch.from_numpy(_nchw_const(const)))
        else:
            self.const = None

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.const is not None:
            a, b = (self.const, a) if self.const_first else (a, self.const)
        if self.op in ("Add", "AddV2", "BiasAdd"):
            return a + b
        if self.op == "Sub":
            return a - b
        if self.op == "Mul":
            return a * b
        if self.op == "RealDiv":
            return a / b
        if self.op == "Maximum":
            return torch.maximum(a, b)
        return torch.minimum(a, b)


def _nchw_const(value: np.ndarray) -> np.ndarray:
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


class _Unary(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "Relu":
            return F.relu(x)
        if self.op == "Abs":
            return x.abs()
        if self.op == "Neg":
            return -x
        if self.op == "Tanh":
            return torch.tanh(x)
        return torch.sigmoid(x)


class _PReLU(nn.Module):
    def __init__(self, alpha: np.ndarray):
        super().__init__()
        self.alpha = nn.Parameter(torch.from_numpy(alpha.copy()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha if self.alpha.numel() in (1, x.shape[1]) else self.alpha[:1]
        return F.prelu(x, alpha)


class _LeakyReLU(nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.slope)


class _PixelShuffle(nn.Module):
    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(x, self.block)


class _DepthToSpace(nn.Module):
    """TF DepthToSpace (DCR) on an NCHW tensor, where no conv's channels could be permuted instead."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, depth, h, w = x.shape
        b = self.block
        c = depth // (b * b)
        if c == 1:
            return F.pixel_shuffle(x, b)
        x = x.reshape(n, b, b, c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(n, c, h * b, w * b)


class GraphModule(nn.Module):
    """A frozen TF graph, from its one input to the chosen outputs, as a list of torch steps.

    `forward(x)` takes NCHW float and returns the output tensor (NCHW). Intermediates are dropped as soon as
    their last consumer has run, so memory follows the live set, not the depth (EDSR has ~70 convs).
    """

    def __init__(self, steps: list[nn.Module], wiring: list[tuple[list[int], int]], release: list[list[int]],
                 output: int, n_slots: int, scale: Fraction, in_channels: int):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.wiring = wiring
        self.release = release
        self.output = output
        self.n_slots = n_slots
        self.scale = scale
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor | None] = [None] * self.n_slots
        values[0] = x
        for step, (ins, out), dead in zip(self.steps, self.wiring, self.release):
            values[out] = step(*[values[i] for i in ins])
            for i in dead:
                values[i] = None
        return values[self.output]


def _scales(net: _Net, order: list[Node]) -> dict[str, Fraction]:
    """Spatial scale of every tensor relative to the input (DepthToSpace multiplies, strides divide)."""
    scale: dict[str, Fraction] = {}
    for n in order:
        ins = [scale[i] for i in n.inputs if i in scale]
        s = ins[0] if ins else Fraction(1)
        if n.op in ("DepthToSpace", "_PixelShuffle"):
            s *= int(n.attrs["block_size"])
        elif n.op in ("_Conv", "Conv2D"):
            s /= _hw_attr(n, "strides")[0]
        elif n.op == "Conv2DBackpropInput":
            s *= _hw_attr(n, "strides")[0]
        scale[n.name] = s
    return scale


def _topological(net: _Net, roots: list[str]) -> list[Node]:
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


def build_module(graph: Graph, scale: int) -> GraphModule:
    """Lower `graph` to a GraphModule for the output that is `scale` times the input (LapSRN has several)."""
    net = _Net(graph)
    _fuse_prelu(net)
    _fuse_leaky(net)
    _fuse_conv_bias(net)
    _fuse_depth_to_space(net)

    # outputs: what nothing consumes (exports may also carry training leftovers; only the chosen output's
    # ancestors are lowered, so those never matter)
    used = {i for n in net.nodes.values() for i in n.inputs}
    sinks = [net.resolve(n.name) for n in graph.nodes
             if n.name not in used and n.op not in ("Const", "Dequantize") and n.name not in net.consts]
    sinks = list(dict.fromkeys(s for s in sinks if s in net.nodes and net.nodes[s].op != "Placeholder"))
    scales = _scales(net, _topological(net, sinks))
    wanted = [s for s in sinks if scales.get(s) == scale]
    if not wanted:
        found = ", ".join(f"x{scales[s]}" for s in sinks if s in scales) or "nothing"
        raise ConfigError(f"upscales {found}, not x{scale}: wrong file for this model name")
    output = wanted[0]
    order = _topological(net, [output])
    placeholders = [n.name for n in order if n.op == "Placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"the output {output!r} depends on {len(placeholders)} inputs (Placeholder), expected one")
    placeholder = placeholders[0]

    in_shape = next(n for n in graph.nodes if n.name == placeholder).attrs.get("shape")
    in_channels = in_shape[-1] if in_shape and len(in_shape) == 4 and in_shape[-1] > 0 else None

    slots = {placeholder: 0}
    steps, wiring = [], []
    for n in order:
        if n.name == placeholder:
            continue
        acts = [i for i in n.inputs if i not in net.consts]
        for i in acts:
            if i not in slots:
                raise ConfigError(f"{n.op} {n.name!r}: input {i!r} is not computed by the graph")
        step, ins = _lower(net, n, acts)
        slots[n.name] = len(slots)
        steps.append(step)
        wiring.append(([slots[i] for i in ins], slots[n.name]))
    # release each slot after its last use (never the output)
    last_use: dict[int, int] = {}
    for k, (ins, _) in enumerate(wiring):
        for i in ins:
            last_use[i] = k
    release: list[list[int]] = [[] for _ in wiring]
    for slot, k in last_use.items():
        if slot != slots[output]:
            release[k].append(slot)
    if in_channels is None:
        first = next((s for s in steps if isinstance(s, _Conv)), None)
        in_channels = first.weight.shape[1] if first is not None else 1
    return GraphModule(steps, wiring, release, slots[output], len(slots), Fraction(scale), in_channels)


def _lower(net: _Net, n: Node, acts: list[str]) -> tuple[nn.Module, list[str]]:
    if n.op == "_Conv":
        return _Conv(n), acts
    if n.op == "Conv2D":  # weights not constant: not a frozen inference graph
        raise ConfigError(f"Conv2D {n.name!r}: its filter is not a constant")
    if n.op == "_PReLU":
        return _PReLU(n.attrs["alpha"]), acts
    if n.op == "_LeakyReLU":
        return _LeakyReLU(n.attrs["slope"]), acts
    if n.op == "_PixelShuffle":
        return _PixelShuffle(int(n.attrs["block_size"])), acts
    if n.op == "DepthToSpace":
        return _DepthToSpace(int(n.attrs["block_size"])), acts
    if n.op in _UNARY:
        return _Unary(n.op), acts
    if n.op in _BINARY:
        if len(n.inputs) != 2:
            raise ConfigError(f"{n.op} {n.name!r}: expected two inputs")
        a, b = n.inputs
        if a in net.consts and b in net.consts:
            raise ConfigError(f"{n.op} {n.name!r}: constant folding is not supported")
        if a in net.consts:
            return _Binary(n.op, net.consts[a], const_first=True), [b]
        if b in net.consts:
            return _Binary(n.op, net.consts[b]), [a]
        return _Binary(n.op), [a, b]
    if n.op == "Conv2DBackpropInput":
        sizes, weight = (net.consts.get(i) for i in n.inputs[:2])
        if weight is None or weight.ndim != 4:
            raise ConfigError(f"Conv2DBackpropInput {n.name!r}: its filter is not a constant")
        out_hw = None
        if sizes is not None and sizes.size == 4 and sizes.reshape(-1)[1] > 0 and sizes.reshape(-1)[2] > 0:
            out_hw = (int(sizes.reshape(-1)[1]), int(sizes.reshape(-1)[2]))
        return _ConvTranspose(n, weight, out_hw), [n.inputs[2]]
    raise ConfigError(f"graph op {n.op!r} ({n.name!r}) is not supported by the torch engine")


# ----------------------------------------------------------------------------------------------------------
# the engine


class TorchEngine(DnnSuperResIO):
    name = "torch"

    def __init__(self, spec: ModelSpec, model_file: Path, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0):
        self.spec = spec
        self.scale = spec.scale
        if precision not in _PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}: use fp32, fp16 or bf16")
        kind = device.split(":", 1)[0]
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
        if kind == "cuda" and not torch_has_cuda():
            raise ConfigError("--device cuda: torch sees no usable CUDA GPU (torch.cuda.is_available() is False)")
        if kind == "cpu" and precision != "fp32":
            raise ConfigError(f"precision {precision} needs a CUDA device; the CPU path is fp32")
        self.device = kind
        self.precision = precision
        self._torch_device = torch.device(device)
        self._dtype = _PRECISIONS[precision]
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            graph = read_graphdef(model_file)
        except (OSError, GraphDefError) as exc:
            raise ConfigError(f"cannot read model file {model_file}: {exc}") from None
        try:
            module = build_module(graph, spec.scale)
        except ConfigError as exc:
            raise ConfigError(f"the model file for {spec.name}: {exc}") from None
        expected_channels = 3 if spec.input_kind == "bgr" else 1
        if module.in_channels != expected_channels:
            raise ConfigError(f"the model file for {spec.name} takes {module.in_channels} channels, not "
                              f"{expected_channels}: wrong file for this model name")
        module.eval()
        # channels-last (NHWC in memory) on both devices: cuDNN's tensor-core kernels want it, and on the CPU
        # oneDNN runs these small-channel convs 1.1-1.9x faster in it (measured, fp32 results within 5e-7).
        if kind == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile sizes: autotune once per shape
            if precision == "fp32":
                # fp32 means fp32: no TF32 tensor-core rounding (process-wide switches in torch)
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self._module = module.to(device=self._torch_device, dtype=self._dtype, memory_format=torch.channels_last)

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale,
                "precision": self.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "channels_last": True,
                **(self._gpu() if self.device == "cuda" else {"gpu": None})}

    def _gpu(self) -> dict:
        free, total = torch.cuda.mem_get_info(self._torch_device)
        return {"gpu": torch.cuda.get_device_name(self._torch_device), "gpu_memory_gib": round(total / 2**30, 1),
                "gpu_free_gib": round(free / 2**30, 1)}

    # -- how much work per call ------------------------------------------------------------------------

    def default_batch(self) -> int:
        return 8 if self.device == "cuda" else 1  # several tiles per call keep a GPU's SMs busy

    def default_tile(self, batch: int) -> int:
        """On CUDA: the largest tile whose activations fit half of the free GPU memory (the rest for cuDNN
        workspaces and other processes), in steps of 32, between 64 and 1024. 256 on the CPU."""
        if self.device != "cuda":
            return 256
        free, _total = torch.cuda.mem_get_info(self._torch_device)
        widest = max((m.weight.shape[0] for m in self._module.modules() if hasattr(m, "weight") and m.weight is not None
                      and m.weight.dim() == 4), default=64)
        element = torch.finfo(self._dtype).bits // 8
        # per input pixel: a few live activations of the widest layer, and the fp32 output copy
        per_pixel = 3 * widest * element + 3 * self.scale * self.scale * 4
        side = int((free * 0.5 / (batch * per_pixel)) ** 0.5) // 32 * 32
        return max(64, min(1024, side))

    # -- the network on a float32 batch ----------------------------------------------------------------

    def forward(self, blob: np.ndarray) -> np.ndarray:
        """NCHW float32 in (the network's own input: Y in 0..1, or BGR minus the mean) -> NCHW float32 out."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32))
            if self.device == "cuda":
                x = x.pin_memory().to(self._torch_device, non_blocking=True).to(self._dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            try:
                y = self._module(x)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise DeviceOutOfMemory(f"CUDA out of memory on a batch of {tuple(blob.shape)}") from None
            # .cpu() waits for the GPU; the numpy array is NCHW and contiguous
            return y.to(torch.float32).cpu().contiguous().numpy()
