"""`superres watch --inbox s3://bucket/prefix/`: poll the prefix with ListObjectsV2 every --rescan-s and take
each object once (the ledger remembers across restarts; a listing's size+ETag is the fingerprint). Objects go
through the stage runner several at a time, so that the engine never waits on downloads, decoding, encoding or
uploads; SIGTERM: take nothing more, finish the items in hand, stop."""

import logging
import time

from handler.ops import Ops
from handler.runtime import loop_guard, open_processor
from handler.stop import Backoff, StopFlag, how_it_ended
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.adapters.s3_place import S3Object
from pipeline.events import ObjectRef, drop_loops
from pipeline.errors import TransientError
from pipeline.intake import is_temp_name
from pipeline.s3keys import parse_s3_uri, relative_key
from pipeline.stages import REMOTE_READERS, StageRunner, Window, in_flight_for

log = logging.getLogger("superres")


def run_s3_watch(settings) -> int:
    bucket, prefix = parse_s3_uri(settings.inbox)
    stop = StopFlag()  # before the engine loads: a SIGTERM during start-up is a clean stop too
    processor = open_processor(settings, "watch")
    ops = Ops.for_processor(processor, interval_s=settings.rescan_s)  # one listing per rescan_s
    objects = S3Objects(s3_client(settings.s3_endpoint_url))
    guard = loop_guard(settings)
    processed = parse_s3_uri(settings.processed) if settings.processed else None
    seen: set[tuple[str, str]] = set()  # (key, etag) settled in this process: spares a ledger read per poll
    ops.serve(settings.metrics_port, settings.metrics_host)
    log.info("watching", extra={"fields": {"inbox": settings.inbox, "outbox": settings.outbox}})
    outage = Backoff()
    limit = in_flight_for(processor, settings.in_flight, REMOTE_READERS)
    runner = StageRunner(processor, queue_max=limit, readers=REMOTE_READERS)
    window = Window(runner, limit, track=ops.in_flight)

    def settle_done(*, wait_s: float = 0.0) -> None:
        if wait_s:
            window.wait(wait_s)
        for ref, result in window.take():
            ops.record(result, log_line=result.outcome != "skipped")
            if not result.retryable:
                seen.add((ref.key, ref.etag))

    def taking() -> bool:
        return not stop.set and not processor.engine_failure and runner.failure is None

    try:
        while taking():
            ops.heartbeat()
            started = time.monotonic()
            try:
                listing = [ObjectRef(i.bucket, i.key, i.size, i.etag) for i in objects.list(bucket, prefix)]
                outage.reset()
            except TransientError as exc:  # an outage of any length: wait and list again
                log.warning("cannot list the inbox (%s); retrying in %.0f s", exc.message, outage.peek())
                stop.sleep(outage.next())
                continue
            refs, _ = drop_loops(listing, guard)  # the outbox may sit inside the inbox prefix
            for ref in refs:
                settle_done()
                if not taking():
                    break
                in_hand = {(r.key, r.etag) for r in window.tags()}
                if (ref.key, ref.etag) in seen or (ref.key, ref.etag) in in_hand or \
                        is_temp_name(ref.key.rpartition("/")[2]):
                    continue
                while not window.room() and taking():
                    ops.heartbeat()
                    settle_done(wait_s=0.5)  # the engine has enough: wait for one to be done
                if not taking():
                    break
                src = S3Object(objects, bucket, ref.key, relative_key(ref.key, prefix), size=ref.size, etag=ref.etag,
                               processed=processed)
                window.submit(src, ref)
            while taking() and time.monotonic() - started < settings.rescan_s:
                ops.heartbeat()
                if len(window):
                    settle_done(wait_s=0.2)
                else:
                    stop.sleep(0.2)
    finally:
        try:
            runner.close()  # what is in hand is finished, and settled here
            for ref, result in window.take(all=True):
                ops.record(result, log_line=result.outcome != "skipped")
        finally:
            processor.close()
    return how_it_ended(processor, ops)
