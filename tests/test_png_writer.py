"""pipeline/png.py, the default PNG writer: what it writes must read back bit-exact in libpng (OpenCV) and
Pillow, for every layout the pipeline hands it, with valid chunks and the metadata it was given."""

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import codec, png

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = SHARED / "datasets" / "Set5" / "HR" / "butterfly.png"


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == png.SIGNATURE
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack_from(">I", data, at + 8 + length)
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        at += 12 + length
    return out


def _layouts(height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for channels in (1, 3, 4):
        for dtype in (np.uint8, np.uint16):
            shape = (height, width) if channels == 1 else (height, width, channels)
            yield rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)  # noise: every filter byte wraps


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 37), (41, 1), (17, 23), (300, 201)])
def test_every_layout_reads_back_bit_exact_in_opencv_and_pillow(height, width):
    for pixels in _layouts(height, width):
        data = png.encode_png(pixels, band_bytes=97)  # bands of a few rows: many IDAT chunks
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert back.dtype == pixels.dtype and np.array_equal(back, pixels), (pixels.shape, pixels.dtype)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        if pixels.dtype == np.uint8:  # Pillow has no 16-bit colour modes to compare against
            with Image.open(io.BytesIO(data)) as img:
                rgb = np.asarray(img)
            expected = pixels if pixels.ndim == 2 else cv2.cvtColor(
                pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
            assert np.array_equal(rgb, expected)


def test_header_chunks_and_filters_are_as_the_format_says():
    pixels = next(_layouts(1500, 500))  # grey, 8-bit noise: ISA-L hands back output every 128 kB
    data = png.encode_png(pixels, band_bytes=500 * 60)  # 60 rows a band
    kinds = [kind for kind, _ in _chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"} and len(kinds) > 5
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", _chunks(data)[0][1])
    assert (width, height, depth, colour) == (500, 1500, 8, 0)
    raw = zlib.decompress(b"".join(body for kind, body in _chunks(data) if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(1500, 501)
    assert (rows[:, 0] == 2).all()  # UP on every row
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), pixels)  # undoing UP gives the pixels


def test_icc_profile_and_exif_are_carried_and_come_before_the_pixels():
    profile = bytes(range(256)) * 3
    exif = Image.Exif()
    exif[0x010F] = "superres test camera"  # Make
    bare = exif.tobytes()[6:]  # without "Exif\0\0": the chunk holds the TIFF block
    data = png.encode_png(next(_layouts(8, 9, seed=1)), icc_profile=profile, exif=bare)
    kinds = [kind for kind, _ in _chunks(data)]
    assert kinds.index(b"iCCP") < kinds.index(b"IDAT") and kinds.index(b"eXIf") < kinds.index(b"IDAT")
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["icc_profile"] == profile
        assert img.getexif()[0x010F] == "superres test camera"


def test_the_pipeline_encoder_writes_it_with_the_input_metadata():
    data = PHOTO.read_bytes()
    image = codec.decode(data, codec.read_header(data))
    image.icc_profile = b"\x00" * 128 + b"acsp" + b"\x00" * 124  # carried through as bytes, whatever they hold
    out = codec.encode(image, "PNG")
    kinds = [kind for kind, _ in _chunks(out)]
    assert b"iCCP" in kinds and kinds.count(b"IDAT") >= 1
    assert np.array_equal(cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED), image.frames[0])


def test_about_the_size_of_libpngs_fastest_on_upscaled_photos():
    ours = libpng_fast = 0
    for path in sorted((SHARED / "datasets" / "Set5" / "HR").glob("*.png")):
        photo = cv2.resize(cv2.imread(str(path)), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        data = png.encode_png(photo)
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), photo)
        ours += len(data)
        libpng_fast += len(cv2.imencode(".png", photo)[1])  # zlib level 1, run-length, SUB: what "fast" was
    # measured 0.92 here; no filter at all (or a broken one) gives ~1.5
    assert 0.8 < ours / libpng_fast < 1.1


@pytest.mark.parametrize("pixels", [np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8),
                                    np.zeros((4, 4, 5), np.uint8), np.zeros((1, png.MAX_SIDE + 1), np.uint8)])
def test_what_png_cannot_hold_is_refused(pixels):
    with pytest.raises(ValueError):
        png.encode_png(pixels)


def test_bands_deflated_on_several_threads_give_the_same_bytes():
    photo = cv2.resize(cv2.imread(str(PHOTO)), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    one = png.encode_png(photo, band_bytes=200_000)  # ~40 bands
    assert png.encode_png(photo, band_bytes=200_000, workers=3) == one
    assert np.array_equal(cv2.imdecode(np.frombuffer(one, np.uint8), cv2.IMREAD_UNCHANGED), photo)
    idat = b"".join(body for kind, body in _chunks(one) if kind == b"IDAT")
    assert len(zlib.decompress(idat)) == photo.shape[0] * (photo.shape[1] * 3 + 1)  # zlib checks the adler32


@pytest.mark.parametrize("cut", [0, 1, 5000, 65521, 200_000])
def test_adler32_of_two_parts_is_the_adler32_of_the_whole(cut):
    data = np.random.default_rng(cut).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    first, second = data[:cut], data[cut:]
    assert png.adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(data)
