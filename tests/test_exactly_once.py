"""Exactly once, as a user sees it: "already done" means the same content with the same settings and its output
still there and still made from it; a holder that lost its claim never publishes; a killed worker costs no
item; timings that cannot work are refused at start. Real files, real processes, moto's server over HTTP."""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd, wait_stopped
from handler.cli import main
from moto_server import aws_env, queue_depth, queue_with_dlq, s3_event
from moto_server import keys as all_keys

MODEL = "fsrcnn-small-x2"


def photo(name: str, dataset: str = "Set14", size: int = 48) -> np.ndarray:
    return cv2.imread(str(DATASETS / dataset / "LR_bicubic" / "X2" / f"{name}x2.png"))[:size, :size]


def upscale(*args: str) -> int:
    return main(["upscale", *args, "--model-dir", str(SHARED_MODELS)])


def engine_runs(out: Path) -> int:
    db = sqlite3.connect(out / ".superres" / "ledger.sqlite3")
    return db.execute("SELECT COALESCE(SUM(engine_runs), 0) FROM items").fetchone()[0]


def test_another_model_or_format_is_done_again_and_a_deleted_output_is_made_again(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), photo("baboon"))
    cv2.imwrite(str(src / "b.png"), photo("zebra"))
    assert upscale(str(src), "--out", str(out), "--model", "fsrcnn-x2") == 0
    first = (out / "a.png").read_bytes()
    assert upscale(str(src), "--out", str(out), "--model", "fsrcnn-x2") == 0
    assert "already done 2" in capsys.readouterr().out

    # another model into the same outbox: upscaled again, each output replaced
    assert upscale(str(src), "--out", str(out), "--model", "espcn-x2") == 0
    assert "done 2," in capsys.readouterr().out
    assert (out / "a.png").read_bytes() != first
    espcn = (out / "a.png").read_bytes()

    # another format: new outputs beside the old ones
    assert upscale(str(src), "--out", str(out), "--model", "espcn-x2", "--format", "jpeg") == 0
    assert "done 2," in capsys.readouterr().out
    assert cv2.imread(str(out / "a.png.jpg")).shape == (96, 96, 3)

    # a deleted output is made again, the others are left alone
    (out / "a.png").unlink()
    assert upscale(str(src), "--out", str(out), "--model", "espcn-x2") == 0
    assert "done 1, duplicate 0, failed 0, already done 1" in capsys.readouterr().out
    assert (out / "a.png").read_bytes() == espcn

    # back to the first model: the outputs are FSRCNN's again (the old records do not say "done")
    assert upscale(str(src), "--out", str(out), "--model", "fsrcnn-x2") == 0
    assert (out / "a.png").read_bytes() == first


def test_a_duplicate_never_gets_the_picture_of_replaced_content(tmp_path):
    x, y = photo("baboon"), photo("zebra")
    ref = tmp_path / "ref"
    ref.mkdir()
    cv2.imwrite(str(ref / "x.png"), x)
    assert upscale(str(ref / "x.png"), "--out", str(tmp_path / "ref-out"), "--model", MODEL) == 0
    x_up = (tmp_path / "ref-out" / "x.png").read_bytes()

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), x)
    assert upscale(str(src / "a.png"), "--out", str(out), "--model", MODEL) == 0
    assert (out / "a.png").read_bytes() == x_up
    time.sleep(0.01)
    cv2.imwrite(str(src / "a.png"), y)  # a.png now holds other content: its output is replaced
    assert upscale(str(src / "a.png"), "--out", str(out), "--model", MODEL) == 0
    assert (out / "a.png").read_bytes() != x_up
    cv2.imwrite(str(src / "b.png"), x)  # X again, under another name: X's first output is gone, so upscale
    assert upscale(str(src / "b.png"), "--out", str(out), "--model", MODEL) == 0
    assert (out / "b.png").read_bytes() == x_up
    cv2.imwrite(str(src / "c.png"), x)  # and now a true duplicate of b.png: a copy of X's picture
    assert upscale(str(src / "c.png"), "--out", str(out), "--model", MODEL) == 0
    assert (out / "c.png").read_bytes() == x_up


def png(image) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_s3_identity_duplicates_and_the_ledger_outside_the_outbox(aws):
    s3, _, _ = aws
    x, y = png(photo("baboon")), png(photo("zebra"))
    out = ["--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"]
    s3.put_object(Bucket="inbox", Key="in/a.png", Body=x)
    assert main(["upscale", "s3://inbox/in/a.png", *out]) == 0
    x_up = s3.get_object(Bucket="outbox", Key="up/a.png")["Body"].read()
    s3.put_object(Bucket="inbox", Key="in/a.png", Body=y)
    assert main(["upscale", "s3://inbox/in/a.png", *out]) == 0
    s3.put_object(Bucket="inbox", Key="in/b.png", Body=x)
    assert main(["upscale", "s3://inbox/in/b.png", *out]) == 0
    b = s3.get_object(Bucket="outbox", Key="up/b.png")
    assert b["Body"].read() == x_up
    import hashlib
    assert b["Metadata"]["source-sha256"] == hashlib.sha256(x).hexdigest()
    # another model: done again into the same prefix
    assert main(["upscale", "s3://inbox/in/b.png", *out, "--model", "fsrcnn-x2"]) == 0
    assert s3.get_object(Bucket="outbox", Key="up/b.png")["Body"].read() != x_up
    # the outbox prefix holds outputs only; the ledger is beside it
    assert all_keys(s3, "outbox", "up/") == {"up/a.png", "up/b.png"}
    assert any(k.startswith(".superres/ledger/up/items/") for k in all_keys(s3, "outbox", ".superres/"))


def test_keys_that_name_one_output_are_refused_not_overwritten(aws):
    s3, _, _ = aws
    s3.put_object(Bucket="inbox", Key="in/a//x.png", Body=png(photo("baboon")))
    s3.put_object(Bucket="inbox", Key="in/a/./x.png", Body=png(photo("zebra")))
    code = main(["upscale", "s3://inbox/in/a//x.png", "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"])
    assert code == 0
    first = s3.get_object(Bucket="outbox", Key="up/x.png")["Body"].read()
    code = main(["upscale", "s3://inbox/in/a/./x.png", "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"])
    assert code == 1
    assert s3.get_object(Bucket="outbox", Key="up/x.png")["Body"].read() == first
    failed = [k for k in all_keys(s3, "outbox", "failed/") if k.endswith(".error.json")]
    record = json.loads(s3.get_object(Bucket="outbox", Key=failed[0])["Body"].read())
    assert record["error"] == "output_collision" and "in/a//x.png" in record["message"]


# -- fencing: a holder that paused past its lease --------------------------------------------------------------


def big_photo(path: Path, side: int = 1400) -> None:
    img = cv2.imread(str(DATASETS / "BSD100" / "HR" / "3096.png")) if (DATASETS / "BSD100" / "HR" / "3096.png").exists() \
        else cv2.imread(str(sorted((DATASETS / "BSD100" / "HR").glob("*.png"))[0]))
    cv2.imwrite(str(path), cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC))


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def claimed_by(ledger: Path) -> str | None:
    if not ledger.exists():
        return None
    try:
        row = sqlite3.connect(ledger, timeout=1).execute("SELECT owner FROM items WHERE state='claimed'").fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


@pytest.mark.slow
def test_a_holder_that_paused_past_its_lease_abandons_the_item_and_never_publishes(tmp_path):
    """A is stopped (SIGSTOP: a GC pause, a frozen VM) mid-item until its lease runs out; B takes the item over
    and publishes it; A resumes and ends with lost-claim, touching nothing."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    big_photo(src / "big.png")
    cmd = [*superres_cmd(), "upscale", str(src / "big.png"), "--out", str(out), "--model", "espcn-x2", "--lease-s", "3"]
    a = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: claimed_by(out / ".superres" / "ledger.sqlite3"), 60, "A's claim")
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(3.5)  # A's lease runs out while it cannot renew it
        b = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=180)
        assert b.returncode == 0, b.stderr
        assert "done 1," in b.stdout
        b_output = (out / "big.png").read_bytes()
        b_stat = os.stat(out / "big.png")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=180)
    assert "lost-claim" in a_err and "lost claim 1" in a_out, a_out + a_err
    assert (out / "big.png").read_bytes() == b_output and os.stat(out / "big.png").st_ino == b_stat.st_ino
    assert engine_runs(out) == 1  # only B's upscale was published


def watch(inbox: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(out), "--failed", str(out.parent / "failed"),
           "--model", "espcn-x2", "--log-format", "json", *extra]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))


@pytest.mark.slow
def test_two_watchers_sharing_an_outbox_upscale_each_item_once_with_a_lease_shorter_than_the_item(tmp_path):
    """Claims are renewed in watch mode too: a 3 s lease on items of several seconds is never taken over."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    procs = [watch(inbox, out, log, "--lease-s", "3") for log in logs]
    try:
        time.sleep(3)  # both are up
        for i in range(2):
            big_photo(tmp_path / f"p{i}.png", side=1100 + 50 * i)
            os.replace(tmp_path / f"p{i}.png", inbox / f"p{i}.png")
        wait_for(lambda: all((out / f"p{i}.png").exists() for i in range(2)), 180, "both outputs")
        time.sleep(4)  # the loser's retry comes and finds the item done
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p, log in zip(procs, logs):
            wait_stopped(p, 60, log)
    done = [json.loads(line) for log in logs for line in log.read_text().splitlines()
            if line.startswith("{") and '"outcome": "done"' in line]
    assert sorted(d["source"] for d in done) == sorted(str(inbox / f"p{i}.png") for i in range(2))
    assert engine_runs(out) == 2


# -- the worker: a SIGKILL mid-item, a second message for the same content -----------------------------------------


def worker(endpoint: str, queue: str, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/", "--failed",
           "s3://outbox/failed/", "--model", "espcn-x2", "--wait-s", "1", "--log-format", "json", *extra]
    env = cli_env(**aws_env(endpoint))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def s3_claim_owner(s3) -> str | None:
    for key in all_keys(s3, "outbox", ".superres/ledger/done/items/"):
        row = json.loads(s3.get_object(Bucket="outbox", Key=key)["Body"].read())
        if row["state"] == "claimed":
            return row["owner"]
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_item_costs_nothing_and_a_second_message_waits_for_the_first(aws, tmp_path):
    """Visibility 30 s, lease 60 s, maxReceiveCount 5, as the defaults' ratios: worker A is SIGKILLed mid-item;
    B gets a second message for the same content while A's claim still runs, then A's message. Both wait for
    the claim to be taken over instead of burning receives: every output made, the DLQ empty."""
    s3, sqs, endpoint = aws
    queue, dlq = queue_with_dlq(sqs, max_receives=5, visibility=30)
    big_photo(tmp_path / "big.png", side=1000)
    data = (tmp_path / "big.png").read_bytes()
    s3.put_object(Bucket="inbox", Key="drop/first.png", Body=data)
    s3.put_object(Bucket="inbox", Key="drop/second.png", Body=data)
    timing = ["--visibility-s", "30", "--lease-s", "60"]
    a = worker(endpoint, queue, tmp_path / "a.log", *timing)
    b = None
    try:
        sqs.send_message(QueueUrl=queue, MessageBody=s3_event("inbox", "drop/first.png"))
        wait_for(lambda: s3_claim_owner(s3), 60, "A's claim")
        a.kill()  # SIGKILL mid-item: no release, no message given back
        a.wait(timeout=30)
        sqs.send_message(QueueUrl=queue, MessageBody=s3_event("inbox", "drop/second.png"))
        b = worker(endpoint, queue, tmp_path / "b.log", *timing)
        wait_for(lambda: {"done/drop/first.png", "done/drop/second.png"} <= all_keys(s3, "outbox", "done/"), 280,
                 "both outputs")
        wait_for(lambda: queue_depth(sqs, queue) == 0, 60, "an empty queue")
    finally:
        if b is not None:
            b.send_signal(signal.SIGTERM)
            b.wait(timeout=60)
    assert queue_depth(sqs, dlq) == 0
    lines = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines() if line.startswith("{")]
    outcomes = sorted(line["outcome"] for line in lines if line.get("message") == "item" and line["outcome"] != "retry")
    assert outcomes == ["done", "duplicate"], outcomes
    assert all_keys(s3, "outbox", "failed/") == set()


def test_timings_that_cannot_work_are_refused_at_start(aws, tmp_path):
    s3, sqs, endpoint = aws
    queue, _ = queue_with_dlq(sqs, max_receives=2, visibility=60)
    env = cli_env(**aws_env(endpoint))
    base = [*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/", "--model", MODEL]
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "maxReceiveCount is 2" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*base, "--visibility-s", "30", "--lease-s", "50000"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "lease_s=50000 is too long" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*superres_cmd(), "worker", "--queue", queue + "-nope", "--outbox", "s3://outbox/done/",
                        "--model", MODEL], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    # nothing was created for a refused configuration
    assert all_keys(s3, "outbox") == set()
