"""The onnxruntime engine: the model's network as an ONNX graph (converted from the `.pb` by
`models.onnx_export` and cached, or the model's own `.onnx` file) run by onnxruntime, with `dnn_superres`'s pre-
and post-processing from `dnn_superres_io`. Within 1 level of the OpenCV engine (tested on every shared model and
the EDSR-structured graph); 1.5-3x faster than cv2.dnn on a CPU (docs/benchmarks.md).

Execution providers, from `device` and `precision`:
- cpu: CPUExecutionProvider, fp32, all graph optimisations, the NCHWc conv layouts only where the model's
  family is faster with them (`ModelSpec.onnxruntime_blocked`), 3x3 convs of 128+ channels as Winograd
  F(6, 3) (`models.winograd`: EDSR ~2x onnxruntime's own conv), threads not spinning between runs (the decode
  and encode stages share the cores); for thin models one thread per run, runs side by side (THIN_MODEL_*);
- cuda: TensorrtExecutionProvider (fp16 when precision is fp16, engines cached beside the ONNX cache, one
  optimisation profile for tiles up to `TRT_MAX_SIDE`) where this onnxruntime build has it, then
  CUDAExecutionProvider (on a graph exported in fp16 for precision fp16). If neither ends up in the session,
  that is a ConfigError: never a silent CPU run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from models.catalog import ModelSpec
from models.engines.dnn_superres_io import DnnSuperResIO, model_file_format
from models.onnx_export import WINOGRAD_KEY
from pipeline.errors import ConfigError, DeviceOutOfMemory

log = logging.getLogger("superres.engine")

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
TRT_MAX_SIDE = 1280  # input px: the largest tile (with overlap) TensorRT's profile covers without a rebuild
TRT_MAX_BATCH = 16  # tiles per call the profile covers (--tile-batch above the engine's default included)
PRECISIONS = ("fp32", "fp16")
SIDE_BY_SIDE = 2  # items at once on a CPU, sharing the session's threads: measured on 2 cores (docs/benchmarks.md)
MAX_SIDE_BY_SIDE = 16  # the most `--lanes` may ask for on a CPU (settings' bound)
# Models at most this heavy (FSRCNN, fast-*) have layers too thin for onnxruntime's threads to share: each call
# runs on one thread, and calls run side by side, one per core (up to THIN_MOST_LANES): 1.2-2.1x the throughput of
# one call on two threads, on 96-256 px tiles (bench/side_by_side_bench.py). Heavier ones (ESPCN 1.04-1.17x,
# quality-* 0.90-1.16x, LapSRN 1.00-1.03x) keep the session's threads: little or no faster side by side, and one
# image alone would take up to twice as long.
THIN_MODEL_MACS_PER_PIXEL = 16_000
THIN_MOST_LANES = 8  # memory: this many small items at once (bigger ones run alone)
# Heavier models run without onnxruntime's memory pattern (one block planned per input shape, on top of what the
# arena already holds): on EDSR-structured 256-channel graphs at 400x400 it doubled the peak (0.77 -> 1.45 GiB
# direct, 1.59 -> 3.22 GiB Winograd) at the same speed; LapSRN-x4 the same speed either way. Small models keep
# it (2-5 % faster).
HEAVY_MODEL_MACS_PER_PIXEL = 1_000_000


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def onnxruntime_has_cuda() -> bool:
    """This onnxruntime build can run on CUDA (onnxruntime-gpu); whether a GPU is really there shows at load."""
    try:
        return CUDA in available_providers()
    except Exception:  # a broken install reads as "no GPU", never as a crash at start-up
        return False


def provider_list(device: str, precision: str, providers: list[str], cache_dir: Path, in_channels: int,
                  batch: int) -> list:
    """The (name, options) providers to ask onnxruntime for, best first (pure; tested without a GPU)."""
    if device == "cpu":
        return [CPU]
    if device != "cuda":
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
    chosen: list = []
    if TENSORRT in providers:
        side = TRT_MAX_SIDE
        chosen.append((TENSORRT, {
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir / "tensorrt"),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir / "tensorrt"),
            "trt_profile_min_shapes": f"input:1x{in_channels}x1x1",
            "trt_profile_opt_shapes": f"input:{batch}x{in_channels}x320x320",
            "trt_profile_max_shapes": f"input:{max(batch, TRT_MAX_BATCH)}x{in_channels}x{side}x{side}",
        }))
    if CUDA in providers:
        chosen.append((CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}))
    if not chosen:
        raise ConfigError("--device cuda: this onnxruntime has no CUDA or TensorRT execution provider (it is the CPU "
                          "wheel 'onnxruntime'; for CUDA, install 'onnxruntime-gpu' in its place); run with --device cpu")
    return chosen


class OnnxRuntimeEngine(DnnSuperResIO):
    name = "onnxruntime"

    def __init__(self, spec: ModelSpec, model_file: Path, device: str = "cpu", precision: str = "fp32",
                 threads: int = 0, cache_dir: Path | None = None, lanes: int = 0, winograd: bool = True):
        import onnxruntime

        from models.files import onnx_cache_dir

        self.spec = spec
        self.scale = spec.scale
        if precision not in PRECISIONS:
            hint = "; for bf16 on a CPU that has it use --engine torch" if precision == "bf16" else ""
            raise ConfigError(f"--engine onnxruntime: precision {precision} is not supported (fp32 or fp16){hint}")
        if device == "cpu" and precision != "fp32":
            raise ConfigError(f"precision {precision} needs a CUDA device; the CPU path is fp32")
        self.device, self.precision = device, precision
        self._winograd = winograd and device == "cpu"  # False: onnxruntime's own convs (benchmarks compare)
        cache_dir = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
        in_channels = 3 if spec.input_kind == "bgr" else 1
        providers = provider_list(device, precision, available_providers(), cache_dir, in_channels,
                                  self.default_batch())
        options = onnxruntime.SessionOptions()
        levels = onnxruntime.GraphOptimizationLevel
        # ALL adds the blocked conv layouts (NCHWc), a CPU-only rewrite that is faster or slower by model family
        blocked = spec.onnxruntime_blocked or device != "cpu"
        options.graph_optimization_level = levels.ORT_ENABLE_ALL if blocked else levels.ORT_ENABLE_EXTENDED
        self.conv_layout = "nchwc" if blocked else "nchw"
        options.log_severity_level = 3  # warnings about fallbacks are ours to say, in our log
        # a session's run() may be called from several threads at once: on a CPU the stage runner runs small items
        # (and a big one's tiles) side by side (pipeline/stages.py); a GPU groups items into its calls instead
        cores = os.cpu_count() or 1
        thin = device == "cpu" and spec.macs_per_pixel <= THIN_MODEL_MACS_PER_PIXEL
        auto = min(cores, THIN_MOST_LANES) if thin else min(SIDE_BY_SIDE, cores)
        self.side_by_side = (lanes or auto) if device == "cpu" else 1
        self.max_side_by_side = MAX_SIDE_BY_SIDE if device == "cpu" else 1  # --lanes: what the user may ask
        self.threads = threads or (1 if thin and self.side_by_side > 1 else 0)  # 0: onnxruntime's (one per core)
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_mem_pattern = spec.macs_per_pixel < HEAVY_MODEL_MACS_PER_PIXEL
        # spinning workers would burn the cores the decode/encode stages need between two runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if any(not isinstance(p, str) and p[0] == TENSORRT for p in providers):
            try:  # where TensorRT keeps its engines; unwritable only costs a rebuild at each start
                (cache_dir / "tensorrt").mkdir(parents=True, exist_ok=True)
            except OSError:
                log.warning("TensorRT engine cache not writable", extra={"fields": {"cache": str(cache_dir)}})
        self._session = self._open(onnxruntime, spec, model_file, options, providers, cache_dir)
        self.providers = self._session.get_providers()
        self.winograd_convs = int(self._session.get_modelmeta().custom_metadata_map.get(WINOGRAD_KEY, 0))
        if device == "cuda" and not any(p in self.providers for p in GPU_PROVIDERS):
            raise ConfigError("--device cuda: onnxruntime could not use the GPU (no usable CUDA device or CUDA/cuDNN "
                              f"libraries; session providers {self.providers}); run with --device cpu")
        self._input = self._session.get_inputs()[0].name
        self._fixed_batch = self._session.get_inputs()[0].shape[0] == 1  # own models: 1xCxHxW
        self._check_scale()

    def _open(self, onnxruntime, spec, model_file, options, providers, cache_dir, retry: bool = True):
        from models.onnx_export import cached_onnx

        # the CUDA provider runs what it is given: fp16 arithmetic needs the fp16 graph (a `.pb` converted so);
        # TensorRT takes the fp32 graph and builds fp16 kernels itself
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        half = self.precision == "fp16" and first == CUDA and model_file_format(spec) == "pb"
        # on a CPU, wide 3x3 convs as Winograd F(6, 3): fewer multiplications (models/winograd.py); GPU
        # providers pick their own conv algorithms
        source = cached_onnx(spec, model_file, precision="fp16" if half else "fp32", cache_dir=cache_dir,
                             winograd=self._winograd)
        try:
            return onnxruntime.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            if isinstance(source, Path) and retry:  # a damaged cache entry: convert again, once
                log.warning("cached ONNX graph unreadable: converting again", extra={"fields": {"onnx": str(source)}})
                source.unlink(missing_ok=True)
                return self._open(onnxruntime, spec, model_file, options, providers, cache_dir, retry=False)
            raise ConfigError(f"onnxruntime cannot load the model for {spec.name} ({model_file}): "
                              f"{str(exc).splitlines()[0]}") from None

    def _check_scale(self) -> None:
        # A file whose scale differs from the catalog's would only fail later, at the merge.
        out = self.forward(self.probe_blob())
        if out.shape[-1] != 8 * self.scale:
            raise ConfigError(f"the model file for {self.spec.name} upscales x{out.shape[-1] / 8:g}, "
                              f"not x{self.scale}: wrong file for this model name")

    def describe(self) -> dict:
        import onnxruntime

        return {"engine": self.name, "device": self.device, "model": self.spec.name, "scale": self.scale,
                "precision": self.precision, "onnxruntime": onnxruntime.__version__, "providers": self.providers,
                "conv_layout": self.conv_layout, "winograd_convs": self.winograd_convs,
                "threads_per_call": self.threads or "all"}

    def default_batch(self) -> int:
        return 4 if self.device == "cuda" else 1

    def default_tile(self, batch: int) -> int:
        """256 on a CPU (cache-sized); on a GPU 512, inside TensorRT's profile with any model's overlap."""
        return 512 if self.device == "cuda" else 256

    def forward(self, blob: np.ndarray) -> np.ndarray:
        blob = np.ascontiguousarray(blob, dtype=np.float32)
        try:
            if self._fixed_batch and blob.shape[0] > 1:
                return np.concatenate([self._session.run(None, {self._input: one[None]})[0] for one in blob])
            return self._session.run(None, {self._input: blob})[0]
        except Exception as exc:
            text = str(exc)
            if "out of memory" in text.lower() or "Failed to allocate memory" in text:
                raise DeviceOutOfMemory(f"onnxruntime out of memory on a batch of {tuple(blob.shape)}") from None
            raise
