"""`superres upscale` as a person meets it, in real processes: on a terminal (a pty) one progress bar redrawn in
place, failures printed above it, no raw libpng/OpenCV text; off a terminal one line per item and a summary;
JSON logs one object per item; exit codes 0 / 1 (failed now or still failed from before) / 130 / 143."""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import cv2
import pytest

from conftest import DATASETS, cli_env, superres_cmd

MODEL = ["--model", "fsrcnn-x2"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two small good images, one big enough for several tiles, and a truncated PNG."""
    src = tmp_path / "src"
    src.mkdir()
    bird = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png"))
    cv2.imwrite(str(src / "a.png"), bird[:40, :48])
    cv2.imwrite(str(src / "b.png"), bird[40:80, :48])
    photo = cv2.imread(str(DATASETS / "BSD100" / "HR" / "img_001.png"))
    cv2.imwrite(str(src / "c.png"), photo[:160, :160])
    ok, png = cv2.imencode(".png", bird)
    (src / "trunc.png").write_bytes(png.tobytes()[: len(png) // 2])
    return src


def upscale_args(tmp_path: Path, src: Path, *extra: str) -> list[str]:
    return [*superres_cmd(), "upscale", str(src), "--out", str(tmp_path / "out"), *MODEL, *extra]


def run_in_pty(argv: list[str], env: dict, timeout_s: float = 120) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pty 200 columns wide; everything it wrote, and its exit code."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env={**env, "COLUMNS": "200"},
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, ANSI.sub("", out.decode("utf-8", "replace"))


def test_on_a_terminal_one_bar_redrawn_with_the_failure_above_it_and_no_raw_library_text(tmp_path, folder):
    code, text = run_in_pty(upscale_args(tmp_path, folder, "--tile", "48"), cli_env())
    assert code == 1, text
    assert "libpng" not in text and "WARN:" not in text and "[ WARN" not in text, text
    assert " INFO " not in text and "upscaling" not in text, text
    lines = text.replace("\r\n", "\n").split("\n")
    # the failure: a whole line of its own (the bar cleared before it, drawn again after it)
    failure = [line.split("\r")[-1] for line in lines if "trunc.png" in line]
    assert len(failure) == 1, text
    assert failure[0].startswith("failed ") and failure[0].rstrip().endswith("(it ends before the image data does))")
    # the bar: one line, redrawn in place (carriage returns), never a new line per item
    draws = [seg for seg in text.split("\r") if re.search(r"\d+/4 \[", seg)]
    assert len(draws) >= 3, text
    assert not any(re.match(r"done +\S+a\.png", line.split("\r")[-1]) for line in lines), "a per-item line on a terminal"
    bar_lines = [line for line in lines if re.search(r"\d+/4 \[", line)]
    assert len(bar_lines) <= 2, bar_lines  # the bar drawn again below the failure, and its last state: no more
    assert "Mpx/s" in draws[-1] and "4/4" in draws[-1]
    assert any(re.search(r"tiles \d+/\d+", seg) for seg in draws), "no tiles progress for the image of several tiles"
    # the summary, at the end
    assert lines[-1].strip() == "" or "done 3" in lines[-1]
    assert re.search(r"done 3, duplicate 0, failed 1 .*output Mpx/s", [line for line in lines if line.strip()][-1])


def test_off_a_terminal_one_line_per_item_and_a_summary(tmp_path, folder):
    result = subprocess.run(upscale_args(tmp_path, folder), env=cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    err = result.stderr.splitlines()
    assert len(err) == 4, result.stderr  # exactly one line per item: no INFO lines, no raw libpng line
    assert sorted(line.split()[0] for line in err) == ["done", "done", "done", "failed"]
    assert all(" INFO " not in line and "libpng" not in line for line in err)
    assert [Path(line.split()[1]).name for line in err] == ["a.png", "b.png", "c.png", "trunc.png"]
    assert result.stdout.startswith("done 3, duplicate 0, failed 1") and result.stdout.count("\n") == 1


def test_json_logs_have_one_object_per_item(tmp_path, folder):
    result = subprocess.run(upscale_args(tmp_path, folder), env=cli_env(SUPERRES_LOG_FORMAT="json"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    docs = [json.loads(line) for line in result.stderr.splitlines()]  # every line a JSON object: none raw
    per_source: dict[str, int] = {}
    for doc in docs:
        if "source" in doc:
            per_source[Path(doc["source"]).name] = per_source.get(Path(doc["source"]).name, 0) + 1
    assert per_source == {"a.png": 1, "b.png": 1, "c.png": 1, "trunc.png": 1}, docs
    assert {doc["outcome"] for doc in docs if doc.get("message") == "item"} == {"done", "failed"}


def test_a_rerun_after_a_failure_exits_1_and_says_still_failed(tmp_path, folder):
    first = subprocess.run(upscale_args(tmp_path, folder), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr
    again = subprocess.run(upscale_args(tmp_path, folder), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "already done 3" in again.stdout and "still failed 1 (records in " in again.stdout, again.stdout
    assert "out.failed" in again.stdout or "failed" in again.stdout.split("records in ")[1]
    (folder / "trunc.png").unlink()  # nothing failed any more among the inputs: all done
    third = subprocess.run(upscale_args(tmp_path, folder), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_stops_after_the_items_in_hand(tmp_path, signum, code):
    src = tmp_path / "many"
    src.mkdir()
    photo = cv2.imread(str(DATASETS / "BSD100" / "HR" / "img_001.png"))
    for i in range(40):
        cv2.imwrite(str(src / f"p{i:02d}.png"), photo[i:i + 160, :200])
    proc = subprocess.Popen(upscale_args(tmp_path, src), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # the first item settled: the run is under way
        assert first.startswith("done "), first
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out + err
    assert "interrupted" in out and "not started" in out, out
    done = int(re.match(r"done (\d+)", out).group(1))
    assert 1 <= done < 40
    assert len(list((tmp_path / "out").glob("*.png"))) == done  # what was started was finished, nothing half-made


def test_the_summary_counts_skipped_non_images_apart_and_they_are_not_failures():
    from handler.oneshot import _kind
    from pipeline.process import Result

    assert _kind(Result(None, "skipped", detail="not an image file (by extension)")) == "not images"
    assert _kind(Result(None, "skipped", "out/a.png", detail="already done")) == "already done"
    assert _kind(Result(None, "skipped", "failed/b.png", detail="already failed")) == "still failed"
    assert _kind(Result(None, "retry", detail="SlowDown")) == "retry"
