"""`superres enqueue`: a backfill of an existing prefix fanned out as S3-event messages, drained by a real worker;
enqueueing twice upscales nothing twice (the workers' ledger skips what is done)."""

import json
import subprocess
from datetime import datetime, timezone

import cv2
import pytest

from conftest import DATASETS, cli_env, superres_cmd
from handler.enqueue import Progress, s3_event_body, wanted
from moto_server import aws_env, client
from pipeline.adapters.s3_ledger import S3Ledger
from pipeline.events import ObjectRef, parse_sqs_body

MODEL = "fsrcnn-small-x2"


@pytest.mark.parametrize("key", ["plain.png", "a folder/with space+plus.png", "ü/ñ&=?.jpg", "deep/a/b/c.webp"])
def test_the_message_is_what_s3_sends_and_parses_back_to_the_object(key):
    body = s3_event_body("bucket", key, 1234, "abc123", region="eu-west-1",
                         now=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc))
    record = json.loads(body)["Records"][0]
    assert record["eventSource"] == "aws:s3" and record["eventName"] == "ObjectCreated:Put"
    assert record["eventTime"] == "2026-01-02T03:04:05.678Z" and record["awsRegion"] == "eu-west-1"
    assert " " not in record["s3"]["object"]["key"]  # encoded form-style, as S3 does
    refs, skipped = parse_sqs_body(body)
    assert skipped == [] and refs == [ObjectRef("bucket", key, 1234, "abc123")]


def test_only_image_objects_outside_our_own_places_are_work():
    refs = [ObjectRef("b", k) for k in ("in/a.png", "in/b.JPG", "in/notes.txt", "in/c.png.part", "in/.~d.png",
                                        "in/noext", "out/done.png")]
    kept, left_out = wanted(refs, [("b", "out/")])
    assert [r.key for r in kept] == ["in/a.png", "in/b.JPG"]
    assert left_out == 5


def test_progress_is_one_line_that_ends_with_the_total(tmp_path):
    out = open(tmp_path / "err", "w+")
    progress = Progress(out, every_s=0)
    progress.show("listed 10")
    progress.show("listed 20 (done)", final=True)
    out.seek(0)
    assert out.read().splitlines() == ["listed 10", "listed 20 (done)"]


def photos(count: int) -> list[bytes]:
    paths = sorted((DATASETS / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))[:count]
    return [cv2.imencode(".png", cv2.imread(str(p))[:48, :48])[1].tobytes() for p in paths]


def queue_depth(sqs, queue: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def enqueue(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*superres_cmd(), "enqueue", *args], env=cli_env(**aws_env(endpoint), SUPERRES_MODEL=MODEL),
                          capture_output=True, text=True, timeout=120)


def drain(endpoint: str, queue: str) -> subprocess.CompletedProcess:
    return subprocess.run([*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                           "--inbox", "s3://inbox/old/", "--batch-size", "10", "--wait-s", "1", "--idle-exit-s", "2"],
                          env=cli_env(**aws_env(endpoint), SUPERRES_MODEL=MODEL), capture_output=True, text=True,
                          timeout=300)


def outputs(s3) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="outbox", Prefix="done/")
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_a_backfill_is_drained_by_a_real_worker_and_enqueueing_twice_upscales_nothing_twice(aws):
    s3, sqs, endpoint = aws
    queue = sqs.create_queue(QueueName="superres-jobs", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    data = photos(12)
    for i, body in enumerate(data):
        s3.put_object(Bucket="inbox", Key=f"old/{i // 4}/p {i}.png", Body=body)  # three "folders", spaces
    s3.put_object(Bucket="inbox", Key="old/0/same as p 0.png", Body=data[0])  # a duplicate content
    s3.put_object(Bucket="inbox", Key="old/readme.txt", Body=b"not an image")
    s3.put_object(Bucket="inbox", Key="other/x.png", Body=data[1])  # outside the prefix
    images = {f"done/{i // 4}/p {i}.png" for i in range(12)} | {"done/0/same as p 0.png"}

    first = enqueue(endpoint, "s3://inbox/old/", "--queue", queue)
    assert first.returncode == 0, first.stderr
    assert "listed 14, sent 13, left out 1 (done)" in first.stderr.splitlines()[-1]
    assert queue_depth(sqs, queue) == 13
    worker = drain(endpoint, queue)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert set(outputs(s3)) == images and queue_depth(sqs, queue) == 0
    before = outputs(s3)
    ledger = S3Ledger(client("s3", endpoint), "outbox", ".superres/ledger/done/")
    assert ledger.stats()["engine_runs"] == 12  # the duplicate was copied, not upscaled

    again = enqueue(endpoint, "s3://inbox/old/", "--queue", queue)
    assert again.returncode == 0 and queue_depth(sqs, queue) == 13
    assert drain(endpoint, queue).returncode == 0
    assert queue_depth(sqs, queue) == 0
    assert ledger.stats()["engine_runs"] == 12  # nothing upscaled twice
    assert outputs(s3) == before  # nor published again


@pytest.mark.parametrize("args, says", [
    (["inbox/old/", "--queue", "QUEUE"], "enqueue takes an S3 prefix"),
    (["s3://inbox/old/"], "enqueue needs --queue"),
    (["s3://inbox/old/", "--queue", "MISSING"], "does not exist"),
    (["s3://no-such-bucket/x/", "--queue", "QUEUE"], "does not exist"),
])
def test_set_up_errors_are_one_line_and_exit_2(aws, args, says):
    _, sqs, endpoint = aws
    queue = sqs.create_queue(QueueName="superres-jobs")["QueueUrl"]
    missing = queue.rsplit("/", 1)[0] + "/nope"
    done = enqueue(endpoint, *[{"QUEUE": queue, "MISSING": missing}.get(a, a) for a in args])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("superres: error:") and says in lines[0], lines
