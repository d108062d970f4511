"""Every long-running mode keeps the engine busy: on a simulated GPU (bench/sim_engine.py: a fixed time per
megapixel, sleeping, no CPU) the engine is >= 90 % busy from its first call to its last while watch (local and
S3), the SQS worker and a Lambda batch feed it real images, because several items are in flight (read and
decoded ahead of it, encoded and published behind it). One item at a time (SUPERRES_IN_FLIGHT=1) leaves the
engine idle while the CPU stages run: the same check tells the two apart.

The engine here takes ~90 ms per 96x96 image; the CPU stages (read, hash, ledger, decode, encode, publish) take
~25 ms on this machine's two shared cores: the engine is the bottleneck, as a GPU running EDSR is."""

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from conftest import DATASETS, REPO, cli_env, stop_process, superres_cmd
from handler.enqueue import s3_event_body
from moto_server import aws_env

sys.path.insert(0, str(REPO / "bench"))
from sim_engine import busy_fraction, read_log  # noqa: E402

MODEL = "fsrcnn-small-x2"
ITEMS = 48  # over 4 s of engine time: one stall of a shared machine costs a few per cent, not ten
SIDE = 96
MS_PER_MPX = 10_000  # 96x96: ~92 ms an image
HOOK = f"{REPO / 'bench' / 'sim_engine.py'}:load"


def images(count: int = ITEMS) -> list[bytes]:
    paths = sorted((DATASETS / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))[:count]
    return [cv2.imencode(".png", cv2.imread(str(p))[:SIDE, :SIDE])[1].tobytes() for p in paths]


def sim_env(log: Path, **extra: str) -> dict:
    return cli_env(SUPERRES_MODEL=MODEL, SUPERRES_TEST_ENGINE=HOOK, SIM_GPU_MS_PER_MPX=str(MS_PER_MPX),
                   SIM_GPU_BATCH="4", SIM_GPU_LOG=str(log), **extra)


def wait_for(condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert condition(), "timed out"


def engine_busy(log: Path) -> tuple[float, list]:
    calls = read_log(log)
    return busy_fraction(calls), calls


def run_local_watch(tmp_path: Path, name: str, **extra: str) -> tuple[float, list]:
    inbox, outbox, log = tmp_path / f"{name}-in", tmp_path / f"{name}-out", tmp_path / f"{name}.engine"
    inbox.mkdir()
    for i, data in enumerate(images()):
        (inbox / f"p{i:02d}.png").write_bytes(data)
    proc = subprocess.Popen([*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(outbox),
                             "--settle-s", "0"], env=sim_env(log, **extra), stdout=open(tmp_path / f"{name}.log", "ab"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: outbox.is_dir() and len(list(outbox.glob("*.png"))) == ITEMS)
    finally:
        assert stop_process(proc, 60, tmp_path / f"{name}.log") == 0
    for i in range(ITEMS):  # right size: the double upscales, and every output is there
        assert cv2.imread(str(outbox / f"p{i:02d}.png")).shape[:2] == (2 * SIDE, 2 * SIDE)
    return engine_busy(log)


def test_local_watch_keeps_the_engine_busy_and_one_at_a_time_does_not(tmp_path):
    busy, calls = run_local_watch(tmp_path, "piped")
    serial, serial_calls = run_local_watch(tmp_path, "serial", SUPERRES_IN_FLIGHT="1")
    assert busy >= 0.9, f"the engine was busy {busy:.0%} of the time"
    assert len(calls) < ITEMS  # several items were ready at once: they shared engine calls
    assert len(serial_calls) == ITEMS and serial < busy, (serial, busy)


def test_one_shot_keeps_the_engine_busy(tmp_path):
    """One-shot's producer waits for room, not for the oldest result: while the oldest item is encoded and
    published the reader is still fed. Waiting for the oldest left the reader idle, so engine, encode and
    publish took turns: with the engine about as slow as the CPU stages (~28 ms an image here) it was ~70 %
    busy (~98 % now), and on a CPU the 60-image benchmark ran at 0.8x the seed's loop (1.3x now)."""
    inbox, outbox, log = tmp_path / "in", tmp_path / "out", tmp_path / "oneshot.engine"
    inbox.mkdir()
    for i, data in enumerate(images()):
        (inbox / f"p{i:02d}.png").write_bytes(data)
    env = sim_env(log)
    env["SIM_GPU_BATCH"] = "1"  # one image a call, as on a CPU: nothing is hidden by batching
    env["SIM_GPU_MS_PER_MPX"] = "3000"  # ~28 ms an image: about the CPU stages' time, where turns would show
    done = subprocess.run([*superres_cmd(), "upscale", str(inbox), "--out", str(outbox), "-q"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list(outbox.glob("*.png"))) == ITEMS
    busy, calls = engine_busy(log)
    assert len(calls) == ITEMS and busy >= 0.9, f"the engine was busy {busy:.0%} of the time"


@pytest.fixture
def queue(aws):
    s3, sqs, _ = aws
    return sqs.create_queue(QueueName="superres-jobs", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]


def put_images(s3, prefix: str) -> list[str]:
    keys = []
    for i, data in enumerate(images()):
        keys.append(f"{prefix}p{i:02d}.png")
        s3.put_object(Bucket="inbox", Key=keys[-1], Body=data)
    return keys


def outputs(s3, prefix: str) -> set[str]:
    return {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="outbox", Prefix=prefix)
            for o in page.get("Contents", [])}


def test_s3_watch_keeps_the_engine_busy(aws, tmp_path):
    s3, _, endpoint = aws
    put_images(s3, "drop/")
    log = tmp_path / "s3watch.engine"
    proc = subprocess.Popen([*superres_cmd(), "watch", "--inbox", "s3://inbox/drop/", "--outbox", "s3://outbox/done/",
                             "--rescan-s", "1"], env=sim_env(log, **aws_env(endpoint)),
                            stdout=open(tmp_path / "s3watch.log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(outputs(s3, "done/")) == ITEMS)
    finally:
        assert stop_process(proc, 60, tmp_path / "s3watch.log") == 0
    busy, calls = engine_busy(log)
    assert busy >= 0.9, f"the engine was busy {busy:.0%} of the time"
    assert len(calls) < ITEMS


def send_events(sqs, queue: str, keys: list[str]) -> None:
    bodies = [s3_event_body("inbox", key, 1, None) for key in keys]
    for start in range(0, len(bodies), 10):
        sqs.send_message_batch(QueueUrl=queue, Entries=[{"Id": str(i), "MessageBody": b}
                                                        for i, b in enumerate(bodies[start:start + 10])])


def test_worker_keeps_the_engine_busy_and_settles_every_message(aws, queue, tmp_path):
    s3, sqs, endpoint = aws
    send_events(sqs, queue, put_images(s3, "drop/"))
    log = tmp_path / "worker.engine"
    proc = subprocess.run([*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                           "--batch-size", "10", "--wait-s", "1", "--idle-exit-s", "2"],
                          env=sim_env(log, **aws_env(endpoint)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(outputs(s3, "done/drop/")) == ITEMS
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    busy, calls = engine_busy(log)
    assert busy >= 0.9, f"the engine was busy {busy:.0%} of the time"
    assert len(calls) < ITEMS


def test_lambda_batch_keeps_the_engine_busy(aws, monkeypatch, tmp_path):
    s3, sqs, _ = aws
    keys = put_images(s3, "drop/")
    event = {"Records": [{"messageId": f"m{i}", "receiptHandle": f"r{i}", "eventSource": "aws:sqs",
                          "body": s3_event_body("inbox", key, 1, None)} for i, key in enumerate(keys)]}
    log = tmp_path / "lambda.engine"
    for key, value in {"SUPERRES_OUTBOX": "s3://outbox/done/", "SUPERRES_INBOX": "s3://inbox/drop/",
                       "SUPERRES_TEST_ENGINE": HOOK, "SIM_GPU_MS_PER_MPX": str(MS_PER_MPX),
                       "SIM_GPU_LOG": str(log)}.items():
        monkeypatch.setenv(key, value)
    import importlib

    sys.modules.pop("handler.lambda_function", None)
    lam = importlib.import_module("handler.lambda_function")
    try:
        assert lam.handler(event, None) == {"batchItemFailures": []}
        assert outputs(s3, "done/") == {f"done/p{i:02d}.png" for i in range(ITEMS)}
        busy = busy_fraction(lam._processor.engine.calls)
        assert busy >= 0.9, f"the engine was busy {busy:.0%} of the time"
        assert len(lam._processor.engine.calls) < ITEMS
        # the same batch again: every object is already done, nothing is upscaled twice
        assert lam.handler(event, None) == {"batchItemFailures": []}
        assert lam._processor.ledger.stats()["engine_runs"] == ITEMS
    finally:
        sys.modules.pop("handler.lambda_function", None)
        lam._processor.close()


def test_the_worker_settles_a_message_only_when_all_its_objects_are_done(aws, queue, tmp_path):
    """A message of several objects (one bad): deleted once every object has its result; the bad one is
    recorded as failed, not retried."""
    s3, sqs, endpoint = aws
    keys = put_images(s3, "multi/")[:5]
    s3.put_object(Bucket="inbox", Key="multi/bad.png", Body=b"not a png")
    records = [json.loads(s3_event_body("inbox", k, 1, None))["Records"][0] for k in [*keys, "multi/bad.png"]]
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": records}))
    log = tmp_path / "multi.engine"
    proc = subprocess.run([*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                           "--failed", "s3://outbox/failed/", "--wait-s", "1", "--idle-exit-s", "2"],
                          env=sim_env(log, **aws_env(endpoint)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert outputs(s3, "done/multi/") == {f"done/{k}" for k in keys}
    assert outputs(s3, "failed/") == {"failed/multi/bad.png", "failed/multi/bad.png.error.json"}
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_the_heartbeat_keeps_every_message_in_hand_invisible(aws, queue, tmp_path):
    """Six messages taken at once, each object 3 s on the engine, one at a time: the last is done ~18 s after it
    was received, past its 10 s visibility. The one heartbeat renews every message in hand, so none comes back
    while in work: each object is settled once, and the engine ran six times."""
    s3, sqs, endpoint = aws
    send_events(sqs, queue, put_images(s3, "slow/")[:6])
    log = tmp_path / "slow.engine"
    env = sim_env(log, **aws_env(endpoint), SUPERRES_HEARTBEAT_S="2")
    env.update(SIM_GPU_MS_PER_MPX=str(3000 / (SIDE * SIDE / 1e6)), SIM_GPU_BATCH="1")
    proc = subprocess.run([*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                           "--batch-size", "10", "--visibility-s", "10", "--wait-s", "1", "--idle-exit-s", "3",
                           "--log-format", "json"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    items = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    outcomes = [line["outcome"] for line in items if line.get("message") == "item"]
    assert outcomes == ["done"] * 6  # no second delivery: nothing skipped, nothing busy
    assert len(read_log(log)) == 6
    assert len(outputs(s3, "done/slow/")) == 6
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


class Deadline:
    """The one method of Lambda's context object the handler uses."""

    def __init__(self, remaining_ms: float):
        self.at = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self.at - time.monotonic()) * 1000)


def test_lambda_starts_only_what_can_finish_in_the_time_left(aws, monkeypatch, tmp_path):
    """Items of ~1 s: with 8 s left, a message is started only while the time left covers the reserve plus
    everything in flight; the rest is reported for retry unstarted, and the handler returns in time."""
    s3, _, _ = aws
    keys = put_images(s3, "drop/")[:12]
    records = [{"messageId": f"m{i}", "receiptHandle": f"r{i}", "eventSource": "aws:sqs",
                "body": s3_event_body("inbox", key, 1, None)} for i, key in enumerate(keys)]
    for key, value in {"SUPERRES_OUTBOX": "s3://outbox/done/", "SUPERRES_INBOX": "s3://inbox/drop/",
                       "SUPERRES_TEST_ENGINE": HOOK, "SIM_GPU_MS_PER_MPX": str(1000 / (SIDE * SIDE / 1e6)),
                       "SIM_GPU_BATCH": "1"}.items():
        monkeypatch.setenv(key, value)
    import importlib

    sys.modules.pop("handler.lambda_function", None)
    lam = importlib.import_module("handler.lambda_function")
    try:
        assert lam.handler({"Records": records[:2]}, Deadline(60_000)) == {"batchItemFailures": []}  # warm
        context = Deadline(8_000)
        answer = lam.handler({"Records": records[2:]}, context)
        assert context.get_remaining_time_in_millis() > 3_000  # returned with time to spare
        failed = {f["itemIdentifier"] for f in answer["batchItemFailures"]}
        started = [r["messageId"] for r in records[2:] if r["messageId"] not in failed]
        assert 1 <= len(started) <= 3, started
        assert failed == {r["messageId"] for r in records[2 + len(started):]}  # the rest, in order, unstarted
        assert outputs(s3, "done/") == {f"done/p{i:02d}.png" for i in range(2 + len(started))}
    finally:
        sys.modules.pop("handler.lambda_function", None)
        lam._processor.close()
