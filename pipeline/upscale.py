"""The upscale stage: resize policy, alpha split, tiles through the engine, assembled at full resolution."""

import logging
from itertools import groupby

import cv2
import numpy as np

from pipeline.codec import merge_alpha, split_alpha
from pipeline.errors import DeviceOutOfMemory, TransientError
from pipeline.tiling import capped_size, plan_tiles

log = logging.getLogger("superres.upscale")

MIN_TILE = 32  # below this the overlap dominates: give the item back for a later try instead


def upscale_tiled(image: np.ndarray, engine, tile: int, context: int, batch: int = 1) -> np.ndarray:
    """Run `engine` over overlapping tiles and keep each tile's core: equal to the untiled result.
    Tiles of one padded size go through the engine `batch` at a time (a GPU wants several per call)."""
    h, w = image.shape[:2]
    s = engine.scale
    out = np.empty((h * s, w * s) + image.shape[2:], dtype=image.dtype)
    tiles = sorted(plan_tiles(w, h, tile, context), key=lambda t: (t.py1 - t.py0, t.px1 - t.px0))
    for _, same_size in groupby(tiles, key=lambda t: (t.py1 - t.py0, t.px1 - t.px0)):
        same_size = list(same_size)
        for start in range(0, len(same_size), batch):
            chunk = same_size[start:start + batch]
            inputs = [np.ascontiguousarray(image[t.py0:t.py1, t.px0:t.px1]) for t in chunk]
            ups = engine.upscale_batch(inputs) if batch > 1 else [engine.upscale(inputs[0])]
            for t, up in zip(chunk, ups):
                oy, ox = (t.y0 - t.py0) * s, (t.x0 - t.px0) * s
                out[t.y0 * s:t.y1 * s, t.x0 * s:t.x1 * s] = up[oy:oy + (t.y1 - t.y0) * s, ox:ox + (t.x1 - t.x0) * s]
    return out


def apply_policy(frame: np.ndarray, policy: str, cap_side: int) -> np.ndarray:
    if policy != "cap":
        return frame
    h, w = frame.shape[:2]
    size = capped_size(w, h, cap_side)
    return frame if size is None else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def upscale_frame(frame: np.ndarray, engine, *, policy: str, cap_side: int, tile: int, context: int,
                  batch: int = 1) -> np.ndarray:
    frame = apply_policy(frame, policy, cap_side)
    color, alpha = split_alpha(frame)
    while True:
        try:
            color_up = upscale_tiled(color, engine, tile, context, batch)
            # Alpha goes through the model on its own, as a gray image, so edges stay as sharp as the colour.
            alpha_up = None if alpha is None else upscale_tiled(alpha, engine, tile, context, batch)
            return merge_alpha(color_up, alpha_up)
        except DeviceOutOfMemory:
            # other work on the GPU took memory since the tile size was chosen: smaller batches, then tiles
            if batch > 1:
                batch //= 2
            elif tile // 2 >= MIN_TILE:
                tile //= 2
            else:
                raise TransientError("the device is out of memory even at the smallest tile", stage="upscale") from None
            log.warning("device out of memory: retrying the item with smaller work",
                        extra={"fields": {"tile": tile, "batch": batch}})
