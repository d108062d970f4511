"""`superres watch`: a real watchdog observer on the inbox; each ready file goes through the pipeline.
SIGTERM/SIGINT finish the item in hand, then stop cleanly (exit 0)."""

import heapq
import logging
import signal
import time
from pathlib import Path

from handler.inbox_watch import InboxWatcher
from handler.runtime import open_processor
from pipeline.errors import ConfigError
from pipeline.process import Result, Source

log = logging.getLogger("superres")

RETRY_DELAYS_S = (1, 5, 30, 120, 600)  # transient errors; after the last one the item waits for the next change


def run_watch(settings) -> int:
    if settings.inbox is None or settings.outbox is None:
        raise ConfigError("watch needs --inbox DIR and --outbox DIR (or SUPERRES_INBOX / SUPERRES_OUTBOX)")
    inbox = settings.inbox
    if not inbox.is_dir():
        raise ConfigError(f"the inbox {inbox} is not a folder")
    processor = open_processor(settings)
    # Subfolders the pipeline itself writes into, when they sit inside the inbox, are not inputs.
    exclude = frozenset(
        p.name for p in (processor.opt.outbox, processor.opt.failed, processor.opt.processed)
        if p is not None and p.resolve().parent == inbox.resolve()
    )
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        log.info("stopping after the item in hand", extra={"fields": {"signal": signal.Signals(signum).name}})
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    watcher = InboxWatcher(inbox, poll=settings.poll, settle_s=settings.settle_s, rescan_s=settings.rescan_s,
                           exclude=exclude)
    watcher.start()
    log.info("watching", extra={"fields": {"inbox": str(inbox), "outbox": str(settings.outbox), "poll": settings.poll}})
    retries: list[tuple[float, str]] = []  # (due, name), a heap
    attempts: dict[str, int] = {}
    try:
        while not stopping:
            path = _next(watcher, retries, inbox)
            if path is None:
                continue
            try:
                result = processor.process(Source(path, Path(path.name), inbox))
            except Exception as exc:  # e.g. the failed place itself is not writable: retry later, keep running
                log.exception("could not settle %r", path.name)
                result = Result(Source(path, Path(path.name), inbox), "retry", detail=str(exc))
            log.info("item", extra={"fields": {"name": path.name, "outcome": result.outcome,
                                               "output": str(result.output or ""), "detail": result.detail,
                                               **{f"{k}_s": round(v, 4) for k, v in result.seconds.items()}}})
            if result.outcome == "retry":
                attempt = attempts.get(path.name, 0)
                if attempt < len(RETRY_DELAYS_S):
                    attempts[path.name] = attempt + 1
                    heapq.heappush(retries, (time.monotonic() + RETRY_DELAYS_S[attempt], path.name))
            else:
                attempts.pop(path.name, None)
            watcher.done(path)
    finally:
        watcher.stop()
        processor.ledger.close()
    log.info("stopped")
    return 0


def _next(watcher: InboxWatcher, retries: list, inbox: Path) -> Path | None:
    if retries and retries[0][0] <= time.monotonic():
        _, name = heapq.heappop(retries)
        path = inbox / name
        return path if path.exists() or path.is_symlink() else None
    return watcher.next_ready(0.5)
