"""The one `Settings` of superres: every option is a `SUPERRES_*` environment variable (or `.env` line)
and, for the CLI, a flag. Validated at start; a bad value is a `ConfigError` (exit 2)."""

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SUPERRES_", env_file=".env", extra="ignore")

    # where things are: local folders or s3://bucket/prefix/
    inbox: str | None = None
    outbox: str | None = None
    failed: str | None = None  # default: beside the outbox, named "failed"
    processed: str | None = None  # default: <inbox>/processed (only used with disposition=move)
    ledger: Path | None = None  # local outbox: default <outbox>/.superres/ledger.sqlite3 (S3: beside the outputs)
    s3_endpoint_url: str | None = None  # moto, MinIO; default: AWS
    queue_url: str | None = None  # `superres worker`: the SQS queue
    batch_size: int = Field(1, ge=1, le=10)  # SQS messages received at a time
    visibility_s: int = Field(300, ge=10, le=43200)  # SQS visibility while an item is in work (kept up by heartbeats)
    wait_s: int = Field(20, ge=0, le=20)  # SQS long-poll wait

    # the model and where it runs
    model: str = "edsr-x3"
    model_dir: Path | None = None  # default: the download cache (see models.files.default_model_dir)
    model_base_url: str | None = None  # a mirror for `models pull` (default: each model's pinned public URL)
    engine: Literal["auto", "opencv", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # torch engine; auto: fp16 on CUDA, fp32 on CPU
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

    # output
    format: Literal["keep", "png", "jpeg", "webp", "tiff"] = "keep"
    jpeg_quality: int = Field(95, ge=1, le=100)
    webp_quality: int = Field(95, ge=1, le=100)

    # exactly-once bookkeeping
    dedup: bool = True
    on_duplicate: Literal["copy", "record"] = "copy"  # copy the first output to the duplicate's name, or only record it
    disposition: Literal["keep", "move", "delete"] = "keep"  # what happens to an inbox file once it is settled
    lease_s: float = Field(600.0, gt=0)  # a claim older than this (or whose process is gone) is taken over

    # watch mode
    poll: bool = False
    settle_s: float = Field(2.0, ge=0)
    rescan_s: float = Field(30.0, gt=0)

    # watch and worker: /metrics and /healthz on 0.0.0.0:PORT (0: off); a port already taken is a warning
    metrics_port: int = Field(9100, ge=0, le=65535)

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("model")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    def failed_location(self) -> str:
        """--failed, or a `failed` folder/prefix beside the outbox."""
        if self.failed:
            return self.failed
        if self.outbox is None:
            raise ConfigError("no failed place: give --failed DIR (or SUPERRES_FAILED)")
        if self.outbox.startswith("s3://"):
            bucket, _, prefix = self.outbox[5:].partition("/")
            parent = prefix.rstrip("/").rpartition("/")[0]
            return f"s3://{bucket}/{parent + '/' if parent else ''}failed/"
        return str(Path(self.outbox).parent / "failed")

    def ledger_path(self) -> Path:
        if self.ledger:
            return self.ledger
        if self.outbox is None:
            raise ConfigError("no outbox: give --out/--outbox DIR (or SUPERRES_OUTBOX)")
        return Path(self.outbox) / ".superres" / "ledger.sqlite3"


def load_settings(**overrides) -> Settings:
    """Environment and `.env` first, then the CLI's explicit flags (`None` means "not given")."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
