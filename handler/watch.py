"""`superres watch`: a local inbox with a real watchdog observer, or an S3 prefix polled with ListObjectsV2.
Each ready object goes through the pipeline. SIGTERM/SIGINT finish the item in hand, then stop (exit 0)."""

import heapq
import logging
import time
from pathlib import Path

from handler.ops import Ops
from handler.runtime import open_processor
from handler.stop import StopFlag, how_it_ended
from pipeline.adapters.local_files import LocalFile
from pipeline.errors import ConfigError
from pipeline.process import Result
from pipeline.s3keys import is_s3_uri

log = logging.getLogger("superres")

RETRY_DELAYS_S = (1, 5, 30, 120, 600)  # transient errors; after the last one the item waits for its next change


def run_watch(settings) -> int:
    if settings.inbox is None or settings.outbox is None:
        raise ConfigError("watch needs --inbox and --outbox (folders or s3:// prefixes; or SUPERRES_INBOX / SUPERRES_OUTBOX)")
    if is_s3_uri(settings.inbox):
        from handler.s3_watch import run_s3_watch

        return run_s3_watch(settings)
    inbox = Path(settings.inbox)
    if not inbox.is_dir():
        raise ConfigError(f"the inbox {inbox} is not a folder")
    stop = StopFlag()  # before the engine loads: a SIGTERM during start-up is a clean stop too
    processor = open_processor(settings, "watch")
    ops = Ops.for_processor(processor, interval_s=0.5)  # the loop below wakes at least every 0.5 s
    processed = Path(settings.processed) if settings.processed else inbox / "processed"
    # Folders the pipeline itself writes into, when they sit inside the inbox, are not inputs.
    exclude = frozenset(
        Path(p).name for p in (settings.outbox, settings.failed_location(), processed)
        if not is_s3_uri(str(p)) and Path(p).resolve().parent == inbox.resolve()
    )
    from handler.inbox_watch import InboxWatcher

    watcher = InboxWatcher(inbox, poll=settings.poll, settle_s=settings.settle_s, rescan_s=settings.rescan_s,
                           exclude=exclude)
    watcher.start()
    ops.serve(settings.metrics_port, settings.metrics_host)
    log.info("watching", extra={"fields": {"inbox": str(inbox), "outbox": settings.outbox, "poll": settings.poll}})
    retries: list[tuple[float, str]] = []  # (due, name), a heap
    attempts: dict[str, int] = {}
    try:
        while not stop.set and not processor.engine_failure:
            ops.heartbeat()
            path = _next(watcher, retries, inbox)
            if path is None:
                continue
            src = LocalFile(path, path.name, inbox, processed=processed)
            with ops.in_flight():
                try:
                    result = processor.process(src)
                except Exception as exc:  # e.g. the failed place itself is not writable: retry later, keep running
                    log.exception("could not settle %r", path.name)
                    result = Result(src, "retry", detail=str(exc))
            ops.record(result)
            if result.retryable:
                attempt = attempts.get(path.name, 0)
                if attempt < len(RETRY_DELAYS_S):
                    attempts[path.name] = attempt + 1
                    # a busy claim: when its holder's lease could have run out, if it has not finished by then
                    delay = max(RETRY_DELAYS_S[attempt], result.retry_after_s or 0)
                    heapq.heappush(retries, (time.monotonic() + delay, path.name))
            else:
                attempts.pop(path.name, None)
            watcher.done(path)
    finally:
        watcher.stop()
        processor.close()
    return how_it_ended(processor, ops)


def _next(watcher, retries: list, inbox: Path) -> Path | None:
    if retries and retries[0][0] <= time.monotonic():
        _, name = heapq.heappop(retries)
        path = inbox / name
        return path if path.exists() or path.is_symlink() else None
    return watcher.next_ready(0.5)
