"""The README's local worker try ("S3, SQS and Lambda": the bash block after "against moto"), run as written: the
moto server line on a free port instead of 5000 (the only change to the text), then every other line, in order,
from this checkout; a real `superres worker` takes the one dropped image into `done/bird.png`.

With the AWS CLI on PATH the lines run in bash as they are. Without it (or for the `boto3` case, always) each
`aws SERVICE OPERATION --param value …` line is made the same boto3 call (`create-queue --queue-name X` ->
`create_queue(QueueName=X)`, JSON values decoded, `--body FILE` read); the other lines still run in bash."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.timeout(300)

PORT = "5000"  # the README's port: replaced by a free one
VENV_BIN = Path(sys.executable).parent


def readme_moto_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## S3, SQS and Lambda\n"):]
    section = section[:section.index("\n## ", 1)]
    anchor = section.index("against moto")
    block = re.search(r"```bash\n(.*?)```", section[anchor:], re.DOTALL)
    assert block, "no bash block after 'against moto' in the README's S3 section"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"moto_server exited: {proc.stdout.read() if proc.stdout else ''}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"moto_server did not listen on {port} in {timeout_s:g} s")


def _camel(option: str) -> str:
    return "".join(word.capitalize() for word in option.split("-"))


def aws_line_via_boto3(line: str, env: dict, cwd: Path) -> None:
    """`aws [--endpoint-url URL] SERVICE OPERATION --param value …` as the same boto3 call."""
    words = shlex.split(line)
    assert words[0] == "aws", line
    words, endpoint = words[1:], None
    if words[0] == "--endpoint-url":
        endpoint, words = words[1], words[2:]
    service, operation, rest = words[0], words[1], words[2:]
    assert service in ("sqs", "s3api"), f"only the sqs and s3api commands have a boto3 twin here: {line}"
    params = {}
    while rest:
        option, value, rest = rest[0], rest[1], rest[2:]
        assert option.startswith("--"), line
        name = _camel(option[2:])
        if name == "Body":
            params[name] = (cwd / value).read_bytes()
        elif value[:1] in "{[":
            params[name] = json.loads(value)
        else:
            params[name] = value
    session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                    region_name=env["AWS_DEFAULT_REGION"])
    client = session.client("s3" if service == "s3api" else service, endpoint_url=endpoint)
    getattr(client, operation.replace("-", "_"))(**params)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["aws-cli", "boto3"])
def test_readme_moto_lines_as_written(runner, tmp_path):
    if runner == "aws-cli" and not shutil.which("aws"):
        pytest.skip("the AWS CLI is not installed (the boto3 case runs the same calls)")
    lines = readme_moto_block()
    port = _free_port()
    lines = [line.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}").replace(f"-p {PORT}", f"-p {port}")
             for line in lines]
    assert lines[0].startswith("moto_server ") and lines[0].endswith("&"), lines[0]
    assert any(line.startswith("superres worker ") and "--inbox s3://superres-demo/incoming/" in line
               for line in lines), lines
    assert any("maxReceiveCount" in line and "superres-dlq" in line for line in lines), lines
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SUPERRES_"))}
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")  # no ~/.aws here
    env["SUPERRES_METRICS_PORT"] = "0"  # not in the README: two tests in parallel would share port 9100
    server = subprocess.Popen(["bash", "-c", "exec " + lines[0].rstrip("& ")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, server)
        exports, log = [], []
        for line in lines[1:]:
            if line.startswith("export "):
                exports.append(line)
                for assignment in shlex.split(line[len("export "):]):
                    key, _, value = assignment.partition("=")
                    env[key] = value
                continue
            if runner == "boto3" and line.startswith("aws "):
                aws_line_via_boto3(line, env, REPO)
                log.append(f"$ {line}\n(boto3)")
                continue
            proc = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=180)
            log.append(f"$ {line}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            assert proc.returncode == 0, "\n".join(log)
        assert exports, "the block exports the AWS_* and SUPERRES_S3_ENDPOINT_URL it uses"

        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="superres-demo").get("Contents", []))
        assert "done/bird.png" in keys, f"{keys}\n" + "\n".join(log)
        assert not [k for k in keys if k.startswith("done/incoming/")], keys  # the path below --inbox is kept
        sr = cv2.imdecode(np.frombuffer(s3.get_object(Bucket="superres-demo", Key="done/bird.png")["Body"].read(),
                                        np.uint8), cv2.IMREAD_UNCHANGED)
        lr = cv2.imread(str(REPO.parent / "shared/datasets/Set5/LR_bicubic/X3/birdx3.png"), cv2.IMREAD_UNCHANGED)
        assert sr.shape[:2] == (lr.shape[0] * 3, lr.shape[1] * 3)
        for name in ("superres-jobs", "superres-dlq"):  # both messages handled, nothing dead-lettered
            url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0", (name, attrs)
            if name == "superres-jobs":
                assert json.loads(attrs["RedrivePolicy"])["maxReceiveCount"] in (5, "5"), attrs
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
