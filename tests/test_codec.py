"""pipeline.codec on real image files (the shared test sets, or files the tests write from them into tmp_path)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from pipeline.codec import (
    DecodedImage,
    ImageHeader,
    apply_orientation,
    decode,
    encode,
    merge_alpha,
    output_format,
    read_header,
    split_alpha,
)
from pipeline.errors import InputRejected

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LENNA = DATASETS / "Set14" / "HR" / "lenna.png"
BRIDGE = DATASETS / "Set14" / "HR" / "bridge.png"  # grayscale
BABY = DATASETS / "Set5" / "HR" / "baby.png"

pytestmark = pytest.mark.skipif(not LENNA.exists(), reason="shared datasets not available")


def _bytes_of(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _lenna_small() -> Image.Image:
    """A real photo, cropped non-square so that rotations show in the shape."""
    return Image.open(LENNA).convert("RGB").crop((100, 150, 260, 250))  # 160 x 100


def _roundtrip(data: bytes) -> DecodedImage:
    return decode(data, read_header(data))


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# ------------------------------------------------------------------------------------------ header


def test_header_of_real_png_and_jpeg():
    png = LENNA.read_bytes()
    h = read_header(png)
    assert h == ImageHeader(format="PNG", width=512, height=512, frames=1, mode="RGB", channels=3, bytes_per_sample=1)

    jpeg = _bytes_of(Image.open(BABY), "JPEG", quality=90)
    h = read_header(jpeg)
    assert (h.format, h.width, h.height, h.frames, h.mode) == ("JPEG", 512, 512, 1, "RGB")

    assert read_header(BRIDGE.read_bytes()).mode == "L"


def _encoded_cv2(ext: str, pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


def _header_cases() -> dict[str, tuple[bytes, bool]]:
    """Real files of every kind of pixel data: name -> (bytes, whether the header's channels are only a bound)."""
    bgr = cv2.imread(str(LENNA))[150:250, 100:260]
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = np.dstack([bgr, np.where(gray < 100, 0, 255).astype(np.uint8)])
    small = _lenna_small()
    cases = {}
    for ext in (".png", ".tif"):
        for name, pixels in (("bgr", bgr), ("gray", gray), ("bgra", bgra)):
            cases[f"{ext} {name} 8"] = (_encoded_cv2(ext, pixels), False)
            cases[f"{ext} {name} 16"] = (_encoded_cv2(ext, pixels.astype(np.uint16) * 257), False)
    cases["jpeg rgb"] = (_bytes_of(small, "JPEG"), False)
    cases["jpeg gray"] = (_bytes_of(small.convert("L"), "JPEG"), False)
    cases["jpeg cmyk"] = (_bytes_of(small.convert("CMYK"), "JPEG"), False)
    cases["webp rgb"] = (_encoded_cv2(".webp", bgr), False)
    cases["webp rgba"] = (_encoded_cv2(".webp", bgra), False)
    cases["bmp bgr"] = (_encoded_cv2(".bmp", bgr), False)
    cases["bmp gray"] = (_encoded_cv2(".bmp", gray), False)
    cases["png 1-bit"] = (_bytes_of(small.convert("1"), "PNG"), False)
    cases["png LA"] = (_bytes_of(Image.fromarray(np.dstack([gray, bgra[..., 3]]), "LA"), "PNG"), False)
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    cases["png palette"] = (_bytes_of(palette, "PNG"), False)
    cases["png palette + tRNS"] = (_bytes_of(palette, "PNG", transparency=0), False)
    cases["gif"] = (_bytes_of(palette, "GIF"), False)
    cases["gif + transparency"] = (_bytes_of(palette, "GIF", transparency=0), False)
    # animations are counted as BGRA: only decoding every frame would tell that none has transparency
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    cases["gif animation"] = (_bytes_of(frames[0], "GIF", save_all=True, append_images=frames[1:]), True)
    cases["webp animation"] = (_bytes_of(frames[0], "WEBP", save_all=True, append_images=frames[1:]), True)
    return cases


HEADER_CASES = _header_cases()


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_channels_and_depth_are_what_decode_makes(case):
    data, bound = HEADER_CASES[case]
    header = read_header(data)
    frame = decode(data, header).frames[0]
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    assert header.bytes_per_sample == frame.dtype.itemsize, header
    if bound:
        assert header.channels >= channels, header
    else:
        assert header.channels == channels, header


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_header_of_png_claiming_huge_size_is_probed_without_decoding():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )
    start = time.perf_counter()
    h = read_header(data)
    assert time.perf_counter() - start < 0.5
    assert (h.format, h.width, h.height, h.frames) == ("PNG", 100_000, 100_000, 1)


def test_empty_file_is_rejected():
    with pytest.raises(InputRejected) as err:
        read_header(b"")
    assert err.value.code == "empty" and err.value.stage == "decode"
    assert "empty" in err.value.message


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InputRejected) as err:
        read_header(data)
    assert err.value.code == "not_an_image"
    assert "not an image" in err.value.message


def test_html_text_is_not_an_image(tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<!DOCTYPE html>\n<html><head><title>Not found</title></head><body>404</body></html>\n")
    with pytest.raises(InputRejected) as err:
        read_header(page.read_bytes())
    assert err.value.code == "not_an_image"


def test_unsupported_format_is_named():
    data = _bytes_of(_lenna_small(), "PPM")
    with pytest.raises(InputRejected) as err:
        read_header(data)
    assert err.value.code == "unsupported_format"
    assert "PPM" in err.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    full = _bytes_of(Image.open(LENNA), fmt)
    path.write_bytes(full[: len(full) // 2])
    data = path.read_bytes()
    with pytest.raises(InputRejected) as err:
        decode(data, read_header(data))  # the header survives the cut, the pixel data does not
    assert err.value.stage == "decode"
    assert err.value.code in ("truncated", "corrupt")
    assert fmt in err.value.message
    assert "truncated" in err.value.message or "corrupt" in err.value.message


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow notes the cut-off directory on its way
def test_truncated_tiff_header_is_corrupt_not_unknown(tmp_path):
    path = tmp_path / "cut.tif"
    cv2.imwrite(str(path), cv2.imread(str(BABY)))  # OpenCV puts the TIFF directory after the pixels
    data = path.read_bytes()
    with pytest.raises(InputRejected) as err:
        read_header(data[: len(data) // 2])
    assert err.value.code == "corrupt"
    assert "TIFF" in err.value.message and "truncated" in err.value.message


def test_multi_page_tiff_is_refused():
    page = _lenna_small()
    data = _bytes_of(page, "TIFF", save_all=True, append_images=[page.rotate(90, expand=True)])
    with pytest.raises(InputRejected) as err:
        read_header(data)
    assert err.value.code == "unsupported_format" and "multi-page" in err.value.message


# ------------------------------------------------------------------------------------------ decode


def test_png_decodes_to_bgr_like_opencv():
    decoded = _roundtrip(LENNA.read_bytes())
    assert len(decoded.frames) == 1 and decoded.durations_ms is None
    np.testing.assert_array_equal(decoded.frames[0], cv2.imread(str(LENNA)))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_apply_orientation_matches_pillow(orientation):
    img = _lenna_small()
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    img.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(img))
    np.testing.assert_array_equal(apply_orientation(np.asarray(img), orientation), expected)


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_orientation_is_applied_and_reset(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCamera"
    data = _bytes_of(_lenna_small(), "JPEG", quality=95, exif=exif)

    decoded = _roundtrip(data)
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    pixels = decoded.frames[0]
    assert pixels.shape == ((160, 100, 3) if orientation == 6 else (100, 160, 3))
    assert stored.shape == (100, 160, 3)  # IMREAD_UNCHANGED ignores orientation: that is why we apply it
    expected = cv2.cvtColor(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))), cv2.COLOR_RGB2BGR)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2  # same decoder family, same positions

    out = Image.open(io.BytesIO(encode(decoded, "JPEG")))
    assert out.getexif()[0x0112] == 1
    assert out.getexif()[0x010F] == "TestCamera"
    assert out.size == (pixels.shape[1], pixels.shape[0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_icc_profile_round_trips_through_encode(fmt):
    icc = _srgb_icc()
    decoded = _roundtrip(_bytes_of(_lenna_small(), "PNG", icc_profile=icc))
    assert decoded.icc_profile == icc
    out = Image.open(io.BytesIO(encode(decoded, fmt)))
    assert out.format == fmt
    assert out.info.get("icc_profile") == icc


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_round_trips_through_encode(fmt):
    exif = Image.Exif()
    exif[0x010F] = "TestCamera"
    decoded = _roundtrip(_bytes_of(_lenna_small(), "JPEG", exif=exif))
    out = Image.open(io.BytesIO(encode(decoded, fmt)))
    assert out.getexif().get(0x010F) == "TestCamera"


def test_16bit_png_decodes_to_uint16_and_encodes_back_bit_exactly(tmp_path):
    src = cv2.imread(str(BABY)).astype(np.uint16) * 257
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), src)
    decoded = _roundtrip(path.read_bytes())
    assert decoded.frames[0].dtype == np.uint16
    np.testing.assert_array_equal(decoded.frames[0], src)

    back = cv2.imdecode(np.frombuffer(encode(decoded, "PNG"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, src)

    tiff = cv2.imdecode(np.frombuffer(encode(decoded, "TIFF"), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(tiff, src)

    # Formats without 16-bit samples get round(x / 257), which undoes the x257 exactly.
    webp = encode(decoded, "WEBP", webp_quality=101)  # > 100: lossless
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(webp, np.uint8), cv2.IMREAD_UNCHANGED), src // 257)


def test_16_bit_samples_become_round_x_over_257_for_every_value():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # BMP: 8-bit and lossless
    image = DecodedImage(frames=[every], format="PNG", icc_profile=None, exif=None)
    back = cv2.imdecode(np.frombuffer(encode(image, "BMP"), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back, np.floor(every / 257 + 0.5).astype(np.uint8))


def test_composite_on_white_is_exact_for_every_colour_and_alpha():
    colour, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    bgra = np.dstack([colour, 255 - colour, colour // 2, alpha])
    image = DecodedImage(frames=[bgra], format="PNG", icc_profile=None, exif=None)
    back = cv2.imdecode(np.frombuffer(encode(image, "BMP"), np.uint8), cv2.IMREAD_UNCHANGED)
    a = alpha[..., None] / 255.0  # the definition, in float64
    expected = np.floor(bgra[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_grayscale_stays_grayscale(fmt):
    decoded = _roundtrip(BRIDGE.read_bytes())
    assert decoded.frames[0].ndim == 2 and decoded.frames[0].shape == (512, 512)
    out = Image.open(io.BytesIO(encode(decoded, fmt)))
    assert out.mode == "L"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_bgra_round_trip_keeps_alpha(fmt):
    rgb = np.asarray(_lenna_small())
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    data = _bytes_of(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    decoded = _roundtrip(data)
    frame = decoded.frames[0]
    assert frame.shape == (100, 160, 4)
    np.testing.assert_array_equal(frame[..., 3], alpha)
    np.testing.assert_array_equal(frame[..., :3], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    kwargs = {"webp_quality": 101} if fmt == "WEBP" else {}
    back = cv2.imdecode(np.frombuffer(encode(decoded, fmt, **kwargs), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (100, 160, 4)
    np.testing.assert_array_equal(back[..., 3], alpha)


def test_jpeg_output_of_transparent_image_is_composited_on_white():
    bgra = np.zeros((20, 30, 4), np.uint8)  # fully transparent black
    bgra[:, 15:] = (0, 0, 255, 255)  # opaque red half
    image = DecodedImage(frames=[bgra], format="PNG", icc_profile=None, exif=None, durations_ms=None, loop=None)
    back = cv2.imdecode(np.frombuffer(encode(image, "JPEG"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (20, 30, 3)
    assert back[:, :10].min() >= 245  # white, not black
    assert back[:, 20:, 2].min() >= 240 and back[:, 20:, :2].max() <= 15


def test_cmyk_jpeg_decodes_to_source_colours(tmp_path):
    # Pillow writes CMYK JPEGs the Adobe way (APP14 marker, inverted ink values), as Photoshop does.
    rgb = Image.open(BABY).convert("RGB")
    path = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(path, "JPEG", quality=95)
    data = path.read_bytes()
    header = read_header(data)
    assert header.mode == "CMYK"
    decoded = decode(data, header)
    frame = decoded.frames[0]
    assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8
    source = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR).astype(int)
    diff = np.abs(frame.astype(int) - source)
    assert diff.mean() < 3.0
    assert np.abs(frame.reshape(-1, 3).mean(0) - source.reshape(-1, 3).mean(0)).max() < 2.0  # no colour cast
    assert decoded.icc_profile is None


def test_palette_png_with_transparency_decodes_to_bgra():
    pal = _lenna_small().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = _bytes_of(pal, "PNG", transparency=0)
    frame = _roundtrip(data).frames[0]
    assert frame.shape == (100, 160, 4)
    expected = cv2.cvtColor(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), cv2.COLOR_RGBA2BGRA)
    np.testing.assert_array_equal(frame, expected)
    assert (frame[..., 3] == 0).any() and (frame[..., 3] == 255).any()  # palette entry 0 is see-through


def _three_frames() -> list[Image.Image]:
    base = _lenna_small()
    return [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.transpose(Image.Transpose.ROTATE_180)]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_decodes_every_frame_and_encodes_back(tmp_path, fmt):
    frames = _three_frames()
    durations = [100, 200, 300]
    path = tmp_path / f"anim.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0, **extra)
    data = path.read_bytes()

    header = read_header(data)
    assert (header.format, header.frames) == (fmt, 3)
    decoded = decode(data, header)
    assert len(decoded.frames) == 3
    assert decoded.durations_ms == durations
    assert decoded.loop == 0
    assert all(f.shape == (100, 160, 3) for f in decoded.frames)  # opaque animation: plain BGR
    # Every frame is its own picture, not the first one repeated.
    assert not np.array_equal(decoded.frames[0], decoded.frames[1])
    assert not np.array_equal(decoded.frames[1], decoded.frames[2])
    if fmt != "GIF":  # GIF is palette-quantised; WebP lossless and APNG are exact
        for got, want in zip(decoded.frames, frames):
            np.testing.assert_array_equal(got, cv2.cvtColor(np.asarray(want), cv2.COLOR_RGB2BGR))

    upscaled = [cv2.resize(f, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC) for f in decoded.frames]
    out = DecodedImage(upscaled, decoded.format, decoded.icc_profile, decoded.exif, decoded.durations_ms, decoded.loop)
    encoded = encode(out, fmt)
    again = decode(encoded, read_header(encoded))
    assert len(again.frames) == 3
    assert again.durations_ms == durations
    assert again.frames[0].shape[:2] == (200, 320)


def test_animation_cannot_be_written_as_jpeg():
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)]
    image = DecodedImage(frames, "GIF", None, None, [100] * 3, 0)
    with pytest.raises(InputRejected) as err:
        encode(image, "JPEG")
    assert err.value.stage == "encode"


def test_one_pixel_png_decodes(tmp_path):
    path = tmp_path / "dot.png"
    Image.open(LENNA).convert("RGB").crop((10, 10, 11, 11)).save(path)
    decoded = _roundtrip(path.read_bytes())
    assert decoded.frames[0].shape == (1, 1, 3)
    r, g, b = Image.open(LENNA).convert("RGB").getpixel((10, 10))
    assert decoded.frames[0][0, 0].tolist() == [b, g, r]


# ------------------------------------------------------------------------------------------ alpha


def test_split_alpha_fills_transparent_area_with_nearby_colour():
    frame = np.zeros((96, 128, 4), np.uint8)  # transparent black
    cv2.circle(frame, (64, 48), 25, (0, 0, 255, 255), thickness=-1)  # opaque red disc (BGRA)
    color, alpha = split_alpha(frame)
    assert color.shape == (96, 128, 3) and color.dtype == np.uint8
    np.testing.assert_array_equal(alpha, frame[..., 3])
    opaque = alpha > 0
    np.testing.assert_array_equal(color[opaque], frame[..., :3][opaque])  # opaque pixels untouched
    hidden = color[~opaque].astype(int)
    assert hidden[:, 2].min() >= 200  # red-ish everywhere, also far from the disc
    assert hidden[:, :2].max() <= 40  # no black, no other colour mixed in


def test_split_alpha_passes_through_opaque_and_gray():
    bgr = cv2.imread(str(BABY))
    color, alpha = split_alpha(bgr)
    assert color is bgr and alpha is None
    gray = cv2.imread(str(BRIDGE), cv2.IMREAD_UNCHANGED)
    assert split_alpha(gray)[1] is None


def test_split_alpha_handles_16bit():
    frame = np.zeros((40, 40, 4), np.uint16)
    frame[:20] = (1000, 20000, 60000, 65535)
    color, alpha = split_alpha(frame)
    assert color.dtype == np.uint16
    assert np.abs(color[30:].astype(int) - np.array([1000, 20000, 60000])).max() <= 2


def test_merge_alpha():
    bgr = cv2.imread(str(BABY))
    alpha = np.full(bgr.shape[:2], 77, np.uint8)
    merged = merge_alpha(bgr, alpha)
    assert merged.shape == (512, 512, 4)
    np.testing.assert_array_equal(merged[..., :3], bgr)
    assert merge_alpha(bgr, None) is bgr

    gray = cv2.imread(str(BRIDGE), cv2.IMREAD_UNCHANGED)
    merged = merge_alpha(gray, alpha)
    assert merged.shape == (512, 512, 4)
    np.testing.assert_array_equal(merged[..., 0], gray)
    np.testing.assert_array_equal(merged[..., 2], gray)
    assert (merged[..., 3] == 77).all()

    color, back = split_alpha(merge_alpha(bgr, alpha))
    np.testing.assert_array_equal(color, bgr)
    np.testing.assert_array_equal(back, alpha)


# ------------------------------------------------------------------------------------------ output format


@pytest.mark.parametrize(
    ("input_format", "requested", "expected"),
    [
        ("JPEG", None, ("JPEG", ".jpg")),
        ("PNG", "keep", ("PNG", ".png")),
        ("WEBP", None, ("WEBP", ".webp")),
        ("TIFF", None, ("TIFF", ".tif")),
        ("BMP", None, ("BMP", ".bmp")),
        ("GIF", "keep", ("GIF", ".gif")),
        ("JPEG", "png", ("PNG", ".png")),
        ("PNG", "jpg", ("JPEG", ".jpg")),
        ("PNG", "jpeg", ("JPEG", ".jpg")),
        ("GIF", "webp", ("WEBP", ".webp")),
        ("PNG", "tiff", ("TIFF", ".tif")),
        ("PNG", "PNG", ("PNG", ".png")),
    ],
)
def test_output_format(input_format, requested, expected):
    assert output_format(input_format, requested) == expected


def test_output_format_unknown_is_value_error():
    with pytest.raises(ValueError):
        output_format("PNG", "heic")
