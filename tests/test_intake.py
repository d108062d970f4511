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


def seen(t: ReadinessTracker, name: str, now: float, sig=SIG, **kw) -> None:
    t.on_seen(name, sig[0], sig[1], now, **kw)


def test_closed_is_ready_at_once():
    t = ReadinessTracker(settle_s=2.0)
    t.on_written("a.jpg", 0.0)
    assert t.ready(0.1) == []
    t.on_closed("a.jpg", 0.2)
    assert t.ready(0.2) == ["a.jpg"]


@pytest.mark.parametrize(
    ("looks", "ready_after_last"),
    [
        ([0.0], False),  # one look is never enough
        ([0.0, 1.0], False),  # not settle_s apart
        ([0.0, 2.0], True),  # exactly settle_s apart
        ([0.0, 0.5, 1.0, 1.5, 2.5], True),  # many looks, same state
        ([10.3, 12.3], True),  # float rounding does not lose "exactly settle_s"
    ],
)
def test_stable_twice_across_settle(looks, ready_after_last):
    t = ReadinessTracker(settle_s=2.0)
    for now in looks[:-1]:
        seen(t, "a.jpg", now)
        assert t.ready(now) == []
    seen(t, "a.jpg", looks[-1])
    assert t.ready(looks[-1]) == (["a.jpg"] if ready_after_last else [])


@pytest.mark.parametrize("changed", [(2000, SIG[1]), (SIG[0], SIG[1] + 1)], ids=["size", "mtime"])
def test_change_resets_stability(changed):
    t = ReadinessTracker(settle_s=2.0)
    seen(t, "a.jpg", 0.0)
    seen(t, "a.jpg", 1.5, sig=changed)
    seen(t, "a.jpg", 2.5, sig=changed)
    assert t.ready(2.5) == []  # only 1 s since the change
    seen(t, "a.jpg", 3.5, sig=changed)
    assert t.ready(3.5) == ["a.jpg"]


def test_inflight_not_taken_by_stability_until_timeout():
    t = ReadinessTracker(settle_s=2.0, inflight_timeout_s=300.0)
    t.on_written("a.jpg", 0.0)
    seen(t, "a.jpg", 1.0)
    seen(t, "a.jpg", 30.0)
    assert t.ready(30.0) == []  # stable for far more than settle_s, but a writer may hold it open
    seen(t, "a.jpg", 200.0)
    assert t.ready(200.0) == []
    t.on_written("a.jpg", 250.0)  # still being written: the clock restarts at the next look
    seen(t, "a.jpg", 260.0, sig=(2000, SIG[1] + 5))
    seen(t, "a.jpg", 400.0, sig=(2000, SIG[1] + 5))
    assert t.ready(400.0) == []
    seen(t, "a.jpg", 560.0, sig=(2000, SIG[1] + 5))
    assert t.ready(560.0) == ["a.jpg"]


def test_inflight_then_closed_is_ready():
    t = ReadinessTracker(settle_s=2.0)
    t.on_written("a.jpg", 0.0)
    seen(t, "a.jpg", 1.0)
    t.on_closed("a.jpg", 1.5)
    assert t.ready(1.5) == ["a.jpg"]


def test_write_after_close_cancels_it():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    t.on_written("a.jpg", 0.1)  # reopened for writing before we took it
    assert t.ready(0.2) == []
    t.on_closed("a.jpg", 0.3)
    assert t.ready(0.3) == ["a.jpg"]


def test_settled_look_is_ready_at_once_unless_in_flight():
    t = ReadinessTracker(settle_s=2.0)
    seen(t, "old.jpg", 5.0, settled=True)
    t.on_written("busy.jpg", 4.9)
    seen(t, "busy.jpg", 5.0, settled=True)  # an event was seen: the mtime proves nothing
    assert t.ready(5.0) == ["old.jpg"]


def test_each_ready_name_returned_once():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    seen(t, "b.jpg", 0.0)
    seen(t, "b.jpg", 2.0)
    assert sorted(t.ready(2.0)) == ["a.jpg", "b.jpg"]
    assert t.ready(2.1) == []
    # Same state seen again later: still not returned again.
    seen(t, "a.jpg", 3.0)  # the state a.jpg was taken in
    seen(t, "a.jpg", 10.0)
    seen(t, "b.jpg", 10.0)
    assert t.ready(10.0) == []
    assert t.is_taken("a.jpg") and t.is_taken("b.jpg")


def test_taken_name_comes_back_when_it_changes():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    assert t.ready(0.0) == ["a.jpg"]
    seen(t, "a.jpg", 0.1)  # baseline: as taken
    seen(t, "a.jpg", 5.0, sig=(3000, SIG[1] + 9))  # changed with no event (e.g. an event lost)
    assert not t.is_taken("a.jpg")
    assert t.ready(5.0) == []
    seen(t, "a.jpg", 7.0, sig=(3000, SIG[1] + 9))
    assert t.ready(7.0) == ["a.jpg"]
    t.on_closed("a.jpg", 8.0)  # rewritten
    assert t.ready(8.0) == ["a.jpg"]


def test_forget():
    t = ReadinessTracker(settle_s=2.0)
    t.on_closed("a.jpg", 0.0)
    seen(t, "b.jpg", 0.0)
    t.forget("a.jpg")
    t.forget("b.jpg")
    t.forget("never-seen.jpg")
    seen(t, "b.jpg", 2.0)  # a new file: its first look again
    assert t.ready(2.0) == []
    assert "a.jpg" not in t and "b.jpg" in t
    assert t.names() == ["b.jpg"]
    # A taken, forgotten, re-created name is a new file.
    t.on_closed("a.jpg", 3.0)
    assert t.ready(3.0) == ["a.jpg"]
    t.forget("a.jpg")
    t.on_closed("a.jpg", 4.0)
    assert t.ready(4.0) == ["a.jpg"]


def test_pending_lists_files_waiting_for_a_look():
    t = ReadinessTracker(settle_s=2.0)
    seen(t, "wait.jpg", 0.0)
    t.on_written("busy.jpg", 0.0)
    t.on_closed("done.jpg", 0.0)
    assert sorted(t.pending()) == ["busy.jpg", "wait.jpg"]
    t.ready(0.0)
    assert sorted(t.pending()) == ["busy.jpg", "wait.jpg"]
