"""moto in server mode on a free loopback port: S3 and SQS over real HTTP, as boto3 talks to AWS.

Use the `moto_endpoint` fixture (import it in a test module or conftest): it yields the endpoint URL, sets the
AWS_* and SUPERRES_S3_ENDPOINT_URL variables for the test (and for subprocesses that inherit them), and
resets moto's state after each test so tests do not see each other's buckets and queues."""

import os
import socket
import urllib.request

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


@pytest.fixture(scope="session")
def moto_server_url():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request drowns real failures
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


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
