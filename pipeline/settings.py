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
    # a SQLite file or an s3:// prefix; default: <outbox>/.superres/ledger.sqlite3, or for an S3 outbox
    # s3://<outbox bucket>/.superres/ledger/<outbox prefix>/ (outside the outbox prefix: it holds outputs only)
    ledger: str | None = None
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
    # the output, checked on the header before any pixel is decoded (width*height*frames after upscaling)
    max_output_pixels: int = Field(300_000_000, ge=1)

    # output
    format: Literal["keep", "png", "jpeg", "webp", "tiff"] = "keep"
    jpeg_quality: int = Field(95, ge=1, le=100)
    webp_quality: int = Field(95, ge=1, le=100)

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
        return str(Path(self.outbox) / ".superres" / "ledger.sqlite3")

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
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
