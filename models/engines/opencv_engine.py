"""The OpenCV engine: the model's TensorFlow graph run by `cv2.dnn`, with `dnn_superres`'s own pre- and
post-processing written out here (so 16-bit and gray inputs work and are checked up front, instead of
surfacing as OpenCV assertions). For uint8 it is bit-exact with `cv2.dnn_superres.DnnSuperResImpl`."""

from pathlib import Path

import cv2
import numpy as np

from models.catalog import ModelSpec
from pipeline.errors import ConfigError, InputRejected

# DIV2K mean in BGR order, as dnn_superres subtracts it for EDSR
EDSR_MEAN_BGR = np.array([103.1545782, 111.561547, 114.35629928], dtype=np.float32)


def opencv_has_cuda() -> bool:
    try:
        return cv2.cuda.getCudaEnabledDeviceCount() > 0 and bool(
            cv2.dnn.getAvailableTargets(cv2.dnn.DNN_BACKEND_CUDA)
        )
    except (cv2.error, AttributeError):
        return False


def _to_uint(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round half to even and saturate, as OpenCV's convertTo does."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


class OpenCVEngine:
    name = "opencv"

    def __init__(self, spec: ModelSpec, model_file: Path, device: str = "cpu", threads: int = 0):
        self.spec = spec
        self.scale = spec.scale
        self.device = device
        if threads > 0:
            cv2.setNumThreads(threads)
        # Creating a DnnSuperResImpl registers its DepthToSpace layer with cv2.dnn; without it every
        # shared model fails at the first forward ("DepthSpaceLayer: blocksize is required").
        cv2.dnn_superres.DnnSuperResImpl_create()
        try:
            self._net = cv2.dnn.readNetFromTensorflow(str(model_file))
        except cv2.error as exc:
            raise ConfigError(f"OpenCV cannot read model file {model_file}: {exc.err}") from None
        if device == "cuda":
            self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
        self._outputs = list(self._net.getUnconnectedOutLayersNames())
        self._check_scale()

    def _check_scale(self) -> None:
        # A file whose scale differs from the catalog's would only fail later, inside dnn_superres's merge.
        probe = np.zeros((8, 8, 3) if self.spec.input_kind == "bgr" else (8, 8), np.uint8)
        try:
            out = self._forward(self._network_input(probe))
        except ConfigError:
            raise
        except cv2.error as exc:
            raise ConfigError(f"model {self.spec.name} does not run in OpenCV: {exc.err}") from None
        if out.shape[-1] != 8 * self.scale:
            raise ConfigError(f"the model file for {self.spec.name} is not x{self.scale}: wrong file for this model name")

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale,
                "precision": "fp32", "opencv": cv2.__version__, "threads": cv2.getNumThreads()}

    def _forward(self, blob: np.ndarray) -> np.ndarray:
        self._net.setInput(blob)
        outs = self._net.forward(self._outputs)
        # LapSRN has one output per level; the wanted one is `scale` times the input.
        want = blob.shape[2] * self.scale
        for out in outs:
            if out.shape[2] == want:
                return out
        sizes = ", ".join(f"x{out.shape[2] // blob.shape[2]}" for out in outs)
        raise ConfigError(f"the model file for {self.spec.name} upscales {sizes}, not x{self.scale}: "
                          "wrong file for this model name")

    def _network_input(self, image: np.ndarray) -> np.ndarray:
        if self.spec.input_kind == "bgr":
            bgr = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            return ((bgr.astype(np.float32) * self._unit_to_255(image.dtype)) - EDSR_MEAN_BGR).transpose(2, 0, 1)[None]
        luma = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb)[:, :, 0]
        return (luma.astype(np.float32) * np.float32(1.0 / np.iinfo(image.dtype).max))[None, None]

    @staticmethod
    def _unit_to_255(dtype: np.dtype) -> np.float32:
        return np.float32(255.0 / np.iinfo(dtype).max)

    def upscale(self, image: np.ndarray) -> np.ndarray:
        if image.dtype not in (np.uint8, np.uint16):
            raise InputRejected(f"pixel type {image.dtype} is not supported (uint8 or uint16)", stage="upscale",
                                code="unsupported_depth")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputRejected(f"image shape {image.shape} is not gray or BGR (alpha is split off before the engine)",
                                stage="upscale", code="unsupported_channels")
        if self.spec.input_kind == "bgr":
            return self._upscale_bgr_model(image)
        return self._upscale_y_model(image)

    def _upscale_y_model(self, image: np.ndarray) -> np.ndarray:
        maxval = np.float32(np.iinfo(image.dtype).max)
        unit = np.float32(1.0) / maxval  # dnn_superres multiplies by float32(1/255); dividing differs
        if image.ndim == 2:
            y = self._forward(image.astype(np.float32)[None, None] * unit)[0, 0]
            return _to_uint(y * maxval, image.dtype)
        ycrcb = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb).astype(np.float32) * unit
        y = self._forward(np.ascontiguousarray(ycrcb[:, :, 0])[None, None])[0, 0]
        h, w = y.shape
        cr = cv2.resize(ycrcb[:, :, 1], (w, h), interpolation=cv2.INTER_LINEAR)
        cb = cv2.resize(ycrcb[:, :, 2], (w, h), interpolation=cv2.INTER_LINEAR)
        merged = _to_uint(np.dstack([y, cr, cb]) * maxval, image.dtype)
        return cv2.cvtColor(merged, cv2.COLOR_YCrCb2BGR)

    def _upscale_bgr_model(self, image: np.ndarray) -> np.ndarray:
        out = self._forward(self._network_input(image))[0].transpose(1, 2, 0) + EDSR_MEAN_BGR
        if image.ndim == 2:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
        return _to_uint(out / self._unit_to_255(image.dtype), image.dtype)
