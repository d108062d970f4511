"""The image formats superres reads and writes, as data: one `Format` per format, in `FORMATS`.

Adding a format is one entry here (and, if neither OpenCV nor Pillow writes it the way codec.encode expects, a
branch in codec). Every number below was measured with the encoders this project ships (OpenCV 5.0 and
Pillow 13; tests/test_formats.py writes each finite side limit and fails one pixel more): the largest side is
that of the writer codec.encode uses for the format, or of the smaller one where it uses two.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str  # as Pillow names it: what codec.read_header reports and codec.encode takes
    extension: str  # the one outputs get, with the dot
    other_extensions: tuple[str, ...]  # also mean this format on an input's name
    mime: str
    max_side: int  # largest width or height the encoder writes
    alpha: bool  # an alpha channel survives (else it is composited on white)
    high_depth: bool  # 16 bits per sample survive (else rounded to 8)
    icc: bool  # the ICC profile is written
    exif: bool  # EXIF is written
    animation: bool  # several frames can be written
    # peak memory while codec.encode writes a still image, frames included, in multiples of the raw frames:
    # the most measured over gray/BGR and 8/16-bit, with and without ICC; then over BGRA (pipeline/limits.py)
    encode_memory: float
    encode_memory_alpha: float
    requested_as: tuple[str, ...] = ()  # names for --format / SUPERRES_FORMAT; () = only kept from an input
    max_file_bytes: int | None = None  # a writer that stores the file size in a 32-bit int refuses bigger files

    @property
    def extensions(self) -> tuple[str, ...]:
        return (self.extension, *self.other_extensions)


_INT32_MAX = 2**31 - 1

FORMATS: dict[str, Format] = {f.name: f for f in (
    # libjpeg-turbo: JPEG_MAX_DIMENSION is 65500, not the 65535 the file format could hold
    Format("JPEG", ".jpg", (".jpeg", ".jpe"), "image/jpeg", max_side=65500,
           alpha=False, high_depth=False, icc=True, exif=True, animation=False,
           encode_memory=1.8, encode_memory_alpha=3.7, requested_as=("jpeg", "jpg")),
    # libpng's default user limit (png_set_user_limits: 1,000,000 per side), which its readers keep to; the format
    # holds 2**31-1, and Pillow's writer (used for APNG) has no limit, but a still PNG goes through pipeline/png.py
    # or OpenCV, which both keep to it
    Format("PNG", ".png", (), "image/png", max_side=1_000_000,
           alpha=True, high_depth=True, icc=True, exif=True, animation=True,
           encode_memory=3.2, encode_memory_alpha=3.2, requested_as=("png",)),
    # libwebp: 14-bit sizes in the bitstream
    Format("WEBP", ".webp", (), "image/webp", max_side=16383,
           alpha=True, high_depth=False, icc=True, exif=True, animation=True,
           encode_memory=6.8, encode_memory_alpha=11.5, requested_as=("webp",)),
    # OpenCV keeps sizes in an int (measured: 2**27 px per side written; the tests write 2**24). 16-bit TIFF goes
    # through OpenCV, which writes no ICC/EXIF: metadata survives on 8-bit TIFF only (Pillow writes those).
    # A classic TIFF (what both write) cannot pass 4 GiB, far above an output of SUPERRES_MAX_OUTPUT_PIXELS's
    # default.
    Format("TIFF", ".tif", (".tiff",), "image/tiff", max_side=_INT32_MAX,
           alpha=True, high_depth=True, icc=True, exif=True, animation=False,
           encode_memory=4.8, encode_memory_alpha=4.8, requested_as=("tiff", "tif")),
    # OpenCV writes the file size as an int (validateToInt): 2 GiB files at most, whatever the sides;
    # alpha is composited on white because most BMP readers ignore a fourth channel
    Format("BMP", ".bmp", (), "image/bmp", max_side=_INT32_MAX, max_file_bytes=_INT32_MAX,
           alpha=False, high_depth=False, icc=False, exif=False, animation=False,
           encode_memory=3.5, encode_memory_alpha=3.5),
    # 16-bit sides in the logical screen descriptor; Pillow writes neither ICC (it reads an ICCRGBG1 block, but
    # does not write one) nor EXIF; alpha is one transparent palette entry
    Format("GIF", ".gif", (), "image/gif", max_side=65535,
           alpha=True, high_depth=False, icc=False, exif=False, animation=True,
           encode_memory=5.7, encode_memory_alpha=5.7),
)}

REQUESTABLE: dict[str, Format] = {name: f for f in FORMATS.values() for name in f.requested_as}


def format_named(name: str) -> Format:
    """The Format of a Pillow format name ("JPEG"; "MPO", a camera JPEG, is JPEG)."""
    key = name.strip().upper()
    fmt = FORMATS.get("JPEG" if key == "MPO" else key)
    if fmt is None:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return fmt


def requested(name: str) -> Format:
    """The Format of a --format value (png, jpeg, jpg, webp, tiff, tif)."""
    fmt = REQUESTABLE.get(name.strip().lower())
    if fmt is None:
        raise ValueError(f"unknown output format {name!r} (use keep, {', '.join(sorted(REQUESTABLE))})")
    return fmt


def content_type(name: str) -> str:
    """The MIME type of an output written as `name` (a Pillow format name, e.g. codec.output_format's first)."""
    return format_named(name).mime


def file_bytes(width: int, height: int, channels: int, bytes_per_sample: int) -> int:
    """An uncompressed file's size: rows padded to 4 bytes (BMP) plus at most a header and a 256-colour palette."""
    row = -(-width * channels * bytes_per_sample // 4) * 4
    return height * row + 14 + 40 + 1024
