"""The one stop helper of the long-running modes: SIGTERM/SIGINT set a flag that the loops check between
items (the item in hand is finished), waits that a stop cuts short, and a bounded backoff for outages."""

import logging
import random
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("superres")

# Exit codes: 0 stopped as asked; 1 some items failed (one-shot); 2 bad usage or configuration;
# 3 the engine failed on valid input: the work was given back, restart the process (the orchestrator does)
EXIT_ENGINE_FAILED = 3


class StopFlag:
    """Set by SIGTERM/SIGINT. `on_stop` runs in the signal handler (e.g. to cut a long poll short)."""

    def __init__(self, on_stop: Callable[[], None] | None = None) -> None:
        self._event = threading.Event()
        self._on_stop = on_stop
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    @property
    def set(self) -> bool:
        return self._event.is_set()

    def _stop(self, signum, _frame) -> None:
        log.info("stopping after the item in hand", extra={"fields": {"signal": signal.Signals(signum).name}})
        self._event.set()
        if self._on_stop is not None:
            self._on_stop()

    def sleep(self, seconds: float) -> None:
        """Wait, unless a stop comes first."""
        self._event.wait(seconds)


def how_it_ended(processor, ops, **fields) -> int:
    """The exit code of a long-running mode, after its loop: 0 when it stopped as asked; EXIT_ENGINE_FAILED,
    with /healthz turned to 503, when the engine failed on a valid input and the work in hand was given back."""
    if processor.engine_failure:
        ops.engine_failed(processor.engine_failure)
        log.error("stopping: the engine failed (%s); the work in hand was given back", processor.engine_failure)
        return EXIT_ENGINE_FAILED
    log.info("stopped", extra={"fields": fields})
    return 0


class Backoff:
    """Exponential backoff with full jitter, capped: 1, 2, 4 … up to `cap_s`, for as long as the outage lasts."""

    def __init__(self, first_s: float = 1.0, cap_s: float = 30.0) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self._failures = 0

    def peek(self) -> float:
        return min(self.cap_s, self.first_s * 2 ** self._failures)

    def next(self) -> float:
        delay = random.uniform(0.5, 1.0) * self.peek()
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0
