"""The inbox watcher: a real watchdog observer around the pure rules of pipeline.intake.

Only top-level entries of the inbox are inputs. The observer thread only queues raw events; all decisions
(and every ReadinessTracker call) happen in the caller's thread inside next_ready(), so no locks are needed.

How a file becomes ready (see pipeline.intake.ReadinessTracker):
- inotify (default): closed after write, then quiet for settle_s (no further event, the same size and mtime
  at a look after that) -> ready; a writer that closes and reopens the file starts the wait again.
  Created/modified -> in flight until closed.
- renamed or moved in -> ready at once (a rename is atomic). Writing under a temporary name (x.jpg.part)
  and renaming it in is the recommended way to drop files: no wait, and no half-written file is ever taken.
- poll=True (network/FUSE mounts, no close events): only by stability of (size, mtime) for settle_s.
- files already there at start: ready at once when their mtime is older than settle_s, else after settle_s.
- a rescan every rescan_s lists the inbox: it heals events lost to an inotify queue overflow (watchdog
  only logs those) and takes files that had no usable event by stability.
A file waiting to settle is looked at once after its last event and again just before it is handed out;
next_ready() wakes when the first wait ends, so no wait lasts until the rescan.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from pipeline.intake import ReadinessTracker, is_temp_name

try:
    from watchdog.observers.inotify import InotifyObserver
except Exception:  # not Linux: no close events, so fall back to polling and stability
    InotifyObserver = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)


class _LastEventAtStop(logging.Filter):
    """watchdog 7 logs an ERROR when its emitter, stopping, still gets one last event ("queue_events() called
    when the thread is inactive"; about one stop in eight here). We are stopping: the event is not wanted, and
    an ERROR line on a clean stop would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_LastEventAtStop())


class _Enqueue(FileSystemEventHandler):
    """Runs in the observer thread: hand every event to the caller's thread, untouched."""

    def __init__(self, events: queue.Queue[FileSystemEvent]) -> None:
        self._events = events

    def dispatch(self, event: FileSystemEvent) -> None:
        self._events.put(event)


class InboxWatcher:
    def __init__(
        self,
        inbox: Path,
        *,
        poll: bool = False,
        settle_s: float = 1.0,
        rescan_s: float = 30.0,
        poll_interval_s: float = 1.0,
        ignore: Callable[[str], bool] = is_temp_name,
        exclude: frozenset[str] = frozenset(),
        inflight_timeout_s: float = 300.0,
    ) -> None:
        self._inbox = Path(inbox)
        self._root = os.path.abspath(inbox)  # event paths are built on this exact string
        self._poll = poll or InotifyObserver is None
        self._settle_s = settle_s
        self._rescan_s = rescan_s
        self._poll_interval_s = poll_interval_s
        self._ignore = ignore
        self._exclude = exclude
        self._tracker = ReadinessTracker(settle_s, inflight_timeout_s)
        # not a SimpleQueue: its C get(timeout) takes a deadline passed while a signal handler ran (SIGTERM's, on
        # this thread) for "wait forever" (CPython 3.11), and a watch asked to stop waited for the next event
        self._events: queue.Queue[FileSystemEvent] = queue.Queue()
        self._observer: BaseObserver | None = None
        self._ready: dict[str, None] = {}  # ready, not yet handed out (an insertion-ordered set)
        self._out: set[str] = set()  # handed out, done() not yet called
        self._again: set[str] = set()  # became ready again while handed out
        self._next_rescan = 0.0

    # Lifecycle.

    def start(self) -> None:
        if self._poll:
            observer: BaseObserver = PollingObserver(timeout=self._poll_interval_s)  # how often it lists the inbox
        else:
            # Full events: a move in from outside arrives as FileMovedEvent("", dest) instead of a
            # FileCreatedEvent that would look like a new file still being written.
            observer = InotifyObserver(generate_full_events=True)
        observer.schedule(_Enqueue(self._events), self._root, recursive=False)
        # The watch is in place when start() returns, so scanning after it misses nothing.
        observer.start()
        self._observer = observer
        now = time.monotonic()
        self._drain(now)
        self._scan(now, startup=True)
        self._next_rescan = now + self._rescan_s

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            if self._observer.is_alive():
                log.warning("the inbox observer did not stop within 10 s")
            self._observer = None

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # The caller's side.

    def next_ready(self, timeout_s: float) -> Path | None:
        """The next ready top-level entry of the inbox, or None after timeout_s. Each is returned once;
        call done(path) when finished with it."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            self._drain(now)
            if now >= self._next_rescan:
                self._scan(now, startup=False)
                self._next_rescan = now + self._rescan_s
            for name in self._tracker.looks_due():  # the first look after an event starts its quiet period
                self._look(name, now)
            for name in self._tracker.ready(now):
                if name in self._out:
                    self._again.add(name)
                else:
                    self._ready[name] = None
            path = self._hand_out(now)
            if path is not None:
                return path
            if now >= deadline:
                return None
            wake = min(deadline, self._next_rescan, self._tracker.next_ready_at())
            try:
                event = self._events.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                continue
            self._apply(event, time.monotonic())

    def done(self, path: Path) -> None:
        """The caller is finished with path. If the file is still there it stays known as it is now, and
        becomes a candidate again only once it changes, or is re-created or renamed in."""
        name = Path(path).name
        self._out.discard(name)
        if not os.path.lexists(self._inbox / name):
            self._again.discard(name)
            self._tracker.forget(name)
        elif name in self._again:
            # Written again while the caller had it: offer it again.
            self._again.discard(name)
            self._ready[name] = None

    # Internals.

    def _hand_out(self, now: float) -> Path | None:
        while self._ready:
            name = next(iter(self._ready))
            del self._ready[name]
            if not self._tracker.is_taken(name):  # changed while queued: it comes back when ready again
                continue
            path = self._inbox / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                self._tracker.forget(name)
                continue
            if stat.S_ISREG(st.st_mode):
                # The look after its quiet period, which also records the state it is taken in (so that
                # done() can tell a later change from none).
                self._tracker.on_seen(name, st.st_size, st.st_mtime_ns, now)
                if not self._tracker.is_taken(name):  # it changed with no event seen: it waits again
                    continue
            self._out.add(name)
            return path
        return None

    def _drain(self, now: float) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._apply(event, now)

    def _top(self, path: bytes | str) -> str | None:
        """The entry name if path is a top-level entry of the inbox."""
        path = os.fsdecode(path)
        if not path or os.path.dirname(path) != self._root:
            return None
        return os.path.basename(path)

    def _wanted(self, name: str) -> bool:
        return name not in self._exclude and not self._ignore(name)

    def _apply(self, event: FileSystemEvent, now: float) -> None:
        kind = event.event_type
        src = self._top(event.src_path)
        if kind == "moved":
            if src is not None:
                self._tracker.forget(src)
            dest = self._top(event.dest_path)
            if dest is not None and self._wanted(dest):
                self._arrived(dest, now, renamed=True)
            return
        if src is None:
            return
        if kind == "deleted":
            self._tracker.forget(src)
        elif not self._wanted(src):
            return
        elif kind == "created":
            self._arrived(src, now, renamed=False)
        elif kind == "closed" and not self._poll:
            self._tracker.on_closed(src, now)
        elif kind == "modified" and not event.is_directory:
            if self._poll:
                self._look(src, now)
            else:
                self._tracker.on_written(src, now)
        elif kind == "attrib" and not event.is_directory:
            self._tracker.on_attrib(src, now)  # chmod/utime (cp -p sets times after close): a change, not a writer
            self._look(src, now)
        # opened / closed_no_write (readers, our own pipeline) and directory modifications: nothing to do.

    def _arrived(self, name: str, now: float, *, renamed: bool) -> None:
        """A new entry appeared by an event (created, or renamed/moved in)."""
        try:
            st = os.lstat(self._inbox / name)
        except FileNotFoundError:
            return  # already gone again; its own event follows
        if not stat.S_ISREG(st.st_mode):
            self._tracker.on_complete(name, now)  # directories, symlinks: nothing to wait for, the pipeline decides
        elif renamed:
            self._tracker.on_complete(name, now)  # a rename is atomic: the content is complete
        elif self._poll:
            self._tracker.on_seen(name, st.st_size, st.st_mtime_ns, now)
        elif st.st_nlink > 1:
            # A hard link: IN_CREATE only, no writer of ours will close it. Take it by stability.
            self._tracker.on_seen(name, st.st_size, st.st_mtime_ns, now)
        else:
            self._tracker.on_written(name, now)  # created by open(): a writer holds it

    def _look(self, name: str, now: float) -> None:
        try:
            st = os.lstat(self._inbox / name)
        except FileNotFoundError:
            self._tracker.forget(name)
            return
        if stat.S_ISREG(st.st_mode):
            self._tracker.on_seen(name, st.st_size, st.st_mtime_ns, now)
        elif not self._tracker.is_taken(name):
            self._tracker.on_complete(name, now)  # now a directory or symlink: nothing to wait for

    def _scan(self, now: float, *, startup: bool) -> None:
        """List the inbox and feed what is there; forget what is gone."""
        present = set()
        wall = time.time()
        try:
            with os.scandir(self._root) as entries:
                for entry in entries:
                    name = entry.name
                    if not self._wanted(name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    present.add(name)
                    if not stat.S_ISREG(st.st_mode):
                        if name not in self._tracker:
                            self._tracker.on_complete(name, now)
                        continue
                    # At startup a file untouched for settle_s, with no event seen, is complete.
                    settled = startup and wall - st.st_mtime_ns / 1e9 >= self._settle_s
                    self._tracker.on_seen(name, st.st_size, st.st_mtime_ns, now, settled=settled)
        except OSError as exc:  # e.g. a network mount briefly away: try again at the next rescan
            log.warning("cannot list the inbox %s: %s", self._root, exc)
            return
        for name in self._tracker.names():
            if name not in present:
                self._tracker.forget(name)
