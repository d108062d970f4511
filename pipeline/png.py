"""The PNG writer behind the default ("fast") PNG compression: every row UP-filtered with numpy, deflated by
ISA-L (the `isal` package) at its level 1, a band of rows at a time.

Why not libpng (OpenCV's imencode): its fastest setting (zlib level 1, run-length, SUB filter) was a third of the
CPU of a one-shot run on small images. On the same upscaled photos this writer takes a quarter of the time and
writes ~8 % fewer bytes (bench/png_compression_bench.py): ISA-L's deflate is several times faster than zlib's at
a similar ratio, and UP suits upscaled images, whose neighbouring rows are near-equal. The pixels are the same;
only the compressed bytes differ. ISA-L releases the GIL, so the encode pool's threads run side by side.

Memory: one band (~4 MB of rows) beyond the image and the compressed output, whatever the image's size, or one
per worker: each band is filtered and deflated on its own (ending on a byte boundary), so several bands can be
deflated at once on a big image, and the bytes are the same whatever the number of workers. Each band's deflate
output is its own IDAT chunk (a PNG may have any number, one after another); the zlib header and the adler32 of
the whole stream (combined from the bands') are ours.
"""

import struct
import zlib

import cv2
import numpy as np
from isal import isal_zlib

from pipeline.in_order import map_in_order

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey + alpha, RGB, RGBA
_TO_PNG_ORDER = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}  # OpenCV's frames are BGR(A)
_FILTER_UP = 2  # each byte minus the byte above it
BAND_BYTES = 1 << 22
ZLIB_HEADER = b"\x78\x01"  # deflate, 32 kB window, no dictionary ("fastest" level: a hint only)
ADLER_MOD = 65521
ICC_PROFILE_NAME = b"ICC Profile"
# libpng's default user limit (png_set_user_limits): its readers, OpenCV's and Pillow's among them, refuse wider
MAX_SIDE = 1_000_000


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _png_rows(band: np.ndarray, channels: int) -> np.ndarray:
    """A band of OpenCV rows as PNG stores them: RGB(A) order, 16-bit samples big-endian; one byte row each."""
    if channels in _TO_PNG_ORDER:
        band = cv2.cvtColor(band, _TO_PNG_ORDER[channels])
    if band.dtype == np.uint16:
        band = band.astype(">u2")
    return np.ascontiguousarray(band).view(np.uint8).reshape(len(band), -1)


def _deflated_band(pixels: np.ndarray, top: int, band: int, channels: int, level: int) -> tuple[bytes, int, int]:
    """Rows [top, top + band) UP-filtered (the first against the row above the band) and deflated on their own,
    ending on a byte boundary (a sync flush; the last band: the final block): (deflate data, adler32 of the
    filtered bytes, their length). Bands deflated apart, one after another, are one deflate stream."""
    rows = _png_rows(pixels[top:top + band], channels)
    above = _png_rows(pixels[top - 1:top], channels)[0] if top else np.zeros(rows.shape[1], np.uint8)
    part = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
    part[:, 0] = _FILTER_UP
    np.subtract(rows[0], above, out=part[0, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's filters do
    np.subtract(rows[1:], rows[:-1], out=part[1:, 1:])
    deflate = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)  # raw deflate: the zlib wrapper is ours
    last = top + band >= len(pixels)
    data = deflate.compress(part) + deflate.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)
    return data, isal_zlib.adler32(part), part.size


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """adler32 of A + B from adler32(A), adler32(B) and len(B). Per byte, adler32 keeps s1 = 1 + the bytes' sum
    and s2 = the sum of every s1 so far (mod 65521); B's s1 values each grow by s1(A) - 1 after A."""
    s1a, s2a, s1b, s2b = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    s1 = (s1a + s1b - 1) % ADLER_MOD
    s2 = (s2a + s2b + second_length * (s1a - 1)) % ADLER_MOD
    return (s2 << 16) | s1


def encode_png(pixels: np.ndarray, *, icc_profile: bytes | None = None, exif: bytes | None = None,
               level: int = 1, band_bytes: int = BAND_BYTES, workers: int = 1) -> bytes:
    """`pixels`: HxW grey, HxWx2 grey + alpha, HxWx3 BGR or HxWx4 BGRA, uint8 or uint16. `exif`: the bare TIFF
    block (no "Exif\\0\\0" prefix). `level`: ISA-L's 0-3. `workers`: bands deflated at once (the same bytes)."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG holds 8- or 16-bit samples, not {pixels.dtype}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in _COLOUR_TYPE or not height or not width:
        raise ValueError(f"no PNG for an image of shape {pixels.shape}")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"a side of {max(height, width)} px is over the {MAX_SIDE} px libpng reads")
    depth = pixels.dtype.itemsize * 8
    out = bytearray(SIGNATURE)
    out += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels], 0, 0, 0))
    if icc_profile:  # name, NUL, compression method 0, the zlib-compressed profile
        out += _chunk(b"iCCP", ICC_PROFILE_NAME + b"\0\0" + zlib.compress(icc_profile))
    if exif:  # before IDAT, where readers look for it
        out += _chunk(b"eXIf", exif)
    row_bytes = width * channels * pixels.dtype.itemsize
    band = max(1, band_bytes // row_bytes)
    tops = range(0, height, band)
    adler, ahead = 1, ZLIB_HEADER  # adler32 of nothing; the header goes before the first band's data
    bands = map_in_order(lambda top: _deflated_band(pixels, top, band, channels, level), tops, workers,
                         "superres-png")
    for i, (data, band_adler, size) in enumerate(bands):
        adler = adler32_combine(adler, band_adler, size)
        tail = struct.pack(">I", adler) if i == len(tops) - 1 else b""
        out += _chunk(b"IDAT", ahead + data + tail)
        ahead = b""
    out += _chunk(b"IEND", b"")
    return bytes(out)
