"""`superres watch` as a real process on a real folder: bad files never stop it, SIGTERM stops it cleanly,
and SIGKILL at random moments loses nothing and upscales nothing twice."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import pytest

from conftest import DATASETS, cli_env, make_bad_inputs, superres_cmd

def start_watch(tmp_path: Path, *extra: str, log_name: str = "watch.log", model: str = "fsrcnn-x2") -> subprocess.Popen:
    log = open(tmp_path / log_name, "ab")
    return subprocess.Popen(
        [*superres_cmd(), "watch", "--inbox", str(tmp_path / "inbox"), "--outbox", str(tmp_path / "outbox"),
         "--failed", str(tmp_path / "failed"), "--model", model, "--settle-s", "0.3", "--rescan-s", "1", *extra],
        env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"watch exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.exists() else set()


def real_images(count: int) -> list[Path]:
    """BSD100 photos, 480x321: big enough that each takes a noticeable moment, so kills land mid-job."""
    paths = sorted((DATASETS / "BSD100" / "HR").glob("*.png"))[:count]
    assert len(paths) == count
    return paths


def test_bad_files_never_stop_it_and_sigterm_stops_cleanly(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = start_watch(tmp_path, "--disposition", "move")
    try:
        wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), 60, "start", proc)
        expected = make_bad_inputs(tmp_path / "staging")
        for name in expected:  # dropped the way a careful writer does: written elsewhere, renamed in
            os.rename(tmp_path / "staging" / name, inbox / name)
        (inbox / "x.jpg").mkdir()
        secret = tmp_path / "secret.png"
        cv2.imwrite(str(secret), cv2.imread(str(real_images(1)[0])))
        os.symlink(secret, inbox / "escape.png")
        cv2.imwrite(str(inbox / "good photo.png"), cv2.imread(str(real_images(2)[1])))
        (inbox / "still-copying.jpg.part").write_bytes(b"half")

        names = set(expected) | {"x.jpg", "escape.png"}
        failed = tmp_path / "failed"
        wait_for(lambda: all((failed / f"{n}.error.json").exists() for n in names)
                 and (tmp_path / "outbox" / "good photo.png").exists(), 60, "every item settled", proc)
        assert json.loads((failed / "x.jpg.error.json").read_text())["error"] == "is_directory"
        assert json.loads((failed / "escape.png.error.json").read_text())["error"] == "symlink_outside"
        assert proc.poll() is None, "a bad file stopped the watcher"
        assert visible(inbox) == {"processed", "still-copying.jpg.part"}  # failed inputs were moved, not lost
        assert secret.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "stopped" in (tmp_path / "watch.log").read_text()


def test_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(tmp_path):
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    inbox.mkdir()
    sources = real_images(32)
    expected_good = {p.name for p in sources}
    for path in sources:
        (inbox / path.name).write_bytes(path.read_bytes())
    bad = make_bad_inputs(inbox)  # failures must survive kills too
    (inbox / "again.png").write_bytes(sources[0].read_bytes())  # same bytes, another name: a duplicate

    rng = random.Random(20261124)
    kills = 0
    for round_ in range(8):
        # LapSRN takes ~0.5 s an image here: kills land in start-up, upscale, publish and disposition alike
        proc = start_watch(tmp_path, "--disposition", "move", log_name=f"watch{round_}.log", model="lapsrn-x2")
        time.sleep(rng.uniform(0.5, 3.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if not visible(inbox) - {"processed"}:
            break
    assert kills >= 3
    proc = start_watch(tmp_path, "--disposition", "move", log_name="final.log", model="lapsrn-x2")
    try:
        wait_for(lambda: visible(inbox) == {"processed"}, 180, "the inbox to drain", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

    outputs = visible(outbox)
    assert outputs == expected_good | {"again.png"}
    for name in expected_good:
        image = cv2.imread(str(outbox / name))
        lr = cv2.imread(str(inbox / "processed" / name))
        assert image is not None and image.shape[:2] == (lr.shape[0] * 2, lr.shape[1] * 2), name
    failures = {p.name[: -len(".error.json")] for p in failed.glob("*.error.json")}
    assert failures == set(bad)
    assert visible(failed) == set(bad) | {f"{n}.error.json" for n in bad}
    assert visible(inbox / "processed") == expected_good | {"again.png"}
    # no partial or temporary files anywhere
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix == ".tmp" or ".tmp." in p.name)]
    assert leftovers == []
    # nothing upscaled twice: each distinct content ran through the engine to completion exactly once
    db = sqlite3.connect(outbox / ".superres" / "ledger.sqlite3")
    runs = db.execute("SELECT engine_runs FROM items").fetchall()
    assert len(runs) == len(expected_good) and all(r == (1,) for r in runs)
    outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM sources GROUP BY outcome").fetchall())
    assert outcomes.get("duplicate", 0) == 1
