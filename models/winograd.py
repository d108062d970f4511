"""Wide 3x3 convolutions as Winograd F(m, 3) in plain ONNX ops, for onnxruntime on a CPU.

Why: in fp32 onnxruntime's direct 3x3 conv already runs at the two cores' FMA peak (~80 GMAC/s measured here on
256 channels), so EDSR-sized networks can only get faster by doing fewer multiplications. Winograd's minimal
filtering F(m, 3) computes an m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 products per
channel pair instead of 9 m^2: 5.1x fewer at m = 6 (4x at m = 4). The small transforms are exact linear maps
(Toom-Cook on the points 0, +-1, +-2, +-1/2 and infinity), so the result is the direct conv's up to float
rounding (~2e-5 of the activations' scale, tested; under 0.05 levels at EDSR's full depth), far inside the 1
level of uint8 output the engines must agree on.

How, in ops every onnxruntime build has (Conv, MatMul, Reshape, Transpose, Add, Mul, If):
- Inside a run of such convs (and the elementwise ops between them: ReLU, residual adds, scalings) the
  activations stay in a *phase-major* layout, Q = [N, m, Th, m, Tw, C]: pixel (m*th + i, m*tw + j) at
  [n, i, th, j, tw, c], zero beyond the image's own height and width. A conv's output transform writes Q
  directly, so no layer pays a transpose; the layout is converted only where the run begins and ends.
- A conv on Q: B^T applied to each tile's m+2 rows by a small conv over the blocks, with the m phases
  as its channels (it fetches and transforms the rows in one pass, zero blocks padded each side), the same for
  the columns, then the (m+2)^2 channel products as one broadcast MatMul (~65 % of the time: GEMMs at full
  speed), A^T applied to the rows and to the columns (MatMul), the bias added, and the positions beyond the
  image zeroed: the next conv reads them as its zero padding (where an op between makes them non-zero, adding
  a constant say, that conv zeroes its input first). A constant factor right after a conv (EDSR's residual
  scaling) goes into its weights.

Which convs: 3x3, stride 1, dilation 1, one group, padding 1 each side, a constant weight, `MIN_CHANNELS` or
more in or out (EDSR's 256: ~2.1x onnxruntime's own conv; at 128 channels ~1.45x, at 64 0.9x, measured in
docs/benchmarks.md). Used only for onnxruntime's CPU provider; GPU libraries choose their own algorithms.
"""

from __future__ import annotations

import numpy as np

TILE = 6  # m: 64 products per 36 outputs; ~6 % faster than F(4, 3) at 500 x 500 (equal at 400), ~2x its error
VERSION = 2  # of the rewrite: a cached graph from another version is converted again
MIN_CHANNELS = 128
_POINTS = {2: "0 1 -1", 4: "0 1 -1 2 -2", 6: "0 1 -1 2 -2 1/2 -1/2"}  # the finite ones; infinity is the last
# ops that act on each element (and a constant scalar or per-channel factor): they run on Q as they do on NCHW
_ELEMENTWISE = {"Relu", "LeakyRelu", "Add", "Sub", "Mul", "Div", "Max", "Min", "Tanh", "Sigmoid", "Neg", "Abs"}
_ZERO_TO_ZERO = {"Relu", "LeakyRelu", "Tanh", "Neg", "Abs"}  # f(0) = 0: zeros beyond the image stay zero


def transform_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A^T (m x a), G (a x r), B^T (a x a), a = m + r - 1, exact (Toom-Cook with the point at infinity).

    y = A^T [(G g) * (B^T d)] is the correlation y_i = sum_k g_k d_(i+k). B^T is solved for exactly, in
    rationals, from that identity, so no published table has to be trusted."""
    from fractions import Fraction  # here: only a conversion needs it, not every start-up

    points = [Fraction(p) for p in _POINTS[m].split()]
    a = m + r - 1
    at = [[Fraction(0)] * a for _ in range(m)]
    g = [[Fraction(0)] * r for _ in range(a)]
    for j, p in enumerate(points):
        f = Fraction(1)
        for q in points:
            if q != p:
                f *= p - q
        for i in range(m):
            at[i][j] = p ** i
        for k in range(r):
            g[j][k] = p ** k / f
    at[m - 1][a - 1] = g[a - 1][r - 1] = Fraction(1)
    # sum_j at[i][j] g[j][k] bt[j][l] = [l == i + k]: for each l, a linear system in the column bt[:, l]
    bt = [[Fraction(0)] * a for _ in range(a)]
    rows = [[at[i][j] * g[j][k] for j in range(a)] for i in range(m) for k in range(r)]
    for col in range(a):
        rhs = [Fraction(int(col == i + k)) for i in range(m) for k in range(r)]
        for j, value in enumerate(_solve(rows, rhs, a)):
            bt[j][col] = value
    as_array = lambda x: np.array([[float(v) for v in row] for row in x])  # noqa: E731
    return as_array(at), as_array(g), as_array(bt)


def _solve(rows: list[list], rhs: list, n: int) -> list:
    """The exact solution of an overdetermined but consistent system (Gauss-Jordan in rationals)."""
    aug = [row[:] + [b] for row, b in zip(rows, rhs)]
    pivots, r = [], 0
    for c in range(n):
        pivot = next((i for i in range(r, len(aug)) if aug[i][c] != 0), None)
        if pivot is None:
            continue
        aug[r], aug[pivot] = aug[pivot], aug[r]
        aug[r] = [v / aug[r][c] for v in aug[r]]
        for i in range(len(aug)):
            if i != r and aug[i][c] != 0:
                factor = aug[i][c]
                aug[i] = [v - factor * p for v, p in zip(aug[i], aug[r])]
        pivots.append(c)
        r += 1
    if any(row[n] != 0 for row in aug[r:]):
        raise ArithmeticError("no Winograd transform for these points")
    solution = [0 * rhs[0]] * n  # zeros of the system's own number type
    for i, c in enumerate(pivots):
        solution[c] = aug[i][n]
    return solution


class _Emitter:
    """New nodes and constants, with names that cannot clash with the graph's own."""

    def __init__(self, taken: set[str]):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.taken = taken
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        while True:
            self._count += 1
            candidate = f"winograd/{hint}/{self._count}"
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate

    def const(self, hint: str, value) -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const("ints", np.array(values, np.int64))

    def op(self, op: str, inputs: list[str], hint: str = "", output: str | None = None, **attrs) -> str:
        output = output or self.name(hint or op)
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def cat(self, *parts: str) -> str:
        return self.op("Concat", list(parts), "shape", axis=0)


class _Geometry:
    """The tiling of one spatial size, as 1-element int64 tensors computed in the graph from an NCHW tensor:
    n, h, w, th = ceil(h / m), tw, and the mask of positions inside the image, [1, m, th, m, tw, 1]."""

    def __init__(self, e: _Emitter, nchw: str, m: int):
        shape = e.op("Shape", [nchw], "shape")
        pick = lambda k: e.op("Slice", [shape, e.ints(k), e.ints(k + 1)], "dim")  # noqa: E731
        self.n, self.h, self.w = pick(0), pick(2), pick(3)
        m1, mm = e.ints(m - 1), e.ints(m)
        self.th = e.op("Div", [e.op("Add", [self.h, m1]), mm], "tiles_h")
        self.tw = e.op("Div", [e.op("Add", [self.w, m1]), mm], "tiles_w")
        self.extra_h = e.op("Sub", [e.op("Mul", [self.th, mm]), self.h])
        self.extra_w = e.op("Sub", [e.op("Mul", [self.tw, mm]), self.w])
        self.mask = self._mask(e, m)
        whole = e.op("Equal", [e.op("Add", [self.extra_h, self.extra_w]), e.ints(0)], "whole_tiles")
        self.whole = e.op("Squeeze", [whole, e.ints(0)], "whole_tiles")

    def _mask(self, e: _Emitter, m: int) -> str:
        def inside(tiles: str, size: str) -> str:  # [m, tiles] of 1.0 where m * t + i < size
            offsets = e.const("phases", np.arange(m, dtype=np.int64).reshape(m, 1))
            pos = e.op("Add", [e.op("Mul", [_count(e, tiles), e.ints(m)]), offsets])
            return e.op("Cast", [e.op("Less", [pos, size])], to=1)

        rows = e.op("Reshape", [inside(self.th, self.h), e.cat(e.ints(1, m), self.th, e.ints(1, 1, 1))])
        cols = e.op("Reshape", [inside(self.tw, self.w), e.cat(e.ints(1, 1, 1, m), self.tw, e.ints(1))])
        return e.op("Mul", [rows, cols], "mask")


def _finish(e: _Emitter, y: str, bias: np.ndarray | None, geo: _Geometry, output: str) -> str:
    """A conv's output in Q: the bias added, the positions beyond the image zeroed. Where there are none (whole
    tiles: the product's 400 px engine calls, 256 and 500 px images) that pass over the tensor is skipped (~20 ms
    a 256-channel conv at 500 x 500, 3 % of it) by an If whose branches both add the bias: onnxruntime writes a
    branch's result into the If's output, but copies a tensor a branch passes through."""
    if bias is None:
        return e.op("Mul", [y, geo.mask], output=output)
    bias = e.const("bias", bias.astype(np.float32).reshape(-1))
    float_out = lambda name: e.helper.make_tensor_value_info(name, 1, None)  # noqa: E731 (1: float)
    plain, with_bias, zeroed = e.name("biased"), e.name("biased"), e.name("zeroed")
    whole = e.helper.make_graph([e.helper.make_node("Add", [y, bias], [plain])], e.name("whole"), [],
                                [float_out(plain)])
    partial = e.helper.make_graph([e.helper.make_node("Add", [y, bias], [with_bias]),
                                   e.helper.make_node("Mul", [with_bias, geo.mask], [zeroed])],
                                  e.name("partial"), [], [float_out(zeroed)])
    e.nodes.append(e.helper.make_node("If", [geo.whole], [output], name=output, then_branch=whole,
                                      else_branch=partial))
    return output


def _count(e: _Emitter, n: str) -> str:
    """0, 1, ..., n - 1 for a 1-element n."""
    scalar = lambda v: e.const("scalar", np.array(v, np.int64))  # noqa: E731
    return e.op("Range", [scalar(0), e.op("Squeeze", [n, e.ints(0)]), scalar(1)], "count")


def _to_phase_major(e: _Emitter, x: str, geo: _Geometry, channels: int, m: int) -> str:
    """NCHW -> Q: zero rows and columns to whole tiles, then one transpose."""
    zeros = e.ints(0, 0, 0, 0, 0, 0)
    pads = e.op("Concat", [zeros, geo.extra_h, geo.extra_w], "pads", axis=0)
    padded = e.op("Pad", [x, pads])
    tiles = e.op("Reshape", [padded, e.cat(geo.n, e.ints(channels), geo.th, e.ints(m), geo.tw, e.ints(m))])
    return e.op("Transpose", [tiles], "to_q", perm=[0, 3, 2, 5, 4, 1])


def _to_nchw(e: _Emitter, q: str, geo: _Geometry, channels: int, m: int, output: str) -> str:
    """Q -> NCHW, cropped to the image. In two transposes, the tiles to rows (whole channel vectors moved) and
    then NHWC to NCHW: onnxruntime's one 6-D transpose took 9x as long at 256 channels."""
    rows = e.op("Transpose", [q], "from_q", perm=[0, 2, 1, 4, 3, 5])  # [n, th, m, tw, m, c]: NHWC
    pixels = e.op("Reshape", [rows, e.cat(geo.n, e.ints(-1, channels))])
    moved = e.op("Transpose", [pixels], "from_q", perm=[0, 2, 1])
    whole = e.op("Reshape", [moved, e.cat(geo.n, e.ints(channels), e.op("Mul", [geo.th, e.ints(m)]),
                                          e.op("Mul", [geo.tw, e.ints(m)]))])
    hw = e.op("Concat", [geo.h, geo.w], axis=0)
    return e.op("Slice", [whole, e.ints(0, 0), hw, e.ints(2, 3)], output=output)


def _gathering_kernel(bt: np.ndarray, m: int) -> np.ndarray:
    """B^T as a conv over Q's blocks, its m phases as input channels: output channel xi at block t is
    sum_a B^T[xi, a] * row (m*t + a - 1), and that row is phase (a - 1) mod m of block t + (a - 1) // m, i.e. tap
    k = 1 + (a - 1) // m. With one zero block padded each side, the conv fetches each tile's m + 2 rows and
    transforms them in one pass, without a gathered copy. A 3-D conv, kernel (1, 3, 1): onnxruntime's blocked
    layouts (NCHWc) take only 2-D convs, and reordering these thin ones made them 2.5x slower."""
    a = bt.shape[0]
    kernel = np.zeros((a, m, 1, 3, 1))
    for row in range(a):
        phase, tap = (row - 1) % m, 1 + (row - 1) // m
        kernel[:, phase, 0, tap, 0] = bt[:, row]
    return kernel.astype(np.float32)


def _winograd_conv(e: _Emitter, q: str, geo: _Geometry, weight: np.ndarray, bias: np.ndarray | None,
                   m: int, output: str) -> str:
    """A 3x3 "same" conv of Q -> Q (masked)."""
    at, g, bt = transform_matrices(m)
    a = m + 2
    cout, cin = weight.shape[:2]
    u = np.einsum("xk,ockl,nl->xnco", g, weight.astype(np.float64), g)  # the weights in the Winograd domain
    u = e.const("weight", u.reshape(a, 1, a, cin, cout).astype(np.float32))
    gather = e.const("bt", _gathering_kernel(bt, m))
    at_c = e.const("at", at.astype(np.float32))
    conv = {"kernel_shape": [1, 3, 1], "pads": [0, 1, 0, 0, 1, 0]}
    # rows: [n, m, 1, th, m*tw*c] -> [n, a, 1, th, m*tw*c]; columns: [n*a*th, m, 1, tw, c] -> [n*a*th, a, 1, tw, c]
    rows = e.op("Conv", [e.op("Reshape", [q, e.cat(geo.n, e.ints(m, 1), geo.th, e.ints(-1))]), gather], "rows",
                **conv)
    nath = e.op("Mul", [e.op("Mul", [geo.n, e.ints(a)]), geo.th])
    cols = e.op("Conv", [e.op("Reshape", [rows, e.cat(nath, e.ints(m, 1), geo.tw, e.ints(cin))]), gather], "cols",
                **conv)
    v = e.op("Reshape", [cols, e.cat(geo.n, e.ints(a), geo.th, e.ints(a), geo.tw, e.ints(cin))])
    products = e.op("MatMul", [v, u], "products")  # [n, a, th, a, tw, cout]: the bulk of the work
    out_rows = e.op("MatMul", [at_c, e.op("Reshape", [products, e.cat(geo.n, e.ints(a, -1))])])
    nmth = e.op("Mul", [e.op("Mul", [geo.n, e.ints(m)]), geo.th])
    out = e.op("MatMul", [at_c, e.op("Reshape", [out_rows, e.cat(nmth, e.ints(a, -1))])])
    y = e.op("Reshape", [out, e.cat(geo.n, e.ints(m), geo.th, e.ints(m), geo.tw, e.ints(cout))])
    return _finish(e, y, bias, geo, output)


def _eligible(node, initializers: dict, min_channels: int):
    """(weight, bias) of a conv this rewrite can take, else None."""
    from onnx import helper, numpy_helper

    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = numpy_helper.to_array(initializers[node.input[1]])
    if weight.ndim != 4 or weight.shape[2:] != (3, 3) or attrs.get("group", 1) != 1:
        return None
    if list(attrs.get("strides", [1, 1])) != [1, 1] or list(attrs.get("dilations", [1, 1])) != [1, 1]:
        return None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or list(attrs.get("pads", [])) != [1] * 4:
        return None
    if max(weight.shape[:2]) < min_channels:
        return None
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in initializers:
            return None
        bias = numpy_helper.to_array(initializers[node.input[2]])
    return weight, bias


def _fold_scalings(graph, initializers: dict, plans: dict) -> set[str]:
    """A conv read only by a Mul with a constant scalar or per-channel factor (EDSR's residual scaling, x0.1)
    takes the factor into its weight and bias: one pass fewer over a wide tensor. The conv then writes the Mul's
    output; returns the outputs of the Mul nodes so made redundant."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    convs = {node.output[0]: node for node in graph.node if plans.get(node.output[0])}
    dropped = set()
    for out, conv in convs.items():
        [mul, *others] = readers.get(out, [None])
        if others or out in outputs or mul is None or mul.op_type != "Mul" or len(set(mul.input)) != 2:
            continue
        factor_name = next(i for i in mul.input if i != out)
        weight, bias = plans[out]
        factor = None
        if factor_name in initializers:
            factor = _as_channels_last(numpy_helper.to_array(initializers[factor_name]), weight.shape[0])
        if factor is None:
            continue
        factor = factor.astype(np.float64)
        scaled_bias = None if bias is None else bias * factor
        del plans[out]
        plans[mul.output[0]] = (weight * factor.reshape(-1, 1, 1, 1), scaled_bias)
        conv.output[0] = mul.output[0]
        dropped.add(mul.output[0])
    return dropped


def _as_channels_last(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant operand of an elementwise op, for Q: a scalar as it is, a per-channel [C,1,1] / [1,C,1,1] as
    [C]; anything else (a spatial constant) None."""
    if value.size == 1:
        return value.reshape(())
    if value.size == channels and value.ndim >= 3 and all(d == 1 for d in value.shape[-2:]):
        return value.reshape(-1)
    return None


def _keeps_zeros(op: str, operands: list[tuple[bool, bool]]) -> bool:
    """Whether positions beyond the image stay zero, given each operand's (is a Q tensor, is zero there)."""
    if op in _ZERO_TO_ZERO:
        return operands[0] == (True, True)
    if op == "Mul":
        return (True, True) in operands
    if op == "Div":
        return operands[0] == (True, True) and not operands[1][0]
    return op in ("Add", "Sub", "Max", "Min") and all(o == (True, True) for o in operands)


class _PhaseMajor:
    """A tensor of the run in Q: its name, tiling, channels, and whether it is zero beyond the image."""

    def __init__(self, name: str, geo: _Geometry, channels: int, clean: bool):
        self.name, self.geo, self.channels, self.clean = name, geo, channels, clean


def rewrite(model, *, m: int = TILE, min_channels: int = MIN_CHANNELS):
    """`model` (an onnx.ModelProto, NCHW) with its eligible convs as Winograd F(m, 3) in phase-major runs.
    Returns (model, number of convs rewritten); the model unchanged where none is eligible."""
    from onnx import checker, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    plans = {node.output[0]: _eligible(node, initializers, min_channels) for node in graph.node}
    if not any(plans.values()):
        return model, 0
    dropped = _fold_scalings(graph, initializers, plans)
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | set(initializers)
    e = _Emitter(taken)
    q_of: dict[str, _PhaseMajor] = {}  # tensor name -> its Q form (made by the run, or converted at an entry)
    only_q: set[str] = set()  # tensors that exist in Q only: converted back where something else reads them
    as_nchw: set[str] = set()

    def need_nchw(name: str) -> str:
        if name in only_q and name not in as_nchw:
            q = q_of[name]
            _to_nchw(e, q.name, q.geo, q.channels, m, output=name)
            as_nchw.add(name)
        return name

    count = 0
    for node in graph.node:
        if node.op_type == "Mul" and node.output[0] in dropped:
            continue
        out = node.output[0]
        plan = plans.get(out)
        if plan is not None:
            weight, bias = plan
            x = node.input[0]
            if x not in q_of:
                geo = _Geometry(e, need_nchw(x), m)
                q_of[x] = _PhaseMajor(_to_phase_major(e, x, geo, weight.shape[1], m), geo, weight.shape[1], True)
            q = q_of[x]
            source = q.name if q.clean else e.op("Mul", [q.name, q.geo.mask], "masked")
            y = _winograd_conv(e, source, q.geo, weight, bias, m, e.name("q"))
            q_of[out] = _PhaseMajor(y, q.geo, weight.shape[0], True)
            only_q.add(out)
            count += 1
            continue
        if node.op_type in _ELEMENTWISE and len(node.output) == 1 and any(i in only_q for i in node.input):
            first = q_of[next(i for i in node.input if i in only_q)]
            operands, kinds = [], []
            for i in node.input:
                if i in q_of:
                    operands.append(q_of[i].name)
                    kinds.append((True, q_of[i].clean))
                    continue
                value = None
                if i in initializers:
                    value = _as_channels_last(numpy_helper.to_array(initializers[i]), first.channels)
                if value is None:
                    break
                operands.append(e.const("operand", value))
                kinds.append((False, False))
            else:
                new = e.helper.make_node(node.op_type, operands, [e.name("q")], name=e.name(node.op_type))
                new.attribute.extend(node.attribute)
                e.nodes.append(new)
                q_of[out] = _PhaseMajor(new.output[0], first.geo, first.channels, _keeps_zeros(node.op_type, kinds))
                only_q.add(out)
                continue
        for i in node.input:
            need_nchw(i)
        e.nodes.append(node)
    for output in graph.output:
        need_nchw(output.name)
    used = {i for node in e.nodes for i in node.input}
    gone = only_q - as_nchw  # tensors that no longer exist under their names: their shape notes go too
    kept_info = [info for info in graph.value_info if info.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(e.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + e.initializers)
    checker.check_model(model)
    return model, count
