"""The upscale stage: resize policy, alpha split, tiles through the engine, assembled at full resolution."""

import cv2
import numpy as np

from pipeline.codec import merge_alpha, split_alpha
from pipeline.tiling import capped_size, plan_tiles


def upscale_tiled(image: np.ndarray, engine, tile: int, context: int) -> np.ndarray:
    """Run `engine` over overlapping tiles and keep each tile's core: equal to the untiled result."""
    h, w = image.shape[:2]
    s = engine.scale
    out = np.empty((h * s, w * s) + image.shape[2:], dtype=image.dtype)
    for t in plan_tiles(w, h, tile, context):
        up = engine.upscale(np.ascontiguousarray(image[t.py0:t.py1, t.px0:t.px1]))
        oy, ox = (t.y0 - t.py0) * s, (t.x0 - t.px0) * s
        out[t.y0 * s:t.y1 * s, t.x0 * s:t.x1 * s] = up[oy:oy + (t.y1 - t.y0) * s, ox:ox + (t.x1 - t.x0) * s]
    return out


def apply_policy(frame: np.ndarray, policy: str, cap_side: int) -> np.ndarray:
    if policy != "cap":
        return frame
    h, w = frame.shape[:2]
    size = capped_size(w, h, cap_side)
    return frame if size is None else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def upscale_frame(frame: np.ndarray, engine, *, policy: str, cap_side: int, tile: int, context: int) -> np.ndarray:
    frame = apply_policy(frame, policy, cap_side)
    color, alpha = split_alpha(frame)
    color_up = upscale_tiled(color, engine, tile, context)
    # Alpha goes through the model on its own, as a gray image, so edges stay as sharp as the colour.
    alpha_up = None if alpha is None else upscale_tiled(alpha, engine, tile, context)
    return merge_alpha(color_up, alpha_up)
