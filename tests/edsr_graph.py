"""Write an EDSR-structured TensorFlow GraphDef (.pb) without TensorFlow, for tests.

The real EDSR files (Saafke/EDSR_Tensorflow, ~40 MB each) cannot be downloaded here, so code that handles
EDSR is tested on a graph with the same structure, node ops and weight encoding, but few blocks/channels and
random weights. Structure, from upstream edsr.py/run.py at the commit pinned in the catalog:

    IteratorGetNext (Placeholder, NHWC float, BGR minus the DIV2K mean)
    -> Conv2D(resFilter_one) + BiasOne                         = out1
    -> B x [Conv2D + resBias, Relu, Conv2D + resBias, Mul 0.1, Add block input]
    -> Conv2D(resFilter_two) + BiasTwo, Add out1
    -> Conv2D(resFilter_three, to 3*s*s channels) + BiasThree
    -> DepthToSpace(s) "NHWC_output" -> Transpose [0,3,1,2] "NCHW_output"

Upstream uses ONE conv + DepthToSpace(s) for every scale, x4 included (PS = 3*scale*scale), not the paper's
two x2 stages. Biases are added with `Add` (TF 1.14's `x + var`), not `BiasAdd`, so OpenCV imports them as
separate Shift layers, as it does for the real files.

Weights are exported as TF's `quantize_weights` graph transform does: the float Const "W" becomes
"W_quantized_const" (quint8) + "W_quantized_min" + "W_quantized_max" (float scalars) feeding a `Dequantize`
node named "W" (T=quint8, mode=MIN_FIRST). OpenCV's TF importer decodes these at load time. Here every
kernel and bias is quantized; the real files have quint8 kernels but float biases, since quantize_weights
skips tensors under 1024 elements (256 biases) - both Const forms are exercised either way.

Only the protobuf wire format is needed: varints (wire type 0), 32-bit floats (5) and length-delimited
fields (2). Field numbers are those of tensorflow/core/framework/*.proto.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

DT_FLOAT, DT_INT32, DT_QUINT8 = 1, 3, 12
_DTYPES = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.int32): DT_INT32, np.dtype(np.uint8): DT_QUINT8}

INPUT_NAME = "IteratorGetNext"  # upstream's input, turned into a Placeholder by optimize_for_inference
OUTPUT_NAME = "NCHW_output"  # upstream's exported output (a Transpose of "NHWC_output")
RES_SCALE = 0.1  # EDSR residual scaling
TF_PRODUCER = 27  # GraphDef version written by TF 1.14


# ---- protobuf wire format ----

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_int(field: int, value: int) -> bytes:
    return _varint(field << 3 | 0) + _varint(value)


def _field_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _field_bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


# ---- TensorShapeProto, TensorProto, AttrValue, NodeDef, GraphDef ----

def _shape(dims) -> bytes:
    return b"".join(_field_bytes(2, _field_int(1, int(d))) for d in dims)  # dim=2 { size=1 }


def _tensor(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return (_field_int(1, _DTYPES[array.dtype])  # dtype
            + _field_bytes(2, _shape(array.shape))  # tensor_shape
            + _field_bytes(4, array.tobytes()))  # tensor_content, little-endian row-major


def attr_s(value: str) -> bytes:
    return _field_bytes(2, value)


def attr_i(value: int) -> bytes:
    return _field_int(3, value)


def attr_f(value: float) -> bytes:
    return _field_float(4, value)


def attr_b(value: bool) -> bytes:
    return _field_int(5, int(value))


def attr_type(dtype: int) -> bytes:
    return _field_int(6, dtype)


def attr_shape(dims) -> bytes:
    return _field_bytes(7, _shape(dims))


def attr_tensor(array: np.ndarray) -> bytes:
    return _field_bytes(8, _tensor(array))


def attr_ints(values) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field_bytes(1, _field_bytes(3, packed))  # list=1 { i=3, packed as TF writes it }


def node_def(name: str, op: str, inputs=(), attrs: dict[str, bytes] | None = None) -> bytes:
    out = _field_bytes(1, name) + _field_bytes(2, op)
    out += b"".join(_field_bytes(3, i) for i in inputs)
    for key, value in sorted((attrs or {}).items()):  # map<string, AttrValue> entries: key=1, value=2
        out += _field_bytes(5, _field_bytes(1, key) + _field_bytes(2, value))
    return out


def graph_def(nodes: list[bytes]) -> bytes:
    return b"".join(_field_bytes(1, n) for n in nodes) + _field_bytes(4, _field_int(1, TF_PRODUCER))


# ---- quantize_weights / Dequantize(MIN_FIRST) ----

def quantize_min_first(values: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """quint8 + min + max as TF's quantize_weights writes them (range widened to contain 0)."""
    values = np.asarray(values, np.float32)
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if lo == hi:  # quantize_weights' rule for a constant tensor
        hi = lo + 1.0 if abs(lo) < 1e-6 else (2.0 * lo if lo > 0 else lo / 2.0)
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    steps = 255.0 / (hi - lo)  # FloatToQuantized: 256 / ((hi - lo) * 256 / 255)

    def round_away(x):  # C's round(): half away from zero
        return np.sign(x) * np.floor(np.abs(x) + 0.5)

    q = round_away(values.astype(np.float64) * steps) - round_away(lo * steps)
    return np.clip(q, 0, 255).astype(np.uint8), np.float32(lo), np.float32(hi)


def dequantize_min_first(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Dequantize mode MIN_FIRST: q * s + round(min / s) * s with s = (max - min) / 255, so that 0.0 is
    exactly representable. Written in float32 as OpenCV's TF importer computes it."""
    step = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    offset = step * np.float32(np.rint(np.float32(lo) / step))
    return np.asarray(q).astype(np.float32) * step + offset


class GraphWriter:
    """Collects NodeDefs; `weight` writes a float Const, or quantize_weights' four nodes for it."""

    def __init__(self, quantized: bool):
        self.quantized = quantized
        self.nodes: list[bytes] = []
        self._used: dict[str, int] = {}

    def name(self, base: str) -> str:
        """TF-style unique names: Conv2D, Conv2D_1, ..."""
        n = self._used.get(base, 0)
        self._used[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def add(self, name: str, op: str, inputs=(), attrs=None) -> str:
        self.nodes.append(node_def(name, op, inputs, attrs))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        return self.add(name, "Const", attrs={"dtype": attr_type(_DTYPES[value.dtype]), "value": attr_tensor(value)})

    def weight(self, name: str, value: np.ndarray) -> str:
        if not self.quantized:
            return self.const(name, np.asarray(value, np.float32))
        q, lo, hi = quantize_min_first(value)
        inputs = (self.const(f"{name}_quantized_const", q),
                  self.const(f"{name}_quantized_min", np.array(lo, np.float32)),
                  self.const(f"{name}_quantized_max", np.array(hi, np.float32)))
        return self.add(name, "Dequantize", inputs, {"T": attr_type(DT_QUINT8), "mode": attr_s("MIN_FIRST")})

    def placeholder(self, name: str, channels: int) -> str:
        return self.add(name, "Placeholder",
                        attrs={"dtype": attr_type(DT_FLOAT), "shape": attr_shape([-1, -1, -1, channels])})

    def conv3x3(self, x: str, kernel: str, bias: str) -> str:
        conv = self.add(self.name("Conv2D"), "Conv2D", (x, kernel), {
            "T": attr_type(DT_FLOAT), "data_format": attr_s("NHWC"), "dilations": attr_ints([1, 1, 1, 1]),
            "padding": attr_s("SAME"), "strides": attr_ints([1, 1, 1, 1]), "use_cudnn_on_gpu": attr_b(True)})
        return self.binary("Add", conv, bias)

    def binary(self, op: str, a: str, b: str) -> str:
        return self.add(self.name(op.lower()), op, (a, b), {"T": attr_type(DT_FLOAT)})

    def to_bytes(self) -> bytes:
        return graph_def(self.nodes)


# ---- EDSR ----

def edsr_weights(*, scale: int = 2, blocks: int = 2, channels: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under upstream's variable names; kernels are HWIO as TF stores them."""
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return rng.normal(0.0, 0.05, shape).astype(np.float32)

    out_ch = 3 * scale * scale
    w = {"resFilter_one": draw(3, 3, 3, channels), "BiasOne": draw(channels)}
    for i in range(2 * blocks):
        w[f"resFilter{i}"] = draw(3, 3, channels, channels)
        w[f"resBias{i}"] = draw(channels)
    w["resFilter_two"] = draw(3, 3, channels, channels)
    w["BiasTwo"] = draw(channels)
    w["resFilter_three"] = draw(3, 3, channels, out_ch)
    w["BiasThree"] = draw(out_ch)
    return w


def build_edsr_graph(path: Path, *, scale: int = 2, blocks: int = 2, channels: int = 8, seed: int = 0,
                     quantized: bool = True) -> None:
    """Write an EDSR_x{scale}.pb-structured graph with `edsr_weights(...)` of the same arguments to `path`."""
    if scale not in (2, 3, 4):
        raise ValueError(f"EDSR upstream has x2, x3, x4 models, not x{scale}")
    w = edsr_weights(scale=scale, blocks=blocks, channels=channels, seed=seed)
    g = GraphWriter(quantized)
    x = g.placeholder(INPUT_NAME, 3)
    x = out1 = g.conv3x3(x, g.weight("resFilter_one", w["resFilter_one"]), g.weight("BiasOne", w["BiasOne"]))
    for i in range(blocks):
        k = 2 * i
        y = g.conv3x3(x, g.weight(f"resFilter{k}", w[f"resFilter{k}"]), g.weight(f"resBias{k}", w[f"resBias{k}"]))
        y = g.add(g.name("Relu"), "Relu", (y,), {"T": attr_type(DT_FLOAT)})
        k += 1
        y = g.conv3x3(y, g.weight(f"resFilter{k}", w[f"resFilter{k}"]), g.weight(f"resBias{k}", w[f"resBias{k}"]))
        mul = g.name("mul")  # `x * 0.1`: a float scalar Const that quantize_weights leaves alone
        y = g.add(mul, "Mul", (y, g.const(f"{mul}/y", np.array(RES_SCALE, np.float32))), {"T": attr_type(DT_FLOAT)})
        x = g.binary("Add", x, y)
    x = g.conv3x3(x, g.weight("resFilter_two", w["resFilter_two"]), g.weight("BiasTwo", w["BiasTwo"]))
    x = g.binary("Add", x, out1)
    x = g.conv3x3(x, g.weight("resFilter_three", w["resFilter_three"]), g.weight("BiasThree", w["BiasThree"]))
    x = g.add("NHWC_output", "DepthToSpace", (x,),
              {"T": attr_type(DT_FLOAT), "block_size": attr_i(scale), "data_format": attr_s("NHWC")})
    perm = g.const(f"{OUTPUT_NAME}/perm", np.array([0, 3, 1, 2], np.int32))
    g.add(OUTPUT_NAME, "Transpose", (x, perm), {"T": attr_type(DT_FLOAT), "Tperm": attr_type(DT_INT32)})
    Path(path).write_bytes(g.to_bytes())
