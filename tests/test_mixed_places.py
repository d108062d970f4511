"""Inputs from one kind of place, outputs and failures in another: S3 objects into local folders, local files into
S3 prefixes (over HTTP against moto's server). Also the S3 adapters' part of "nothing lost": failure records that
never overwrite each other, and dispositions that touch only the version read."""

import json
import os
import subprocess

import cv2
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd
from moto_server import aws_env, client
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.adapters.s3_place import S3Object, S3Place
from pipeline.errors import InputRejected

MODEL = ["--model", "fsrcnn-x2", "--model-dir", str(SHARED_MODELS)]
LONG = "a" * 1011 + ".png"  # a 1015-byte key segment: fine in S3, too long for a local file name
RECORD = {"stage": "decode", "error": "not_an_image", "message": "not an image", "input": "s3://inbox/x.png"}


def photos(count: int, size: int = 48) -> list[bytes]:
    paths = sorted((DATASETS / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))[:count]
    return [cv2.imencode(".png", cv2.imread(str(p))[:size, :size])[1].tobytes() for p in paths]


@pytest.fixture
def s3(moto_endpoint):
    raw = client("s3", moto_endpoint)
    for bucket in ("inbox", "outbox"):
        raw.create_bucket(Bucket=bucket)
    return raw


def body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def all_keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def upscale(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*superres_cmd(), "upscale", *args, *MODEL], env=cli_env(**aws_env(endpoint)),
                          capture_output=True, text=True, timeout=180)


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_inputs_into_a_local_outbox_and_failed_folder(s3, moto_endpoint, tmp_path):
    good = photos(3)
    s3.put_object(Bucket="inbox", Key="in/p0.png", Body=good[0])
    s3.put_object(Bucket="inbox", Key="in/p1.png", Body=good[1])
    s3.put_object(Bucket="inbox", Key="in/broken.png", Body=b"<html>not an image</html>")
    s3.put_object(Bucket="inbox", Key=f"in/{LONG}", Body=good[2])
    out, failed = tmp_path / "out", tmp_path / "failed"

    result = upscale(moto_endpoint, "s3://inbox/in/", "--out", str(out), "--failed", str(failed))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "done 2, duplicate 0, failed 2" in result.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["p0.png", "p1.png"]

    broken = json.loads((failed / "broken.png.error.json").read_text())
    assert broken["error"] == "not_an_image" and broken["input_kept"] is True
    assert (failed / "broken.png").read_bytes() == b"<html>not an image</html>"
    [record_path] = [p for p in failed.glob("*.error.json") if p.name.startswith("aaaa")]
    record = json.loads(record_path.read_text())
    assert record["error"] == "name_too_long" and record["stage"] == "publish", record
    assert record["input"] == f"s3://inbox/in/{LONG}" and record["input_kept"] is True
    assert len(os.fsencode(record_path.name)) <= os.pathconf(failed, "PC_NAME_MAX")
    kept = record_path.with_name(record_path.name[: -len(".error.json")])
    assert kept.read_bytes() == good[2] and kept.suffix == ".png"
    assert len(all_keys(s3, "inbox")) == 4  # inputs untouched


@pytest.mark.slow
def test_local_inputs_into_an_s3_outbox_and_failed_prefix(s3, moto_endpoint, tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, data in enumerate(photos(2)):
        (inbox / f"p{i}.png").write_bytes(data)
    (inbox / "broken.png").write_bytes(b"<html>not an image</html>")
    secret = b"TOP-SECRET-" + os.urandom(2048)
    (tmp_path / "secret.bin").write_bytes(secret)
    os.symlink(tmp_path / "secret.bin", inbox / "link.png")

    result = upscale(moto_endpoint, str(inbox), "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "done 2, duplicate 0, failed 2" in result.stdout
    keys = all_keys(s3, "outbox")
    assert {"up/p0.png", "up/p1.png"} <= set(keys)
    assert json.loads(body(s3, "outbox", "failed/broken.png.error.json"))["input_kept"] is True
    assert body(s3, "outbox", "failed/broken.png") == b"<html>not an image</html>"
    link = json.loads(body(s3, "outbox", "failed/link.png.error.json"))
    assert link["error"] == "symlink" and link["input_kept"] is False
    assert "failed/link.png" not in keys
    for key in keys:  # what the link points to is in no object
        assert secret[:40] not in body(s3, "outbox", key), key
    assert (inbox / "link.png").is_symlink() and (inbox / "broken.png").exists()


# -- the S3 adapters ---------------------------------------------------------------------------------------------


@pytest.fixture
def objects(s3, moto_endpoint):
    return S3Objects(s3_client(moto_endpoint))


def test_put_failure_writes_the_record_and_the_bytes_and_never_overwrites(s3, objects):
    place = S3Place(objects, "outbox", "failed/")
    first = place.put_failure("x.png", {**RECORD, "message": "first"}, None)
    second = place.put_failure("x.png", {**RECORD, "message": "second"}, b"\x00bytes")
    third = place.put_failure("x.png", {**RECORD, "message": "third"}, None)
    assert (first, second, third) == ("s3://outbox/failed/x.png", "s3://outbox/failed/x (2).png",
                                      "s3://outbox/failed/x (3).png")
    record = json.loads(body(s3, "outbox", "failed/x.png.error.json"))
    assert record == {**RECORD, "message": "first", "input_kept": False}
    assert json.loads(body(s3, "outbox", "failed/x (2).png.error.json"))["input_kept"] is True
    assert body(s3, "outbox", "failed/x (2).png") == b"\x00bytes"
    assert "failed/x.png" not in all_keys(s3, "outbox")


def test_remove_failure_removes_both_and_nothing_outside_the_prefix(s3, objects):
    place = S3Place(objects, "outbox", "failed/")
    where = place.put_failure("x.png", RECORD, b"bytes")
    s3.put_object(Bucket="outbox", Key="up/x.png", Body=b"an output")
    place.remove_failure(where)
    place.remove_failure(where)  # missing is fine
    place.remove_failure("s3://outbox/up/x.png")
    assert all_keys(s3, "outbox") == ["up/x.png"]


def test_keys_past_s3s_limit_are_refused_as_outputs_and_shortened_as_failures(s3, objects):
    place = S3Place(objects, "outbox", "failed/")
    rel = "b" * 1020 + ".png"
    with pytest.raises(InputRejected) as info:
        S3Place(objects, "outbox", "up/").url(rel)
    assert info.value.code == "name_too_long"
    where = place.put_failure(rel, RECORD, b"bytes")
    key = where[len("s3://outbox/"):]
    assert key.startswith("failed/bbbb") and key.endswith(".png") and "~" in key
    assert len((key + ".error.json").encode()) <= 1024
    assert body(s3, "outbox", key) == b"bytes"


def read_object(s3, objects, key="in/a.png", data=b"first", **kw) -> S3Object:
    s3.put_object(Bucket="inbox", Key=key, Body=data)
    src = S3Object(objects, "inbox", key, key.rpartition("/")[2], **kw)
    src.read(1000)
    return src


def test_delete_and_move_touch_only_the_version_read(s3, objects):
    read_object(s3, objects).dispose("delete")
    assert all_keys(s3, "inbox") == []

    read_object(s3, objects, processed=("outbox", "done/")).dispose("move")
    assert all_keys(s3, "inbox") == [] and body(s3, "outbox", "done/a.png") == b"first"

    for disposition in ("delete", "move"):
        src = read_object(s3, objects, data=b"first", processed=("outbox", f"{disposition}/"))
        s3.put_object(Bucket="inbox", Key="in/a.png", Body=b"a newer upload")
        src.dispose(disposition)
        assert body(s3, "inbox", "in/a.png") == b"a newer upload"
        assert f"{disposition}/a.png" not in all_keys(s3, "outbox")


def test_an_object_never_read_is_left_alone(s3, objects):
    s3.put_object(Bucket="inbox", Key="in/a.png", Body=b"first")
    S3Object(objects, "inbox", "in/a.png", "a.png").dispose("delete")
    assert all_keys(s3, "inbox") == ["in/a.png"]


@pytest.mark.slow
def test_s3_watch_into_a_local_outbox_goes_on_past_bad_objects(s3, moto_endpoint, tmp_path):
    """`watch --inbox s3://… --outbox ./local`: a bad object and one whose name is too long for the local file
    system each get a record, the good ones their outputs, and the watcher keeps running (it once crash-looped)."""
    import signal
    import time

    good = photos(2)
    s3.put_object(Bucket="inbox", Key="in/p0.png", Body=good[0])
    s3.put_object(Bucket="inbox", Key="in/broken.png", Body=b"<html>not an image</html>")
    s3.put_object(Bucket="inbox", Key=f"in/{LONG}", Body=good[1])
    out, failed = tmp_path / "out", tmp_path / "failed"
    proc = subprocess.Popen([*superres_cmd(), "watch", "--inbox", "s3://inbox/in/", "--outbox", str(out), "--failed",
                             str(failed), "--rescan-s", "1", *MODEL], env=cli_env(**aws_env(moto_endpoint)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
                (out / "p0.png").exists() and len(list(failed.glob("*.error.json"))) == 2):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        s3.put_object(Bucket="inbox", Key="in/p1.png", Body=good[1])  # and it goes on
        while time.monotonic() < deadline and not (out / "p1.png").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert (out / "p0.png").exists() and (out / "p1.png").exists()
    codes = sorted(json.loads(p.read_text())["error"] for p in failed.glob("*.error.json"))
    assert codes == ["name_too_long", "not_an_image"]
