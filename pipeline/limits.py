"""Refusal limits, checked on the header before any pixel is decoded (pure)."""

from dataclasses import dataclass

from pipeline.errors import InputRejected


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int  # width * height * frames of the input
    max_side: int
    min_side: int = 1


def check_size(byte_count: int, limits: Limits) -> None:
    if byte_count == 0:
        raise InputRejected("the file is empty (0 bytes)", stage="read", code="empty")
    if byte_count > limits.max_bytes:
        raise InputRejected(
            f"the file is {byte_count} bytes, more than the limit of {limits.max_bytes} bytes",
            stage="read",
            code="too_many_bytes",
        )


def check_dimensions(width: int, height: int, frames: int, limits: Limits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise InputRejected(
            f"the image is {width}x{height}, smaller than the minimum side of {limits.min_side} px",
            stage="limits",
            code="too_small",
        )
    pixels = width * height * max(frames, 1)
    if pixels > limits.max_pixels:
        raise InputRejected(
            f"the image header claims {width}x{height}"
            + (f"x{frames} frames" if frames > 1 else "")
            + f" = {pixels} pixels, over the limit of {limits.max_pixels} (decompression bomb guard)",
            stage="limits",
            code="too_many_pixels",
        )
    if width > limits.max_side or height > limits.max_side:
        raise InputRejected(
            f"the image is {width}x{height}, a side is over the limit of {limits.max_side} px",
            stage="limits",
            code="too_large",
        )
