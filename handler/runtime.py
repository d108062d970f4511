"""What every entrypoint builds once: the engine (cold start), the places, the ledger, the processor."""

from pathlib import Path

from models.engines import load_engine
from pipeline.errors import ConfigError
from pipeline.process import Options, Processor
from pipeline.s3keys import is_s3_uri, join_key, parse_s3_uri


def open_processor(settings) -> Processor:
    options = Options.from_settings(settings)
    if settings.outbox is None:
        raise ConfigError("give an outbox: --out/--outbox DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    failed = settings.failed_location()
    if is_s3_uri(settings.outbox) != is_s3_uri(failed):
        raise ConfigError("the outbox and the failed place must both be local folders or both be s3:// prefixes")
    on_s3 = is_s3_uri(settings.outbox)
    places = open_s3_places(settings, failed) if on_s3 else open_local_places(settings, failed)
    engine, spec = load_engine(settings)  # after the cheap checks above, before any work
    # S3: no start-up sweep (it would read every ledger row at each cold start); an interrupted publish is
    # finished by the next claim on it instead, once its lease runs out (RESUME_PUBLISH)
    return Processor(engine, spec, options, *places, recover=not on_s3)


def open_local_places(settings, failed: str):
    from pipeline.adapters.local_files import LocalPlace
    from pipeline.adapters.sqlite_ledger import SQLiteLedger, pid_alive

    outbox, failed_place = LocalPlace(Path(settings.outbox)), LocalPlace(Path(failed))
    for place in (outbox, failed_place):
        place.remove_orphans(pid_alive)  # temp files of processes that were killed
    return SQLiteLedger(settings.ledger_path(), lease_s=settings.lease_s), outbox, failed_place


def open_s3_places(settings, failed: str):
    from pipeline.adapters.s3_ledger import S3Ledger
    from pipeline.adapters.s3_objects import S3Objects, s3_client
    from pipeline.adapters.s3_place import S3Place

    client = s3_client(settings.s3_endpoint_url)
    objects = S3Objects(client)
    out_bucket, out_prefix = parse_s3_uri(settings.outbox)
    fail_bucket, fail_prefix = parse_s3_uri(failed)
    # the ledger lives beside the outputs, under the outbox prefix (so the loop guard covers it too)
    ledger = S3Ledger(client, out_bucket, join_key(out_prefix, ".superres/ledger/"), lease_s=settings.lease_s)
    return ledger, S3Place(objects, out_bucket, out_prefix), S3Place(objects, fail_bucket, fail_prefix)


def loop_guard(settings) -> list[tuple[str, str]]:
    """(bucket, prefix) pairs the service writes into: events for objects there are never work."""
    pairs = []
    for location in (settings.outbox, settings.failed_location() if settings.outbox else None):
        if location and is_s3_uri(location):
            pairs.append(parse_s3_uri(location))
    return pairs
