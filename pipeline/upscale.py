"""The upscale stage: resize policy, alpha split, tiles through the engine, assembled at full resolution.

Tiles of one padded size (and kind: gray or BGR, uint8 or uint16) go through the engine `batch` at a time,
across frames and across images (`upscale_frames`): a GPU wants many small tiles per call. With `workers` > 1
(an engine whose calls run side by side: onnxruntime on a CPU, one thread per call) that many calls run at once,
each on its own thread: an image's tiles then use the cores the way several images do."""

import logging
from collections.abc import Callable
from itertools import groupby

import cv2
import numpy as np

from pipeline.codec import merge_alpha, split_alpha
from pipeline.errors import DeviceOutOfMemory, TransientError
from pipeline.in_order import map_in_order
from pipeline.tiling import capped_size, plan_tiles

log = logging.getLogger("superres.upscale")

MIN_TILE = 32  # below this the overlap dominates: give the item back for a later try instead


def upscale_many(images: list[np.ndarray], engine, tile: int, context: int, batch: int = 1,
                 progress: Callable[[int, int], None] | None = None,
                 progress_each: Callable[[int, int, int], None] | None = None,
                 workers: int = 1) -> list[np.ndarray]:
    """Upscale several images in overlapping tiles, keeping each tile's core: equal to the untiled results.
    `progress(tiles_done, tiles_total)` is called after each engine call (a big image is many tiles);
    `progress_each(image_index, its_tiles_done, its_tiles_total)` after each call for every image in it; both
    on the calling thread, in the calls' order. `workers`: engine calls at once (the results are the same)."""
    s = engine.scale
    outs = [np.empty((im.shape[0] * s, im.shape[1] * s) + im.shape[2:], dtype=im.dtype) for im in images]
    work = [(i, t) for i, im in enumerate(images) for t in plan_tiles(im.shape[1], im.shape[0], tile, context)]

    def kind(item):
        i, t = item
        return t.py1 - t.py0, t.px1 - t.px0, images[i].ndim, images[i].dtype.str

    done_tiles = 0
    totals = [0] * len(images)
    for i, _ in work:
        totals[i] += 1
    dones = [0] * len(images)
    chunks = [group[start:start + batch] for _, g in groupby(sorted(work, key=kind), key=kind)
              for group in [list(g)] for start in range(0, len(group), batch)]

    def run(chunk):
        inputs = [np.ascontiguousarray(images[i][t.py0:t.py1, t.px0:t.px1]) for i, t in chunk]
        return engine.upscale_batch(inputs) if len(inputs) > 1 else [engine.upscale(inputs[0])]

    def place(chunk, ups) -> None:
        nonlocal done_tiles
        for (i, t), up in zip(chunk, ups):
            oy, ox = (t.y0 - t.py0) * s, (t.x0 - t.px0) * s
            outs[i][t.y0 * s:t.y1 * s, t.x0 * s:t.x1 * s] = up[oy:oy + (t.y1 - t.y0) * s, ox:ox + (t.x1 - t.x0) * s]
        if progress is not None:
            done_tiles += len(chunk)
            progress(done_tiles, len(work))
        if progress_each is not None:
            for i in sorted({i for i, _ in chunk}):
                dones[i] += sum(1 for j, _ in chunk if j == i)
                progress_each(i, dones[i], totals[i])

    # at most `workers` calls in flight, placed in order: memory is that many tiles, whatever the image (the
    # results drive the loop, so their threads are done with when it ends)
    for ups, chunk in zip(map_in_order(run, chunks, workers, "superres-tile"), chunks):
        place(chunk, ups)
    return outs


def upscale_tiled(image: np.ndarray, engine, tile: int, context: int, batch: int = 1) -> np.ndarray:
    return upscale_many([image], engine, tile, context, batch)[0]


def engine_tiles(frames: list[np.ndarray], *, policy: str, cap_side: int, tile: int, context: int) -> int:
    """The tiles `upscale_frames` runs for these frames: each frame's, after the policy, and its alpha's again."""
    count = 0
    for frame in frames:
        h, w = frame.shape[:2]
        capped = capped_size(w, h, cap_side) if policy == "cap" else None
        w, h = capped or (w, h)
        planes = 2 if frame.ndim == 3 and frame.shape[2] == 4 else 1
        count += planes * len(plan_tiles(w, h, tile, context))
    return count


def apply_policy(frame: np.ndarray, policy: str, cap_side: int) -> np.ndarray:
    if policy != "cap":
        return frame
    h, w = frame.shape[:2]
    size = capped_size(w, h, cap_side)
    return frame if size is None else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def upscale_frames(frames: list[np.ndarray], engine, *, policy: str, cap_side: int, tile: int, context: int,
                   batch: int = 1, progress: Callable[[int, int], None] | None = None,
                   progress_each: Callable[[int, int, int], None] | None = None,
                   workers: int = 1) -> list[np.ndarray]:
    """Frames of one or several images (`progress_each` per frame: its alpha's tiles count with its colour's).
    Alpha goes through the model on its own, as a gray image, so edges stay
    as sharp as the colour (the colour under transparent pixels is filled first: no dark fringes)."""
    split = [split_alpha(apply_policy(f, policy, cap_side)) for f in frames]
    planes = [color for color, _ in split] + [alpha for _, alpha in split if alpha is not None]
    owner = list(range(len(split))) + [i for i, (_, alpha) in enumerate(split) if alpha is not None]

    def each(plane: int, done: int, total: int) -> None:  # planes -> frames
        plane_done[plane] = done
        frame = owner[plane]
        mine = [p for p, f in enumerate(owner) if f == frame]
        progress_each(frame, sum(plane_done[p] for p in mine), sum(plane_total[p] for p in mine))
    while True:
        plane_total = [len(plan_tiles(p.shape[1], p.shape[0], tile, context)) for p in planes]
        plane_done = [0] * len(planes)
        try:
            ups = iter(upscale_many(planes, engine, tile, context, batch, progress,
                                    each if progress_each is not None else None, workers))
            colors = [next(ups) for _ in split]
            return [merge_alpha(color, None if alpha is None else next(ups)) for color, (_, alpha) in zip(colors, split)]
        except DeviceOutOfMemory:
            # other work on the GPU took memory since the tile size was chosen: smaller batches, then tiles
            if batch > 1:
                batch //= 2
            elif tile // 2 >= MIN_TILE:
                tile //= 2
            else:
                raise TransientError("the device is out of memory even at the smallest tile", stage="upscale") from None
            log.warning("device out of memory: retrying with smaller work", extra={"fields": {"tile": tile, "batch": batch}})


def upscale_frame(frame: np.ndarray, engine, *, policy: str, cap_side: int, tile: int, context: int,
                  batch: int = 1) -> np.ndarray:
    return upscale_frames([frame], engine, policy=policy, cap_side=cap_side, tile=tile, context=context, batch=batch)[0]
