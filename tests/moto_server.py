"""moto in server mode on a free loopback port: S3 and SQS over real HTTP, as boto3 talks to AWS.

Use the `moto_endpoint` fixture (import it in a test module or conftest): it yields the endpoint URL, sets the
AWS_* and SUPERRES_S3_ENDPOINT_URL variables for the test (and for subprocesses that inherit them), and
resets moto's state after each test so tests do not see each other's buckets and queues."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """moto's server as its own process on 127.0.0.1:port, once it answers: it shares no GIL, and no garbage
    collection, with the process that drives it (tests, benchmarks)."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **AWS_ENV})
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's server did not start on {url}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_server_url():
    """Its own process, as S3 is (in the test process, late in the suite, its answers slowed the busy checks of
    the S3 modes by 10-20 %)."""
    port = free_port()
    proc = start_server(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def moto_endpoint(moto_server_url, monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SUPERRES_S3_ENDPOINT_URL", moto_server_url)
    yield moto_server_url
    # moto's reset endpoint: every test starts with no buckets and no queues
    urllib.request.urlopen(urllib.request.Request(f"{moto_server_url}/moto-api/reset", method="POST")).read()


def aws_env(endpoint: str) -> dict:
    """Environment for a subprocess that talks to the moto server."""
    return {**AWS_ENV, "SUPERRES_S3_ENDPOINT_URL": endpoint}


def client(service: str, endpoint: str):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(retries={"mode": "standard"}))


def keys(s3, bucket: str, prefix: str = "") -> set[str]:
    """Every key under prefix, page by page."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def queue_with_dlq(sqs, *, max_receives: int, visibility: int) -> tuple[str, str]:
    """The jobs queue and its dead-letter queue (redrive after max_receives receives)."""
    import json

    dlq = sqs.create_queue(QueueName="superres-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(QueueName="superres-jobs", Attributes={
        "VisibilityTimeout": str(visibility),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}),
    })["QueueUrl"]
    return queue, dlq


def s3_event(bucket: str, key: str) -> str:
    """The body of an S3 ObjectCreated notification for one object, as S3 sends it to SQS."""
    import json

    return json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                    "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}]})


def queue_depth(sqs, queue: str) -> int:
    """Messages in the queue, visible or in flight."""
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])
