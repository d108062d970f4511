"""OpenCV `dnn_superres`'s pre- and post-processing, written out once for every engine.

An engine supplies `forward(blob)`: its network on an NCHW float32 batch (Y in 0..1, or BGR minus the DIV2K
mean) returning NCHW float32 `scale` times larger. This mixin turns images into blobs and back exactly as
`DnnSuperResImpl.upsample` does for uint8 (bit-exact, tested), and the same way for uint16:
- Y-channel models (FSRCNN, ESPCN, LapSRN): BGR->YCrCb on the integer image, Y * float32(1/max) (a multiply:
  dividing shifts ~1 % of values), Cr/Cb upscaled with bilinear `cv::resize`, merge, * max, round-half-even
  with saturation, YCrCb->BGR. Gray in: the network on the gray image, gray out.
- EDSR: BGR 0..255 minus the DIV2K mean, the mean added back, rounded and saturated; gray is replicated to BGR
  and converted back.
"""

import cv2
import numpy as np

from pipeline.errors import InputRejected

# DIV2K mean in BGR order, as dnn_superres subtracts it for EDSR
EDSR_MEAN_BGR = np.array([103.1545782, 111.561547, 114.35629928], dtype=np.float32)


def model_file_format(spec) -> str:
    """"pb" (a TensorFlow GraphDef) or "onnx", from the catalog's `file_format` (the file's suffix otherwise)."""
    declared = getattr(spec, "file_format", None)
    if declared:
        return declared
    return "onnx" if str(spec.filename).lower().endswith(".onnx") else "pb"


def to_uint(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round half to even and saturate, as OpenCV's convertTo does."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


_CV_DEPTH = {np.dtype(np.uint8): cv2.CV_8U, np.dtype(np.uint16): cv2.CV_16U}


def scaled_to_uint(values: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """`to_uint(values * float32(scale), dtype)` for float32 `values`, as one OpenCV call: the same float32
    product, rounding and saturation (tested), with the GIL released throughout. numpy's four calls (multiply,
    rint, clip, cast) each take the GIL back between them, and the lanes running items side by side wait on it."""
    return cv2.addWeighted(values, float(scale), values, 0.0, 0.0, dtype=_CV_DEPTH[np.dtype(dtype)])


def check_image(image: np.ndarray) -> None:
    if image.dtype not in (np.uint8, np.uint16):
        raise InputRejected(f"pixel type {image.dtype} is not supported (uint8 or uint16)", stage="upscale",
                            code="unsupported_depth")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise InputRejected(f"image shape {image.shape} is not gray or BGR (alpha is split off before the engine)",
                            stage="upscale", code="unsupported_channels")


class DnnSuperResIO:
    spec: "object"  # models.catalog.ModelSpec

    def forward(self, blob: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def default_tile(self, batch: int) -> int:
        """Tile side (input px) when the settings leave it to the engine. 256 on a CPU: large enough that the
        overlap costs little, small enough for the cache (docs/benchmarks.md)."""
        return 256

    def default_batch(self) -> int:
        return 1

    def upscale(self, image: np.ndarray) -> np.ndarray:
        return self.upscale_batch([image])[0]

    def upscale_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-shape, same-dtype images (tiles) in one forward pass; each result as `upscale` gives it."""
        if not images:
            return []
        for image in images:
            check_image(image)
        if len({(im.shape, im.dtype) for im in images}) != 1:
            raise ValueError("upscale_batch needs images of one shape and dtype")
        return self._bgr_model(images) if self.spec.input_kind == "bgr" else self._y_model(images)

    def probe_blob(self, side: int = 8) -> np.ndarray:
        """A small input blob of the network's kind, to check a model file's scale at load."""
        channels = 3 if self.spec.input_kind == "bgr" else 1
        return np.zeros((1, channels, side, side), np.float32)

    def _y_model(self, images: list[np.ndarray]) -> list[np.ndarray]:
        dtype = images[0].dtype
        maxval = np.float32(np.iinfo(dtype).max)
        unit = np.float32(1.0) / maxval  # dnn_superres multiplies by float32(1/255); dividing differs
        if images[0].ndim == 2:
            ys = self.forward(np.stack([im.astype(np.float32) * unit for im in images])[:, None])[:, 0]
            return [scaled_to_uint(y, maxval, dtype) for y in ys]
        planes = [cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2YCrCb)) for im in images]  # Y, Cr, Cb
        ys = self.forward(np.stack([y.astype(np.float32) * unit for y, _, _ in planes])[:, None])[:, 0]
        out = []
        for y, (_, cr, cb) in zip(ys, planes):
            h, w = y.shape
            # plane by plane: dnn_superres's arithmetic on its merged float image, without the 3-channel float
            # copies (a third of the colour handling's time)
            chroma = [scaled_to_uint(cv2.resize(c.astype(np.float32) * unit, (w, h), interpolation=cv2.INTER_LINEAR),
                                     maxval, dtype) for c in (cr, cb)]
            out.append(cv2.cvtColor(cv2.merge([scaled_to_uint(y, maxval, dtype), *chroma]), cv2.COLOR_YCrCb2BGR))
        return out

    def _bgr_model(self, images: list[np.ndarray]) -> list[np.ndarray]:
        dtype = images[0].dtype
        to_255 = np.float32(255.0 / np.iinfo(dtype).max)
        bgrs = [im if im.ndim == 3 else cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) for im in images]
        blob = np.stack([(bgr.astype(np.float32) * to_255 - EDSR_MEAN_BGR).transpose(2, 0, 1) for bgr in bgrs])
        outs = []
        for y, image in zip(self.forward(blob), images):
            y = y.transpose(1, 2, 0) + EDSR_MEAN_BGR
            if image.ndim == 2:
                y = cv2.cvtColor(y, cv2.COLOR_BGR2GRAY)
            outs.append(to_uint(y / to_255, dtype))
        return outs
