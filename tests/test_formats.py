"""pipeline.formats: every claim of the table checked against what codec.encode really writes, on real images."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline import codec
from pipeline.errors import InputRejected
from pipeline.formats import FORMATS, REQUESTABLE, content_type, file_bytes, format_named, requested
from pipeline.limits import available_memory
from pipeline.settings import Settings

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LENNA = DATASETS / "Set14" / "HR" / "lenna.png"

pytestmark = pytest.mark.skipif(not LENNA.exists(), reason="shared datasets not available")

MAKE = 0x010F  # EXIF tag: camera maker


def _lenna(height: int = 100, width: int = 160) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(LENNA))[150:150 + height, 100:100 + width])


def _image(frames: list[np.ndarray], **kwargs) -> codec.DecodedImage:
    return codec.DecodedImage(frames=frames, format="PNG", icc_profile=kwargs.get("icc"), exif=kwargs.get("exif"))


def _strip(length: int, axis: str) -> np.ndarray:
    """Lenna's middle row, repeated to `length` pixels, as a one-pixel-high row or one-pixel-wide column."""
    row = cv2.imread(str(LENNA))[256]
    strip = np.ascontiguousarray(np.resize(row, (length, 3)))
    return strip[None] if axis == "width" else np.ascontiguousarray(strip[:, None])


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ------------------------------------------------------------------------------------------ names, extensions, MIME


@pytest.mark.parametrize("name", list(FORMATS))
def test_names_extensions_and_mime_types_are_pillows(name):
    fmt = FORMATS[name]
    data = codec.encode(_image([_lenna()]), name)
    assert codec.read_header(data).format == name  # what we write is read back as the format it claims
    registered = Image.registered_extensions()
    assert all(registered[ext] == name for ext in fmt.extensions), fmt.extensions
    assert fmt.mime == Image.MIME[name] == content_type(name)
    assert codec.output_format(name, None) == (name, fmt.extension)


def test_requested_names_cover_the_settings_choices():
    choices = set(Settings.choices("format")) - {"keep"}
    assert choices <= set(REQUESTABLE)
    assert {alias: f.name for alias, f in REQUESTABLE.items()} == {
        "jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF"}
    assert requested(" JPG ").name == "JPEG" and format_named("mpo").name == "JPEG"
    assert codec.SUPPORTED_FORMATS == tuple(FORMATS)
    with pytest.raises(ValueError):
        requested("bmp")  # kept from a BMP input, never asked for
    with pytest.raises(ValueError):
        format_named("HEIC")


# ------------------------------------------------------------------------------------------ largest side


@pytest.mark.parametrize("axis", ["width", "height"])
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.max_side < 2**31 - 1])
def test_max_side_is_what_the_encoder_writes_and_one_more_is_refused(name, axis):
    side = FORMATS[name].max_side
    data = codec.encode(_image([_strip(side, axis)]), name)
    assert _size(data) == ((side, 1) if axis == "width" else (1, side))
    with pytest.raises(InputRejected) as err:
        codec.encode(_image([_strip(side + 1, axis)]), name)
    assert err.value.code == "encode_failed"


@pytest.mark.parametrize("axis", ["width", "height"])
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.max_side == 2**31 - 1])
def test_formats_without_a_side_limit_write_sides_far_past_the_others(name, axis):
    # 2**31-1 is the int the writers keep sizes in; 2**24 (48 MB of pixels) is 16x PNG's limit
    side = 2**24
    data = codec.encode(_image([_strip(side, axis)]), name)
    assert _size(data) == ((side, 1) if axis == "width" else (1, side))


@pytest.mark.parametrize(("width", "height", "gray"), [(1, 1, False), (161, 100, False), (161, 100, True),
                                                       (1001, 3, False), (1002, 7, True)])
def test_file_bytes_bounds_a_real_bmp(width, height, gray):
    pixels = cv2.resize(_lenna(), (width, height), interpolation=cv2.INTER_AREA)
    if gray:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    written = len(codec.encode(_image([pixels]), "BMP"))
    estimate = file_bytes(width, height, 1 if gray else 3, 1)
    # exact for gray (palette included); a BGR file has no palette: 1024 bytes less
    assert estimate - written == (0 if gray else 1024)


def test_bmp_over_max_file_bytes_is_refused_by_the_writer():
    # BMP is stored uncompressed, so only the size matters; np.zeros pages are not touched until written,
    # so this costs no memory: OpenCV refuses before writing a pixel
    limit = FORMATS["BMP"].max_file_bytes
    width = 16384
    height = (limit - 54) // (width * 3) + 1  # 43691 rows: 2147500086 bytes
    assert 54 + width * 3 * height > limit >= 54 + width * 3 * (height - 1)
    with pytest.raises(InputRejected) as err:
        codec.encode(_image([np.zeros((height, width, 3), np.uint8)]), "BMP")
    assert err.value.code == "encode_failed"


@pytest.mark.slow
@pytest.mark.skipif((available_memory() or 0) < 16 * 2**30, reason="needs 16 GiB free: a 2 GiB BMP, written and copied")
def test_bmp_just_under_max_file_bytes_is_written():
    limit = FORMATS["BMP"].max_file_bytes
    width = 16384
    height = (limit - 54) // (width * 3)  # 43690 rows: 2147450934 bytes
    data = codec.encode(_image([np.zeros((height, width, 3), np.uint8)]), "BMP")
    assert len(data) == 54 + width * 3 * height <= limit
    assert _size(data) == (width, height)


# ------------------------------------------------------------------------------------------ what survives


@pytest.mark.parametrize("name", list(FORMATS))
def test_alpha_survives_exactly_where_the_table_says(name):
    bgr = _lenna()
    alpha = np.where(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) < 100, 0, 255).astype(np.uint8)  # GIF: 1-bit
    out = codec.decode(data := codec.encode(_image([np.dstack([bgr, alpha])]), name), codec.read_header(data))
    frame = out.frames[0]
    if FORMATS[name].alpha:
        assert frame.shape[2] == 4
        assert (frame[..., 3] == 0).mean() == pytest.approx((alpha == 0).mean(), abs=0.01)
    else:
        assert frame.shape[2] == 3
        assert frame[alpha == 0].mean() > 245  # composited on white (JPEG's loss moves it a little)


@pytest.mark.parametrize("name", list(FORMATS))
def test_16_bits_survive_exactly_where_the_table_says(name):
    deep = _lenna().astype(np.uint16) * 257 + 3  # not a multiple of 257: 8 bits would lose the +3
    data = codec.encode(_image([deep]), name)
    frame = codec.decode(data, codec.read_header(data)).frames[0]
    if FORMATS[name].high_depth:
        assert frame.dtype == np.uint16
        np.testing.assert_array_equal(frame, deep)
    else:
        assert frame.dtype == np.uint8


@pytest.mark.parametrize("name", list(FORMATS))
def test_icc_and_exif_survive_exactly_where_the_table_says(name):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[MAKE] = "superres test camera"
    data = codec.encode(_image([_lenna()], icc=icc, exif=exif.tobytes()), name)
    img = Image.open(io.BytesIO(data))
    assert (img.info.get("icc_profile") == icc) == FORMATS[name].icc
    assert (img.getexif().get(MAKE) == "superres test camera") == FORMATS[name].exif


def test_tiff_metadata_survives_on_8_bit_only():
    # the table's TIFF icc/exif hold for 8-bit (Pillow writes it); OpenCV writes 16-bit TIFF without metadata
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = codec.encode(_image([_lenna().astype(np.uint16) * 257], icc=icc), "TIFF")
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") is None


@pytest.mark.parametrize("name", list(FORMATS))
def test_animation_is_written_exactly_where_the_table_says(name):
    frames = [_lenna(), np.ascontiguousarray(_lenna()[:, ::-1])]
    image = codec.DecodedImage(frames=frames, format="GIF", icc_profile=None, exif=None, durations_ms=[100, 100],
                               loop=0)
    if FORMATS[name].animation:
        assert codec.read_header(codec.encode(image, name)).frames == 2
    else:
        with pytest.raises(InputRejected) as err:
            codec.encode(image, name)
        assert err.value.code == "unsupported_output"
