"""`superres watch --inbox s3://bucket/prefix/`: poll the prefix with ListObjectsV2 every --rescan-s and take
each object once (the ledger remembers across restarts; a listing's size+ETag is the fingerprint)."""

import logging
import time

from handler.ops import Ops
from handler.runtime import loop_guard, open_processor
from handler.watch import StopFlag
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.adapters.s3_place import S3Object
from pipeline.events import ObjectRef, drop_loops
from pipeline.intake import is_temp_name
from pipeline.s3keys import parse_s3_uri, relative_key

log = logging.getLogger("superres")


def run_s3_watch(settings) -> int:
    bucket, prefix = parse_s3_uri(settings.inbox)
    processor = open_processor(settings)
    ops = Ops.for_processor(processor, interval_s=settings.rescan_s)  # one listing per rescan_s
    objects = S3Objects(s3_client(settings.s3_endpoint_url))
    guard = loop_guard(settings)
    processed = parse_s3_uri(settings.processed) if settings.processed else None
    stop = StopFlag()
    seen: set[tuple[str, str]] = set()  # (key, etag) settled in this process: spares a ledger read per poll
    ops.serve(settings.metrics_port)
    log.info("watching", extra={"fields": {"inbox": settings.inbox, "outbox": settings.outbox}})
    while not stop.set:
        ops.heartbeat()
        started = time.monotonic()
        listing = [ObjectRef(info.bucket, info.key, info.size, info.etag) for info in objects.list(bucket, prefix)]
        refs, _ = drop_loops(listing, guard)  # the outbox may sit inside the inbox prefix
        for ref in refs:
            if stop.set:
                break
            if (ref.key, ref.etag) in seen or is_temp_name(ref.key.rpartition("/")[2]):
                continue
            src = S3Object(objects, bucket, ref.key, relative_key(ref.key, prefix), size=ref.size, etag=ref.etag,
                           processed=processed)
            with ops.in_flight():
                result = processor.process(src)
            ops.record(result, log_line=result.outcome != "skipped")
            if result.outcome != "retry":
                seen.add((ref.key, ref.etag))
        while not stop.set and time.monotonic() - started < settings.rescan_s:
            ops.heartbeat()
            time.sleep(0.2)
    processor.ledger.close()
    log.info("stopped")
    return 0
