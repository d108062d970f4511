"""The one `Settings` of superres: every option is a `SUPERRES_*` environment variable (or `.env` line)
and, for the CLI, a flag. Validated at start; a bad value is a `ConfigError` (exit 2).

The fields are a table: each one's type (its annotation), default, bounds or choices, and a clean-up run before
the check (`setting(...)`). Read and checked by our own small code, not pydantic: its import alone took longer
than numpy and OpenCV together, and `superres upscale` of one small image pays every millisecond of start-up."""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType

from pipeline.errors import ConfigError

ENV_PREFIX = "SUPERRES_"
DOTENV_FILE = ".env"  # in the current directory, as pydantic-settings read it


def setting(default, *, ge=None, le=None, gt=None, choices: tuple[str, ...] | None = None, clean=None):
    """One row of the table: the default, the limits the value must keep, the values allowed, and `clean`, run on
    the value as given (before its type is checked)."""
    return field(default=default, metadata={"ge": ge, "le": le, "gt": gt, "choices": choices, "clean": clean})


def _lower(value):
    return value.strip().lower() if isinstance(value, str) else value


def _format_alias(value):
    # the names Real-ESRGAN, waifu2x and upscayl users type; stored canonical, so the ledger's request ids
    # (and so what counts as "already done") are the same whichever name was given
    if isinstance(value, str):
        value = value.strip().lower()
        return {"jpg": "jpeg", "tif": "tiff"}.get(value, value)
    return value


def _png_level(value):
    return str(value).strip().lower() if isinstance(value, (int, str)) else value


def _plain_suffix(value):
    if isinstance(value, str) and ("/" in value or "\\" in value or "\0" in value or value in (".", "..")):
        raise ValueError(f"a suffix is part of a file name: no '/', '\\' or NUL (got {value!r})")
    return value


@dataclass
class Settings:
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
    batch_size: int = setting(1, ge=1, le=10)  # SQS messages received at a time
    visibility_s: int = setting(300, ge=10, le=43200)  # SQS visibility while an item is in work (kept up by heartbeats)
    wait_s: int = setting(20, ge=0, le=20)  # SQS long-poll wait
    # watch, worker, Lambda: items in the stage runner at once (read ahead of the engine, encoded and published
    # behind it); 0: enough that the engine never waits on the CPU stages (pipeline/stages.py in_flight_for)
    in_flight: int = setting(0, ge=0, le=256)

    # the model and where it runs
    model: str = setting("", clean=_lower)  # empty: the best model present at --scale (default x3), see best_present_model
    scale: int | None = setting(None, ge=1)  # with a family name (fsrcnn): picks fsrcnn-x<scale>; else must match
    model_dir: Path | None = None  # default: the download cache (see models.files.default_model_dir)
    model_base_url: str | None = None  # a mirror for `models pull` (default: each model's pinned public URL)
    engine: str = setting("auto", choices=("auto", "opencv", "onnxruntime", "torch"))
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    # auto: fp16 on CUDA, fp32 on a CPU; bf16: torch, on CUDA or a CPU that computes it (AVX512-BF16, AMX)
    precision: str = setting("auto", choices=("auto", "fp32", "fp16", "bf16"))
    threads: int = setting(0, ge=0)  # engine threads; 0 = library default
    # items in the engine at once, side by side (each its own engine call and encode); 0: the engine's choice
    # (onnxruntime on a CPU: 2, at most the cores; every other engine, and grouped calls on a GPU: 1)
    lanes: int = setting(0, ge=0, le=16)

    # resize policy and refusal limits (the limits apply to every input, whatever the policy)
    policy: str = setting("tile", choices=("tile", "cap"))
    tile: int = setting(0, ge=0)  # tile side in input px (a memory bound, not a quality knob); 0: the engine's choice
    tile_batch: int = setting(0, ge=0)  # tiles per engine call; 0: the engine's choice (1 on CPU, several on a GPU)
    cap_side: int = setting(500, ge=1)  # policy=cap: longest input side before upscaling (the seed's way)
    max_bytes: int = setting(200 * 1024 * 1024, ge=1)
    max_pixels: int = setting(50_000_000, ge=1)  # input width*height*frames, checked on the header
    max_side: int = setting(30_000, ge=1)
    min_side: int = setting(1, ge=1)
    # the output, checked on the header before any pixel is decoded (width*height*frames after upscaling)
    max_output_pixels: int = setting(300_000_000, ge=1)

    # output
    # also jpg and tif (stored as jpeg, tiff)
    format: str = setting("keep", choices=("keep", "png", "jpeg", "webp", "tiff"), clean=_format_alias)
    jpeg_quality: int = setting(95, ge=1, le=100)
    webp_quality: int = setting(95, ge=1, le=100)
    # PNG: fast (pipeline/png.py: UP filter, ISA-L deflate; the quickest, ~4 % larger than level 1) or libpng's
    # zlib level 0-9 (1 is ~4x slower, 6 ~17x slower for ~12 % smaller files, 9 ~80x for ~14 %; docs/benchmarks.md).
    # Changes the output bytes, so it is part of what "already done" means (pipeline/ledger.py). A string or an int.
    png_compression: str = setting("fast", choices=("fast", *map(str, range(10))), clean=_png_level)
    quality: int | None = setting(None, ge=1, le=100)  # both of the above, unless one is given itself (from_values)
    suffix: str = setting("", clean=_plain_suffix)  # output names NAME{suffix}.ext (e.g. "_x3": photo_x3.png); default none
    overwrite: bool = False  # process again what the ledger says is done, and publish over its output

    # exactly-once bookkeeping
    dedup: bool = True
    # copy the first output to the duplicate's name, or only record it
    on_duplicate: str = setting("copy", choices=("copy", "record"))
    # what happens to an inbox file once it is settled
    disposition: str = setting("keep", choices=("keep", "move", "delete"))
    lease_s: float = setting(600.0, gt=0)  # a claim not renewed for this long (or whose process is gone) is taken over
    heartbeat_s: float = setting(0.0, ge=0)  # worker: SQS visibility renewal period; 0: a third of visibility_s

    # watch mode
    poll: bool = False
    settle_s: float = setting(1.0, ge=0)  # quiet time after a writer's close before a file is taken
    rescan_s: float = setting(30.0, gt=0)

    # watch and worker: /metrics and /healthz on METRICS_HOST:PORT (0: off); a port already taken is a warning.
    # Loopback unless told otherwise: the container and the manifests say 0.0.0.0 explicitly.
    metrics_port: int = setting(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # serve: the HTTP API and upload page on HOST:PORT (loopback unless told otherwise; the container says 0.0.0.0);
    # /metrics and /healthz are served there too (metrics_port is not used)
    host: str = "127.0.0.1"
    port: int = setting(8080, ge=0, le=65535)
    api_token: str | None = None  # a bearer token required on every endpoint but /healthz (and the static page)
    cors_origins: str = ""  # comma-separated origins allowed by CORS ("*": any); empty: no CORS headers
    queue_max: int = setting(16, ge=1)  # uploads waiting for the pipeline; more are answered 503 + Retry-After
    result_ttl_s: float = setting(3600.0, gt=0)  # results (and failure records) are removed this long after made

    log_format: str = setting("text", choices=("text", "json"))
    log_level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self):
        """Every field coerced to its type and checked (also after `dataclasses.replace`); all problems at once."""
        problems = []
        for spec in fields(self):
            try:
                setattr(self, spec.name, checked(spec, getattr(self, spec.name)))
            except ValueError as exc:
                problems.append(f"{spec.name}: {exc}")
        if problems:
            raise ConfigError(f"invalid settings: {'; '.join(problems)}")

    @classmethod
    def from_values(cls, values: dict) -> "Settings":
        """Settings from the values given (strings or typed; an unknown name is a TypeError). `quality` sets
        jpeg_quality and webp_quality unless one is among the values itself: --jpeg-quality given too wins."""
        settings = cls(**values)
        if settings.quality is not None:
            for name in ("jpeg_quality", "webp_quality"):
                if name not in values:
                    setattr(settings, name, settings.quality)
        return settings

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in fields(cls))

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The values a choice field (engine, format, ...) allows; () for the others."""
        return {spec.name: spec.metadata.get("choices") or () for spec in fields(cls)}[name]

    def as_json_dict(self) -> dict:
        """Every setting, JSON-ready (paths as strings), in the table's order: what `superres info` prints."""
        return {spec.name: str(value) if isinstance(value := getattr(self, spec.name), Path) else value
                for spec in fields(self)}

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


# ------------------------------------------------------------------------- coercion and checks (pure) --------

_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def to_int(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():  # 2.0, as pydantic took it
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)  # surrounding blanks, a sign and 1_000 as Python reads them
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and number.is_integer():  # "2.0"
            return int(number)
    raise ValueError(f"must be an integer (got {value!r})")


def to_float(value) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or number != number:  # not a number, or NaN
        raise ValueError(f"must be a number (got {value!r})")
    return number


def to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"must be true or false (1/0, yes/no, on/off) (got {value!r})")


def to_str(value) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"must be a string (got {value!r})")


def to_path(value) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError(f"must be a path (got {value!r})")


CONVERTERS = {int: to_int, float: to_float, bool: to_bool, str: to_str, Path: to_path}


def checked(spec, value):
    """One field's value as given (a string from the environment, or typed) -> its type, within its limits and
    choices; a ValueError says what is wanted and what was given. Optional fields take None or "" as not set."""
    kind, optional = spec.type, False
    if isinstance(kind, UnionType):  # `int | None`
        kind, optional = next(t for t in kind.__args__ if t is not type(None)), True
    if spec.metadata.get("clean"):
        value = spec.metadata["clean"](value)
    if optional and (value is None or value == ""):
        return None
    value = CONVERTERS[kind](value)
    rules = spec.metadata
    if rules.get("choices") and value not in rules["choices"]:
        raise ValueError(f"must be one of {', '.join(rules['choices'])} (got {value!r})")
    # written `not (a >= b)` so that a NaN fails as well
    if rules.get("ge") is not None and not value >= rules["ge"]:
        raise ValueError(f"must be at least {rules['ge']} (got {value!r})")
    if rules.get("le") is not None and not value <= rules["le"]:
        raise ValueError(f"must be at most {rules['le']} (got {value!r})")
    if rules.get("gt") is not None and not value > rules["gt"]:
        raise ValueError(f"must be greater than {rules['gt']} (got {value!r})")
    return value


# ------------------------------------------------------------------------------------ the sources ---------

def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines as python-dotenv reads them (comments, `export `, quotes and their escapes, values over
    several lines), without ${VAR} expansion; a line with no `=` sets nothing. Imported only when there is a
    `.env` to read: most starts have none and pay nothing for it."""
    import io

    from dotenv import dotenv_values

    return {key: value for key, value in dotenv_values(stream=io.StringIO(text), interpolate=False).items()
            if value is not None}


def read_dotenv(path: str = DOTENV_FILE) -> dict[str, str]:
    """The `.env` file's pairs; none when there is no such file."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            return parse_dotenv(file.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {os.path.abspath(path)}: {exc}") from None


def superres_values(variables) -> dict[str, str]:
    """The SUPERRES_<FIELD> entries (the name in any case) by field name; other names, even SUPERRES_ ones that
    are no setting, are not ours to judge and are left out."""
    names = set(Settings.field_names())
    picked = {}
    for key, value in variables.items():
        name = key[len(ENV_PREFIX):].lower()
        if key[:len(ENV_PREFIX)].upper() == ENV_PREFIX and name in names:
            picked[name] = value
    return picked


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
    """Defaults, then `.env` in the current directory, then the environment, then the CLI's explicit flags
    (`None` means "not given"): each later source wins."""
    given = {**superres_values(read_dotenv()), **superres_values(os.environ),
             **{key: value for key, value in overrides.items() if value is not None}}
    settings = Settings.from_values(given)
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
