"""S3/SQS benchmark: objects/s through SQS workers vs the same files through local one-shot, one worker vs
two, each held to one engine thread; and the S3 overhead per object. Ratios within one run.

    .venv/bin/python bench/s3_bench.py [--images 80] [--model fsrcnn-small-x2]

moto's server runs as its own process on a free loopback port (so it does not share a GIL with anything
measured); S3 -> SQS notifications are configured through the real API; workers are real `superres worker`
processes started before the clock starts (their cold start is not counted).
"""

import argparse
import re
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
sys.path.insert(0, str(REPO / "tests"))
from moto_server import free_port, start_server  # noqa: E402


def run_sqs(endpoint: str, paths: list[Path], workers: int, model: str, tmp: Path) -> float:
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, **keys)
    sqs = boto3.client("sqs", endpoint_url=endpoint, **keys)
    urllib_reset(endpoint)
    s3.create_bucket(Bucket="inbox")
    s3.create_bucket(Bucket="outbox")
    queue = sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket="inbox", NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    env = {**os.environ, **AWS, "SUPERRES_S3_ENDPOINT_URL": endpoint, "SUPERRES_MODEL": model,
           "SUPERRES_MODEL_DIR": str(SHARED / "models"), "SUPERRES_THREADS": "1"}
    logs = [tmp / f"worker-{workers}-{i}.log" for i in range(workers)]
    procs = [subprocess.Popen([str(BIN / "superres"), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                               "--wait-s", "1"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for log in logs]
    while not all("worker ready" in log.read_text() for log in logs):
        time.sleep(0.1)
    data = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    for p, body in zip(paths, data):
        s3.put_object(Bucket="inbox", Key=p.name, Body=body)
    pending = {f"done/{p.name}" for p in paths}
    while pending:
        listed = s3.list_objects_v2(Bucket="outbox", Prefix="done/", MaxKeys=1000).get("Contents", [])
        pending -= {o["Key"] for o in listed}
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    if os.environ.get("BENCH_STAGES"):  # where a worker's time goes, from its own per-item log lines
        sums: dict[str, float] = {}
        for log in logs:
            for key, value in re.findall(r"(\w+)_s=([0-9.]+)", log.read_text()):
                sums[key] = sums.get(key, 0.0) + float(value)
        print(f"{workers} worker(s), stage seconds summed:", {k: round(v, 2) for k, v in sums.items()})
    return seconds


def urllib_reset(endpoint: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()


def run_local(paths: list[Path], model: str, tmp: Path) -> float:
    src = tmp / "local-in"
    src.mkdir()
    for p in paths:
        shutil.copy(p, src / p.name)
    env = {**os.environ, "SUPERRES_MODEL": model, "SUPERRES_MODEL_DIR": str(SHARED / "models"), "SUPERRES_THREADS": "1"}
    out = subprocess.run([str(BIN / "superres"), "upscale", str(src), "--out", str(tmp / "local-out")],
                         env=env, capture_output=True, text=True, check=True)
    # the summary's own seconds: items only, not the process start and model load
    return float(out.stdout.rsplit(";", 1)[1].split(" s,")[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--model", default="fsrcnn-small-x2")
    args = parser.parse_args()
    paths = sorted((SHARED / "datasets" / "BSD100" / "HR").glob("*.png"))[: args.images]
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            local = run_local(paths, args.model, tmp)
            one = run_sqs(endpoint, paths, 1, args.model, tmp)
            two = run_sqs(endpoint, paths, 2, args.model, tmp)
    finally:
        server.terminate()
        server.wait()
    n = len(paths)
    print(f"{n} BSD100 photos (480x321 PNG), model {args.model}, one engine thread per process, {os.cpu_count()} cores")
    print(f"| {'path':<34} | {'seconds':>7} | {'objects/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 36}|{'-' * 8}:|{'-' * 10}:|{'-' * 7}:|")
    print(f"| {'local one-shot (1 process)':<34} | {local:7.2f} | {n / local:9.1f} | {1:6.2f} |")
    print(f"| {'S3 + SQS, 1 worker':<34} | {one:7.2f} | {n / one:9.1f} | {local / one:6.2f} |")
    print(f"| {'S3 + SQS, 2 workers':<34} | {two:7.2f} | {n / two:9.1f} | {local / two:6.2f} |")
    print(f"two workers vs one: {one / two:.2f}x; S3/SQS overhead per object (1 worker - local): "
          f"{(one - local) / n * 1000:.0f} ms")


if __name__ == "__main__":
    main()
