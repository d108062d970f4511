"""A small reader of TensorFlow GraphDef (`.pb`) files, in pure Python + numpy: no TensorFlow, no protobuf.

It decodes the protobuf wire format directly (varints and length-delimited fields) for the few messages a
frozen inference graph uses:

    GraphDef      node = 1 (repeated NodeDef)
    NodeDef       name = 1, op = 2, input = 3 (repeated), device = 4, attr = 5 (map<string, AttrValue>)
    AttrValue     list = 1, s = 2, i = 3, f = 4, b = 5, type = 6, shape = 7, tensor = 8
    ListValue     s = 2, i = 3, f = 4, b = 5, type = 6, shape = 7, tensor = 8 (all repeated)
    TensorProto   dtype = 1, tensor_shape = 2, tensor_content = 4, float_val = 5, double_val = 6, int_val = 7,
                  int64_val = 10, bool_val = 11, half_val = 13
    TensorShapeProto  dim = 2 (Dim: size = 1), unknown_rank = 3

`read_graphdef(path)` returns a `Graph`: its nodes in file order (name, op, inputs, attrs) and its constant
tensors as numpy arrays. Constants are `Const` nodes and, for graphs exported with TensorFlow's
`quantize_weights` graph transform (EDSR's upstream files), `Dequantize` nodes whose three inputs are a quint8
`Const` and its float min/max `Const`s: those are turned back into float32 here (see `dequantize_min_first`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto) -> numpy dtype.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8 = 1, 2, 3, 4, 5, 6
DT_STRING, DT_INT64, DT_BOOL, DT_QINT8, DT_QUINT8, DT_QINT32 = 7, 9, 10, 11, 12, 13
DT_BFLOAT16, DT_UINT16, DT_HALF = 14, 17, 19

_NUMPY_DTYPES = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_INT32: np.dtype("<i4"),
    DT_UINT8: np.dtype("u1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT8: np.dtype("i1"),
    DT_INT64: np.dtype("<i8"),
    DT_BOOL: np.dtype("?"),
    DT_QINT8: np.dtype("i1"),
    DT_QUINT8: np.dtype("u1"),
    DT_QINT32: np.dtype("<i4"),
    DT_UINT16: np.dtype("<u2"),
    DT_HALF: np.dtype("<f2"),
}

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class GraphDefError(ValueError):
    """The bytes are not a GraphDef this reader understands."""


# ----------------------------------------------------------------------------------------------------------
# protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphDefError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    """int32/int64 fields are varints of the two's-complement 64-bit value (negatives take 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes):
    """Yield (field number, wire type, value) for every field of one message; LEN values are bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _I32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise GraphDefError(f"unsupported wire type {wire} (field {number})")
        if pos > end:
            raise GraphDefError(f"truncated field {number}")
        yield number, wire, value


def _packed_varints(wire: int, value) -> list[int]:
    """A repeated varint field arrives packed (one LEN field) or one element per field."""
    if wire == _VARINT:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _packed_fixed(wire: int, value: bytes, fmt: str) -> list:
    size = struct.calcsize(fmt)
    if len(value) % size:
        raise GraphDefError("packed fixed-size field has a ragged length")
    return list(struct.unpack(f"<{len(value) // size}{fmt}", value))


# ----------------------------------------------------------------------------------------------------------
# messages


def _shape(buf: bytes) -> tuple[int, ...] | None:
    dims, unknown_rank = [], False
    for number, _, value in _fields(buf):
        if number == 2:  # Dim
            size = 0
            for n, _, v in _fields(value):
                if n == 1:
                    size = _signed64(v)
            dims.append(size)
        elif number == 3:
            unknown_rank = bool(value)
    return None if unknown_rank else tuple(dims)


def _tensor(buf: bytes) -> np.ndarray:
    dtype_enum, shape, content = DT_FLOAT, (), b""
    values: list = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype_enum = value
        elif number == 2:
            shape = _shape(value) or ()
        elif number == 4:
            content = value
        elif number == 5:  # float_val
            values += _packed_fixed(wire, value, "f")
        elif number == 6:  # double_val
            values += _packed_fixed(wire, value, "d")
        elif number in (7, 10, 11, 13):  # int_val (also quint8/uint8/int16/...), int64_val, bool_val, half_val
            values += [_signed64(v) for v in _packed_varints(wire, value)]
    if dtype_enum not in _NUMPY_DTYPES:
        raise GraphDefError(f"tensor dtype {dtype_enum} is not supported")
    dtype = _NUMPY_DTYPES[dtype_enum]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if content:
        array = np.frombuffer(content, dtype=dtype).copy()
        if array.size != count:
            raise GraphDefError(f"tensor_content has {array.size} values for shape {shape}")
    elif dtype_enum == DT_HALF:  # half_val holds the raw 16-bit patterns
        array = np.array(values, dtype=np.uint16).view(np.float16)
    else:
        array = np.array(values, dtype=dtype)
    if array.size != count:
        # TensorFlow's rule: fewer values than elements -> the last value is repeated (none -> zeros)
        fill = array[-1] if array.size else np.zeros((), dtype)
        array = np.concatenate([array, np.full(count - array.size, fill, dtype)])
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _list_value(buf: bytes) -> list:
    out: list = []
    for number, wire, value in _fields(buf):
        if number == 2:
            out.append(value.decode("utf-8", "replace"))
        elif number == 3:
            out += [_signed64(v) for v in _packed_varints(wire, value)]
        elif number == 4:
            out += _packed_fixed(wire, value, "f") if wire == _LEN else list(struct.unpack("<f", value))
        elif number == 5:
            out += [bool(v) for v in _packed_varints(wire, value)]
        elif number == 6:
            out += _packed_varints(wire, value)
        elif number == 7:
            out.append(_shape(value))
        elif number == 8:
            out.append(_tensor(value))
    return out


def _attr_value(buf: bytes) -> Any:
    result: Any = None
    for number, wire, value in _fields(buf):
        if number == 1:
            result = _list_value(value)
        elif number == 2:
            result = value.decode("utf-8", "replace")
        elif number == 3:
            result = _signed64(value)
        elif number == 4:
            result = struct.unpack("<f", value)[0]
        elif number == 5:
            result = bool(value)
        elif number == 6:
            result = value  # a DataType enum value
        elif number == 7:
            result = _shape(value)
        elif number == 8:
            result = _tensor(value)
    return result


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)  # as written: "name", "name:1", "^control"
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def data_inputs(self) -> list[str]:
        """Input node names without output index, control inputs left out."""
        return [_node_name(i) for i in self.inputs if not i.startswith("^")]


def _node_name(ref: str) -> str:
    ref = ref.lstrip("^")
    head, sep, tail = ref.rpartition(":")
    return head if sep and tail.isdigit() else ref


def _node(buf: bytes) -> Node:
    node = Node(name="", op="")
    for number, _, value in _fields(buf):
        if number == 1:
            node.name = value.decode("utf-8")
        elif number == 2:
            node.op = value.decode("utf-8")
        elif number == 3:
            node.inputs.append(value.decode("utf-8"))
        elif number == 5:  # map entry: key = 1, value = 2
            key, attr = "", None
            for n, _, v in _fields(value):
                if n == 1:
                    key = v.decode("utf-8")
                elif n == 2:
                    attr = _attr_value(v)
            node.attrs[key] = attr
    return node


# ----------------------------------------------------------------------------------------------------------
# Dequantize


def dequantize_min_first(q: np.ndarray, min_range: float, max_range: float) -> np.ndarray:
    """TensorFlow's `Dequantize` in mode MIN_FIRST for quint8 (what `quantize_weights` graphs use).

    TensorFlow (core/kernels/dequantize_op.cc -> QuantizedTensorToFloatInPlaceUsingEigen in
    quantization_utils.h; the gemmlowp "meta" path is ARM-only):

        steps       = 256                                             # 1 << bits
        range_scale = (max - min) * (steps / (steps - 1)) / steps     # = (max - min) / 255, in double
        min_rounded = round(min / float(range_scale)) * float(range_scale)   # min snapped to the grid
        out         = (float(q) - lowest_quantized) * range_scale + min_rounded   # lowest = 0 for quint8

    where the last line is an Eigen expression on a float tensor, so `range_scale` and `min_rounded` enter as
    float32 and it is evaluated in float32 (multiply, then add). In words: out = q * step + min, except that
    `min` is first rounded to a whole number of steps (`round` = std::round, half away from zero) so that 0.0
    is represented exactly. If min == max every value is min.

    OpenCV's importer (tf_importer.cpp, addConstNodes) does the same in float32 with its own rounding of the
    step: scale = float32(max - min) / 255, out = q * scale + scale * cvRound(min / scale). Measured on random
    quantize_weights tensors the two are identical for ~90 % of values and differ by at most 3e-5 of one step
    (the step's last-bit rounding times q); invisible in the engines' output comparison.
    """
    q = np.asarray(q)
    min_range, max_range = float(np.float32(min_range)), float(np.float32(max_range))
    if min_range == max_range:
        return np.full(q.shape, min_range, np.float32)
    lowest = int(np.iinfo(q.dtype).min) if q.dtype.kind in "iu" else 0
    steps = float(1 << (8 * q.dtype.itemsize))
    range_scale = (max_range - min_range) * (steps / (steps - 1.0)) / steps
    scale32 = np.float32(range_scale)
    min_rounded = np.float32(_round_half_away(min_range / float(scale32)) * float(scale32))
    offset = (q.astype(np.float32) - np.float32(lowest)) if lowest else q.astype(np.float32)
    return (offset * scale32).astype(np.float32) + min_rounded


def _round_half_away(x: float) -> float:
    return float(np.sign(x) * np.floor(abs(x) + 0.5))


# ----------------------------------------------------------------------------------------------------------
# graph


@dataclass
class Graph:
    nodes: list[Node]

    def __post_init__(self) -> None:
        self.by_name: dict[str, Node] = {n.name: n for n in self.nodes}
        self._constants: dict[str, np.ndarray] | None = None

    def node(self, name: str) -> Node:
        try:
            return self.by_name[_node_name(name)]
        except KeyError:
            raise GraphDefError(f"no node named {name!r} in the graph") from None

    @property
    def constants(self) -> dict[str, np.ndarray]:
        """Every constant tensor by node name: `Const` values, and `Dequantize` of constants as float32."""
        if self._constants is None:
            consts: dict[str, np.ndarray] = {}
            for n in self.nodes:
                if n.op == "Const" and isinstance(n.attrs.get("value"), np.ndarray):
                    consts[n.name] = n.attrs["value"]
            for n in self.nodes:
                if n.op == "Dequantize":
                    consts[n.name] = self._dequantize(n, consts)
            # Identity of a constant (TF's frozen graphs often read weights through `<name>/read`)
            changed = True
            while changed:
                changed = False
                for n in self.nodes:
                    if n.op == "Identity" and n.name not in consts and n.data_inputs and n.data_inputs[0] in consts:
                        consts[n.name] = consts[n.data_inputs[0]]
                        changed = True
            self._constants = consts
        return self._constants

    def _dequantize(self, node: Node, consts: dict[str, np.ndarray]) -> np.ndarray:
        mode = node.attrs.get("mode", "MIN_COMBINED")
        inputs = node.data_inputs
        if len(inputs) != 3 or not all(i in consts for i in inputs):
            raise GraphDefError(f"Dequantize {node.name!r}: only constant input, min and max are supported")
        q, lo, hi = (consts[i] for i in inputs)
        if mode != "MIN_FIRST":
            raise GraphDefError(f"Dequantize {node.name!r}: mode {mode!r} is not supported (MIN_FIRST only)")
        if q.dtype != np.uint8 or lo.size != 1 or hi.size != 1:
            raise GraphDefError(f"Dequantize {node.name!r}: expected quint8 with scalar min/max")
        return dequantize_min_first(q, float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.data_inputs:
                out.setdefault(i, []).append(n)
        return out

    def topological(self) -> list[Node]:
        """Nodes ordered so that every node comes after its inputs (file order where free)."""
        order, state = [], {}
        for root in self.nodes:
            stack = [(root, False)]
            while stack:
                n, done = stack.pop()
                if done:
                    state[n.name] = 2
                    order.append(n)
                    continue
                if state.get(n.name):
                    continue  # done, or an ancestor (a cycle: not a valid frozen graph)
                state[n.name] = 1
                stack.append((n, True))
                for i in reversed(n.data_inputs):
                    if i in self.by_name and not state.get(i):
                        stack.append((self.by_name[i], False))
        return order


def parse_graphdef(data: bytes) -> Graph:
    nodes = []
    try:
        for number, wire, value in _fields(data):
            if number == 1 and wire == _LEN:
                nodes.append(_node(value))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise GraphDefError(f"not a valid GraphDef: {exc}") from None
    if not nodes:
        raise GraphDefError("no nodes: not a GraphDef")
    return Graph(nodes)


def read_graphdef(path: str | Path) -> Graph:
    return parse_graphdef(Path(path).read_bytes())
