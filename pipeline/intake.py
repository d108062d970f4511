"""Watch-folder intake rules: which inbox names to ignore, and when a file is ready to be taken.

Pure: no clocks, no file system. The caller passes in what it saw (events, stat results) and `now`
(monotonic seconds), so every rule can be tested with plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Names that writers use while a file is incomplete (browsers, curl/wget, editors, rsync, Office).
_TEMP_SUFFIXES = (".part", ".crdownload", ".tmp", ".swp", ".download", ".partial")
# Files the desktop drops on its own; never inputs.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})

# Looks are compared as differences of floats; allow for rounding so "exactly settle_s apart" counts.
_EPS = 1e-6


def is_temp_name(name: str) -> bool:
    """True for names to ignore until renamed to a real name."""
    lower = name.lower()
    return (
        not name
        or name.startswith(".")  # dotfiles: .DS_Store, AppleDouble "._x", rsync's ".x.jpg.AbC123"
        or name.startswith("~$")  # Office lock files
        or name.endswith("~")  # editor backups
        or lower.endswith(_TEMP_SUFFIXES)
        or lower in _JUNK_NAMES
    )


@dataclass(slots=True)
class _Waiting:
    """A name not taken yet."""

    sig: tuple[int, int] | None = None  # (size, mtime_ns) at the last look; None: no look since the last event
    since: float = 0.0  # when `sig` was first seen: the start of the quiet period
    inflight: bool = False  # a write event was seen and no close yet
    complete: bool = False  # known complete (renamed in, not a regular file): ready at once


class ReadinessTracker:
    """Decides when each inbox file is ready to be taken.

    A file is ready once it has been quiet for `settle_s`: no event (written, closed, attrib) and the same
    (size, mtime_ns) from a look after its last event until a look after the quiet period. Every event starts
    the wait again, so a writer that closes and reopens the file (an append in two steps: scanners, SMB and
    FTP servers, `cat a >> f`) is not taken between its two writes. A file with a write event and no close is
    in flight: it needs `inflight_timeout_s` instead, since a writer may keep a file open and idle for long.

    A file renamed or moved into the inbox is complete at once: a rename is atomic, and writing under a
    temporary name and renaming it in is the recommended way to drop a file.

    Time only comes in as `now`. The caller's part:
    - look (stat, on_seen) at every name in looks_due(): the first look after an event starts the quiet period;
    - call ready(now) at or after next_ready_at(), and look at each name it returns before taking it: a
      different size or mtime puts it back to wait (is_taken() turns False).

    A returned name is remembered with its size and mtime until forget(): it is returned again only after a
    new event or a look that shows a different size or mtime. That is one small tuple per file left in the
    inbox (disposition keep), so memory grows with the inbox, not with the items ever seen.
    """

    def __init__(self, settle_s: float, inflight_timeout_s: float = 300.0) -> None:
        self.settle_s = settle_s
        self.inflight_timeout_s = inflight_timeout_s
        self._waiting: dict[str, _Waiting] = {}  # not taken yet: only these are looked at
        self._taken: dict[str, tuple[int, int] | None] = {}  # returned by ready(): the state it was taken in

    def _wait_again(self, name: str) -> _Waiting:
        entry = self._waiting.get(name)
        if entry is None:
            self._taken.pop(name, None)
            entry = self._waiting[name] = _Waiting()
        return entry

    def on_written(self, name: str, now: float) -> None:
        """A created/modified event: in flight, and what we looked at before no longer counts."""
        entry = self._wait_again(name)
        entry.inflight, entry.complete, entry.sig = True, False, None

    def on_closed(self, name: str, now: float) -> None:
        """Closed after write: no longer in flight; ready once quiet for settle_s from the next look."""
        entry = self._wait_again(name)
        entry.inflight, entry.complete, entry.sig = False, False, None

    def on_attrib(self, name: str, now: float) -> None:
        """A chmod/utime event (`cp -p` sets times after its close): the wait starts again at the next look.
        A taken file is only offered again if that look shows a different size or mtime."""
        if name in self._taken:
            return  # the caller's look tells whether it changed
        entry = self._wait_again(name)
        if not entry.complete:  # a renamed-in file stays complete: its content is there
            entry.sig = None

    def on_complete(self, name: str, now: float) -> None:
        """Known complete (renamed or moved in; not a regular file): ready at once."""
        entry = self._wait_again(name)
        entry.inflight, entry.complete, entry.sig = False, True, None

    def on_seen(self, name: str, size: int, mtime_ns: int, now: float, *, settled: bool = False) -> None:
        """A stat() of the file. `settled`: the caller knows it already looked like this settle_s ago
        (its mtime is older than that and no event was seen), so this one look is enough."""
        sig = (size, mtime_ns)
        if name in self._taken:
            taken_as = self._taken[name]
            if taken_as is None:  # first look after it was returned as complete: the state it was taken in
                self._taken[name] = sig
                return
            if taken_as == sig:
                return
            # changed after it was taken: a candidate again
        entry = self._wait_again(name)
        if entry.sig == sig:
            return
        entry.sig = sig
        entry.since = now - self.settle_s if settled and not entry.inflight else now

    def forget(self, name: str) -> None:
        """The name is gone from the inbox (deleted, moved away)."""
        self._waiting.pop(name, None)
        self._taken.pop(name, None)

    def ready(self, now: float) -> list[str]:
        """Names ready at `now`, each returned once (until it changes): complete ones, and those quiet for
        their whole wait by `now`. The caller's look before taking one confirms it (see the class doc)."""
        out = [name for name, entry in self._waiting.items() if self._ready_at(entry) <= now]
        for name in out:
            self._taken[name] = self._waiting.pop(name).sig
        return out

    def looks_due(self) -> list[str]:
        """Names with no look since their last event: look at them now, to start their quiet period."""
        return [name for name, entry in self._waiting.items() if entry.sig is None and not entry.complete]

    def next_ready_at(self) -> float:
        """The earliest `now` at which ready() can return a name (math.inf: none is waiting)."""
        return min(map(self._ready_at, self._waiting.values()), default=math.inf)

    def _ready_at(self, entry: _Waiting) -> float:
        if entry.complete:
            return -math.inf
        if entry.sig is None:
            return math.inf  # no look since the last event: its quiet period has not started
        wait = self.inflight_timeout_s if entry.inflight else self.settle_s
        return entry.since + wait - _EPS

    # Queries the adapter needs.

    def __contains__(self, name: object) -> bool:
        return name in self._waiting or name in self._taken

    def names(self) -> list[str]:
        """Every name known (seen and not forgotten)."""
        return [*self._waiting, *self._taken]

    def is_taken(self, name: str) -> bool:
        """Returned by ready() and unchanged since."""
        return name in self._taken
