"""InboxWatcher with a real watchdog observer on a real folder (no mocks).

Timeouts are generous (slow CI); the waits that prove something is *not* returned are kept short.
"""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import pytest

from conftest import lr_image
from handler.inbox_watch import InboxWatcher

pytestmark = pytest.mark.timeout(60)

LONG = 30.0  # settle/rescan long enough that only events can make a file ready within a test


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"  # same file system as the inbox
    folder.mkdir()
    return folder


@pytest.fixture
def watch(inbox):
    started = []

    def make(**kw) -> InboxWatcher:
        w = InboxWatcher(inbox, **kw)
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


def collect(w: InboxWatcher, want: set[str], timeout_s: float = 10.0) -> list[str]:
    """Names returned until all of `want` came (or timeout), each marked done."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not want <= set(got) and time.monotonic() < deadline:
        path = w.next_ready(max(0.0, deadline - time.monotonic()))
        if path is not None:
            got.append(path.name)
            w.done(path)
    return got


def drain(w: InboxWatcher, seconds: float) -> list[str]:
    """Everything returned during `seconds`."""
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        path = w.next_ready(left)
        if path is not None:
            got.append(path.name)
            w.done(path)
    return got


def test_file_written_in_chunks_is_returned_after_close_and_whole(watch, inbox):
    w = watch(settle_s=0.2, rescan_s=0.2)  # the pause is longer than settle_s: only "in flight" protects it
    chunk = b"x" * 256 * 1024
    last_write_done = threading.Event()

    def writer():
        with open(inbox / "big.jpg", "wb") as f:
            f.write(chunk)
            f.flush()
            time.sleep(0.5)
            f.write(chunk)
            f.flush()
            last_write_done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        path = w.next_ready(10.0)
        assert path == inbox / "big.jpg"
        assert last_write_done.is_set()
        assert path.stat().st_size == 2 * len(chunk)
    finally:
        thread.join()
    assert w.next_ready(0.3) is None  # returned once


def test_part_file_renamed_is_returned_and_part_never(watch, inbox):
    w = watch(settle_s=LONG, rescan_s=LONG)
    part = inbox / "x.jpg.part"
    with open(part, "wb") as f:
        f.write(b"data")
    os.rename(part, inbox / "x.jpg")
    assert collect(w, {"x.jpg"}) == ["x.jpg"]
    assert w.next_ready(0.3) is None


def test_files_present_before_start_are_returned(watch, inbox):
    old = inbox / "old.jpg"
    old.write_bytes(b"o")
    os.utime(old, (time.time() - 3600,) * 2)
    (inbox / "fresh.jpg").write_bytes(b"f")  # mtime now: taken by stability at a rescan
    (inbox / "folder.jpg").mkdir()  # an entry too: the pipeline records "is a directory"
    (inbox / "link.jpg").symlink_to(old)
    (inbox / "processed").mkdir()
    w = watch(settle_s=0.3, rescan_s=0.3, exclude=frozenset({"processed"}))
    immediate = []
    while (path := w.next_ready(0.0)) is not None:
        immediate.append(path.name)
        w.done(path)
    assert "old.jpg" in immediate  # mtime older than settle_s, no event: complete, no second look needed
    got = immediate + collect(w, {"old.jpg", "fresh.jpg", "folder.jpg", "link.jpg"} - set(immediate))
    assert sorted(got) == ["folder.jpg", "fresh.jpg", "link.jpg", "old.jpg"]
    assert drain(w, 0.7) == []  # "processed" is excluded, and nothing comes twice


def test_file_moved_in_from_another_folder_is_returned(watch, inbox, outside):
    w = watch(settle_s=LONG, rescan_s=LONG)
    (outside / "moved.jpg").write_bytes(b"m")
    (outside / "dir.jpg").mkdir()
    os.rename(outside / "moved.jpg", inbox / "moved.jpg")
    os.rename(outside / "dir.jpg", inbox / "dir.jpg")
    assert sorted(collect(w, {"moved.jpg", "dir.jpg"})) == ["dir.jpg", "moved.jpg"]


def test_temp_and_junk_names_are_never_returned(watch, inbox):
    thumbs = inbox / "Thumbs.db"
    thumbs.write_bytes(b"t")
    os.utime(thumbs, (time.time() - 3600,) * 2)
    w = watch(settle_s=0.2, rescan_s=0.2)  # rescans would take them by stability if not ignored
    for name in (".DS_Store", "~$x.jpg", ".x.jpg.AbC123", "y.jpg.crdownload"):
        (inbox / name).write_bytes(b"junk")
    (inbox / "real.jpg").write_bytes(b"real")
    assert drain(w, 1.2) == ["real.jpg"]


def test_name_with_space_unicode_and_newline(watch, inbox):
    w = watch(settle_s=0.2, rescan_s=LONG)
    name = "a b é\n漢字.jpg"
    (inbox / name).write_bytes(b"n")
    path = w.next_ready(10.0)
    assert path == inbox / name
    assert path.read_bytes() == b"n"


def test_poll_mode_takes_a_file_only_after_settle(watch, inbox):
    settle = 0.5
    w = watch(poll=True, settle_s=settle, poll_interval_s=0.1, rescan_s=LONG)
    last_write = 0.0

    def writer():
        nonlocal last_write
        with open(inbox / "slow.jpg", "wb") as f:
            f.write(b"a" * 1000)
            f.flush()
            time.sleep(0.3)  # shorter than settle: must not be taken in this pause
            f.write(b"b" * 1000)
            f.flush()
            last_write = time.monotonic()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        path = w.next_ready(10.0)
        returned = time.monotonic()
    finally:
        thread.join()
    assert path == inbox / "slow.jpg"
    assert path.stat().st_size == 2000
    assert last_write > 0.0 and returned - last_write >= settle - 0.05
    assert w.next_ready(0.3) is None


def test_file_with_no_close_event_is_taken_once_stable_without_a_rescan(watch, inbox, outside):
    # A hard link gives only IN_CREATE: no close will come. It is taken once stable for settle_s.
    w = watch(settle_s=0.3, rescan_s=LONG)
    (outside / "src.jpg").write_bytes(b"linked")
    os.link(outside / "src.jpg", inbox / "linked.jpg")
    assert collect(w, {"linked.jpg"}, timeout_s=10.0) == ["linked.jpg"]


def test_open_file_not_taken_by_rescan_until_inflight_timeout(watch, inbox):
    w = watch(settle_s=0.2, rescan_s=0.2, inflight_timeout_s=1.5)
    with open(inbox / "held.jpg", "wb"):
        created = time.monotonic()
        # Created and held open, nothing written yet: stable for many times settle_s, but not done.
        assert w.next_ready(0.8) is None
        path = w.next_ready(10.0)
        assert path == inbox / "held.jpg"
        assert time.monotonic() - created >= 1.5


def test_done_file_comes_back_only_when_changed(watch, inbox, outside):
    w = watch(settle_s=0.2, rescan_s=0.2)
    target = inbox / "keep.jpg"
    target.write_bytes(b"1")
    assert collect(w, {"keep.jpg"}) == ["keep.jpg"]  # done(), file kept in place
    assert drain(w, 0.6) == []  # several rescans: unchanged, not again
    with open(target, "ab") as f:  # appended to in two steps: in flight again, not taken in the pause
        f.write(b"2")
        f.flush()
        assert drain(w, 0.6) == []
        f.write(b"3")
    assert collect(w, {"keep.jpg"}) == ["keep.jpg"]
    assert target.read_bytes() == b"123"
    os.rename(target, outside / "keep.jpg")  # moved away ...
    assert drain(w, 0.3) == []
    os.rename(outside / "keep.jpg", target)  # ... and back in
    assert collect(w, {"keep.jpg"}) == ["keep.jpg"]


def test_rewritten_while_handed_out_comes_again_after_done(watch, inbox):
    w = watch(settle_s=0.2, rescan_s=LONG)
    target = inbox / "busy.jpg"
    target.write_bytes(b"1")
    path = w.next_ready(10.0)
    assert path == target
    target.write_bytes(b"22")  # the writer rewrites it while the caller works on it
    assert w.next_ready(0.5) is None  # not handed out twice at once
    w.done(path)
    assert w.next_ready(10.0) == target


def test_stop_returns_promptly(inbox):
    for poll in (False, True):
        w = InboxWatcher(inbox, poll=poll, poll_interval_s=1.0)
        w.start()
        started = time.monotonic()
        w.stop()
        assert time.monotonic() - started < 2.0


# Slow writers and start-up: a close is not the end of a file until it has been quiet for settle_s.


def real_png() -> bytes:
    ok, png = cv2.imencode(".png", lr_image("baby"))
    assert ok
    return png.tobytes()


def test_file_closed_and_reopened_for_append_is_taken_once_and_whole(watch, inbox):
    # Scanners, SMB and FTP servers, `cat a >> f`: a close, a pause, then more data.
    settle = 2.0  # far longer than the writer's pause, even on a loaded machine
    w = watch(settle_s=settle, rescan_s=LONG)
    data = real_png()
    second_close = 0.0

    def writer():
        nonlocal second_close
        with open(inbox / "scan.png", "wb") as f:
            f.write(data[: len(data) // 2])
        time.sleep(0.3)
        with open(inbox / "scan.png", "ab") as f:
            f.write(data[len(data) // 2 :])
        second_close = time.monotonic()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        path = w.next_ready(10.0)
        returned = time.monotonic()
        content = path.read_bytes() if path is not None else None
    finally:
        thread.join()
    assert path == inbox / "scan.png"
    assert second_close > 0.0, "handed out before the second close"
    assert returned - second_close >= settle - 0.05  # quiet for settle_s after the last close
    assert content == data
    w.done(path)
    assert drain(w, settle + 0.5) == []  # exactly once


def test_old_files_present_at_start_are_taken_at_once(watch, inbox):
    data = real_png()
    names = {f"old{i:02d}.png" for i in range(20)}
    for name in names:
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (time.time() - 3600,) * 2)
    started = time.monotonic()
    w = watch(settle_s=1.0, rescan_s=LONG)
    got = collect(w, names, timeout_s=5.0)  # ~1 s; generous for a loaded machine, far below the rescan
    assert sorted(got) == sorted(names)
    assert time.monotonic() - started < 5.0


def test_fresh_file_present_at_start_is_taken_after_settle_not_rescan(watch, inbox):
    settle = 1.0
    (inbox / "fresh.png").write_bytes(real_png())  # mtime now: it may still be written to
    written = time.monotonic()
    w = watch(settle_s=settle, rescan_s=LONG)
    assert w.next_ready(0.0) is None
    path = w.next_ready(5.0)  # the first rescan is 30 s away
    assert path == inbox / "fresh.png"
    assert time.monotonic() - written >= settle - 0.05


def test_the_last_event_an_emitter_gets_while_stopping_is_no_error_line(inbox, caplog):
    """watchdog's emitter, stopped while it waits for an event, logs an ERROR for the one it then gets: on a clean
    stop that line is noise. Here the stopped emitter is handed its last call itself."""
    w = InboxWatcher(inbox, settle_s=LONG, rescan_s=LONG)
    w.start()
    (emitter,) = w._observer.emitters
    w.stop()
    with caplog.at_level(logging.DEBUG):
        emitter.queue_events(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_signal_handler_outlasting_the_wait_does_not_make_it_endless(watch, inbox):
    """SIGTERM's handler runs on this thread, in the middle of next_ready's wait for an event. A handler that
    took longer than what was left of the wait once turned it into a wait for the next event, however long (the
    C SimpleQueue read the past deadline as "forever"): a watch asked to stop did not, until a file came."""
    w = watch(settle_s=LONG, rescan_s=LONG)
    previous = signal.signal(signal.SIGUSR2, lambda *_: time.sleep(0.3))  # slower than the wait below
    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2)).start()
    unblock = threading.Timer(10, (inbox / "late.png").write_bytes, (b"x",))  # an event ends a wait that hangs
    unblock.start()
    try:
        started = time.monotonic()
        assert w.next_ready(0.1) is None
        assert time.monotonic() - started < 5
    finally:
        unblock.cancel()
        signal.signal(signal.SIGUSR2, previous)
