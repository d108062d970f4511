"""The PyTorch engine: the model's TensorFlow graph, read from the same `.pb` file by `models.graphdef` (no
TensorFlow), lowered once into a torch module, with `dnn_superres`'s pre- and post-processing written out as in
the OpenCV engine. fp32 on the CPU, or bf16 (opt-in) where the CPU computes bf16 natively; on CUDA fp16/bf16
(or fp32 without TF32), channels-last, cuDNN autotuning. bf16 runs the whole module in bf16 (float32 sums
inside oneDNN/cuDNN) and converts the output back to float32 before the colour and rounding code.

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

Models whose file is ONNX (our own fast/quality models, `spec.file_format == "onnx"`) are lowered the same way
by `build_onnx_module`: their graphs use only Conv, PRelu, Relu, Add and DepthToSpace, each one torch op.
"""

from __future__ import annotations

import platform
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.catalog import ModelSpec
from models.engines.dnn_superres_io import DnnSuperResIO
from models.graph_rewrite import Net as _Net
from models.graph_rewrite import hw_attr as _hw_attr
from models.graph_rewrite import nchw_const as _nchw_const
from models.graph_rewrite import plan_graph
from models.graph_rewrite import same_pads as _same_pads
from models.graphdef import Graph, GraphDefError, Node, read_graphdef
from pipeline.errors import ConfigError, DeviceOutOfMemory

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BINARY = {"Add", "AddV2", "BiasAdd", "Sub", "Mul", "RealDiv", "Maximum", "Minimum"}
_UNARY = {"Relu", "Abs", "Neg", "Tanh", "Sigmoid"}


def cpu_has_native_bf16() -> bool:
    """Whether torch's oneDNN computes bf16 in this CPU's hardware: AVX512-BF16 or AMX on x86, the BF16 extension on
    ARM. torch (2.13) has no public check: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is also true on plain
    AVX-512, where oneDNN emulates bf16 and runs slower than fp32, so on x86 the instruction sets are asked too."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return True  # aarch64: the check above is cpuinfo's "has the BF16 extension"
    except (AttributeError, RuntimeError):  # a torch without these private checks: say no, never crash
        return False


def torch_has_cuda() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver reads as "no GPU", never as a crash at start-up
        return False


# ----------------------------------------------------------------------------------------------------------
# torch steps (the graph rewrites they run on: models/graph_rewrite.py, shared with the ONNX export)


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


def build_module(graph: Graph, scale: int) -> GraphModule:
    """Lower `graph` to a GraphModule for the output that is `scale` times the input (LapSRN has several)."""
    plan = plan_graph(graph, scale)
    net, order, placeholder, output, in_channels = (plan.net, plan.order, plan.placeholder, plan.output,
                                                    plan.in_channels)

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


class OnnxModule(nn.Module):
    """An ONNX graph of Conv / PRelu / Relu / Add / DepthToSpace as torch ops, nodes in the file's order (ONNX
    requires topological order); each intermediate dropped after its last consumer."""

    _OPS = {"Conv", "PRelu", "Relu", "Add", "DepthToSpace"}

    def __init__(self, path: Path):
        super().__init__()
        import onnx  # only where an ONNX model is used: ~0.5 s to import
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends: any of them means "not a model file"
            raise ConfigError(f"cannot read ONNX model file {path}: {exc}") from None
        graph = model.graph
        consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ConfigError(f"{path}: expected one input and one output, found {len(inputs)} and {len(graph.output)}")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.params = nn.ParameterDict()
        self.nodes: list[tuple[str, list[str], str, dict]] = []
        for node in graph.node:
            if node.op_type not in self._OPS or len(node.output) != 1:
                raise ConfigError(f"ONNX op {node.op_type!r} ({node.name!r}) is not supported by the torch engine")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for name in node.input:
                if name in consts and name.replace(".", "_") not in self.params:
                    self.params[name.replace(".", "_")] = nn.Parameter(consts[name], requires_grad=False)
            if node.op_type == "Conv":
                if any(v != 1 for v in attrs.get("strides", [1, 1]) + attrs.get("dilations", [1, 1])) \
                        or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                    raise ConfigError(f"Conv {node.name!r}: only stride 1, dilation 1, explicit pads")
                pads = attrs.get("pads", [0, 0, 0, 0])
                if pads[0] != pads[2] or pads[1] != pads[3]:
                    raise ConfigError(f"Conv {node.name!r}: asymmetric pads {pads}")
                attrs = {"padding": (pads[0], pads[1]), "groups": int(attrs.get("group", 1))}
            elif node.op_type == "DepthToSpace":
                attrs = {"block": int(attrs["blocksize"]), "crd": attrs.get("mode", b"DCR") in (b"CRD", "CRD")}
            self.nodes.append((node.op_type, list(node.input), node.output[0], attrs))
        first = next((i for op, i, _, _ in self.nodes if op == "Conv"), None)
        self.in_channels = int(consts[first[1]].shape[1]) if first else 1
        last_use: dict[str, int] = {}
        for k, (_, ins, _, _) in enumerate(self.nodes):
            for i in ins:
                last_use[i] = k
        self.release = [[i for i in ins if last_use.get(i) == k and i not in consts] for k, (_, ins, _, _)
                        in enumerate(self.nodes)]

    def _value(self, values: dict, name: str) -> torch.Tensor:
        key = name.replace(".", "_")
        return self.params[key] if key in self.params else values[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x}
        for (op, ins, out, attrs), dead in zip(self.nodes, self.release):
            args = [self._value(values, i) for i in ins if i]
            if op == "Conv":
                y = F.conv2d(args[0], args[1].to(x.dtype), args[2].to(x.dtype) if len(args) > 2 else None,
                             padding=attrs["padding"], groups=attrs["groups"])
            elif op == "PRelu":
                y = F.prelu(args[0], args[1].reshape(-1).to(x.dtype))
            elif op == "Relu":
                y = F.relu(args[0])
            elif op == "Add":
                y = args[0] + args[1]
            elif attrs["crd"] or args[0].shape[1] == attrs["block"] ** 2:  # one output channel: DCR = CRD
                y = F.pixel_shuffle(args[0], attrs["block"])
            else:
                y = _DepthToSpace(attrs["block"])(args[0])
            values[out] = y
            for i in dead:
                if i != self.output_name:
                    values.pop(i, None)
        return values[self.output_name]


def build_onnx_module(path: Path, scale: int) -> OnnxModule:
    """Lower an ONNX model file and check that it upscales x`scale` (ConfigError otherwise)."""
    module = OnnxModule(path)
    with torch.inference_mode():
        out = module(torch.zeros(1, module.in_channels, 8, 8))
    if out.shape[-1] != 8 * scale:
        raise ConfigError(f"upscales x{out.shape[-1] / 8:g}, not x{scale}: wrong file for this model name")
    return module


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
        if kind == "cpu" and precision == "fp16":
            raise ConfigError("precision fp16 needs a CUDA device; on the CPU use fp32 (or bf16 where the CPU has it)")
        if kind == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
            raise ConfigError("precision bf16 on the CPU needs native bf16 (AVX512-BF16 or AMX on x86, BF16 on ARM), "
                              "which this CPU lacks (emulated, it runs slower than fp32): use --precision fp32")
        self.device = kind
        self.precision = precision
        self._torch_device = torch.device(device)
        self._dtype = _PRECISIONS[precision]
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            if getattr(spec, "file_format", "pb") == "onnx":
                module = build_onnx_module(model_file, spec.scale)
            else:
                try:
                    graph = read_graphdef(model_file)
                except (OSError, GraphDefError) as exc:
                    raise ConfigError(f"cannot read model file {model_file}: {exc}") from None
                module = build_module(graph, spec.scale)
        except ConfigError as exc:
            if str(exc).startswith("cannot read"):
                raise
            raise ConfigError(f"the model file for {spec.name}: {exc}") from None
        expected_channels = 3 if spec.input_kind == "bgr" else 1
        if module.in_channels != expected_channels:
            raise ConfigError(f"the model file for {spec.name} takes {module.in_channels} channels, not "
                              f"{expected_channels}: wrong file for this model name")
        module.eval()
        # channels-last (NHWC in memory) on both devices: cuDNN's tensor-core kernels want it, and on the CPU
        # oneDNN runs these small-channel convs 1.1-1.9x faster in it (measured, fp32 results within 5e-7), and
        # its native bf16 convs want it too.
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
                x = x.pin_memory().to(self._torch_device, non_blocking=True)
            x = x.to(self._dtype).contiguous(memory_format=torch.channels_last)
            try:
                y = self._module(x)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise DeviceOutOfMemory(f"CUDA out of memory on a batch of {tuple(blob.shape)}") from None
            # float32 again before the colour and rounding code; .cpu() waits for the GPU; NCHW and contiguous
            return y.to(torch.float32).cpu().contiguous().numpy()
