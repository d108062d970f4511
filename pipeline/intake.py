"""Watch-folder intake rules: which inbox names to ignore, and when a file is ready to be taken.

Pure: no clocks, no file system. The caller passes in what it saw (events, stat results) and `now`
(monotonic seconds), so every rule can be tested with plain numbers.
"""

from __future__ import annotations

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


@dataclass
class _Entry:
    sig: tuple[int, int] | None = None  # (size, mtime_ns) at the last look; None: unknown since the last event
    since: float = 0.0  # when `sig` was first seen
    last_look: float = 0.0  # when `sig` was last seen
    inflight: bool = False  # a write event was seen and no close yet
    closed: bool = False  # closed after write and not yet returned
    taken: bool = False  # returned by ready(); not again until it changes


class ReadinessTracker:
    """Decides when each inbox file is ready to be taken.

    Ready when (1) closed by its writer, or (2) stable: the same (size, mtime_ns) at two looks at least
    `settle_s` apart. A file with a write event and no close is in flight: it needs `inflight_timeout_s`
    without change instead, since a writer may keep a file open and idle for a long time.

    A returned name is remembered (with its last size and mtime) until forget(): it is returned again
    only after a new event or a look that shows a different size or mtime.
    """

    def __init__(self, settle_s: float, inflight_timeout_s: float = 300.0) -> None:
        self.settle_s = settle_s
        self.inflight_timeout_s = inflight_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._open: dict[str, None] = {}  # names not taken (insertion-ordered set): ready() only looks at these

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry()
            self._open[name] = None
        return entry

    def _reopen(self, name: str, entry: _Entry) -> None:
        entry.taken = False
        self._open[name] = None

    def on_written(self, name: str, now: float) -> None:
        """A created/modified event: in flight, and what we looked at before no longer counts."""
        entry = self._entry(name)
        entry.inflight, entry.closed, entry.sig = True, False, None
        self._reopen(name, entry)

    def on_closed(self, name: str, now: float) -> None:
        """Closed after write (or otherwise known complete, e.g. renamed in): ready at once."""
        entry = self._entry(name)
        entry.inflight, entry.closed, entry.sig = False, True, None
        self._reopen(name, entry)

    def on_seen(self, name: str, size: int, mtime_ns: int, now: float, *, settled: bool = False) -> None:
        """A stat() of the file. `settled`: the caller knows it already looked like this settle_s ago
        (its mtime is older than that and no event was seen), so this one look is enough."""
        entry = self._entry(name)
        sig = (size, mtime_ns)
        if entry.sig == sig:
            entry.last_look = now
            return
        if entry.taken and entry.sig is None:
            # First look after it was returned on close: this is the state it was taken in.
            entry.sig, entry.since, entry.last_look = sig, now, now
            return
        entry.sig, entry.last_look = sig, now
        entry.since = now - self.settle_s if settled and not entry.inflight else now
        if entry.taken:  # changed after it was taken: a candidate again
            self._reopen(name, entry)

    def forget(self, name: str) -> None:
        """The name is gone from the inbox (deleted, moved away)."""
        self._entries.pop(name, None)
        self._open.pop(name, None)

    def ready(self, now: float) -> list[str]:
        """Names ready now, each returned once (until it changes). `now` is part of the interface; readiness
        only changes with what the caller reports, and stability is measured between looks."""
        out = []
        for name in list(self._open):
            entry = self._entries[name]
            if entry.closed or self._stable(entry):
                entry.taken, entry.closed, entry.inflight = True, False, False
                del self._open[name]
                out.append(name)
        return out

    def _stable(self, entry: _Entry) -> bool:
        if entry.sig is None:
            return False
        needed = self.inflight_timeout_s if entry.inflight else self.settle_s
        return entry.last_look - entry.since >= needed - _EPS

    # Queries the adapter needs.

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Every name known (seen and not forgotten)."""
        return list(self._entries)

    def pending(self) -> list[str]:
        """Names waiting for another look to become ready (not taken, not closed)."""
        return [name for name in self._open if not self._entries[name].closed]

    def is_taken(self, name: str) -> bool:
        """Returned by ready() and unchanged since."""
        entry = self._entries.get(name)
        return entry is not None and entry.taken
