"""The pure intake rules: temp names, and when a file is ready (explicit `now`, no sleeps)."""

import pytest

from pipeline.intake import ReadinessTracker, is_temp_name


@pytest.mark.parametrize(
    ("name", "temp"),
    [
        ("photo.jpg", False),
        ("photo.JPG", False),
        ("a b é\nc.png", False),
        ("x.part.jpg", False),  # only the last suffix counts
        ("tmp.jpg", False),
        ("x~y.jpg", False),
        ("x.jpg.part", True),
        ("x.jpg.PART", True),
        ("x.jpg.crdownload", True),
        ("x.jpg.tmp", True),
        ("x.jpg.swp", True),
        ("x.jpg.download", True),
        ("x.jpg.partial", True),
        ("x.jpg~", True),
        (".DS_Store", True),
        (".hidden.jpg", True),
        (".x.jpg.AbC123", True),  # rsync's temp name
        ("._x.jpg", True),  # macOS AppleDouble
        ("Thumbs.db", True),
        ("thumbs.db", True),
        ("desktop.ini", True),
        ("Desktop.ini", True),
        ("~$x.jpg", True),  # Office lock file
        ("", True),
    ],
)
def test_is_temp_name(name, temp):
    assert is_temp_name(name) is temp


SIG = (1000, 1_700_000_000_000_000_000)  # (size, mtime_ns)
GROWN = (2000, SIG[1] + 5)


def seen(t: ReadinessTracker, name: str, now: float, sig=SIG, **kw) -> None:
    t.on_seen(name, sig[0], sig[1], now, **kw)


def test_closed_is_ready_only_after_settle_from_the_look_after_close():
    t = ReadinessTracker(settle_s=2.0)
    t.on_written("a.jpg", 0.0)
    assert t.ready(0.1) == []
    t.on_closed("a.jpg", 0.2)
    assert t.looks_due() == ["a.jpg"]  # the caller looks at once
    seen(t, "a.jpg", 0.2)
    assert t.looks_due() == []
    assert t.next_ready_at() == pytest.approx(2.2)
    assert t.ready(0.2) == []
    assert t.ready(2.1) == []
    assert t.ready(2.2) == ["a.jpg"]


def test_closed_and_never_looked_at_is_not_ready():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    assert t.ready(100.0) == []
    assert t.next_ready_at() == float("inf")  # its quiet period starts with a look
    assert t.looks_due() == ["a.jpg"]


def reopen_and_append(t: ReadinessTracker, now: float) -> None:
    t.on_written("a.jpg", now)
    t.on_closed("a.jpg", now + 0.1)


@pytest.mark.parametrize(
    ("event", "quiet_from"),
    [
        (reopen_and_append, 1.1),  # the writer reopens and closes again: `cat a >> f`, scanners, SMB, FTP
        (lambda t, now: t.on_closed("a.jpg", now), 1.0),
        (lambda t, now: t.on_attrib("a.jpg", now), 1.0),  # cp -p sets the times after its close
    ],
    ids=["written+closed", "closed", "attrib"],
)
def test_an_event_during_the_quiet_period_starts_it_again(event, quiet_from):
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    seen(t, "a.jpg", 0.0)
    event(t, 1.0)
    assert t.ready(2.0) == []  # 2 s after the first close, but not quiet since
    seen(t, "a.jpg", quiet_from, sig=GROWN)
    assert t.ready(quiet_from + 1.9) == []
    assert t.ready(quiet_from + 2.0) == ["a.jpg"]


def test_complete_is_ready_at_once_and_attrib_keeps_it_so():
    t = ReadinessTracker(settle_s=2.0)
    t.on_complete("moved.jpg", 0.0)  # renamed or moved in: atomic
    t.on_complete("dir.jpg", 0.0)  # not a regular file
    t.on_attrib("moved.jpg", 0.0)
    assert t.looks_due() == []
    assert t.next_ready_at() == float("-inf")
    assert t.ready(0.0) == ["moved.jpg", "dir.jpg"]


@pytest.mark.parametrize(
    ("looks", "now", "ready"),
    [
        ([(0.0, SIG)], 1.9, False),  # not quiet for settle_s yet
        ([(0.0, SIG)], 2.0, True),  # exactly settle_s (the caller confirms with its look before taking it)
        ([(0.0, SIG), (1.0, SIG), (1.5, SIG)], 2.0, True),  # more looks at the same state change nothing
        ([(10.3, SIG)], 12.3, True),  # float rounding does not lose "exactly settle_s"
        ([(0.0, SIG), (1.5, GROWN)], 3.4, False),  # a change starts the wait again ...
        ([(0.0, SIG), (1.5, GROWN)], 3.5, True),  # ... from the look that saw it
        ([(0.0, SIG), (1.5, (SIG[0], SIG[1] + 1))], 3.4, False),  # the mtime alone counts too
    ],
)
def test_stable_for_settle_without_close(looks, now, ready):
    t = ReadinessTracker(settle_s=2.0)
    for at, sig in looks:
        seen(t, "a.jpg", at, sig=sig)
    assert t.ready(now) == (["a.jpg"] if ready else [])


def test_the_callers_look_before_taking_can_send_it_back_to_wait():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    seen(t, "a.jpg", 0.0)
    assert t.ready(2.0) == ["a.jpg"]
    seen(t, "a.jpg", 2.0)  # the look before taking it: unchanged
    assert t.is_taken("a.jpg")
    t.on_closed("b.jpg", 0.0)
    seen(t, "b.jpg", 0.0)
    assert t.ready(2.0) == ["b.jpg"]
    seen(t, "b.jpg", 2.0, sig=GROWN)  # changed with no event (a lost event, or poll mode between listings)
    assert not t.is_taken("b.jpg")
    assert t.ready(3.9) == []
    assert t.ready(4.0) == ["b.jpg"]


def test_inflight_not_taken_by_stability_until_timeout():
    t = ReadinessTracker(settle_s=2.0, inflight_timeout_s=300.0)
    t.on_written("a.jpg", 0.0)
    seen(t, "a.jpg", 1.0)
    assert t.ready(30.0) == []  # stable for far more than settle_s, but a writer may hold it open
    assert t.ready(200.0) == []
    t.on_written("a.jpg", 250.0)  # still being written: the clock restarts at the next look
    seen(t, "a.jpg", 260.0, sig=GROWN)
    assert t.next_ready_at() == pytest.approx(560.0)
    assert t.ready(559.0) == []
    assert t.ready(560.0) == ["a.jpg"]


def test_inflight_then_closed_waits_settle_from_the_close():
    t = ReadinessTracker(settle_s=2.0)
    t.on_written("a.jpg", 0.0)
    seen(t, "a.jpg", 1.0)
    t.on_closed("a.jpg", 1.5)
    seen(t, "a.jpg", 1.5, sig=GROWN)
    assert t.ready(3.4) == []
    assert t.ready(3.5) == ["a.jpg"]


def test_settled_look_is_ready_at_once_unless_in_flight():
    t = ReadinessTracker(settle_s=2.0)
    seen(t, "old.jpg", 5.0, settled=True)  # at start-up, mtime older than settle_s
    seen(t, "fresh.jpg", 5.0)  # at start-up, mtime younger: settle_s from now
    t.on_written("busy.jpg", 4.9)
    seen(t, "busy.jpg", 5.0, settled=True)  # an event was seen: the mtime proves nothing
    assert t.ready(5.0) == ["old.jpg"]
    assert t.next_ready_at() == pytest.approx(7.0)
    assert t.ready(7.0) == ["fresh.jpg"]


def test_each_ready_name_returned_once():
    t = ReadinessTracker(settle_s=2.0)
    t.on_complete("a.jpg", 0.0)
    seen(t, "b.jpg", 0.0)
    assert sorted(t.ready(2.0)) == ["a.jpg", "b.jpg"]
    assert t.ready(2.1) == []
    # Same state seen again later: still not returned again.
    seen(t, "a.jpg", 3.0)  # the state a.jpg was taken in
    seen(t, "a.jpg", 10.0)
    seen(t, "b.jpg", 10.0)
    assert t.ready(20.0) == []
    assert t.is_taken("a.jpg") and t.is_taken("b.jpg")
    assert t.next_ready_at() == float("inf")
    t.on_attrib("b.jpg", 21.0)  # e.g. a chmod of a taken file
    seen(t, "b.jpg", 21.0)  # same size and mtime: nothing new
    assert t.ready(30.0) == [] and t.is_taken("b.jpg")


def test_taken_name_comes_back_when_it_changes():
    t = ReadinessTracker(settle_s=2.0)
    t.on_complete("a.jpg", 0.0)
    assert t.ready(0.0) == ["a.jpg"]
    seen(t, "a.jpg", 0.1)  # baseline: as taken
    seen(t, "a.jpg", 5.0, sig=(3000, SIG[1] + 9))  # changed with no event (e.g. an event lost)
    assert not t.is_taken("a.jpg")
    assert t.ready(6.9) == []
    assert t.ready(7.0) == ["a.jpg"]
    t.on_closed("a.jpg", 8.0)  # rewritten
    assert not t.is_taken("a.jpg")
    seen(t, "a.jpg", 8.0, sig=(4000, SIG[1] + 20))
    assert t.ready(10.0) == ["a.jpg"]


def test_forget():
    t = ReadinessTracker(settle_s=2.0)
    t.on_complete("a.jpg", 0.0)
    seen(t, "b.jpg", 0.0)
    t.forget("a.jpg")
    t.forget("b.jpg")
    t.forget("never-seen.jpg")
    seen(t, "b.jpg", 1.5)  # a new file: its wait starts again
    assert t.ready(2.0) == []
    assert "a.jpg" not in t and "b.jpg" in t
    assert t.names() == ["b.jpg"]
    # A taken, forgotten, re-created name is a new file.
    t.on_complete("a.jpg", 3.0)
    assert t.ready(3.0) == ["a.jpg"]
    t.forget("a.jpg")
    t.on_complete("a.jpg", 3.2)
    assert t.ready(3.2) == ["a.jpg"]
    assert t.ready(3.5) == ["b.jpg"]


def test_looks_due_and_next_ready_at():
    t = ReadinessTracker(settle_s=2.0)
    assert t.looks_due() == [] and t.next_ready_at() == float("inf")
    seen(t, "wait.jpg", 1.0)
    t.on_written("busy.jpg", 0.0)
    t.on_closed("done.jpg", 0.0)
    assert t.looks_due() == ["busy.jpg", "done.jpg"]  # no look since their event
    assert t.next_ready_at() == pytest.approx(3.0)
    seen(t, "done.jpg", 0.5)
    assert t.next_ready_at() == pytest.approx(2.5)
    assert t.looks_due() == ["busy.jpg"]
    t.on_complete("moved.jpg", 0.6)
    assert t.next_ready_at() == float("-inf")  # ready now
    assert t.ready(0.6) == ["moved.jpg"]
    assert t.next_ready_at() == pytest.approx(2.5)
