"""Symlinks never leak what they point to: a real `superres watch` whose inbox has a name swapped between a real PNG
and a symlink to a secret outside it, and one-shot runs given symlinks by a glob or with disposition=move."""

import os
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, stop_process, superres_cmd
from handler.cli import main

MODEL = ["--model", "fsrcnn-x2", "--model-dir", str(SHARED_MODELS)]
RACE_S = 15


def png(index: int, side: int = 48) -> bytes:
    """A small real photo crop (distinct per index) as PNG bytes."""
    path = sorted((DATASETS / "BSD100" / "HR").glob("*.png"))[index]
    ok, data = cv2.imencode(".png", cv2.imread(str(path))[:side, :side])
    assert ok
    return data.tobytes()


def secret_bytes() -> bytes:
    # not an image: if anything read it, the failed place would get these very bytes as the input set aside
    return b"TOP-SECRET-" + os.urandom(4096)


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def assert_never_leaked(secret: bytes, *folders: Path) -> None:
    for path in files_under(*folders):
        assert not path.is_symlink(), f"a symlink was set aside or moved: {path}"
        assert secret[:40] not in path.read_bytes(), f"the secret leaked into {path}"


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"watch exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_name_swapped_between_a_png_and_a_symlink_never_leaks_the_link_target(tmp_path):
    inbox, outbox, failed, staging = (tmp_path / n for n in ("inbox", "outbox", "failed", "staging"))
    inbox.mkdir()
    staging.mkdir()  # same file system as the inbox: every os.replace into it is atomic
    secret = secret_bytes()
    (tmp_path / "secret.bin").write_bytes(secret)
    race_png, goods = png(0), {f"good{i}.png": png(i + 1) for i in range(3)}

    log = open(tmp_path / "watch.log", "ab")
    proc = subprocess.Popen(
        [*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(outbox), "--failed", str(failed), *MODEL,
         "--disposition", "move", "--settle-s", "0.3", "--rescan-s", "1"],
        env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()

    def swap() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            os.symlink(tmp_path / "secret.bin", staging / f"link{n}")
            os.replace(staging / f"link{n}", inbox / "race.png")
            time.sleep(0.001)
            (staging / f"file{n}").write_bytes(race_png)
            os.replace(staging / f"file{n}", inbox / "race.png")
            time.sleep(0.001)

    swapper = threading.Thread(target=swap)
    try:
        wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), 60, "start", proc)
        swapper.start()
        started = time.monotonic()
        for name, data in goods.items():  # dropped while the swapping goes on
            time.sleep(RACE_S / (len(goods) + 1))
            (staging / name).write_bytes(data)
            os.replace(staging / name, inbox / name)
        time.sleep(max(0.0, RACE_S - (time.monotonic() - started)))
        stop.set()
        swapper.join()
        wait_for(lambda: all((outbox / name).exists() for name in goods), 40, "every good PNG upscaled", proc)
    finally:
        stop.set()
        if swapper.is_alive():
            swapper.join()
        assert stop_process(proc, 30, tmp_path / "watch.log") == 0

    assert_never_leaked(secret, outbox, failed, inbox / "processed")
    assert (tmp_path / "secret.bin").read_bytes() == secret
    assert list(failed.glob("good*")) == []  # no good PNG recorded as failed
    for name, data in goods.items():
        small = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert cv2.imread(str(outbox / name)).shape == (small.shape[0] * 2, small.shape[1] * 2, 3), name
        assert (inbox / "processed" / name).read_bytes() == data  # moved, untouched
    # the race reached the pipeline in both shapes (a failure of race.png is removed once it succeeds again)
    assert "race.png" in (tmp_path / "watch.log").read_text() and (outbox / "race.png").exists()
    assert "symlink" in (tmp_path / "watch.log").read_text()


def test_a_glob_never_upscales_through_a_symlink_and_leaves_it_in_place(tmp_path, capsys):
    pics, outside = tmp_path / "pics", tmp_path / "outside"
    pics.mkdir()
    outside.mkdir()
    (pics / "real.png").write_bytes(png(1))
    (outside / "secret.png").write_bytes(png(2))  # a real image: read through the link, it would be upscaled
    (outside / "other.png").write_bytes(png(3))
    os.symlink(outside / "secret.png", pics / "link.png")
    os.symlink(outside, pics / "linked")  # a symlinked folder: `*/` must not enter it
    out = tmp_path / "out"

    assert main(["upscale", str(pics / "*.png"), str(pics / "*" / "*.png"), "--out", str(out), *MODEL]) == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["real.png"]
    assert (tmp_path / "out.failed" / "link.png.error.json").exists()
    assert not (tmp_path / "out.failed" / "link.png").exists()
    assert (pics / "link.png").is_symlink() and (pics / "linked").is_symlink()
    assert "done 1, duplicate 0, failed 1" in capsys.readouterr().out


def test_disposition_move_never_moves_a_symlink(tmp_path, monkeypatch):
    inbox = tmp_path / "in"
    inbox.mkdir()
    secret = secret_bytes()
    (tmp_path / "secret.bin").write_bytes(secret)
    os.symlink(tmp_path / "secret.bin", inbox / "link.png")
    (inbox / "good.png").write_bytes(png(1))
    monkeypatch.setenv("SUPERRES_DISPOSITION", "move")

    assert main(["upscale", str(inbox), "--out", str(tmp_path / "out"), *MODEL]) == 1
    assert os.readlink(inbox / "link.png") == str(tmp_path / "secret.bin")
    assert (tmp_path / "out" / "good.png").exists()
    assert_never_leaked(secret, tmp_path / "out", tmp_path / "out.failed")
