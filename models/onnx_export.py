"""The catalog's TensorFlow `.pb` networks as ONNX graphs, for onnxruntime and for users' own TensorRT builds.

Why built this way: the graph is rebuilt node by node from `models.graphdef`'s reading (after the exact rewrites of
`models.graph_rewrite`) with the `onnx` package's `helper`/`numpy_helper`. No TensorFlow (tf2onnx would need it,
and it is not installable beside our pinned OpenCV on these machines), and no torch (`torch.onnx.export` of the
torch engine's module would work, but the CPU image has no torch and must still convert). The ops used are the
plainest ONNX has (Conv, ConvTranspose, PRelu, LeakyRelu, Relu, Tanh, DepthToSpace, Add/Sub/Mul/Div, ...),
opset 17, which onnxruntime, OpenCV's ONNX importer and TensorRT's parser all take.

The exported network is the network only: NCHW float32 in and out, dynamic batch, height and width; input
"input" (luma in 0..1, or BGR minus the DIV2K mean for EDSR), output "output" (`scale` times larger). The colour
conversion, the mean and the rounding stay in our code (`models/engines/dnn_superres_io.py`). fp16 is weights and
arithmetic in half precision with float32 at the edges (Cast in, Cast out), for GPU execution providers.

Conversions are cached by the source file's sha256 (and `EXPORT_VERSION`, bumped whenever this module would
write another graph) in the models cache folder, written atomically; `import onnx` (~0.5 s) happens only when a
conversion is actually needed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from models.graph_rewrite import Plan
# models.graph_rewrite / models.graphdef are imported where a conversion runs: a cache hit needs neither

log = logging.getLogger("superres.engine")

EXPORT_VERSION = 1
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "output"
PRECISIONS = ("fp32", "fp16")
WINOGRAD_KEY = "superres_winograd_convs"  # metadata: how many convs the CPU graph runs as Winograd F(6, 3)

# TF op -> ONNX op, for ops that map one to one
_UNARY = {"Relu": "Relu", "Abs": "Abs", "Neg": "Neg", "Tanh": "Tanh", "Sigmoid": "Sigmoid"}
_BINARY = {"Add": "Add", "AddV2": "Add", "BiasAdd": "Add", "Sub": "Sub", "Mul": "Mul", "RealDiv": "Div",
           "Maximum": "Max", "Minimum": "Min"}


class _Builder:
    """ONNX nodes and initializers in the making; tensor names are the TF node names."""

    def __init__(self, dtype: np.dtype):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value).astype(self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _conv(b: _Builder, n, x: str, out: str) -> str:
    from models.graph_rewrite import hw_attr, same_pads

    weight = n.attrs["_weight"]  # TF HWIO -> ONNX OIHW
    inputs = [x, b.const(f"{out}/weight", np.ascontiguousarray(weight.transpose(3, 2, 0, 1)))]
    if n.attrs.get("_bias") is not None:
        inputs.append(b.const(f"{out}/bias", n.attrs["_bias"]))
    strides, dilations = hw_attr(n, "strides"), hw_attr(n, "dilations")
    padding = n.attrs.get("padding", "VALID")
    if padding not in ("SAME", "VALID"):
        raise ConfigError(f"Conv2D {n.name!r}: padding {padding!r} is not supported")
    attrs = {"kernel_shape": list(weight.shape[:2]), "strides": list(strides), "dilations": list(dilations)}
    if padding == "SAME" and strides == (1, 1):
        # the padding does not depend on the input size: explicit, as every runtime reads it alike
        (top, bottom), (left, right) = (same_pads(1, weight.shape[i], 1, dilations[i]) for i in (0, 1))
        attrs["pads"] = [top, left, bottom, right]
    elif padding == "SAME":
        attrs["auto_pad"] = "SAME_UPPER"  # TF's SAME: the smaller half before
    return b.node("Conv", inputs, out, **attrs)


def _conv_transpose(b: _Builder, plan: Plan, n, out: str) -> str:
    """Conv2DBackpropInput(output_sizes, filter, x): TF's transposed conv, with its output size as given."""
    from models.graph_rewrite import hw_attr

    sizes, weight = (plan.net.consts.get(i) for i in n.inputs[:2])
    if weight is None or weight.ndim != 4 or sizes is None or sizes.size != 4:
        raise ConfigError(f"Conv2DBackpropInput {n.name!r}: filter and output sizes must be constants")
    if n.attrs.get("padding") != "SAME":
        raise ConfigError(f"Conv2DBackpropInput {n.name!r}: only SAME padding is exported to ONNX")
    out_hw = [int(v) for v in sizes.reshape(-1)[1:3]]
    # TF filter [kh, kw, out_channels, in_channels] -> ONNX ConvTranspose weight [in, out, kh, kw]
    w = b.const(f"{out}/weight", np.ascontiguousarray(weight.transpose(3, 2, 0, 1)))
    return b.node("ConvTranspose", [n.inputs[2], w], out, kernel_shape=list(weight.shape[:2]),
                  strides=list(hw_attr(n, "strides")), dilations=list(hw_attr(n, "dilations")),
                  output_shape=out_hw, auto_pad="SAME_UPPER")


def prelu(b: _Builder, x: str, alpha: np.ndarray, out: str) -> str:
    """PReLU as plain elementwise ops, not ONNX's PRelu: onnxruntime's CPU PRelu kernel is ~40x slower than its
    Mul (measured: 5-7 ms vs 0.1 ms on 16x256x256) and was most of FSRCNN's time. Both forms are bit-exact:
    with every slope <= 1, prelu(x) = max(x, a*x) (a*x rounds to at most x for x >= 0, to at least x for x < 0);
    otherwise relu(x) + a*min(x, 0)."""
    slope = b.const(f"{out}/slope", alpha.reshape(-1, 1, 1) if alpha.size > 1 else alpha.reshape(1, 1, 1))
    if float(np.max(alpha)) <= 1.0:
        scaled = b.node("Mul", [x, slope], f"{out}/scaled")
        return b.node("Max", [x, scaled], out)
    zero = b.const(f"{out}/zero", np.zeros((1, 1, 1), np.float32))
    negative = b.node("Mul", [b.node("Min", [x, zero], f"{out}/negative_part"), slope], f"{out}/negative")
    return b.node("Add", [b.node("Relu", [x], f"{out}/positive"), negative], out)


def _binary(b: _Builder, plan: Plan, n, out: str) -> str:
    from models.graph_rewrite import nchw_const

    if len(n.inputs) != 2:
        raise ConfigError(f"{n.op} {n.name!r}: expected two inputs")
    consts = plan.net.consts
    if all(i in consts for i in n.inputs):
        raise ConfigError(f"{n.op} {n.name!r}: constant folding is not supported")
    inputs = [b.const(f"{out}/const{k}", nchw_const(consts[i])) if i in consts else i for k, i in enumerate(n.inputs)]
    return b.node(_BINARY[n.op], inputs, out)


def _lower(b: _Builder, plan: Plan, n, out: str) -> str:
    acts = [i for i in n.inputs if i not in plan.net.consts]
    if n.op == "_Conv":
        return _conv(b, n, acts[0], out)
    if n.op == "_PReLU":
        return prelu(b, acts[0], n.attrs["alpha"], out)
    if n.op == "_LeakyReLU":
        return b.node("LeakyRelu", [acts[0]], out, alpha=float(n.attrs["slope"]))
    if n.op == "_PixelShuffle":  # channels already reordered for CRD (see graph_rewrite)
        return b.node("DepthToSpace", [acts[0]], out, blocksize=int(n.attrs["block_size"]), mode="CRD")
    if n.op == "DepthToSpace":
        return b.node("DepthToSpace", [acts[0]], out, blocksize=int(n.attrs["block_size"]), mode="DCR")
    if n.op in _UNARY:
        return b.node(_UNARY[n.op], acts, out)
    if n.op in _BINARY:
        return _binary(b, plan, n, out)
    if n.op == "Conv2DBackpropInput":
        return _conv_transpose(b, plan, n, out)
    if n.op == "Conv2D":
        raise ConfigError(f"Conv2D {n.name!r}: its filter is not a constant")
    raise ConfigError(f"graph op {n.op!r} ({n.name!r}) is not supported by the ONNX export")


def graph_to_onnx(plan: Plan, in_channels: int, *, precision: str = "fp32", doc: str = "", metadata=None):
    """The planned graph as an onnx.ModelProto: input "input" [N, C, H, W], output "output", float32 at the edges."""
    from onnx import TensorProto, checker, helper

    if precision not in PRECISIONS:
        raise ConfigError(f"ONNX export precision {precision!r}: use fp32 or fp16")
    half = precision == "fp16"
    b = _Builder(np.dtype(np.float16 if half else np.float32))
    names = {plan.placeholder: INPUT_NAME}
    if half:
        names[plan.placeholder] = b.node("Cast", [INPUT_NAME], "input/fp16", to=TensorProto.FLOAT16)
    for n in plan.order:
        if n.name == plan.placeholder:
            continue
        renamed = type(n)(n.name, n.op, [names.get(i, i) for i in n.inputs], n.attrs)
        last = n.name == plan.output and not half
        names[n.name] = _lower(b, plan, renamed, OUTPUT_NAME if last else n.name)
    if half:
        b.node("Cast", [names[plan.output]], OUTPUT_NAME, to=TensorProto.FLOAT)
    out_channels = _output_channels(b, plan)
    graph = helper.make_graph(
        b.nodes, "superres",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", in_channels, "height", "width"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                       ["batch", out_channels, "out_height", "out_width"])],
        b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="superres",
                              producer_version=str(EXPORT_VERSION), doc_string=doc)
    model.ir_version = 8  # readable by onnxruntime >= 1.14, OpenCV 4.7+ and TensorRT 8.6+
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    checker.check_model(model)
    return model


def _output_channels(b: _Builder, plan: Plan) -> int | str:
    """Channels of the output, from the last conv feeding it and the pixel moves after it ("channels" if unknown)."""
    by_name = {node.output[0]: node for node in b.nodes}
    weights = {init.name: tuple(init.dims) for init in b.initializers}
    name, block = OUTPUT_NAME, 1
    while name in by_name:
        node = by_name[name]
        if node.op_type == "DepthToSpace":
            block *= next(a.i for a in node.attribute if a.name == "blocksize")
        elif node.op_type in ("Conv", "ConvTranspose"):
            dims = weights[node.input[1]]
            channels = dims[0] if node.op_type == "Conv" else dims[1]
            return channels // (block * block)
        name = node.input[0]
    return "channels"


def export_model(spec, model_file: Path, *, precision: str = "fp32", source_sha256: str | None = None):
    """`spec`'s `.pb` file as an onnx.ModelProto (ConfigError if the file cannot be read or lowered)."""
    from models.graph_rewrite import plan_graph
    from models.graphdef import GraphDefError, read_graphdef

    try:
        graph = read_graphdef(model_file)
    except (OSError, GraphDefError) as exc:
        raise ConfigError(f"cannot read model file {model_file}: {exc}") from None
    try:
        plan = plan_graph(graph, spec.scale)
    except ConfigError as exc:
        raise ConfigError(f"the model file for {spec.name}: {exc}") from None
    expected = 3 if spec.input_kind == "bgr" else 1
    # the Placeholder's shape, else what the convs reading the input take (the GSoC exports leave it open)
    takes = {plan.in_channels} - {None} or {n.attrs["_weight"].shape[2] for n in plan.order
                                           if n.op == "_Conv" and plan.placeholder in n.inputs}
    if takes and takes != {expected}:
        raise ConfigError(f"the model file for {spec.name} takes {'/'.join(map(str, sorted(takes)))} channels, "
                          f"not {expected}: wrong file for this model name")
    what = "BGR 0..255 minus the DIV2K mean" if spec.input_kind == "bgr" else "luma (Y of YCrCb) in 0..1"
    doc = (f"superres {spec.name}: {spec.family} x{spec.scale}, converted from {spec.filename}. Input NCHW "
           f"float32 {what}; output NCHW float32, {spec.scale}x the height and width.")
    metadata = {"superres_model": spec.name, "scale": spec.scale, "input_kind": spec.input_kind,
                "source_file": spec.filename, "source_sha256": source_sha256 or "", "precision": precision}
    return graph_to_onnx(plan, expected, precision=precision, doc=doc, metadata=metadata)


def rewrite_onnx(model):
    """An ONNX model file prepared for onnxruntime: its PRelu nodes (constant slopes) as `prelu`'s plain ops,
    the slopes' initializers dropped where nothing else reads them. The numbers stay bit for bit the same."""
    from onnx import checker, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    b = _Builder(np.dtype(np.float32))
    nodes, replaced = [], set()
    for node in model.graph.node:
        if node.op_type == "PRelu" and node.input[1] in initializers:
            alpha = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32).reshape(-1)
            start = len(b.nodes)
            prelu(b, node.input[0], alpha, node.output[0])
            nodes += b.nodes[start:]
            replaced.add(node.input[1])
        else:
            nodes.append(node)
    if not replaced:
        return model
    still_read = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name not in replaced or init.name in still_read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + b.initializers)
    checker.check_model(model)
    return model


def write_atomically(data: bytes, path: Path) -> None:
    """Temp file in the same folder, fsync, rename: `path` only ever holds a whole file."""
    import tempfile  # only where a file is written: not at every start that reads the cache

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an exported model is an ordinary file, not a secret
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cache_name(spec, sha256: str, precision: str, winograd: bool = False) -> str:
    """One file per (source bytes, precision, conv algorithm, exporter version): a changed file or exporter
    never hits."""
    from models.winograd import TILE, VERSION

    algorithm = f"-winograd{TILE}v{VERSION}" if winograd else ""
    return f"{Path(spec.filename).stem}-{sha256[:32]}-{precision}{algorithm}-e{EXPORT_VERSION}.onnx"


def cached_onnx(spec, model_file: Path, *, precision: str = "fp32", cache_dir: Path | None = None,
                winograd: bool = False) -> Path | bytes:
    """The ONNX graph onnxruntime runs for `spec`: a path in the cache, made on first use — converted from a
    `.pb` file, or an ONNX model file as `rewrite_onnx` prepares it; with `winograd` (onnxruntime's CPU) its
    wide 3x3 convs as Winograd F(6, 3) (`models.winograd`; the graph unchanged where none is wide enough).

    Where the cache cannot be written (a read-only home, Lambda outside /tmp) the graph is returned as bytes
    and made again next time: slower, never an error."""
    from models.engines.dnn_superres_io import model_file_format
    from models.files import file_sha256, onnx_cache_dir

    sha256 = file_sha256(model_file)
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    path = folder / cache_name(spec, sha256, precision, winograd)
    if path.is_file():
        return path
    if model_file_format(spec) == "onnx":
        import onnx

        try:
            model = onnx.load(str(model_file))
        except Exception as exc:  # onnx raises DecodeError and friends for a damaged file
            raise ConfigError(f"onnxruntime cannot load the model for {spec.name} ({model_file}): {exc}") from None
        model = rewrite_onnx(model)
    else:
        model = export_model(spec, model_file, precision=precision, source_sha256=sha256)
    if winograd:
        from models import winograd as winograd_convs

        model, count = winograd_convs.rewrite(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = WINOGRAD_KEY, str(count)
    data = model.SerializeToString()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(data, path)
    except OSError as exc:
        log.warning("ONNX cache not writable: converting in memory each start",
                    extra={"fields": {"cache": str(folder), "error": exc.strerror or str(exc)}})
        return data
    log.info("model converted to ONNX", extra={"fields": {"model": spec.name, "onnx": str(path)}})
    return path


def export_file(spec, model_dir: Path, target: Path, *, precision: str = "fp32") -> Path:
    """`superres models export NAME --onnx FILE`: the verified model's network written to `target` atomically
    (a model that is an ONNX file already is copied as it is, fp32 only)."""
    from models.engines.dnn_superres_io import model_file_format
    from models.files import file_sha256, model_path, verify_file

    source = model_path(spec, model_dir)
    verify_file(spec, source)
    target = Path(target)
    if target.is_dir():
        raise ConfigError(f"--onnx {target} is a folder: give a file name, e.g. {target / (spec.name + '.onnx')}")
    if not target.parent.is_dir():
        raise ConfigError(f"--onnx {target}: folder {target.parent} does not exist")
    if model_file_format(spec) == "onnx":
        if precision != "fp32":
            raise ConfigError(f"{spec.name} is an ONNX file already: it is exported as it is (fp32), without --fp16")
        data = source.read_bytes()
    else:
        data = export_model(spec, source, precision=precision, source_sha256=file_sha256(source)).SerializeToString()
    try:
        write_atomically(data, target)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
