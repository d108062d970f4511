"""What every entrypoint builds once: the engine (cold start), the places, the ledger, the processor."""

from pathlib import Path

from models.engines import load_engine
from pipeline.errors import ConfigError
from pipeline.process import Options, Processor
from pipeline.s3keys import is_s3_uri, parse_s3_uri
from pipeline.settings import timing_problems


def open_processor(settings, mode: str = "oneshot", *, max_receive_count: int | None = None) -> Processor:
    """Check the settings, load the engine, then open the places and the ledger: a refused configuration
    (a bad device, impossible timings) leaves nothing behind."""
    options = Options.from_settings(settings)
    if settings.outbox is None:
        raise ConfigError("give an outbox: --out/--outbox DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    failed = settings.failed_location()
    ledger_at = settings.ledger_location()
    for location in (settings.outbox, failed, ledger_at):
        if is_s3_uri(location):
            parse_s3_uri(location)  # a bad bucket name is a set-up error, said now
    problems = timing_problems(settings, mode, max_receive_count=max_receive_count)
    if problems:
        raise ConfigError("; ".join(problems))
    engine, spec = load_engine(settings)  # after the cheap checks above, before anything is created
    clients = _Clients(settings.s3_endpoint_url)
    outbox, failed_place = open_place(settings.outbox, clients), open_place(failed, clients)
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
