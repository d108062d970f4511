"""The bytes -> bytes transform: limits, header, decode, resize policy, upscale, encode.

Nothing here knows of places, the ledger or publishing: the Processor (pipeline/process.py) wraps it with those,
and every driver (one-shot, watch, the worker, Lambda, the HTTP server) runs these very steps. Split in phases so
the stage runner can overlap them: `plan` and `decode` (reader), `upscale` (engine), `encode` (writer)."""

from collections.abc import Callable
from dataclasses import dataclass

from pipeline import codec
from pipeline.formats import content_type
from pipeline.limits import Limits, check_dimensions, check_output, check_size, recent_available_memory
from pipeline.tiling import policy_id
from pipeline.upscale import engine_tiles, upscale_frames


@dataclass(frozen=True)
class TransformOptions:
    limits: Limits
    max_output_pixels: int
    policy: str  # full | cap
    cap_side: int
    out_format: str  # keep | png | jpg | webp | tif
    jpeg_quality: int
    webp_quality: int
    tile: int = 0  # 0: the engine's choice
    tile_batch: int = 0  # 0: the engine's choice
    png_compression: str = "fast"  # codec.PNG_COMPRESSIONS


@dataclass(frozen=True)
class Plan:
    """What the header says, and what will be made of it: decided before any pixel is decoded."""

    header: codec.ImageHeader
    fmt: str  # the output's Pillow format name
    ext: str  # the output's extension, with the dot
    content_type: str
    quality: int | None  # JPEG/WebP quality; None for lossless formats


class Transform:
    """One engine and one set of options, for the whole process."""

    def __init__(self, engine, spec, options: TransformOptions):
        self.engine = engine
        self.spec = spec
        self.opt = options
        self.policy = policy_id(options.policy, options.cap_side)
        self.batch = options.tile_batch or engine.default_batch()
        self.tile = options.tile or engine.default_tile(self.batch)

    def plan(self, data: bytes) -> Plan:
        """Refuse what the limits refuse (InputRejected), from the size and the header alone."""
        opt = self.opt
        check_size(len(data), opt.limits)
        header = codec.read_header(data)
        check_dimensions(header.width, header.height, header.frames, opt.limits)
        fmt, ext = codec.output_format(header.format, None if opt.out_format == "keep" else opt.out_format)
        # the output's size against the format, the output limit and memory: refused before any work
        check_output(header.width, header.height, header.frames, header.channels, header.bytes_per_sample,
                     scale=self.spec.scale, policy=opt.policy, cap_side=opt.cap_side, fmt=fmt,
                     max_output_pixels=opt.max_output_pixels, available_bytes=recent_available_memory(),
                     input_bytes=len(data))
        quality = {"JPEG": opt.jpeg_quality, "WEBP": opt.webp_quality}.get(fmt)
        return Plan(header, fmt, ext, content_type(fmt), quality)

    def decode(self, data: bytes, plan: Plan) -> codec.DecodedImage:
        return codec.decode(data, plan.header)

    def upscale(self, frames: list, *, progress: Callable[[int, int], None] | None = None,
                progress_each: Callable[[int, int, int], None] | None = None, workers: int = 1) -> list:
        """Frames of one or several images, their tiles sharing engine calls. `progress(done, total)` counts all
        tiles; `progress_each(frame_index, done, total)` each frame's. `workers`: engine calls at once."""
        return upscale_frames(frames, self.engine, policy=self.opt.policy, cap_side=self.opt.cap_side,
                              tile=self.tile, context=self.spec.context_px, batch=self.batch, progress=progress,
                              progress_each=progress_each, workers=workers)

    def tiles(self, frames: list) -> int:
        """The tiles `upscale` runs for these frames."""
        return engine_tiles(frames, policy=self.opt.policy, cap_side=self.opt.cap_side, tile=self.tile,
                            context=self.spec.context_px)

    def encode(self, image: codec.DecodedImage, frames: list, plan: Plan, workers: int = 1) -> bytes:
        image.frames = frames
        return codec.encode(image, plan.fmt, jpeg_quality=self.opt.jpeg_quality, webp_quality=self.opt.webp_quality,
                            png_compression=self.opt.png_compression, workers=workers)

    def __call__(self, data: bytes) -> tuple[bytes, Plan]:
        """The whole transform, one phase after the other."""
        plan = self.plan(data)
        image = self.decode(data, plan)
        return self.encode(image, self.upscale(image.frames), plan), plan


def transform_bytes(data: bytes, engine, spec, options: TransformOptions) -> tuple[bytes, str]:
    """(output bytes, content type): what every driver publishes for these input bytes."""
    out, plan = Transform(engine, spec, options)(data)
    return out, plan.content_type
