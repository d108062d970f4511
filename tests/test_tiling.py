"""Tiles cover the image exactly once, and a tiled upscale equals the untiled one on real images."""

import numpy as np
import pytest

from conftest import SHARED_MODELS, lr_image
from models.catalog import CATALOG
from models.engines.opencv_engine import OpenCVEngine
from pipeline.tiling import capped_size, plan_tiles, policy_id
from pipeline.upscale import upscale_tiled


@pytest.mark.parametrize("w, h, tile, ctx", [(1, 1, 16, 8), (100, 37, 16, 8), (64, 64, 64, 4), (65, 129, 32, 40)])
def test_tiles_cover_every_pixel_once(w, h, tile, ctx):
    hits = np.zeros((h, w), int)
    for t in plan_tiles(w, h, tile, ctx):
        hits[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.px0 <= t.x0 < t.x1 <= t.px1 <= w and 0 <= t.py0 <= t.y0 < t.y1 <= t.py1 <= h
        assert t.x0 - t.px0 == min(ctx, t.x0) and t.px1 - t.x1 == min(ctx, w - t.x1)
    assert (hits == 1).all()


@pytest.mark.parametrize("name", ["fsrcnn-x3", "espcn-x2", "fsrcnn-small-x4", "lapsrn-x4"])
def test_tiled_equals_untiled_on_a_real_image(name):
    spec = CATALOG[name]
    engine = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    image = lr_image("baby", 2)[:100, :90]
    whole = engine.upscale(image)
    tiled = upscale_tiled(image, engine, tile=24, context=spec.context_px)
    diff = np.abs(whole.astype(int) - tiled)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, f"max {diff.max()}, share {(diff > 0).mean()}"


def test_cap_policy_and_policy_ids():
    assert capped_size(400, 300, 500) is None
    assert capped_size(1000, 500, 500) == (500, 250)
    assert capped_size(3, 2000, 500) == (1, 500)
    assert policy_id("tile", 500) != policy_id("cap", 500) != policy_id("cap", 400)


def test_batched_tiles_equal_one_at_a_time():
    from models.engines.torch_engine import TorchEngine

    spec = CATALOG["espcn-x3"]
    engine = TorchEngine(spec, SHARED_MODELS / spec.filename)
    image = lr_image("bird", 3)[:90, :70]
    one = upscale_tiled(image, engine, tile=24, context=spec.context_px, batch=1)
    batched = upscale_tiled(image, engine, tile=24, context=spec.context_px, batch=4)
    assert np.array_equal(one, batched)


class SmallDevice:
    """A real engine behind a memory budget, as a small GPU would be: more input pixels in one call than the
    budget raises DeviceOutOfMemory (what TorchEngine raises on torch.cuda.OutOfMemoryError)."""

    def __init__(self, engine, budget_px: int):
        self.engine, self.budget_px, self.scale, self.calls = engine, budget_px, engine.scale, []

    def _guard(self, images):
        pixels = sum(im.shape[0] * im.shape[1] for im in images)
        self.calls.append(pixels)
        if pixels > self.budget_px:
            from pipeline.errors import DeviceOutOfMemory

            raise DeviceOutOfMemory("out of memory")

    def upscale(self, image):
        self._guard([image])
        return self.engine.upscale(image)

    def upscale_batch(self, images):
        self._guard(images)
        return self.engine.upscale_batch(images)


def test_out_of_memory_shrinks_the_batch_then_the_tile_and_the_result_is_unchanged():
    from pipeline.upscale import upscale_frame

    spec = CATALOG["fsrcnn-small-x2"]
    engine = OpenCVEngine(spec, SHARED_MODELS / spec.filename)
    image = lr_image("baby", 2)[:150, :140]
    expected = upscale_tiled(image, engine, tile=256, context=spec.context_px)
    small = SmallDevice(engine, budget_px=60 * 60)
    got = upscale_frame(image, small, policy="tile", cap_side=500, tile=128, context=spec.context_px, batch=4)
    diff = np.abs(got.astype(int) - expected)  # other tile sizes: the same picture but for rare rounding flips
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    assert max(small.calls) > 60 * 60 and small.calls[-1] <= 60 * 60  # it failed big, then fitted


def test_out_of_memory_at_the_smallest_tile_is_a_transient_error():
    from pipeline.errors import TransientError
    from pipeline.upscale import upscale_frame

    spec = CATALOG["fsrcnn-small-x2"]
    small = SmallDevice(OpenCVEngine(spec, SHARED_MODELS / spec.filename), budget_px=10)
    with pytest.raises(TransientError, match="smallest tile"):
        upscale_frame(lr_image("baby", 2)[:80, :80], small, policy="tile", cap_side=500, tile=64, context=8)


class _Overlapping:
    """A real engine that records how many calls run at once (each held a moment so that overlap shows)."""

    def __init__(self, engine, fail_on_call: int | None = None):
        import threading

        self.engine, self.scale, self.fail_on_call = engine, engine.scale, fail_on_call
        self._lock, self.now, self.most, self.calls = threading.Lock(), 0, 0, 0

    def upscale(self, image):
        import time

        with self._lock:
            self.calls += 1
            self.now += 1
            self.most = max(self.most, self.now)
            call = self.calls
        try:
            time.sleep(0.02)
            if call == self.fail_on_call:
                raise RuntimeError("the engine broke on a tile")
            return self.engine.upscale(image)
        finally:
            with self._lock:
                self.now -= 1


def _onnxruntime_engine(name: str, tmp_path):
    from models.engines.onnx_engine import OnnxRuntimeEngine

    spec = CATALOG[name]
    return spec, OnnxRuntimeEngine(spec, SHARED_MODELS / spec.filename, cache_dir=tmp_path)


def test_tiles_on_several_workers_equal_one_worker_and_report_progress_in_order(tmp_path):
    from pipeline.upscale import upscale_frames

    spec, engine = _onnxruntime_engine("fsrcnn-small-x2", tmp_path)
    bgr = lr_image("baby", 2)[:150, :140]
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 200, np.uint8)])  # its alpha: more tiles, of another kind
    outputs, seen = {}, {}
    for workers in (1, 3):
        counting = _Overlapping(engine)
        progress = []
        outputs[workers] = upscale_frames([bgr, bgra], counting, policy="tile", cap_side=500, tile=64,
                                          context=spec.context_px, progress=lambda d, t: progress.append((d, t)),
                                          workers=workers)
        seen[workers] = (counting.most, progress)
    assert all(np.array_equal(a, b) for a, b in zip(outputs[1], outputs[3]))
    assert seen[1][0] == 1 and seen[3][0] == 3  # one call at a time, then three
    total = 3 * 3 * 3  # 9 tiles of 64 px each: the colour of both frames and the alpha
    assert seen[3][1] == seen[1][1] == [(done, total) for done in range(1, total + 1)]
    assert not _tile_threads()  # done with when the call returns


def _tile_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("superres-tile")]


def test_an_engine_error_on_one_workers_tile_is_raised_and_starts_nothing_more(tmp_path):
    from pipeline.upscale import upscale_many

    spec, engine = _onnxruntime_engine("fsrcnn-small-x2", tmp_path)
    broken = _Overlapping(engine, fail_on_call=2)
    with pytest.raises(RuntimeError, match="broke on a tile"):
        upscale_many([lr_image("baby", 2)[:150, :140]], broken, tile=32, context=spec.context_px, workers=2)
    assert broken.calls <= 4  # 25 tiles: the ones under way when it broke, not the rest
    assert broken.now == 0 and not _tile_threads()  # and none is left running


def test_engine_tiles_counts_what_upscale_frames_runs():
    from pipeline.upscale import engine_tiles

    gray, bgra = np.zeros((100, 130), np.uint8), np.zeros((64, 64, 4), np.uint8)
    assert engine_tiles([gray], policy="tile", cap_side=500, tile=64, context=8) == 2 * 3
    assert engine_tiles([gray, bgra], policy="tile", cap_side=500, tile=64, context=8) == 6 + 2  # alpha: again
    assert engine_tiles([gray], policy="cap", cap_side=64, tile=64, context=8) == 1  # shrunk first
