"""S3 and SQS end to end, over HTTP against moto's server: one-shot on s3:// URIs, the Lambda handler on real
notification messages, the SQS worker as real processes (several at once, one SIGKILLed mid-item), and the
S3 inbox watch. No in-process mocks, no patched boto3."""

import importlib
import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from conftest import DATASETS, cli_env, superres_cmd
from handler.cli import main
from moto_server import aws_env, client
from pipeline.adapters.s3_ledger import S3Ledger

MODEL = "fsrcnn-small-x2"


def png_bytes(image) -> bytes:
    ok, data = cv2.imencode(".png", image)
    return data.tobytes()


def photos(count: int, size: int = 64) -> list[bytes]:
    """Distinct real images (crops of BSD100 photos)."""
    paths = sorted((DATASETS / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))[:count]
    return [png_bytes(cv2.imread(str(p))[:size, :size]) for p in paths]


def make_queue(s3, sqs, *, max_receives: int = 3, prefix: str = "drop/"):
    """A queue with a DLQ, fed by the inbox bucket's real S3 notification configuration."""
    dlq = sqs.create_queue(QueueName="superres-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(QueueName="superres-jobs", Attributes={
        "VisibilityTimeout": "30",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}),
    })["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket="inbox", NotificationConfiguration={"QueueConfigurations": [{
        "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}},
    }]})
    return queue, dlq


def keys(s3, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def outputs(s3, prefix: str = "done/") -> set[str]:
    return {k for k in keys(s3, "outbox", prefix) if "/.superres/" not in k}


def test_one_shot_on_s3_uris(aws):
    s3, _, endpoint = aws
    for i, data in enumerate(photos(3)):
        s3.put_object(Bucket="inbox", Key=f"photos/sub/p{i}.png", Body=data)
    s3.put_object(Bucket="inbox", Key="photos/broken.png", Body=b"<html>not an image</html>")
    code = main(["upscale", "s3://inbox/photos/", "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"])
    assert code == 1
    assert outputs(s3, "up/") == {"up/sub/p0.png", "up/sub/p1.png", "up/sub/p2.png"}
    head = s3.head_object(Bucket="outbox", Key="up/sub/p1.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["source-bucket"] == "inbox" and head["Metadata"]["source-key"] == "photos/sub/p1.png"
    assert head["Metadata"]["model"] == MODEL and len(head["Metadata"]["source-sha256"]) == 64
    out = cv2.imdecode(np.frombuffer(s3.get_object(Bucket="outbox", Key="up/sub/p1.png")["Body"].read(), np.uint8), 1)
    assert out.shape == (128, 128, 3)
    record = json.loads(s3.get_object(Bucket="outbox", Key="failed/broken.png.error.json")["Body"].read())
    assert record["error"] == "not_an_image" and record["stage"] == "decode"
    assert s3.get_object(Bucket="outbox", Key="failed/broken.png")["Body"].read() == b"<html>not an image</html>"
    # again: nothing new is upscaled (the S3 ledger remembers)
    assert main(["upscale", "s3://inbox/photos/sub/", "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"]) == 0
    ledger = S3Ledger(client("s3", endpoint), "outbox", ".superres/ledger/up/")
    assert ledger.stats()["engine_runs"] == 3


class FakeContext:
    """The one method of Lambda's context object the handler uses."""

    def __init__(self, remaining_ms: float):
        self.deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def load_lambda(monkeypatch, **env):
    for key, value in {"SUPERRES_OUTBOX": "s3://outbox/done/", "SUPERRES_FAILED": "s3://outbox/failed/",
                       "SUPERRES_INBOX": "s3://inbox/drop/", **env}.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop("handler.lambda_function", None)
    return importlib.import_module("handler.lambda_function")


def sqs_event(sqs, queue: str, expect: int) -> dict:
    """Receive real messages and wrap them the way Lambda's SQS trigger does."""
    records, deadline = [], time.monotonic() + 10
    while len(records) < expect and time.monotonic() < deadline:
        for m in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            records.append({"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
                            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:superres-jobs",
                            "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}})
    assert len(records) == expect
    return {"Records": records}


def test_lambda_handler_on_sqs_messages_from_real_notifications(aws, monkeypatch):
    s3, sqs, _ = aws
    queue, _ = make_queue(s3, sqs)
    lam = load_lambda(monkeypatch)
    good = photos(2)
    s3.put_object(Bucket="inbox", Key="drop/a photo+1.png", Body=good[0])  # space and plus: encoded by S3
    s3.put_object(Bucket="inbox", Key="drop/b.png", Body=good[1])
    s3.put_object(Bucket="inbox", Key="drop/copy of a.png", Body=good[0])  # same bytes: a duplicate
    s3.put_object(Bucket="inbox", Key="drop/bad.png", Body=b"")
    s3.put_object(Bucket="inbox", Key="elsewhere/x.png", Body=good[1])  # filtered out by the notification prefix
    event = sqs_event(sqs, queue, expect=5)  # the s3:TestEvent message + 4 objects

    response = lam.handler(event, FakeContext(60_000))
    assert response == {"batchItemFailures": []}
    assert outputs(s3) == {"done/a photo+1.png", "done/b.png", "done/copy of a.png"}
    assert json.loads(s3.get_object(Bucket="outbox", Key="failed/bad.png.error.json")["Body"].read())["error"] == "empty"
    # outputs in the outbox prefix never become work (loop guard), even if notified
    loop = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": "outbox"}, "object": {"key": "done/b.png", "size": 1}}}]}
    assert lam.handler(loop, FakeContext(60_000)) == {"results": {"done": 0, "duplicate": 0, "failed": 0, "skipped": 0, "retry": 0, "lost-claim": 0}}
    # the same event again (SQS delivers at least once): nothing upscaled twice
    assert lam.handler(event, FakeContext(60_000)) == {"batchItemFailures": []}
    assert lam._processor.ledger.stats()["engine_runs"] == 2


def test_lambda_reports_transient_failures_and_stops_when_time_is_short(aws, monkeypatch):
    s3, sqs, _ = aws
    queue, _ = make_queue(s3, sqs)
    s3.put_object(Bucket="inbox", Key="drop/a.png", Body=photos(1)[0])
    event = sqs_event(sqs, queue, expect=2)
    lam = load_lambda(monkeypatch)
    object_message = next(r["messageId"] for r in event["Records"] if "TestEvent" not in r["body"])
    # little time left: nothing is started, every message comes back for retry
    short = lam.handler(event, FakeContext(1_000))
    assert {f["itemIdentifier"] for f in short["batchItemFailures"]} == {r["messageId"] for r in event["Records"]}
    assert outputs(s3) == set()
    # the outbox bucket is gone (a transient, operational problem): only that message is retried
    for key in keys(s3, "outbox"):
        s3.delete_object(Bucket="outbox", Key=key)
    s3.delete_bucket(Bucket="outbox")
    assert lam.handler(event, FakeContext(60_000)) == {"batchItemFailures": [{"itemIdentifier": object_message}]}


def test_lambda_on_direct_and_eventbridge_events(aws, monkeypatch):
    s3, _, _ = aws
    data = photos(2)
    s3.put_object(Bucket="inbox", Key="drop/direct.png", Body=data[0])
    s3.put_object(Bucket="inbox", Key="drop/bridge ü.png", Body=data[1])
    lam = load_lambda(monkeypatch)
    shared_events = DATASETS.parent / "events"
    direct = json.loads((shared_events / "s3Event.json").read_text())
    direct["Records"][0]["s3"]["bucket"]["name"] = "inbox"
    direct["Records"][0]["s3"]["object"]["key"] = "drop/direct.png"
    assert lam.handler(direct, FakeContext(60_000))["results"]["done"] == 1
    bridge = json.loads((shared_events / "s3EventBridgeNotificationObjectCreatedEvent.json").read_text())
    bridge["detail"]["bucket"]["name"] = "inbox"
    bridge["detail"]["object"]["key"] = "drop/bridge ü.png"  # EventBridge keys are not URL-encoded
    assert lam.handler(bridge, FakeContext(60_000))["results"]["done"] == 1
    assert outputs(s3) == {"done/direct.png", "done/bridge ü.png"}


def start_worker(endpoint: str, queue: str, log_path, *extra: str) -> subprocess.Popen:
    env = cli_env(**aws_env(endpoint), SUPERRES_MODEL=MODEL, SUPERRES_LEASE_S="8", SUPERRES_THREADS="1",
                  SUPERRES_LOG_LEVEL="DEBUG")  # the "upscaling" line that says an item is in hand is DEBUG
    return subprocess.Popen(
        [*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/", "--failed", "s3://outbox/failed/",
         "--visibility-s", "10", "--wait-s", "1", *extra],
        env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
    )


def queue_depth(sqs, queue: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_workers_upscale_each_content_once_and_survive_a_sigkill(aws, tmp_path):
    s3, sqs, endpoint = aws
    queue, dlq = make_queue(s3, sqs, max_receives=5)
    photo = cv2.imread(str(DATASETS / "BSD100" / "HR" / "img_001.png"))
    big = cv2.resize(photo, (1920, 1284), interpolation=cv2.INTER_CUBIC)  # a few seconds' work: killed mid-item
    contents = photos(6, size=96) + [png_bytes(big)]
    for i, data in enumerate(contents):
        s3.put_object(Bucket="inbox", Key=f"drop/{i}.png", Body=data)
    for i in range(3):  # the same bytes under other keys, and the same object sent twice
        s3.put_object(Bucket="inbox", Key=f"drop/again-{i}.png", Body=contents[i])
    s3.put_object(Bucket="inbox", Key="drop/6.png", Body=contents[6])
    s3.put_object(Bucket="inbox", Key="drop/bad.png", Body=b"\x89PNG\r\n\x1a\n truncated")

    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    workers = [start_worker(endpoint, queue, logs[i], "--batch-size", "2") for i in range(2)]
    try:
        deadline, victim = time.monotonic() + 60, None
        while victim is None and time.monotonic() < deadline:
            for i in range(2):
                if logs[i].exists() and "upscaling source=s3://inbox/drop/6.png" in logs[i].read_text():
                    victim = i
            time.sleep(0.02)
        assert victim is not None, "nobody started the big image"
        workers[victim].send_signal(signal.SIGKILL)  # abandoned mid-item: claim, message and all
        workers[victim].wait()
        workers.append(start_worker(endpoint, queue, logs[2]))  # its replacement
        deadline = time.monotonic() + 120
        while queue_depth(sqs, queue) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queue_depth(sqs, queue) == 0, "messages left on the queue"
    finally:
        survivors = [w for w in workers if w.poll() is None]
        for w in survivors:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=60) for w in survivors]
    assert codes == [0, 0]
    # no --inbox given to the workers: outputs keep the whole input key below the outbox prefix
    assert outputs(s3) == {f"done/drop/{i}.png" for i in range(7)} | {f"done/drop/again-{i}.png" for i in range(3)}
    assert keys(s3, "outbox", "failed/") == {"failed/drop/bad.png", "failed/drop/bad.png.error.json"}
    stats = S3Ledger(client("s3", endpoint), "outbox", ".superres/ledger/done/").stats()
    assert stats["max_engine_runs"] == 1 and stats["engine_runs"] == 7  # each distinct content upscaled once
    assert "upscaling source=s3://inbox/drop/6.png" in logs[1 - victim].read_text() + logs[2].read_text()
    assert queue_depth(sqs, dlq) == 0


def test_s3_inbox_watch_takes_each_object_once_across_restarts(aws, tmp_path):
    s3, _, endpoint = aws
    data = photos(4)
    for i in range(3):
        s3.put_object(Bucket="inbox", Key=f"watch/{i}.png", Body=data[i])
    env = cli_env(**aws_env(endpoint), SUPERRES_MODEL=MODEL)
    cmd = [*superres_cmd(), "watch", "--inbox", "s3://inbox/watch/", "--outbox", "s3://outbox/done/",
           "--failed", "s3://outbox/failed/", "--rescan-s", "0.5"]

    def run_until(expected: set[str]) -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "watch.log", "ab"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while outputs(s3) != expected and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert outputs(s3) == expected

    run_until({f"done/{i}.png" for i in range(3)})
    s3.put_object(Bucket="inbox", Key="watch/3.png", Body=data[3])
    run_until({f"done/{i}.png" for i in range(4)})
    stats = S3Ledger(client("s3", endpoint), "outbox", ".superres/ledger/done/").stats()
    assert stats["engine_runs"] == 4
