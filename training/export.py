"""The fused graph as a small ONNX file, built with `onnx.helper` from Conv, PRelu, Add and DepthToSpace only,
so every engine runs it (cv2.dnn.readNetFromONNX, onnxruntime, the torch engine's lowering).

Graph: input "lr" N x 1 x H x W float32 luma in [0, 1]; output "sr" N x 1 x sH x sW. The residual is added
before DepthToSpace (with one output channel DCR = CRD): the bicubic upscale as a 5x1 Conv (1 -> s row phases)
and a grouped 1x5 Conv (-> s^2 sub-pixels), or for "nearest" a 1x1 Conv of ones (1 -> s^2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from training.arch import FusedNet, residual_kernels

OPSET = 13


def to_onnx(fused: FusedNet, doc: str = "") -> onnx.ModelProto:
    s = fused.scale
    inits, nodes = [], []
    x = "lr"
    for i, (weight, bias, slope) in enumerate(fused.layers):
        inits += [numpy_helper.from_array(weight, f"conv{i}.weight"), numpy_helper.from_array(bias, f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=f"conv{i}"))
        x = f"conv{i}"
        if slope is not None:
            inits.append(numpy_helper.from_array(slope.reshape(-1, 1, 1), f"prelu{i}.slope"))
            nodes.append(helper.make_node("PRelu", [x, f"prelu{i}.slope"], [f"prelu{i}"], name=f"prelu{i}"))
            x = f"prelu{i}"
    if fused.residual == "nearest":
        inits.append(numpy_helper.from_array(np.ones((s * s, 1, 1, 1), np.float32), "residual.weight"))
        nodes.append(helper.make_node("Conv", ["lr", "residual.weight"], ["residual"], kernel_shape=[1, 1],
                                      name="residual"))
    else:
        vertical, horizontal = residual_kernels(s)
        inits += [numpy_helper.from_array(vertical, "bicubic.vertical"),
                  numpy_helper.from_array(horizontal, "bicubic.horizontal")]
        nodes += [
            helper.make_node("Conv", ["lr", "bicubic.vertical"], ["bicubic_rows"], kernel_shape=[5, 1],
                             pads=[2, 0, 2, 0], name="bicubic_rows"),
            helper.make_node("Conv", ["bicubic_rows", "bicubic.horizontal"], ["residual"], kernel_shape=[1, 5],
                             pads=[0, 2, 0, 2], group=s, name="bicubic_columns"),
        ]
    nodes += [
        helper.make_node("Add", [x, "residual"], ["subpixels"], name="add"),
        helper.make_node("DepthToSpace", ["subpixels"], ["sr"], blocksize=s, mode="DCR", name="depth_to_space"),
    ]
    graph = helper.make_graph(
        nodes, "superres",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["N", 1, f"{s}H", f"{s}W"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="superres-train",
                              doc_string=doc)
    model.ir_version = 8  # readable by onnxruntime and OpenCV 5's importer alike
    onnx.checker.check_model(model)
    return model


def write_onnx(fused: FusedNet, path: Path, doc: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(to_onnx(fused, doc).SerializeToString())
    tmp.replace(path)
