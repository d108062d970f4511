"""Bad input gets a clear error and loses nothing: each kind ends in the failed place with a reason that
names the problem, and the run goes on with the good files."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, make_bad_inputs, superres_cmd
from handler.cli import main
from pipeline.adapters.local_files import LocalFile

MODEL = ["--model", "fsrcnn-small-x2", "--model-dir", str(SHARED_MODELS)]
# the words a person would look for in each reason
WORDS = {"empty": "empty", "truncated": "truncat", "not_an_image": "not an image", "too_many_pixels": "100000x100000"}


def reason(failed_dir, name):
    return json.loads((failed_dir / f"{name}.error.json").read_text())


def test_every_bad_file_is_set_aside_with_a_reason_and_good_files_still_done(tmp_path):
    inbox = tmp_path / "in"
    expected = make_bad_inputs(inbox)
    good = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "headx4.png"))
    cv2.imwrite(str(inbox / "good.png"), good)
    cv2.imwrite(str(inbox / "one pixel.png"), good[:1, :1])
    out, failed = tmp_path / "out", tmp_path / "failed"

    assert main(["upscale", str(inbox), "--out", str(out), "--failed", str(failed), *MODEL]) == 1

    for name, code in expected.items():
        record = reason(failed, name)
        assert record["error"] == code, record
        assert WORDS[code] in record["message"].lower(), record
        assert set(record) >= {"stage", "error", "message", "sha256", "model", "time"}
        assert record["input_kept"] is True, record
        assert (failed / name).read_bytes() == (inbox / name).read_bytes()  # a copy, untouched; the input stays
        assert not (out / name).exists()
    assert cv2.imread(str(out / "good.png")).shape == (good.shape[0] * 2, good.shape[1] * 2, 3)
    one = cv2.imread(str(out / "one pixel.png"))
    assert one.shape == (2, 2, 3) and np.abs(one.astype(int) - good[0, 0]).max() < 40


def test_the_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    inbox = tmp_path / "in"
    make_bad_inputs(inbox)
    # If pixels were decoded, 100000x100000x3 would need 30 GB: the run would die, not finish in seconds.
    result = subprocess.run(
        [*superres_cmd(), "upscale", str(inbox / "bomb.png"), "--out", str(tmp_path / "out"), *MODEL],
        env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert reason(tmp_path / "out.failed", "bomb.png")["stage"] == "limits"


def test_min_side_refuses_tiny_images_with_a_stated_reason(tmp_path):
    cv2.imwrite(str(tmp_path / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    assert main(["upscale", str(tmp_path / "dot.png"), "--out", str(tmp_path / "o"), "--min-side", "8", *MODEL]) == 1
    assert "smaller than the minimum side of 8" in reason(tmp_path / "o.failed", "dot.png")["message"]


def test_symlinks_are_refused_wherever_they_point_and_left_in_place(tmp_path):
    inbox, outside = tmp_path / "in", tmp_path / "secret.png"
    inbox.mkdir()
    cv2.imwrite(str(outside), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(inbox / "real.png"), np.full((8, 8, 3), 90, np.uint8))
    os.symlink(outside, inbox / "link.png")
    os.symlink(inbox / "real.png", inbox / "inside.png")
    assert main(["upscale", str(inbox), "--out", str(tmp_path / "o"), *MODEL]) == 1
    for name in ("link.png", "inside.png"):
        record = reason(tmp_path / "o.failed", name)
        assert record["error"] == "symlink" and "left where it is" in record["message"], record
        assert record["input_kept"] is False
        assert not (tmp_path / "o.failed" / name).exists() and not (tmp_path / "o" / name).exists()
        assert (inbox / name).is_symlink()
    assert (tmp_path / "o" / "real.png").exists() and outside.exists()


def test_a_later_failure_of_the_same_name_never_overwrites_an_earlier_record(tmp_path):
    """Two sources named link.png in two runs, neither with bytes to keep: two records side by side."""
    failed = tmp_path / "o.failed"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        os.symlink(tmp_path / "nowhere.png", tmp_path / folder / "link.png")
        assert main(["upscale", str(tmp_path / folder / "link.png"), "--out", str(tmp_path / "o"), *MODEL]) == 1
    records = sorted(p.name for p in failed.glob("*.error.json"))
    assert records == ["link (2).png.error.json", "link.png.error.json"]
    assert {json.loads((failed / r).read_text())["input"] for r in records} == \
        {str(tmp_path / "a" / "link.png"), str(tmp_path / "b" / "link.png")}


def test_names_with_spaces_unicode_and_newlines(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    image = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png"))
    names = ["a photo (1).png", "fotó-ünïcødé-写真.png", "line\nbreak.png", "-dash.png"]
    for i, name in enumerate(names):
        ok, data = cv2.imencode(".png", image[i:, i:])  # distinct contents
        (inbox / name).write_bytes(data.tobytes())
    assert main(["upscale", str(inbox), "--out", str(tmp_path / "o"), *MODEL]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")) == sorted(names)


def test_file_deleted_between_event_and_read_is_recorded(tmp_path):
    from handler.runtime import open_processor
    from pipeline.settings import load_settings

    settings = load_settings(outbox=str(tmp_path / "o"), failed=str(tmp_path / "f"), model="fsrcnn-small-x2",
                             model_dir=SHARED_MODELS)
    processor = open_processor(settings)
    result = processor.process(LocalFile(tmp_path / "gone.jpg", "gone.jpg"))
    assert result.outcome == "failed"
    record = reason(tmp_path / "f", "gone.jpg")
    assert record["error"] == "vanished" and "disappeared" in record["message"]


def test_unreadable_file_is_recorded_not_crashed(tmp_path):
    """chmod 000. Root reads anything, so as root the run gives up the capabilities that let it."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    image = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"))
    cv2.imwrite(str(inbox / "locked.png"), image)
    cv2.imwrite(str(inbox / "open.png"), image[1:])
    os.chmod(inbox / "locked.png", 0)
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*as_user, *superres_cmd(), "upscale", str(inbox), "--out", str(tmp_path / "o"), "--failed", str(tmp_path / "f"), *MODEL],
        env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    record = reason(tmp_path / "f", "locked.png")
    assert record["error"] == "unreadable" and "permission" in record["message"]
    assert (tmp_path / "o" / "open.png").exists()
    assert (inbox / "locked.png").exists()  # still where it was


def test_failed_shows_what_is_failed_now(tmp_path):
    """A file fixed after its failure gets a fresh try; its success removes the stale record, and a second
    failure of the same source replaces its first record instead of adding another."""
    src, out, failed = tmp_path / "in", tmp_path / "out", tmp_path / "failed"
    src.mkdir()
    good = cv2.imencode(".png", cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X4" / "headx4.png")))[1].tobytes()
    args = ["upscale", str(src), "--out", str(out), "--failed", str(failed), *MODEL]
    (src / "scan.png").write_bytes(good[: len(good) // 2])  # the scanner's first half
    assert main(args) == 1
    assert reason(failed, "scan.png")["error"] == "truncated"
    (src / "scan.png").write_bytes(b"<html>oops</html>")  # still bad, otherwise: one record, the current one
    assert main(args) == 1
    [record] = failed.glob("*.error.json")
    assert json.loads(record.read_text())["error"] == "not_an_image"
    shown = sorted(p.name for p in failed.iterdir() if not p.name.startswith("."))
    assert shown == sorted([record.name, record.name[: -len(".error.json")]])
    (src / "scan.png").write_bytes(good)  # now whole
    assert main(args) == 0
    assert (out / "scan.png").exists()
    assert [p.name for p in failed.iterdir() if not p.name.startswith(".")] == []
