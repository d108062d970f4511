"""What comes out keeps what went in: format, alpha (without dark fringes), gray, 16-bit depth, EXIF
orientation (applied), ICC profile, CMYK colours, every frame of an animation. Real files, whole pipeline."""

import io

import cv2
import numpy as np
from PIL import Image, ImageCms

from conftest import DATASETS, SHARED_MODELS
from handler.cli import main

MODEL = ["--model", "fsrcnn-x2", "--model-dir", str(SHARED_MODELS)]


def upscale(tmp_path, name: str, data: bytes, *extra: str) -> bytes:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(data)
    assert main(["upscale", str(src / name), "--out", str(tmp_path / "out"), *MODEL, *extra]) == 0
    return (tmp_path / "out" / name).read_bytes()


def photo(scale_dir="X4", name="butterflyx4.png"):
    return cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / scale_dir / name))


def test_transparent_logo_has_no_dark_fringe(tmp_path):
    # a red disc on fully transparent *black*: the classic source of dark halos
    alpha = np.zeros((64, 64), np.uint8)
    cv2.circle(alpha, (32, 32), 20, 255, -1, lineType=cv2.LINE_AA)  # soft edge
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[alpha > 0] = (0, 0, 255, 0)  # straight (not premultiplied) alpha: edge pixels are pure red
    rgba[:, :, 3] = alpha
    ok, data = cv2.imencode(".png", rgba)
    out = cv2.imdecode(np.frombuffer(upscale(tmp_path, "logo.png", data.tobytes()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == (128, 128, 4)
    visible = out[:, :, 3] > 16
    # every visibly opaque pixel, edges included, is red: no blend with the black under the transparency
    assert out[visible][:, 2].min() > 200, out[visible][:, 2].min()
    assert abs(int(out[64, 64, 3]) - 255) <= 2 and out[2, 2, 3] <= 2


def test_grayscale_stays_gray_and_sixteen_bit_stays_sixteen_bit(tmp_path):
    gray = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "bridgex2.png"), cv2.IMREAD_UNCHANGED)[:60, :70]
    assert gray.ndim == 2
    ok, data = cv2.imencode(".png", gray)
    out = cv2.imdecode(np.frombuffer(upscale(tmp_path, "gray.png", data.tobytes()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == (120, 140) and out.dtype == np.uint8

    deep = photo()[:50, :60].astype(np.uint16) * 257 + 100
    ok, data = cv2.imencode(".png", deep)
    out16 = cv2.imdecode(np.frombuffer(upscale(tmp_path, "deep.png", data.tobytes()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert out16.dtype == np.uint16 and out16.shape == (100, 120, 3)
    assert len(np.unique(out16 % 257)) > 50  # real 16-bit output, not 8-bit values stretched


def test_exif_orientation_applied_and_icc_profile_kept(tmp_path):
    rgb = photo()[:40, :60, ::-1]  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes(), icc_profile=icc)
    out = Image.open(io.BytesIO(upscale(tmp_path, "phone.jpg", buf.getvalue())))
    assert out.format == "JPEG"
    assert out.size == (80, 120)  # portrait, as displayed: 40x60 rotated, times 2
    assert out.getexif().get(0x0112, 1) == 1  # applied, so no longer asked for
    assert out.info.get("icc_profile") == icc


def test_cmyk_jpeg_comes_out_with_the_right_colours(tmp_path):
    rgb = photo()[:60, :60, ::-1]
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    out = np.array(Image.open(io.BytesIO(upscale(tmp_path, "print.jpg", buf.getvalue()))).convert("RGB"))
    expected = cv2.resize(rgb, (120, 120), interpolation=cv2.INTER_CUBIC)
    assert np.abs(out.astype(int) - expected).mean() < 12  # inverted or swapped channels would be ~100 off


def test_animated_gif_and_webp_keep_every_frame(tmp_path):
    base = photo()[:32, :32, ::-1]
    frames = [Image.fromarray(np.roll(base, 8 * i, axis=1)) for i in range(3)]
    for fmt, name in (("GIF", "anim.gif"), ("WEBP", "anim.webp")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
        out = Image.open(io.BytesIO(upscale(tmp_path, name, buf.getvalue())))
        assert out.format == fmt and out.n_frames == 3 and out.size == (64, 64)
        durations = []
        for i in range(3):
            out.seek(i)
            out.load()  # Pillow fills a WebP frame's duration only once it is loaded
            durations.append(out.info.get("duration"))
        assert durations == [100, 200, 300]
