"""`superres watch`: a local inbox with a real watchdog observer, or an S3 prefix polled with ListObjectsV2.
Ready objects go through the stage runner (pipeline/stages.py), several in flight so that the engine never waits
on reading, decoding, encoding or publishing. SIGTERM/SIGINT: take nothing more, finish the items in hand, then
stop (exit 0)."""

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
from pipeline.stages import StageRunner, Window, in_flight_for

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
    limit = in_flight_for(processor, settings.in_flight)
    runner = StageRunner(processor, queue_max=limit)
    window = Window(runner, limit, track=ops.in_flight)

    def settle(path: Path, result: Result) -> None:
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

    try:
        while not stop.set and not processor.engine_failure and runner.failure is None:
            ops.heartbeat()
            for path, result in window.take():
                settle(path, result)
            if not window.room():
                window.wait(0.5)  # the engine has enough: wait for one to be done
                continue
            # items in flight: look again soon, to settle them as they are done
            path = _next(watcher, retries, inbox, 0.05 if len(window) else 0.5, busy=set(window.tags()))
            if path is not None:
                window.submit(LocalFile(path, path.name, inbox, processed=processed), path)
    finally:
        try:
            runner.close()  # what is in hand is finished, and settled below
            for path, result in window.take(all=True):
                settle(path, result)
        finally:
            watcher.stop()
            processor.close()
    return how_it_ended(processor, ops)


def _next(watcher, retries: list, inbox: Path, wait_s: float, busy: set) -> Path | None:
    if retries and retries[0][0] <= time.monotonic():
        _, name = heapq.heappop(retries)
        path = inbox / name
        if path in busy:  # handed out again since, and in flight: that one settles it
            return None
        return path if path.exists() or path.is_symlink() else None
    return watcher.next_ready(wait_s)
