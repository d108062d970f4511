"""Resize policy and tiling (pure functions of sizes and settings).

`tile` upscales at full resolution in tiles that overlap by the model's receptive radius (`context_px`):
each tile is run with that much context on every side and only its core is kept, so the result equals
the whole-image result (convolutions see the same pixels) with memory bounded by the tile size.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    # the core this tile contributes, in input pixels: [x0, x1) x [y0, y1)
    x0: int
    y0: int
    x1: int
    y1: int
    # the region fed to the engine: the core plus context, clipped to the image
    px0: int
    py0: int
    px1: int
    py1: int


def plan_tiles(width: int, height: int, tile: int, context: int) -> list[Tile]:
    """Cover a width x height image with cores of at most tile x tile, each read with `context` pixels around."""
    if width <= 0 or height <= 0:
        return []
    tiles = []
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            tiles.append(
                Tile(
                    x0, y0, x1, y1,
                    max(0, x0 - context), max(0, y0 - context),
                    min(width, x1 + context), min(height, y1 + context),
                )
            )
    return tiles


def capped_size(width: int, height: int, cap_side: int) -> tuple[int, int] | None:
    """Policy `cap` (the seed's way): the size to shrink to so the longest side is cap_side, or None if it fits."""
    longest = max(width, height)
    if longest <= cap_side:
        return None
    factor = cap_side / longest
    return max(1, round(width * factor)), max(1, round(height * factor))


def policy_id(policy: str, cap_side: int) -> str:
    """The part of the dedup key that changes the output: bump the version when a policy's output changes."""
    return "tile-v1" if policy == "tile" else f"cap{cap_side}-v1"
