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
