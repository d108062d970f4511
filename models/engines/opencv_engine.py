"""The OpenCV engine: the model's graph run by `cv2.dnn` — a TensorFlow GraphDef (the GSoC `.pb` files) or an
ONNX graph (our own models: NCHW float32 in and out, the same blob as the `.pb` networks take) — with
`dnn_superres`'s pre- and post-processing from `dnn_superres_io` (so 16-bit and gray inputs work and are checked
up front, instead of surfacing as OpenCV assertions). For uint8 `.pb` models it is bit-exact with
`cv2.dnn_superres.DnnSuperResImpl`."""

from pathlib import Path

import cv2
import numpy as np

from models.catalog import ModelSpec
from models.engines.dnn_superres_io import DnnSuperResIO, model_file_format
from pipeline.errors import ConfigError


def opencv_has_cuda() -> bool:
    try:
        return cv2.cuda.getCudaEnabledDeviceCount() > 0 and bool(
            cv2.dnn.getAvailableTargets(cv2.dnn.DNN_BACKEND_CUDA)
        )
    except (cv2.error, AttributeError):
        return False


class OpenCVEngine(DnnSuperResIO):
    name = "opencv"

    def __init__(self, spec: ModelSpec, model_file: Path, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0):
        if precision != "fp32":  # OpenCV DNN computes in fp32 here: never a silent fp32 run for another
            hint = "; for bf16 on a CPU that has it use --engine torch" if precision == "bf16" else ""
            raise ConfigError(f"--engine opencv: precision {precision} is not supported (fp32 only){hint}")
        self.spec = spec
        self.scale = spec.scale
        self.device = device
        if threads > 0:
            cv2.setNumThreads(threads)
        # Creating a DnnSuperResImpl registers its DepthToSpace layer with cv2.dnn; without it every
        # shared model fails at the first forward ("DepthSpaceLayer: blocksize is required").
        cv2.dnn_superres.DnnSuperResImpl_create()
        read = cv2.dnn.readNetFromONNX if model_file_format(spec) == "onnx" else cv2.dnn.readNetFromTensorflow
        try:
            self._net = read(str(model_file))
        except cv2.error as exc:
            raise ConfigError(f"OpenCV cannot read model file {model_file}: {exc.err}") from None
        if device == "cuda":
            self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
        self._outputs = list(self._net.getUnconnectedOutLayersNames())
        # A file whose scale differs from the catalog's would only fail later, inside dnn_superres's merge.
        try:
            out = self.forward(self.probe_blob())
        except cv2.error as exc:
            raise ConfigError(f"model {spec.name} does not run in OpenCV: {exc.err}") from None
        if out.shape[-1] != 8 * self.scale:
            raise ConfigError(f"the model file for {spec.name} is not x{self.scale}: wrong file for this model name")

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale,
                "precision": "fp32", "opencv": cv2.__version__, "threads": cv2.getNumThreads()}

    def forward(self, blob: np.ndarray) -> np.ndarray:
        self._net.setInput(np.ascontiguousarray(blob, dtype=np.float32))
        outs = self._net.forward(self._outputs)
        # LapSRN has one output per level; the wanted one is `scale` times the input.
        want = blob.shape[2] * self.scale
        for out in outs:
            if out.shape[2] == want:
                return out
        sizes = ", ".join(f"x{out.shape[2] // blob.shape[2]}" for out in outs)
        raise ConfigError(f"the model file for {self.spec.name} upscales {sizes}, not x{self.scale}: "
                          "wrong file for this model name")
