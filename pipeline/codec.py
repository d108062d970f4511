"""Image bytes <-> numpy frames: header probe, decode, encode, and the alpha helpers.

The upscaler sees only HxW (gray) or HxWx3 (BGR) arrays, uint8 or uint16. Everything else that an image file
carries (alpha, EXIF orientation, ICC profile, CMYK, palettes, animation) is dealt with here, so that it
survives the trip through the network or is turned into plain pixels first.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputRejected
from pipeline.formats import FORMATS, REQUESTABLE, Format, format_named, requested as requested_format
from pipeline.png import encode_png

# Pillow's own decompression-bomb check is off: our limits run on the header (see pipeline/limits.py), before
# anything is decoded, and Pillow's warning/error would fire at open() with a different threshold.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED_FORMATS = tuple(FORMATS)  # pipeline/formats.py is the list
ANIMATED_FORMATS = tuple(name for name, f in FORMATS.items() if f.animation)
# OpenCV 5 writes ICC and EXIF for PNG (iCCP, eXIf), JPEG (APP2, APP1) and WebP (ICCP, EXIF chunks) only.
_CV2_WRITES_METADATA = ("PNG", "JPEG", "WEBP")
# File signatures, to tell "a damaged PNG" from "not an image at all" when Pillow cannot even open the header.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageHeader:
    format: str  # Pillow format name: "JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"
    width: int  # as stored (before EXIF orientation)
    height: int
    frames: int  # 1 for still images
    mode: str  # Pillow mode, e.g. "RGB", "RGBA", "L", "I;16", "CMYK", "P" (a 16-bit RGB PNG still says "RGB")
    # what decode will make of it, read from the header (an upper bound where only the pixels could tell)
    channels: int = 3  # 1 gray, 3 BGR, 4 BGRA
    bytes_per_sample: int = 1  # 1 or 2 (4: 32-bit samples, which decode refuses)


@dataclass
class DecodedImage:
    frames: list[np.ndarray]  # each HxW, HxWx3 BGR or HxWx4 BGRA; uint8 or uint16
    format: str  # input format (Pillow name)
    icc_profile: bytes | None  # None after a CMYK->RGB conversion that made it meaningless
    exif: bytes | None  # b"Exif\0\0" + TIFF block (Pillow's convention), Orientation already reset to 1
    durations_ms: list[int] | None = None  # per frame, for animations
    loop: int | None = None  # animation loop count (0 = forever, None = play once)


# --------------------------------------------------------------------------------------------- header


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _SIGNATURES if data.startswith(sig)), None)


def _channels(img: Image.Image, frames: int) -> int:
    """Channels of the decoded frames. Animations decode through RGBA and keep alpha when any frame has some:
    counted as 4 (knowing would take decoding every frame). Gray with a transparent value counts as 4 too."""
    if frames > 1 or "A" in img.mode.upper() or "transparency" in img.info:
        return 4
    if img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16"):
        return 1
    return 3  # RGB, CMYK (decoded to RGB), P without transparency (decoded to RGB), YCbCr...


def _bytes_per_sample(img: Image.Image) -> int:
    """Pillow has no 16-bit RGB(A) mode: a 16-bit colour PNG or TIFF says "RGB" and only its raw mode ("RGB;16B",
    "RGBA;16N", in the header's tile list) tells the depth."""
    if img.mode.startswith("I;16"):
        return 2
    if img.mode in ("I", "F"):
        return 4
    for tile in img.tile[:1]:
        args = tile.args
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and ";16" in raw:
            return 2
    return 1


def read_header(data: bytes) -> ImageHeader:
    """Probe format, size, frame count and mode without decoding any pixels."""
    if not data:
        raise InputRejected("the file is empty (0 bytes)", stage="decode", code="empty")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: parses the header only
        fmt = img.format
        # MPO is how Pillow names camera JPEGs with an extra (depth/preview) picture; the first one is the photo.
        if fmt == "MPO":
            fmt, frames = "JPEG", 1
        else:
            frames = int(getattr(img, "n_frames", 1))
        header = ImageHeader(format=fmt, width=img.width, height=img.height, frames=frames, mode=img.mode,
                             channels=_channels(img, frames), bytes_per_sample=_bytes_per_sample(img))
    except UnidentifiedImageError:
        sniffed = _sniff(data)
        if sniffed is None:
            raise InputRejected(
                "the file is not an image (no known image format recognised)", stage="decode", code="not_an_image"
            ) from None
        raise InputRejected(
            f"the file looks like {sniffed} but its header cannot be read: it is truncated or corrupt",
            stage="decode",
            code="corrupt",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise InputRejected(
            f"the image header cannot be read: it is truncated or corrupt ({exc})", stage="decode", code="corrupt"
        ) from None
    if header.format not in SUPPORTED_FORMATS:
        raise InputRejected(
            f"{header.format} images are not supported (supported: {', '.join(SUPPORTED_FORMATS)})",
            stage="decode",
            code="unsupported_format",
        )
    if header.frames > 1 and header.format not in ANIMATED_FORMATS:
        # Multi-page TIFF: pages may differ in size and there is no single right output; refuse rather than drop pages.
        raise InputRejected(
            f"multi-page {header.format} files ({header.frames} pages) are not supported",
            stage="decode",
            code="unsupported_format",
        )
    return header


# --------------------------------------------------------------------------------------------- EXIF


def _exif_reset_orientation(raw: bytes | None) -> tuple[int, bytes | None]:
    """Return (orientation, EXIF with Orientation set to 1), patched in place so every other tag stays byte-exact.

    `raw` is an EXIF block with or without the b"Exif\\0\\0" prefix. Unreadable EXIF is dropped (orientation 1).
    """
    if not raw:
        return 1, None
    tiff = raw[len(_EXIF_PREFIX):] if raw.startswith(_EXIF_PREFIX) else raw
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd0,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd0)
        orientation = 1
        patched = bytearray(tiff)
        for i in range(count):  # IFD0 entries: tag, type, count, value (12 bytes each)
            entry = ifd0 + 2 + 12 * i
            tag, typ = struct.unpack_from(endian + "HH", tiff, entry)
            if tag == _ORIENTATION_TAG and typ == 3:  # SHORT, stored in the value field itself
                (orientation,) = struct.unpack_from(endian + "H", tiff, entry + 8)
                struct.pack_into(endian + "H", patched, entry + 8, 1)
                break
    except (KeyError, struct.error):
        return 1, None
    return (orientation if 1 <= orientation <= 8 else 1), _EXIF_PREFIX + bytes(patched)


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels -> display orientation for an EXIF Orientation value (1..8), as ImageOps.exif_transpose does."""
    if orientation == 2:
        out = pixels[:, ::-1]  # mirror left-right
    elif orientation == 3:
        out = pixels[::-1, ::-1]  # rotate 180
    elif orientation == 4:
        out = pixels[::-1]  # mirror top-bottom
    elif orientation == 5:
        out = pixels.swapaxes(0, 1)  # transpose
    elif orientation == 6:
        out = np.rot90(pixels, k=-1)  # rotate 90 clockwise
    elif orientation == 7:
        out = pixels[::-1, ::-1].swapaxes(0, 1)  # transverse
    elif orientation == 8:
        out = np.rot90(pixels, k=1)  # rotate 90 counter-clockwise
    else:
        return pixels
    return np.ascontiguousarray(out)  # cv2 wants contiguous arrays


def _read_orientation_and_exif(img: Image.Image) -> tuple[int, bytes | None]:
    raw = img.info.get("exif")  # JPEG APP1, WebP EXIF chunk, PNG eXIf before IDAT (getexif() on PNG would decode)
    if raw:
        return _exif_reset_orientation(raw)
    if img.format == "TIFF":  # a TIFF keeps Orientation in its own IFD; its other tags do not belong in an EXIF block
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1), None
    return 1, None


# --------------------------------------------------------------------------------------------- decode


def _rejected(exc: BaseException | None, fmt: str) -> InputRejected:
    text = str(exc or "")
    if isinstance(exc, EOFError) or "truncated" in text.lower() or "incomplete" in text.lower():
        return InputRejected(
            f"the {fmt} file is truncated (it ends before the image data does)", stage="decode", code="truncated"
        )
    detail = f": {text}" if text else ""
    return InputRejected(
        f"the {fmt} file is corrupt or truncated and cannot be decoded{detail}", stage="decode", code="corrupt"
    )


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> BGR/BGRA/gray array; palettes, CMYK, LA etc. become RGB(A) first."""
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)  # also turns big-endian I;16B into native uint16
    if img.mode in ("I", "F"):  # converting would clip 32-bit samples to 8 bits without a word
        raise InputRejected(
            f"{img.format} images with 32-bit samples (mode {img.mode}) are not supported (only 8- and 16-bit)",
            stage="decode",
            code="unsupported_format",
        )
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    rgb = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    return cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if has_alpha else cv2.COLOR_RGB2BGR)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK -> sRGB through its ICC profile when it has one (printer profiles differ a lot), else Pillow's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        from PIL import ImageCms  # CMYK with a profile only: ~15 ms of every start otherwise

        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: the plain conversion is better than rejecting the image
    return img.convert("RGB")


def _decode_still(data: bytes, header: ImageHeader, img: Image.Image) -> tuple[np.ndarray, bool]:
    """Return (pixels as stored, icc_still_valid)."""
    fmt = header.format
    # Pillow where OpenCV falls short: CMYK needs its ICC profile (OpenCV ignores it), palettes and GIF are Pillow's.
    if header.mode == "CMYK" or header.mode in ("P", "PA") or fmt == "GIF":
        try:
            img.load()
            if img.mode == "CMYK":
                return _pil_to_array(_cmyk_to_rgb(img)), False
            return _pil_to_array(img), True
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise _rejected(exc, fmt) from None
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        pixels = None
    if pixels is not None:
        return pixels, True
    # OpenCV only says "no"; Pillow tells truncated from corrupt, and decodes the odd file OpenCV cannot.
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _rejected(exc, fmt) from None
    except MemoryError:
        raise InputRejected(f"the {fmt} image is too large to decode", stage="decode", code="too_large") from None
    if img.mode == "CMYK":
        return _pil_to_array(_cmyk_to_rgb(img)), False
    return _pil_to_array(img), True


def _decode_animation(img: Image.Image, header: ImageHeader) -> tuple[list[np.ndarray], list[int], int | None]:
    frames, durations = [], []
    loop = img.info.get("loop")  # read before seeking: later frames need not repeat it
    try:
        for i in range(header.frames):
            img.seek(i)  # Pillow composites GIF/WebP/APNG frames onto the full canvas (disposal, blending)
            frames.append(np.asarray(img.convert("RGBA")))
            durations.append(int(round(img.info.get("duration", 0) or 0)))
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _rejected(exc, header.format) from None
    if all(f[..., 3].min() == 255 for f in frames):  # no transparency anywhere: keep the network input plain BGR
        out = [cv2.cvtColor(f, cv2.COLOR_RGBA2BGR) for f in frames]
    else:
        out = [cv2.cvtColor(f, cv2.COLOR_RGBA2BGRA) for f in frames]
    return out, durations, (int(loop) if loop is not None else None)


def decode(data: bytes, header: ImageHeader) -> DecodedImage:
    """Decode every frame to BGR/BGRA/gray numpy arrays in display orientation, keeping depth, ICC and EXIF."""
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _rejected(exc, header.format) from None
    orientation, exif = _read_orientation_and_exif(img)
    icc = img.info.get("icc_profile") or None
    durations, loop = None, None
    if header.frames > 1:
        frames, durations, loop = _decode_animation(img, header)
    else:
        pixels, icc_valid = _decode_still(data, header, img)
        frames = [pixels]
        if not icc_valid:
            icc = None
    if frames[0].dtype not in (np.uint8, np.uint16):
        raise InputRejected(
            f"{header.format} images with {frames[0].dtype} samples are not supported (only 8- and 16-bit)",
            stage="decode",
            code="unsupported_format",
        )
    frames = [apply_orientation(f, orientation) for f in frames]
    return DecodedImage(
        frames=frames, format=header.format, icc_profile=icc, exif=exif, durations_ms=durations, loop=loop
    )


# --------------------------------------------------------------------------------------------- alpha


def _pull_push_fill(color: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Smooth extension of the known pixels' colour over the whole image (pull-push on an image pyramid), float32."""
    w = known.astype(np.float32)
    # Premultiplied colour: zero where unknown (cv2 ops, as numpy broadcasting is several times slower here).
    c = cv2.bitwise_and(color, color, mask=known.view(np.uint8)).astype(np.float32)
    levels = []
    while max(c.shape[:2]) > 1:  # pull: premultiplied colour and coverage, both averaged down to 1x1
        c, w = cv2.pyrDown(c), cv2.pyrDown(w)
        levels.append((c.reshape(c.shape[0], c.shape[1], -1), w[..., None]))  # cv2 drops a 1-channel axis
    c, w = levels[-1]
    est = c / np.maximum(w, 1e-20)
    for c, w in reversed(levels[:-1]):  # push: local mean where coverage is good, else the coarser guess
        up = cv2.pyrUp(est, dstsize=(c.shape[1], c.shape[0])).reshape(c.shape)
        trust = np.minimum(w * 4.0, 1.0)
        c /= np.maximum(w, 1e-20)  # local mean colour (c is not needed after this level)
        c -= up
        c *= trust
        c += up
        est = c
    # Full resolution: unknown pixels have no coverage of their own, so the coarser guess is all there is.
    return cv2.pyrUp(est, dstsize=(color.shape[1], color.shape[0])).reshape(color.shape)


def split_alpha(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """BGRA -> (BGR whose fully transparent pixels carry nearby opaque colour, alpha); anything else -> (frame, None).

    Transparent pixels often hold black; an upscaler would blend it into edge pixels and leave dark fringes.
    """
    if frame.ndim != 3 or frame.shape[2] != 4:
        return frame, None
    color = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    alpha = cv2.extractChannel(frame, 3)
    known = alpha > 0
    if known.all() or not known.any():
        return color, alpha
    # Back to the input depth, rounded and saturated (cv2 does it several times faster than numpy rint/clip/astype).
    depth = cv2.CV_8U if color.dtype == np.uint8 else cv2.CV_16U
    filled = cv2.multiply(_pull_push_fill(color, known), 1.0, dtype=depth)
    filled = cv2.copyTo(color, known.view(np.uint8), filled)  # opaque and partly transparent pixels keep their colour
    return filled, alpha


def merge_alpha(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """(colour, alpha) -> BGRA; gray colour becomes BGR first. alpha is rescaled if its depth differs from colour's."""
    if alpha is None:
        return color
    if alpha.shape[:2] != color.shape[:2]:
        raise ValueError(f"alpha {alpha.shape[:2]} and colour {color.shape[:2]} differ in size")
    if color.ndim == 2:
        color = cv2.cvtColor(color, cv2.COLOR_GRAY2BGR)
    if alpha.dtype != color.dtype:
        alpha = _to_uint8(alpha) if color.dtype == np.uint8 else alpha.astype(np.uint16) * 257
    return np.dstack([color, alpha])


# --------------------------------------------------------------------------------------------- encode


def output_format(input_format: str, requested: str | None) -> tuple[str, str]:
    """(Pillow format name, extension with dot) of the output for an input format and a requested one."""
    if requested is None or requested.strip().lower() == "keep":
        fmt = format_named(input_format)
    else:
        fmt = requested_format(requested)
    return fmt.name, fmt.extension


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    # == round(x / 257), exactly for every uint16 (tests/test_codec.py checks all 65536), with no temporaries:
    # numpy's uint32 arithmetic took 8 bytes per sample on top, 4x a 16-bit output
    return cv2.convertScaleAbs(pixels, alpha=1 / 257)


def _flatten_on_white(frame: np.ndarray) -> np.ndarray:
    """BGRA uint8 -> BGR composited on white: round(c*a/255 + 255*(1 - a/255)) = round((65025 - (255-c)*a) / 255).
    Every term fits in uint16: 6 bytes a pixel of work plus the 3 of the result, where float32 took about 40."""
    d = np.subtract(255, frame[..., :3], dtype=np.uint16)
    d *= frame[..., 3:4]
    np.subtract(65025 + 127, d, out=d)  # +127, then floor division: rounds (no exact halves for integers)
    d //= 255
    return d.astype(np.uint8)


def _prepare(frame: np.ndarray, fmt: Format) -> np.ndarray:
    """Fit a frame to what the output format can hold: depth, then alpha."""
    if frame.dtype not in (np.uint8, np.uint16):
        raise InputRejected(f"cannot encode {frame.dtype} pixels", stage="encode", code="encode_failed")
    if not fmt.high_depth:
        frame = _to_uint8(frame)
    if frame.ndim == 3 and frame.shape[2] == 4 and not fmt.alpha:
        # JPEG has no alpha and BMP alpha is ignored by most readers: composite onto white and drop alpha,
        # so transparent areas come out white instead of whatever colour the transparent pixels held.
        frame = _flatten_on_white(_to_uint8(frame))
    return frame


def _to_pil(frame: np.ndarray) -> Image.Image:
    if frame.ndim == 2:
        return Image.fromarray(frame)
    code = cv2.COLOR_BGRA2RGBA if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return Image.fromarray(cv2.cvtColor(frame, code))


# PNG compression: "fast" is our writer (pipeline/png.py: UP filter, ISA-L deflate level 1), "0".."9" libpng's
# zlib levels through OpenCV, with zlib's default strategy. Measured on 3.7 Mpx of x2 photos
# (bench/png_compression_bench.py): fast 13 ms/Mpx at 1.35 bytes/px (OpenCV's own default, what fast was: 39 ms/Mpx,
# 1.45 B/px), 1: 57 ms/Mpx 1.30 B/px, 6: 219 ms/Mpx 1.19 B/px, 9: 1006 ms/Mpx 1.17 B/px; 0 stores (3 B/px).
PNG_COMPRESSION_FAST = "fast"
PNG_COMPRESSIONS = (PNG_COMPRESSION_FAST, *map(str, range(10)))


def _bare_exif(exif: bytes | None) -> bytes | None:
    """The TIFF block without Pillow's "Exif\\0\\0" prefix: what a PNG eXIf chunk holds, and what OpenCV wants."""
    return exif[len(_EXIF_PREFIX):] if exif and exif.startswith(_EXIF_PREFIX) else exif


def _encode_cv2(frame: np.ndarray, fmt: str, image: DecodedImage, jpeg_quality: int, webp_quality: int,
                png_compression: str = PNG_COMPRESSION_FAST) -> bytes:
    ext = FORMATS[fmt].extension
    params: list[int] = []
    if fmt == "JPEG":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    elif fmt == "WEBP":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(webp_quality)]
    elif fmt == "PNG" and png_compression != PNG_COMPRESSION_FAST:
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)]
    types, blobs = [], []
    if fmt in _CV2_WRITES_METADATA:
        if image.icc_profile:
            types.append(cv2.IMAGE_METADATA_ICCP)
            blobs.append(np.frombuffer(image.icc_profile, np.uint8))
        if image.exif:
            # OpenCV wants the bare TIFF block and adds the "Exif\0\0" header itself for JPEG; passing Pillow's
            # prefixed bytes gives a doubled header in JPEG and an invalid eXIf chunk in PNG.
            types.append(cv2.IMAGE_METADATA_EXIF)
            blobs.append(np.frombuffer(_bare_exif(image.exif), np.uint8))
    if types:
        ok, buf = cv2.imencodeWithMetadata(ext, frame, types, blobs, params)
    else:
        ok, buf = cv2.imencode(ext, frame, params)
    if not ok:
        raise InputRejected(f"OpenCV could not encode the image as {fmt}", stage="encode", code="encode_failed")
    return buf.tobytes()


def _encode_pil(
    frames: list[np.ndarray], fmt: str, image: DecodedImage, jpeg_quality: int, webp_quality: int,
    png_compression: str = PNG_COMPRESSION_FAST,
) -> bytes:
    pil_frames = [_to_pil(f) for f in frames]
    kwargs: dict = {}
    if image.icc_profile:
        kwargs["icc_profile"] = image.icc_profile
    if image.exif and fmt != "GIF":
        kwargs["exif"] = image.exif
    if fmt == "WEBP":
        kwargs["quality"] = int(webp_quality)
    elif fmt == "JPEG":
        kwargs["quality"] = int(jpeg_quality)
    elif fmt == "PNG" and png_compression != PNG_COMPRESSION_FAST:
        kwargs["compress_level"] = int(png_compression)  # an animated PNG (APNG); fast: Pillow's own default
    elif fmt == "TIFF":
        kwargs["compression"] = "tiff_lzw"  # as OpenCV writes TIFF; Pillow would store it uncompressed
    if len(pil_frames) > 1:
        kwargs.update(save_all=True, append_images=pil_frames[1:])
        if image.durations_ms:
            kwargs["duration"] = list(image.durations_ms)
        if image.loop is not None:
            kwargs["loop"] = image.loop
        elif fmt != "GIF":
            kwargs["loop"] = 1  # None means "play once" (a GIF without loop extension); WebP/APNG say that with 1
        if fmt == "GIF":
            kwargs["disposal"] = 2  # frames are full composited canvases: clear before drawing the next one
    out = io.BytesIO()
    pil_frames[0].save(out, format=fmt, **kwargs)
    return out.getvalue()


def encode(image: DecodedImage, fmt: str, *, jpeg_quality: int = 95, webp_quality: int = 95,
           png_compression: str = PNG_COMPRESSION_FAST, workers: int = 1) -> bytes:
    """Encode the (upscaled) frames of `image` as `fmt`: a Pillow format name (output_format's) or a --format one.
    `png_compression`: one of PNG_COMPRESSIONS. `workers`: threads for our PNG writer's bands (the same bytes)."""
    desc = REQUESTABLE.get(fmt.strip().lower()) or format_named(fmt)
    fmt = desc.name
    if not image.frames:
        raise InputRejected("there is no frame to encode", stage="encode", code="encode_failed")
    frames = [_prepare(f, desc) for f in image.frames]
    try:
        if len(frames) > 1:
            if not desc.animation:
                raise InputRejected(
                    f"an animation ({len(frames)} frames) cannot be written as {fmt}; "
                    f"use {', '.join(ANIMATED_FORMATS)}",
                    stage="encode",
                    code="unsupported_output",
                )
            return _encode_pil([_to_uint8(f) for f in frames], fmt, image, jpeg_quality, webp_quality,
                               png_compression)
        frame = frames[0]
        if fmt == "GIF":  # Pillow's palette quantisation and 1-bit transparency
            return _encode_pil([_to_uint8(frame)], fmt, image, jpeg_quality, webp_quality)
        if fmt == "TIFF" and frame.dtype == np.uint8 and (image.icc_profile or image.exif):
            return _encode_pil([frame], fmt, image, jpeg_quality, webp_quality)  # OpenCV drops TIFF metadata
        if fmt == "PNG" and png_compression == PNG_COMPRESSION_FAST:
            return encode_png(frame, icc_profile=image.icc_profile, exif=_bare_exif(image.exif), workers=workers)
        return _encode_cv2(frame, fmt, image, jpeg_quality, webp_quality, png_compression)
    except InputRejected:
        raise
    except (cv2.error, OSError, ValueError, TypeError, KeyError, OverflowError) as exc:  # GIF over 65535 px
        raise InputRejected(
            f"the image could not be encoded as {fmt}: {exc}", stage="encode", code="encode_failed"
        ) from None
