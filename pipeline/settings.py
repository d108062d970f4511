"""The one `Settings` of superres: every option is a `SUPERRES_*` environment variable (or `.env` line)
and, for the CLI, a flag. Validated at start; a bad value is a `ConfigError` (exit 2)."""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SUPERRES_", env_file=".env", extra="ignore")

    # where things are: local folders or s3://bucket/prefix/
    inbox: str | None = None
    outbox: str | None = None
    failed: str | None = None  # default: <outbox>.failed beside the outbox (see failed_location)
    processed: str | None = None  # default: <inbox>/processed (only used with disposition=move)
    # a SQLite file or an s3:// prefix; default: <outbox>/.superres/ledger.sqlite3, or for an S3 outbox
    # s3://<outbox bucket>/.superres/ledger/<outbox prefix>/ (outside the outbox prefix: it holds outputs only)
    ledger: str | None = None
    s3_endpoint_url: str | None = None  # moto, MinIO; default: AWS
    queue_url: str | None = None  # `superres worker`: the SQS queue
    batch_size: int = Field(1, ge=1, le=10)  # SQS messages received at a time
    visibility_s: int = Field(300, ge=10, le=43200)  # SQS visibility while an item is in work (kept up by heartbeats)
    wait_s: int = Field(20, ge=0, le=20)  # SQS long-poll wait
    # watch, worker, Lambda: items in the stage runner at once (read ahead of the engine, encoded and published
    # behind it); 0: enough that the engine never waits on the CPU stages (pipeline/stages.py in_flight_for)
    in_flight: int = Field(0, ge=0, le=256)

    # the model and where it runs
    model: str = ""  # empty: the best model present at --scale (default x3), see best_present_model
    scale: int | None = Field(None, ge=1)  # with a family name (fsrcnn): picks fsrcnn-x<scale>; else must match
    model_dir: Path | None = None  # default: the download cache (see models.files.default_model_dir)
    model_base_url: str | None = None  # a mirror for `models pull` (default: each model's pinned public URL)
    engine: Literal["auto", "opencv", "onnxruntime", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # GPU engines (bf16: torch only); auto: fp16 on CUDA, fp32 on CPU
    threads: int = Field(0, ge=0)  # engine threads; 0 = library default

    # resize policy and refusal limits (the limits apply to every input, whatever the policy)
    policy: Literal["tile", "cap"] = "tile"
    tile: int = Field(0, ge=0)  # tile side in input px (a memory bound, not a quality knob); 0: the engine's choice
    tile_batch: int = Field(0, ge=0)  # tiles per engine call; 0: the engine's choice (1 on CPU, several on a GPU)
    cap_side: int = Field(500, ge=1)  # policy=cap: longest input side before upscaling (the seed's way)
    max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)  # input width*height*frames, checked on the header
    max_side: int = Field(30_000, ge=1)
    min_side: int = Field(1, ge=1)
    # the output, checked on the header before any pixel is decoded (width*height*frames after upscaling)
    max_output_pixels: int = Field(300_000_000, ge=1)

    # output
    format: Literal["keep", "png", "jpeg", "webp", "tiff"] = "keep"  # also jpg and tif (stored as jpeg, tiff)
    jpeg_quality: int = Field(95, ge=1, le=100)
    webp_quality: int = Field(95, ge=1, le=100)
    # PNG: fast (OpenCV's level 1, run-length: the quickest, ~12 % larger than level 1) or a zlib level 0-9 (6 is
    # ~7x slower for ~18 % smaller files, 9 ~40x slower for ~20 %; docs/benchmarks.md). Changes the output bytes,
    # so it is part of what "already done" means (pipeline/ledger.py)
    png_compression: Literal["fast", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] = "fast"
    quality: int | None = Field(None, ge=1, le=100)  # both of the above, unless one is given itself
    suffix: str = ""  # output names NAME{suffix}.ext (e.g. "_x3": photo_x3.png); default none
    overwrite: bool = False  # process again what the ledger says is done, and publish over its output

    # exactly-once bookkeeping
    dedup: bool = True
    on_duplicate: Literal["copy", "record"] = "copy"  # copy the first output to the duplicate's name, or only record it
    disposition: Literal["keep", "move", "delete"] = "keep"  # what happens to an inbox file once it is settled
    lease_s: float = Field(600.0, gt=0)  # a claim not renewed for this long (or whose process is gone) is taken over
    heartbeat_s: float = Field(0.0, ge=0)  # worker: SQS visibility renewal period; 0: a third of visibility_s

    # watch mode
    poll: bool = False
    settle_s: float = Field(1.0, ge=0)  # quiet time after a writer's close before a file is taken
    rescan_s: float = Field(30.0, gt=0)

    # watch and worker: /metrics and /healthz on METRICS_HOST:PORT (0: off); a port already taken is a warning.
    # Loopback unless told otherwise: the container and the manifests say 0.0.0.0 explicitly.
    metrics_port: int = Field(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # serve: the HTTP API and upload page on HOST:PORT (loopback unless told otherwise; the container says 0.0.0.0);
    # /metrics and /healthz are served there too (metrics_port is not used)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_token: str | None = None  # a bearer token required on every endpoint but /healthz (and the static page)
    cors_origins: str = ""  # comma-separated origins allowed by CORS ("*": any); empty: no CORS headers
    queue_max: int = Field(16, ge=1)  # uploads waiting for the pipeline; more are answered 503 + Retry-After
    result_ttl_s: float = Field(3600.0, gt=0)  # results (and failure records) are removed this long after made

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("model")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, value):
        # the names Real-ESRGAN, waifu2x and upscayl users type; stored canonical, so the ledger's request ids
        # (and so what counts as "already done") are the same whichever name was given
        if isinstance(value, str):
            value = value.strip().lower()
            return {"jpg": "jpeg", "tif": "tiff"}.get(value, value)
        return value

    @field_validator("png_compression", mode="before")
    @classmethod
    def _png_level(cls, value):
        return str(value).strip().lower() if isinstance(value, (int, str)) else value

    @field_validator("suffix")
    @classmethod
    def _plain_suffix(cls, value: str) -> str:
        if "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
            raise ValueError("a suffix is part of a file name: no '/', '\\' or NUL")
        return value

    @model_validator(mode="after")
    def _quality_for_both(self) -> "Settings":
        if self.quality is not None:
            for name in ("jpeg_quality", "webp_quality"):
                if name not in self.model_fields_set:  # --jpeg-quality/--webp-quality given too: that one wins
                    setattr(self, name, self.quality)
        return self

    def output_file(self) -> str | None:
        """The one output's file name when the outbox is a local path named like an image (`--out big.png`) and
        not an existing folder: `superres upscale` with one input file writes exactly that file, into its parent
        folder. None: the outbox is a folder (or an S3 prefix)."""
        if not self.outbox or self.outbox.startswith("s3://") or self.outbox.endswith(("/", os.sep)):
            return None
        from pipeline.formats import FORMATS

        path = Path(self.outbox)
        extensions = {e for f in FORMATS.values() for e in f.extensions}
        if path.suffix.lower() in extensions and not path.is_dir():
            return path.name
        return None

    def outbox_folder(self) -> str | None:
        """Where outputs are published: the outbox, or the folder of an output file (see output_file)."""
        if self.outbox and self.output_file():
            return str(Path(self.outbox).parent)
        return self.outbox

    def failed_location(self) -> str:
        """--failed, or a place of the outbox's own beside it: `<outbox>.failed` (upscaled/ -> upscaled.failed/,
        big.png -> big.png.failed/, s3://b/done/ -> s3://b/done.failed/).

        Not `failed/` beside the outbox (the old default): that one was shared by every outbox in a folder, so the
        failures of two runs mixed and one run's retry could take another's record. Not inside the outbox either:
        failed inputs and their records would pass for outputs to whoever syncs or serves the outbox. Named after
        the outbox, beside it, it is found next to the outputs and cannot be shared (made only on a failure)."""
        if self.failed:
            return self.failed
        if self.outbox is None:
            raise ConfigError("no failed place: give --failed DIR (or SUPERRES_FAILED)")
        if self.outbox.startswith("s3://"):
            bucket, _, prefix = self.outbox[5:].partition("/")
            prefix = prefix.rstrip("/")
            # the bucket's root as outbox: no name to take, `failed/` it stays
            return f"s3://{bucket}/{prefix + '.failed/' if prefix else 'failed/'}"
        path = Path(os.path.abspath(self.outbox))
        if not path.name:  # the file system's root
            return str(path / "superres.failed")
        return str(path.with_name(path.name + ".failed"))

    def ledger_location(self) -> str:
        """--ledger, or the default for the outbox: a SQLite file inside a local outbox's `.superres/`, or an
        S3 prefix beside (never inside) an S3 outbox prefix."""
        if self.ledger:
            return self.ledger
        if self.outbox is None:
            raise ConfigError("no outbox: give --out/--outbox DIR (or SUPERRES_OUTBOX)")
        if self.outbox.startswith("s3://"):
            bucket, _, prefix = self.outbox[5:].partition("/")
            prefix = prefix.strip("/")
            return f"s3://{bucket}/.superres/ledger/{prefix + '/' if prefix else ''}"
        return str(Path(self.outbox_folder()) / ".superres" / "ledger.sqlite3")

    def sqs_heartbeat_s(self) -> float:
        return self.heartbeat_s or self.visibility_s / 3


# SQS keeps a message invisible for 12 h at most
SQS_MAX_VISIBILITY_S = 43_200
# a message deferred for a busy claim comes back this long after the claim's lease could have run out
CLAIM_MARGIN_S = 10.0


def timing_problems(s: Settings, mode: str, *, max_receive_count: int | None = None) -> list[str]:
    """Settings that cannot work together (pure): each a line saying which, why and what to do. Leases are
    renewed every lease_s/3 in every mode; the worker's messages every heartbeat_s."""
    problems = []
    if s.lease_s < 3:
        problems.append(f"lease_s={s.lease_s:g} is too short to be renewed in time (renewals every lease_s/3): "
                        "use at least 3 s (default 600)")
    if mode == "worker":
        beat = s.sqs_heartbeat_s()
        if beat * 2 > s.visibility_s:
            problems.append(f"heartbeat_s={beat:g} must be at most half of visibility_s={s.visibility_s}: "
                            "one missed heartbeat would make the message visible to other workers")
        if s.lease_s + CLAIM_MARGIN_S > SQS_MAX_VISIBILITY_S:
            problems.append(f"lease_s={s.lease_s:g} is too long: a message waiting for a busy claim is hidden for "
                            f"the lease's remaining time, and SQS allows {SQS_MAX_VISIBILITY_S} s at most")
        if max_receive_count is not None and max_receive_count < 3:
            problems.append(f"the queue's redrive maxReceiveCount is {max_receive_count}: a message whose worker "
                            "died needs 3 receives (the dead one, one deferred until the claim can be taken "
                            "over, the take-over); use at least 3 (5 recommended)")
    return problems


def load_settings(**overrides) -> Settings:
    """Environment and `.env` first, then the CLI's explicit flags (`None` means "not given")."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}".replace("Value error, ", "")
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    settings.model = resolve_model(settings.model, settings.scale) if settings.model else \
        best_present_model(settings.scale, settings.model_dir)
    return settings


# With no model named: the first of these whose file is present, best first by measured Y-PSNR (docs/models.md).
# Our fast model is bundled, so there always is one: a CPU image or a fresh install upscales out of the box.
DEFAULT_FAMILIES = ("edsr", "quality", "fast")


def best_present_model(scale: int | None, model_dir: Path | None) -> str:
    from models.catalog import CATALOG
    from models.files import default_model_dir, model_path

    scale = scale or 3
    known = [CATALOG[f"{family}-x{scale}"] for family in DEFAULT_FAMILIES if f"{family}-x{scale}" in CATALOG]
    if not known:
        raise ConfigError(f"no default model upscales x{scale}: name one with --model (see `superres models list`)")
    present = [spec for spec in known if model_path(spec, model_dir or default_model_dir()).is_file()]
    return (present or known[::-1])[0].name  # none present (a broken install): the bundled one's error says so


def resolve_model(name: str, scale: int | None) -> str:
    """A catalog name from --model and --scale: `fsrcnn` + 3 is fsrcnn-x3; a full name must agree with the scale.
    A family name without a scale, or any mismatch, is a ConfigError that says what to give."""
    from models.catalog import CATALOG

    families = sorted({n.rsplit("-x", 1)[0] for n in CATALOG})
    if name in CATALOG:
        spec = CATALOG[name]
        if scale is not None and scale != spec.scale:
            family = name.rsplit("-x", 1)[0]
            others = sorted(s.scale for n, s in CATALOG.items() if n.rsplit("-x", 1)[0] == family)
            fix = (f"give --model {family}-x{scale} (or --model {family} --scale {scale})" if scale in others
                   else f"{family} has x{', x'.join(map(str, others))}")
            raise ConfigError(f"--model {name} upscales x{spec.scale}, not x{scale} (--scale {scale}): {fix}")
        return name
    if name in families:
        scales = sorted(s.scale for n, s in CATALOG.items() if n.rsplit("-x", 1)[0] == name)
        if scale is None:
            raise ConfigError(f"--model {name} is a family: give --scale ({', '.join(map(str, scales))}) or "
                              f"--model {name}-x{scales[0]}")
        if f"{name}-x{scale}" not in CATALOG:
            raise ConfigError(f"{name} has no x{scale} model: it has x{', x'.join(map(str, scales))}")
        return f"{name}-x{scale}"
    return name  # unknown: said by get_model where the model is loaded, with the known names
