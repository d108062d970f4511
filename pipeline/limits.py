"""Refusal limits, checked on the header before any pixel is decoded (pure, but for available_memory at the end)."""

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputRejected
from pipeline.formats import REQUESTABLE, Format, file_bytes, format_named
from pipeline.tiling import capped_size


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


# --------------------------------------------------------------------------------------------- the output

# Working memory of one item, from the code, then measured: peak RSS (/proc/self/status VmHWM) of decode ->
# pipeline.upscale.upscale_frames -> codec.encode on Set14 lenna resized to 800x800 and 1000x1000, upscaled x4 (and
# x2), as gray, BGR, BGRA, 8 and 16 bits, with and without ICC (tests/test_limits.py re-measures four of them).
# "raw" is the output as the upscaler holds it: width * height * channels * bytes per sample * frames.
#   upscale: the decoded input is held all along, with alpha also split_alpha's colour/alpha copies and its
#     float32 pull-push fill (INPUT_COPIES x the decoded input, on top of it); the output planes
#     (upscale_many), and with alpha the colour and alpha planes and their np.dstack (merge_alpha) at once: 2x
#     raw. Measured: 1.25x raw without alpha, 2.38x with (x4); 2.53x with alpha at x2.
#   encode: the frames, the copies codec._prepare makes (16 -> 8 bits, alpha composited on white), the writer's
#     own buffers and the encoded bytes (OpenCV's buffer, then bytes()): Format.encode_memory (gray, BGR) and
#     encode_memory_alpha (BGRA), the largest multiple of raw measured for the format, rounded up by 5-10%
#     (PNG by 20%: its encoded bytes, held twice, grow with noise, and 16-bit samples compress worst).
#     Without alpha: JPEG 1.69 (16-bit gray), PNG 2.64 (16-bit gray), WEBP 6.42 (gray: libwebp works on 4 bytes
#     a pixel whatever the input), TIFF 4.52 (8-bit BGR with ICC: Pillow writes it), BMP 3.26, GIF 5.38
#     (Pillow's quantiser). With alpha: JPEG 3.31 (composited on white), PNG 2.47, WEBP 10.89 (the alpha plane
#     goes through libwebp's lossless coder: 8.1x for a mask cut out of a photo, 10.9x for an alpha of noise),
#     TIFF 3.43, BMP 3.31, GIF 4.10. A factor is its format's worst case: BGR to WebP (2.1x) is overstated 3x.
#   the engine's tiles: bounded by the tile size, not by the image (TILE_ALLOWANCE).
# Other items in flight (the overlapped stages hold up to three) are not counted: available_bytes is read when
# this item starts, with theirs already taken.
INPUT_COPIES = 4
TILE_ALLOWANCE = 64 * 2**20
# animations go through Pillow, whose RGB frames take 4 bytes a pixel: measured 5.49x at most (APNG)
ANIMATION_ENCODE_MEMORY = 6.0


@dataclass(frozen=True)
class OutputPlan:
    """What the pipeline will make of an input, known from its header."""

    width: int  # per frame, as stored (EXIF orientation may swap them: nothing below depends on which is which)
    height: int
    frames: int
    pixels: int  # width * height * frames
    memory_bytes: int  # the working memory estimated for this item


def output_size(width: int, height: int, *, scale: int, policy: str, cap_side: int) -> tuple[int, int]:
    """The size of each output frame: policy "cap" first shrinks the longest side to cap_side exactly as
    pipeline.upscale.apply_policy does (tiling.capped_size), then the model multiplies both sides by its scale."""
    if policy == "cap":
        capped = capped_size(width, height, cap_side)
        if capped is not None:
            width, height = capped
    return width * scale, height * scale


def memory_needed(in_width: int, in_height: int, out_width: int, out_height: int, frames: int, channels: int,
                  bytes_per_sample: int, fmt: Format, input_bytes: int = 0) -> int:
    """Peak bytes one item takes between decode and publish (see INPUT_COPIES above); input_bytes: the file's
    bytes, when they are held all along (the pipeline keeps them for the failed place)."""
    frames = max(frames, 1)
    decoded = in_width * in_height * channels * bytes_per_sample * frames
    output = out_width * out_height * channels * bytes_per_sample * frames
    upscale = decoded * (1 + INPUT_COPIES) + output * (2 if channels == 4 else 1)
    if frames > 1:
        factor = ANIMATION_ENCODE_MEMORY
    else:
        factor = fmt.encode_memory_alpha if channels == 4 else fmt.encode_memory
    return int(max(upscale, output * factor)) + TILE_ALLOWANCE + input_bytes


def _advice(out_width: int, out_height: int) -> str:
    """What to ask for instead: a format that holds this size (PNG first: lossless and widely read)."""
    for name in ("png", "tiff", "jpeg", "webp"):
        if max(out_width, out_height) <= REQUESTABLE[name].max_side:
            return f"choose --format {name} or a smaller scale"
    return "choose a smaller scale"


def check_output(width: int, height: int, frames: int, channels: int, bytes_per_sample: int, *, scale: int,
                 policy: str, cap_side: int, fmt: Format | str, max_output_pixels: int,
                 available_bytes: int | None, input_bytes: int = 0) -> OutputPlan:
    """Refuse, before any pixel is decoded, an output the format cannot hold, one over max_output_pixels, or one
    whose working memory is over available_bytes (None: unknown, not checked). width/height/frames/channels/
    bytes_per_sample are the input's, as codec.read_header reports them; fmt is the output format; input_bytes
    the size of the file, held while the item is in work."""
    fmt = format_named(fmt) if isinstance(fmt, str) else fmt
    frames = max(frames, 1)
    out_w, out_h = output_size(width, height, scale=scale, policy=policy, cap_side=cap_side)
    capped = (out_w, out_h) != (width * scale, height * scale)
    made = f"{width}x{height}" + (f" capped to {out_w // scale}x{out_h // scale}" if capped else "") + f" at x{scale}"
    if max(out_w, out_h) > fmt.max_side:
        raise InputRejected(
            f"the output would be {out_w}x{out_h} px ({made}), over the largest side {fmt.name} can hold "
            f"({fmt.max_side} px): {_advice(out_w, out_h)}",
            stage="limits", code="output_too_large_for_format",
        )
    if fmt.max_file_bytes is not None:
        # what the writer gets: alpha composited away, samples rounded to 8 bits, where the format says so.
        # Rows as stored: only BMP inputs become BMP outputs, and BMP has no EXIF orientation to swap them.
        out_c = 3 if channels == 4 and not fmt.alpha else channels
        out_b = bytes_per_sample if fmt.high_depth else 1
        size = file_bytes(out_w, out_h, out_c, out_b)
        if size > fmt.max_file_bytes:
            raise InputRejected(
                f"the output would be a {size} byte {fmt.name} file ({out_w}x{out_h} px, {made}), over the "
                f"{fmt.max_file_bytes} bytes its writer can store: {_advice(out_w, out_h)}",
                stage="limits", code="output_too_large_for_format",
            )
    pixels = out_w * out_h * frames
    if pixels > max_output_pixels:
        raise InputRejected(
            f"the output would be {out_w}x{out_h}" + (f"x{frames} frames" if frames > 1 else "")
            + f" = {pixels} pixels ({made}), over SUPERRES_MAX_OUTPUT_PIXELS={max_output_pixels}: "
            "choose a smaller scale, or raise the setting if the machine can hold it",
            stage="limits", code="too_many_output_pixels",
        )
    need = memory_needed(width, height, out_w, out_h, frames, channels, bytes_per_sample, fmt, input_bytes)
    if available_bytes is not None and need > available_bytes:
        raise InputRejected(
            f"the output ({out_w}x{out_h}" + (f"x{frames} frames" if frames > 1 else "")
            + f", {channels} channel(s) of {8 * bytes_per_sample} bits, as {fmt.name}; {made}) needs about "
            f"{need / 2**30:.1f} GiB of memory and {available_bytes / 2**30:.1f} GiB is available: "
            "choose a smaller scale or give the process more memory",
            stage="limits", code="output_memory",
        )
    return OutputPlan(out_w, out_h, frames, pixels, need)


# --------------------------------------------------------------------------------------------- available memory
# The one function here that reads the machine: an adapter for check_output's available_bytes.

_UNLIMITED = 2**62  # cgroup v1 says "no limit" with 9223372036854771712


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _stat(path: Path, *keys: str) -> int:
    try:
        fields = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return 0
    return next((int(fields[k]) for k in keys if k in fields), 0)


def _cgroup_headroom(proc: Path, cgroup_root: Path) -> int | None:
    """The least room left under any memory limit of this process's cgroup and its parents (v2, else v1).

    Usage counts the page cache; inactive file pages are reclaimed before the OOM killer runs, so they count
    as free (the working set, as the kubelet computes it)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, mounted at the root (or at unified/ on a hybrid host)
            base = cgroup_root if (cgroup_root / "cgroup.controllers").exists() else cgroup_root / "unified"
            files = ("memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):  # v1 (Amazon Linux 2 ECS hosts among others)
            base = cgroup_root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
        else:
            continue
        here = base / path.lstrip("/")
        if not here.is_dir():  # a container sees its own cgroup at the mount's root, under the host's name
            here = base
        while True:
            limit, usage = _read_int(here / files[0]), _read_int(here / files[1])
            if limit is not None and usage is not None and limit < _UNLIMITED:
                found.append(max(0, limit - usage + _stat(here / "memory.stat", *files[2])))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(found) if found else None


def available_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still take: the least of MemAvailable and the room under its cgroup limits;
    None when neither can be read (then check_output skips its memory check)."""
    found = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)  # kB
    except (OSError, ValueError, IndexError):
        pass
    headroom = _cgroup_headroom(proc, cgroup_root)
    if headroom is not None:
        found.append(headroom)
    return min(found) if found else None


_last_reading: tuple[float, int | None] = (float("-inf"), None)  # (monotonic time, bytes)


def recent_available_memory(max_age_s: float = 0.25) -> int | None:
    """available_memory(), read again only when the last reading is older than `max_age_s`: it reads /proc and
    the cgroup files (~0.3 ms, a fifth of a small item's reading), while items come faster than memory moves.
    Every item is still checked, against a reading at most that old."""
    global _last_reading
    taken, value = _last_reading
    now = time.monotonic()
    if now - taken > max_age_s:
        value = available_memory()
        _last_reading = (now, value)
    return value
