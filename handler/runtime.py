"""What every entrypoint builds once: the engine (cold start), the places, the ledger, the processor."""

import os
from pathlib import Path

from models.engines import load_engine
from pipeline.errors import ConfigError
from pipeline.process import Options, Processor, engine_lanes
from pipeline.s3keys import is_s3_uri, parse_s3_uri
from pipeline.settings import timing_problems


def open_processor(settings, mode: str = "oneshot", *, max_receive_count: int | None = None,
                   work_pixels: int | None = None) -> Processor:
    """Check the settings and the places, load the engine, then open the places and the ledger: a refused
    configuration (a bad device, impossible timings, an outbox that is a file, a missing bucket, no credentials,
    an endpoint that does not answer, a missing model) is one ConfigError and leaves nothing behind."""
    options = Options.from_settings(settings)
    if settings.outbox is None:
        raise ConfigError("give an outbox: --out/--outbox DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    if settings.output_file() and mode != "oneshot":
        raise ConfigError(f"the outbox {settings.outbox} is named like an image file: only `superres upscale` "
                          "with one input file writes a single file; give a folder")
    if settings.overwrite and mode != "oneshot":  # every rescan or redelivery would upscale everything again
        raise ConfigError("--overwrite (SUPERRES_OVERWRITE) is for `superres upscale`: a watch or worker would "
                          "process the same inputs again at every look; run `superres upscale --overwrite` once")
    outbox_at = settings.outbox_folder()
    failed = settings.failed_location()
    ledger_at = settings.ledger_location()
    for location in (outbox_at, failed, ledger_at):
        if is_s3_uri(location):
            parse_s3_uri(location)  # a bad bucket name is a set-up error, said now
    problems = timing_problems(settings, mode, max_receive_count=max_receive_count)
    if problems:
        raise ConfigError("; ".join(problems))
    check_places(settings, [("outbox", outbox_at, "folder"), ("failed place", failed, "folder"),
                            ("ledger", ledger_at, "prefix" if is_s3_uri(ledger_at) else "file")])
    engine, spec = _engine(settings, work_pixels)  # after the cheap checks above, before anything is created
    engine_lanes(engine, settings.lanes, settings.tile_batch or engine.default_batch())  # refused before any place
    clients = _Clients(settings.s3_endpoint_url)
    outbox, failed_place = open_place(outbox_at, clients), open_place(failed, clients)
    ledger = open_ledger(ledger_at, settings.lease_s, clients)
    # S3: no start-up sweep (it would read every ledger row at each cold start); an interrupted publish is
    # finished by the next claim on it instead, once its lease runs out (RESUME_PUBLISH)
    processor = Processor(engine, spec, options, ledger, outbox, failed_place, recover=not is_s3_uri(ledger_at))
    # only after recovery: a killed process's staged output is what recovery renames into place
    from pipeline.adapters.sqlite_ledger import pid_alive

    for place in (outbox, failed_place):
        if hasattr(place, "remove_orphans"):
            place.remove_orphans(pid_alive)  # temp files of processes that were killed
    return processor


# Test-only (tests/ and bench/; never set in production): SUPERRES_TEST_ENGINE=FILE.py:FACTORY puts an engine
# double in place of the real engine in a real process: bench/sim_engine.py's simulated GPU. Read here only.
TEST_ENGINE_HOOK = "SUPERRES_TEST_ENGINE"


def _engine(settings, work_pixels: int | None = None):
    hook = os.environ.get(TEST_ENGINE_HOOK)
    if not hook:
        return load_engine(settings, work_pixels=work_pixels)
    import importlib.util

    path, _, factory = hook.rpartition(":")
    spec = importlib.util.spec_from_file_location("superres_test_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, factory)(settings)


def check_places(settings, places: list[tuple[str, str, str]]) -> None:
    """Every place this process writes into can be written, before anything is read or created: a local folder
    (or the ledger's file) is not a file and can be made or written; an S3 bucket exists and answers with our
    credentials (one HEAD each, through a client that gives up within seconds). Each problem is a ConfigError."""
    buckets: dict[str, str] = {}
    for what, location, kind in places:
        if is_s3_uri(location):
            buckets.setdefault(parse_s3_uri(location)[0], what)
        else:
            _check_local(what, Path(location), kind)
    if buckets:
        check_buckets(settings.s3_endpoint_url, buckets)


def _check_local(what: str, path: Path, kind: str) -> None:
    folder = path if kind == "folder" else path.parent
    if kind == "file" and path.is_dir():
        raise ConfigError(f"the {what} {path} is a folder, not a file: give --ledger a file name")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"the {what} {folder} is a file, not a folder: give --{_flag(what)} a folder")
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:  # the nearest part that exists is where it gets made
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"the {what} {folder} cannot be made: {probe} is a file; give --{_flag(what)} another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "written" if probe == folder.absolute() else f"made in {probe}"
        raise ConfigError(f"the {what} {folder} cannot be {verb}: permission denied; give --{_flag(what)} a place "
                          "you can write")


def _flag(what: str) -> str:
    return {"outbox": "out", "failed place": "failed"}.get(what, "ledger")


def check_buckets(endpoint_url: str | None, buckets: dict[str, str]) -> None:
    from pipeline.adapters import aws_errors
    from pipeline.adapters.s3_objects import s3_client

    # its own client: few tries, short timeouts (a refused connection is said within a second or two; a lost
    # answer or a throttle is still tried again). The working client's retries would make a dead endpoint a long
    # wait, then a "retry" for every input.
    client = s3_client(endpoint_url, max_attempts=2, connect_timeout=3, read_timeout=10)
    where = endpoint_url or "AWS S3"
    for bucket, what in buckets.items():
        try:
            aws_errors.call(f"HEAD bucket {bucket}", client.head_bucket, Bucket=bucket, tries=2)
        except aws_errors.AwsFailure as failure:
            kind, exc = failure.kind, failure.cause
            if kind in (aws_errors.NO_BUCKET, aws_errors.MISSING):
                message = f"the {what}'s bucket {bucket!r} does not exist at {where}"
            elif kind == aws_errors.CREDENTIALS:
                message = (f"no usable AWS credentials for the {what}'s bucket {bucket!r} "
                           f"({aws_errors.describe(exc)}): set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            elif kind == aws_errors.DENIED:
                message = f"access to the {what}'s bucket {bucket!r} is denied to these credentials"
            elif kind == aws_errors.BAD_BUCKET:
                message = f"{bucket!r} cannot be a bucket name ({aws_errors.describe(exc)})"
            elif kind == aws_errors.TRANSIENT:
                message = f"the S3 endpoint {where} does not answer ({aws_errors.describe(exc)})"
            else:
                message = f"the {what}'s bucket {bucket!r} cannot be used: {aws_errors.describe(exc)}"
            raise ConfigError(" ".join(message.split())) from None


class _Clients:
    """One boto3 client per process, made only when some place is on S3."""

    def __init__(self, endpoint_url: str | None):
        self.endpoint_url = endpoint_url
        self._s3 = None

    def s3(self):
        if self._s3 is None:
            from pipeline.adapters.s3_objects import s3_client

            self._s3 = s3_client(self.endpoint_url)
        return self._s3


def open_place(location: str, clients: _Clients):
    if is_s3_uri(location):
        from pipeline.adapters.s3_objects import S3Objects
        from pipeline.adapters.s3_place import S3Place

        bucket, prefix = parse_s3_uri(location)
        return S3Place(S3Objects(clients.s3()), bucket, prefix)
    from pipeline.adapters.local_files import LocalPlace

    return LocalPlace(Path(location))


def open_ledger(location: str, lease_s: float, clients: _Clients):
    if is_s3_uri(location):
        from pipeline.adapters.s3_ledger import S3Ledger

        bucket, prefix = parse_s3_uri(location)
        return S3Ledger(clients.s3(), bucket, prefix if prefix.endswith("/") or not prefix else prefix + "/",
                        lease_s=lease_s)
    from pipeline.adapters.sqlite_ledger import SQLiteLedger

    return SQLiteLedger(Path(location), lease_s=lease_s)


def loop_guard(settings) -> list[tuple[str, str]]:
    """(bucket, prefix) pairs the service writes into: events for objects there are never work."""
    pairs = []
    if settings.outbox:
        for location in (settings.outbox, settings.failed_location(), settings.ledger_location(), settings.processed):
            if location and is_s3_uri(location):
                pairs.append(parse_s3_uri(location))
    return pairs
