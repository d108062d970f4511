"""Models shipped as ONNX graphs run in the OpenCV engine (cv2.dnn.readNetFromONNX) with dnn_superres's pre- and
post-processing; the onnxruntime engine runs every model and equals the OpenCV engine within 1 level."""

from dataclasses import replace

import cv2
import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper, save

from conftest import SHARED_MODELS, lr_image
from models.catalog import CATALOG
from models.engines.opencv_engine import OpenCVEngine
from pipeline.errors import ConfigError


def write_luma_onnx(path, scale: int, *, batch="N", seed: int | None = None):
    """A luma model of the shape the project's own models have: 1 channel in, Conv/PRelu/Relu/Add/DepthToSpace.

    seed None: the identity network (a 1x1 conv to scale^2 copies + DepthToSpace), i.e. nearest-neighbour
    upscaling, so its output is known exactly; otherwise random weights with a residual Add."""
    rng = np.random.default_rng(seed)
    s2 = scale * scale
    if seed is None:
        inits = [numpy_helper.from_array(np.ones((s2, 1, 1, 1), np.float32), "w"),
                 numpy_helper.from_array(np.zeros(s2, np.float32), "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                 helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=scale, mode="DCR")]
    else:
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w1"),
                 numpy_helper.from_array(rng.normal(0, 0.05, 8).astype(np.float32), "b1"),
                 numpy_helper.from_array(np.full((8, 1, 1), 0.25, np.float32), "a1"),
                 numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2"),
                 numpy_helper.from_array(rng.normal(0, 0.05, 8).astype(np.float32), "b2"),
                 numpy_helper.from_array(rng.normal(0, 0.1, (s2, 8, 3, 3)).astype(np.float32), "w3"),
                 numpy_helper.from_array(np.full(s2, 0.0, np.float32), "b3"),
                 numpy_helper.from_array(np.ones((s2, 1, 1, 1), np.float32), "wid"),
                 numpy_helper.from_array(np.zeros(s2, np.float32), "bid")]
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
                 helper.make_node("PRelu", ["c1", "a1"], ["p1"]),
                 helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c2"], ["r2"]),
                 helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["x", "wid", "bid"], ["skip"]),
                 helper.make_node("Add", ["c3", "skip"], ["sum"]),
                 helper.make_node("DepthToSpace", ["sum"], ["y"], blocksize=scale, mode="DCR")]
    graph = helper.make_graph(nodes, "luma", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def onnx_spec(name: str, scale: int, filename: str):
    """A catalog-shaped spec for a luma model stored as an ONNX file."""
    base = replace(CATALOG[f"fsrcnn-x{scale}"], name=name, filename=filename, sha256=None, size=None)
    return replace(base, file_format="onnx") if hasattr(base, "file_format") else base


@pytest.mark.parametrize("scale", [2, 3])
def test_opencv_engine_runs_an_onnx_luma_model(tmp_path, scale):
    path = write_luma_onnx(tmp_path / f"nearest_x{scale}.onnx", scale)
    engine = OpenCVEngine(onnx_spec(f"nearest-x{scale}", scale, path.name), path)
    gray = cv2.cvtColor(lr_image("butterfly", 4)[:37, :41], cv2.COLOR_BGR2GRAY)
    out = engine.upscale(gray)
    assert np.array_equal(out, np.repeat(np.repeat(gray, scale, 0), scale, 1))
    colour = lr_image("bird", 4)[:20, :30]
    out = engine.upscale(colour)
    assert out.shape == (20 * scale, 30 * scale, 3)
    # luma nearest, chroma bilinear: each output block's Y equals the input pixel's Y (within YCrCb rounding)
    y_out = cv2.cvtColor(out, cv2.COLOR_BGR2YCrCb)[::scale, ::scale, 0].astype(int)
    y_in = cv2.cvtColor(colour, cv2.COLOR_BGR2YCrCb)[:, :, 0].astype(int)
    assert np.abs(y_out - y_in).max() <= 2


def test_opencv_engine_says_which_onnx_file_it_cannot_read(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="cannot read model file"):
        OpenCVEngine(onnx_spec("broken-x2", 2, bad.name), bad)


def test_opencv_engine_refuses_an_onnx_file_of_another_scale(tmp_path):
    path = write_luma_onnx(tmp_path / "x2.onnx", 2)
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        OpenCVEngine(onnx_spec("wrong-x3", 3, path.name), path)


# ---- the onnxruntime engine -------------------------------------------------------------------------------

from edsr_graph import build_edsr_graph  # noqa: E402
from models.engines.onnx_engine import (CPU, CUDA, TENSORRT, OnnxRuntimeEngine, provider_list,  # noqa: E402
                                        onnxruntime_has_cuda)

PRESENT = [s for s in CATALOG.values() if (SHARED_MODELS / s.filename).exists()]


def max_levels(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype
    return int(np.abs(a.astype(np.int64) - b).max())


@pytest.mark.parametrize("spec", PRESENT, ids=lambda s: s.name)
def test_onnxruntime_equals_opencv_within_one_level_on_every_shared_model(tmp_path, spec):
    path = SHARED_MODELS / spec.filename
    ours, theirs = OnnxRuntimeEngine(spec, path, cache_dir=tmp_path), OpenCVEngine(spec, path)
    colour = lr_image("butterfly", 4)[:37, :41]  # odd sizes on purpose
    for image in (colour, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), colour.astype(np.uint16) * 257):
        assert max_levels(ours.upscale(image), theirs.upscale(image)) <= 1
    assert ours.describe()["providers"] == [CPU]
    # the blocked layouts where they were measured faster, and the FSRCNN graphs without (docs/benchmarks.md)
    assert ours.describe()["conv_layout"] == ("nchw" if spec.algorithm == "fsrcnn" else "nchwc")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_onnxruntime_equals_opencv_on_the_edsr_structured_graph(tmp_path, scale):
    spec = CATALOG[f"edsr-x{scale}"]
    path = tmp_path / spec.filename
    build_edsr_graph(path, scale=scale, blocks=3, channels=16, seed=scale, quantized=True)
    ours, theirs = OnnxRuntimeEngine(spec, path, cache_dir=tmp_path / "cache"), OpenCVEngine(spec, path)
    colour = lr_image("baby", scale)[100:130, 90:116]
    for image in (colour, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), colour.astype(np.uint16) * 257):
        assert max_levels(ours.upscale(image), theirs.upscale(image)) <= 1
    assert ours.upscale(np.full((1, 1, 3), 90, np.uint8)).shape == (scale, scale, 3)


@pytest.mark.parametrize("scale", [2, 4])
def test_edsr_wide_convs_run_as_winograd_and_still_equal_opencv(tmp_path, scale):
    """At 128+ channels the CPU graph's 3x3 convs are Winograd F(6, 3) (models/winograd.py); the export stays the
    plain network."""
    from models.onnx_export import export_model

    spec = CATALOG[f"edsr-x{scale}"]
    path = tmp_path / spec.filename
    build_edsr_graph(path, scale=scale, blocks=1, channels=128, seed=scale, quantized=True)
    ours, theirs = OnnxRuntimeEngine(spec, path, cache_dir=tmp_path / "cache"), OpenCVEngine(spec, path)
    assert ours.describe()["winograd_convs"] == 5  # head, the block's two, the one after the blocks, the tail
    colour = lr_image("baby", scale)[100:131, 90:113]  # 31 x 23: not whole 6-pixel tiles
    for image in (colour, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), colour.astype(np.uint16) * 257):
        assert max_levels(ours.upscale(image), theirs.upscale(image)) <= 1
    (cached,) = (tmp_path / "cache").glob("*.onnx")
    assert "-winograd6v2-" in cached.name
    assert not any(n.name.startswith("winograd/") for n in export_model(spec, path).graph.node)


def test_batches_equal_one_by_one(tmp_path):
    spec = CATALOG["fsrcnn-x3"]
    engine = OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=tmp_path)
    image = lr_image("bird", 3)
    tiles = [np.ascontiguousarray(image[y:y + 24, x:x + 24]) for y in (0, 30) for x in (0, 40)]
    for one, batched in zip([engine.upscale(t) for t in tiles], engine.upscale_batch(tiles)):
        assert np.array_equal(one, batched)


def test_own_onnx_models_run_in_onnxruntime_as_in_opencv(tmp_path):
    """The project's own models are 1x1xHxW ONNX files (a fixed batch of one): both engines run them alike."""
    path = write_luma_onnx(tmp_path / "own_x3.onnx", 3, batch=1, seed=5)
    spec = onnx_spec("own-x3", 3, path.name)
    ours, theirs = OnnxRuntimeEngine(spec, path, cache_dir=tmp_path / "cache"), OpenCVEngine(spec, path)
    colour = lr_image("head", 4)[:33, :29]
    for image in (colour, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)):
        assert max_levels(ours.upscale(image), theirs.upscale(image)) <= 1
    tiles = [np.ascontiguousarray(colour[:16, :16]), np.ascontiguousarray(colour[16:32, 8:24])]
    assert all(np.array_equal(a, b) for a, b in zip(ours.upscale_batch(tiles), [ours.upscale(t) for t in tiles]))
    # prepared once for onnxruntime (PRelu as plain ops), cached by the file's checksum like a conversion
    (prepared,) = (tmp_path / "cache").glob("*.onnx")
    assert "PRelu" not in {n.op_type for n in onnx.load(str(prepared)).graph.node}


def test_conversion_is_cached_by_the_model_files_checksum(tmp_path):
    spec = CATALOG["espcn-x2"]
    model = tmp_path / "models" / spec.filename
    model.parent.mkdir()
    model.write_bytes((SHARED_MODELS / spec.filename).read_bytes())
    cache = tmp_path / "cache"
    first = OnnxRuntimeEngine(spec, model, cache_dir=cache)
    (entry,) = cache.glob("*.onnx")
    assert spec.sha256[:32] in entry.name and not list(cache.glob(".*.tmp"))  # written atomically, no leftovers
    stamp = entry.stat().st_mtime_ns
    image = lr_image("baby", 2)[:40, :40]
    assert np.array_equal(OnnxRuntimeEngine(spec, model, cache_dir=cache).upscale(image), first.upscale(image))
    assert entry.stat().st_mtime_ns == stamp  # a hit: not converted again
    # other bytes under the same name (a different export): another key, never the stale graph
    model.write_bytes((SHARED_MODELS / "ESPCN_x2.pb").read_bytes() + b"\x78\x01")  # + an unknown field 15
    OnnxRuntimeEngine(spec, model, cache_dir=cache)
    assert len(list(cache.glob("*.onnx"))) == 2


def test_a_damaged_cache_entry_is_converted_again(tmp_path):
    spec = CATALOG["fsrcnn-small-x2"]
    OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.onnx")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short (a full disk, a bad copy)
    engine = OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=tmp_path)
    assert engine.upscale(np.full((5, 5), 50, np.uint8)).shape == (10, 10)
    assert entry.stat().st_size > 1000


def test_an_unwritable_cache_converts_in_memory(tmp_path):
    spec = CATALOG["fsrcnn-small-x3"]
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    engine = OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=blocker / "onnx")
    assert engine.upscale(np.full((4, 6), 80, np.uint8)).shape == (12, 18)


def test_wrong_files_and_settings_are_start_up_errors(tmp_path):
    with pytest.raises(ConfigError, match="not x3: wrong file"):
        OnnxRuntimeEngine(CATALOG["fsrcnn-x3"], SHARED_MODELS / "FSRCNN_x2.pb", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="wrong file"):  # a luma model under an EDSR name
        OnnxRuntimeEngine(CATALOG["edsr-x2"], SHARED_MODELS / "ESPCN_x2.pb", cache_dir=tmp_path)
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="cannot read model file"):
        OnnxRuntimeEngine(CATALOG["espcn-x2"], junk, cache_dir=tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="onnxruntime cannot load"):
        OnnxRuntimeEngine(onnx_spec("bad-x2", 2, bad.name), bad, cache_dir=tmp_path)
    spec = CATALOG["espcn-x2"]
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, precision="fp16", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="bf16"):
        OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, precision="bf16", cache_dir=tmp_path)


@pytest.mark.skipif(onnxruntime_has_cuda(), reason="this onnxruntime has a CUDA provider")
def test_cuda_without_a_gpu_provider_is_an_error_never_a_cpu_run(tmp_path):
    spec = CATALOG["espcn-x2"]
    with pytest.raises(ConfigError, match="no CUDA or TensorRT execution provider"):
        OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, device="cuda", cache_dir=tmp_path)


def test_gpu_providers_tensorrt_first_with_fp16_and_an_engine_cache(tmp_path):
    both = provider_list("cuda", "fp16", [TENSORRT, CUDA, CPU], tmp_path, 3, 4)
    assert [name for name, _ in both] == [TENSORRT, CUDA]  # never CPU: a GPU run or an error
    trt = both[0][1]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "tensorrt")
    assert trt["trt_profile_max_shapes"].startswith("input:16x3x")  # room for a --tile-batch above the default
    assert trt["trt_profile_opt_shapes"].startswith("input:4x3x")
    assert provider_list("cuda", "fp32", [TENSORRT, CUDA, CPU], tmp_path, 1, 1)[0][1]["trt_fp16_enable"] is False
    assert [name for name, _ in provider_list("cuda", "fp16", [CUDA, CPU], tmp_path, 1, 4)] == [CUDA]
    assert provider_list("cpu", "fp32", [TENSORRT, CUDA, CPU], tmp_path, 1, 1) == [CPU]
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        provider_list("cuda", "fp16", [CPU], tmp_path, 1, 1)


def test_upscale_with_onnxruntime_matches_opencv_through_the_whole_pipeline(tmp_path):
    """Real processes, real files: alpha, 16-bit, gray and a tiled image come out of `superres upscale
    --engine onnxruntime` within 1 level of `--engine opencv`."""
    import subprocess

    from conftest import DATASETS, cli_env, superres_cmd

    src = tmp_path / "in"
    src.mkdir()
    photo = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "baboonx2.png"))
    alpha = np.dstack([photo[:60, :70], np.linspace(0, 255, 60 * 70).reshape(60, 70).astype(np.uint8)])
    cv2.imwrite(str(src / "alpha.png"), alpha)
    cv2.imwrite(str(src / "deep.png"), photo[:50, :40].astype(np.uint16) * 257)
    cv2.imwrite(str(src / "gray.png"), cv2.cvtColor(photo[:45, :55], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(src / "tiled.png"), photo)  # tiles of 64: several, with overlap
    outs = {}
    for engine in ("opencv", "onnxruntime"):
        done = subprocess.run(superres_cmd() + ["upscale", str(src), "--out", str(tmp_path / engine), "--engine", engine,
                                                "--model", "espcn-x2", "--tile", "64", "-q"],
                              env=cli_env(XDG_CACHE_HOME=str(tmp_path / "cache")), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        outs[engine] = {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (tmp_path / engine).glob("*.png")}
    assert sorted(outs["opencv"]) == sorted(outs["onnxruntime"]) == ["alpha.png", "deep.png", "gray.png", "tiled.png"]
    for name, theirs in outs["opencv"].items():
        ours = outs["onnxruntime"][name]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        assert max_levels(ours, theirs) <= 1, name
    assert outs["onnxruntime"]["alpha.png"].shape[2] == 4 and outs["onnxruntime"]["deep.png"].dtype == np.uint16


def test_thin_models_run_one_thread_per_call_side_by_side_and_heavier_ones_keep_the_sessions_threads(tmp_path):
    """FSRCNN-sized networks: one thread per run, runs side by side, one per core (what is fastest on a CPU,
    docs/benchmarks.md); heavier ones: onnxruntime's threads on each run, two runs at a time. --lanes and
    --threads are the user's."""
    import os

    from models.engines import load_engine
    from models.engines.onnx_engine import SIDE_BY_SIDE, THIN_MOST_LANES, OnnxRuntimeEngine
    from pipeline.settings import load_settings

    cores = os.cpu_count() or 1

    def engine(name, **kw):
        spec = CATALOG[name]
        return OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=tmp_path, **kw)

    thin = engine("fsrcnn-x2")
    assert thin.side_by_side == min(cores, THIN_MOST_LANES)
    assert thin.threads == (1 if cores > 1 else 0) and thin.describe()["threads_per_call"] == (thin.threads or "all")
    assert (engine("fsrcnn-x2", lanes=1).side_by_side, engine("fsrcnn-x2", lanes=1).threads) == (1, 0)
    assert engine("fsrcnn-x2", threads=3).threads == 3
    heavy = engine("espcn-x2")
    assert (heavy.side_by_side, heavy.threads) == (min(cores, SIDE_BY_SIDE), 0)
    settings = load_settings(model="fsrcnn-x2", model_dir=SHARED_MODELS, engine="onnxruntime", lanes=1)
    loaded, _ = load_engine(settings)
    assert (loaded.side_by_side, loaded.threads) == (1, 0)  # the setting reaches the engine
