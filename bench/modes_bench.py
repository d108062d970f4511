"""How busy each long-running mode keeps the engine: watch (local folder, S3 prefix), the SQS worker and a Lambda
batch, each as a real process fed real images, on the simulated GPU (bench/sim_engine.py: a fixed time per input
megapixel, sleeping, no CPU), pipelined (the default: several items in flight) and one item at a time
(SUPERRES_IN_FLIGHT=1, what every mode but one-shot did before). Busy = the engine's busy seconds over the span
from its first call's start to its last call's end.

    .venv/bin/python bench/modes_bench.py [--images 48] [--side 96] [--ms-per-mpx 10000] [--batch 4]

moto's server runs as its own process on a free loopback port. A Lambda batch runs in its own process too: the
handler module imported (cold start) and called with an SQS event of one message per image."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import cv2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
HOOK = f"{REPO / 'bench' / 'sim_engine.py'}:load"
MODEL = "fsrcnn-small-x2"

sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from moto_server import free_port, start_server  # noqa: E402
from sim_engine import busy_fraction, read_log  # noqa: E402


class Moto:
    """moto's server as its own process (it does not share a GIL with anything measured)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(self.port)
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, **keys)
        self.sqs = boto3.client("sqs", endpoint_url=self.endpoint, **keys)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()
        for bucket in ("inbox", "outbox"):
            self.s3.create_bucket(Bucket=bucket)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()

    def outputs(self, prefix: str) -> int:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket="outbox", Prefix=prefix)
        return sum(len(page.get("Contents", [])) for page in pages)


def images(count: int, side: int) -> list[bytes]:
    paths = sorted((SHARED / "datasets" / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))
    paths = (paths * (count // len(paths) + 1))[:count]
    out = []
    for i, p in enumerate(paths):
        img = cv2.imread(str(p))
        y = (i // 100) * 7 % max(1, img.shape[0] - side)  # repeats of a photo: another crop, other content
        out.append(cv2.imencode(".png", img[y:y + side, :side])[1].tobytes())
    return out


def sim_env(args, log: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
    env.update(AWS)
    env.update({"SUPERRES_MODEL": MODEL, "SUPERRES_TEST_ENGINE": HOOK, "SIM_GPU_MS_PER_MPX": str(args.ms_per_mpx),
                "SIM_GPU_BATCH": str(args.batch), "SIM_GPU_LOG": str(log), "SUPERRES_METRICS_PORT": "0",
                "SUPERRES_LOG_LEVEL": "WARNING", **extra})
    return env


def wait_for(condition, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.1)


def event_body(key: str) -> str:
    from handler.enqueue import s3_event_body

    return s3_event_body("inbox", key, 1, None)


def local_watch(args, moto, data, tmp: Path, extra: dict) -> Path:
    inbox, outbox, log = tmp / "in", tmp / "out", tmp / "engine.log"
    inbox.mkdir()
    for i, body in enumerate(data):
        (inbox / f"p{i:04d}.png").write_bytes(body)
    proc = subprocess.Popen([str(BIN / "superres"), "watch", "--inbox", str(inbox), "--outbox", str(outbox),
                             "--settle-s", "0"], env=sim_env(args, log, **extra), stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "err.log", "w"))
    wait_for(lambda: outbox.is_dir() and len(list(outbox.glob("*.png"))) == len(data))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return log


def put_all(moto, data) -> list[str]:
    keys = [f"drop/p{i:04d}.png" for i in range(len(data))]
    for key, body in zip(keys, data):
        moto.s3.put_object(Bucket="inbox", Key=key, Body=body)
    return keys


def s3_watch(args, moto, data, tmp: Path, extra: dict) -> Path:
    put_all(moto, data)
    log = tmp / "engine.log"
    proc = subprocess.Popen([str(BIN / "superres"), "watch", "--inbox", "s3://inbox/drop/", "--outbox",
                             "s3://outbox/done/", "--rescan-s", "1"],
                            env=sim_env(args, log, SUPERRES_S3_ENDPOINT_URL=moto.endpoint, **extra),
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "err.log", "w"))
    wait_for(lambda: moto.outputs("done/") == len(data))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return log


def worker(args, moto, data, tmp: Path, extra: dict) -> Path:
    keys = put_all(moto, data)
    queue = moto.sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    for start in range(0, len(keys), 10):
        moto.sqs.send_message_batch(QueueUrl=queue, Entries=[
            {"Id": str(i), "MessageBody": event_body(k)} for i, k in enumerate(keys[start:start + 10])])
    log = tmp / "engine.log"
    subprocess.run([str(BIN / "superres"), "worker", "--queue", queue, "--outbox", "s3://outbox/done/",
                    "--batch-size", "10", "--wait-s", "1", "--idle-exit-s", "2"],
                   env=sim_env(args, log, SUPERRES_S3_ENDPOINT_URL=moto.endpoint, **extra), check=True,
                   stdout=subprocess.DEVNULL, stderr=open(tmp / "err.log", "w"), timeout=600)
    assert moto.outputs("done/") == len(data)
    return log


LAMBDA = """
import json, sys
import handler.lambda_function as lam
event = json.load(open(sys.argv[1]))
answer = lam.handler(event, None)
assert answer == {"batchItemFailures": []}, answer
"""


def lambda_batch(args, moto, data, tmp: Path, extra: dict) -> Path:
    keys = put_all(moto, data)
    event = {"Records": [{"messageId": f"m{i}", "receiptHandle": f"r{i}", "eventSource": "aws:sqs",
                          "body": event_body(k)} for i, k in enumerate(keys)]}
    (tmp / "event.json").write_text(json.dumps(event))
    log = tmp / "engine.log"
    subprocess.run([sys.executable, "-c", LAMBDA, str(tmp / "event.json")], cwd=REPO, check=True,
                   env=sim_env(args, log, SUPERRES_S3_ENDPOINT_URL=moto.endpoint, SUPERRES_OUTBOX="s3://outbox/done/",
                               SUPERRES_INBOX="s3://inbox/drop/", **extra),
                   stdout=subprocess.DEVNULL, stderr=open(tmp / "err.log", "w"), timeout=600)
    assert moto.outputs("done/") == len(data)
    return log


MODES = (("watch, local folder", local_watch), ("watch, S3 prefix", s3_watch), ("SQS worker", worker),
         ("Lambda batch", lambda_batch))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--ms-per-mpx", type=float, default=10_000)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    data = images(args.images, args.side)
    engine_s = args.images * args.side ** 2 / 1e6 * args.ms_per_mpx / 1000
    moto = Moto()
    rows = []
    try:
        for name, run in MODES:
            row = [name]
            for label, extra in (("pipelined", {}), ("one at a time", {"SUPERRES_IN_FLIGHT": "1"})):
                moto.reset()
                with tempfile.TemporaryDirectory() as tmp:
                    calls = read_log(run(args, moto, data, Path(tmp), extra))
                span = max(e for _, e in calls) - min(s for s, _ in calls)
                row += [busy_fraction(calls), span, len(calls)]
            rows.append(row)
            print(f"{name}: pipelined {row[1]:.1%} busy ({row[3]} calls), one at a time {row[4]:.1%}", file=sys.stderr)
    finally:
        moto.close()
    per_item = args.side ** 2 / 1e6 * args.ms_per_mpx
    print(f"{args.images} real images ({args.side}x{args.side} crops of BSD100, PNG), simulated GPU "
          f"{args.ms_per_mpx:g} ms/Mpx ({per_item:.0f} ms an image, batch {args.batch}; {engine_s:.1f} s of engine "
          f"work), {os.cpu_count()} cores")
    print("| mode | engine busy, pipelined | engine calls | engine busy, one at a time | span pipelined / one at a time |")
    print("|---|---:|---:|---:|---:|")
    for name, busy, span, calls, busy1, span1, _ in rows:
        print(f"| {name} | {busy:.1%} | {calls} | {busy1:.1%} | {span:.2f} s / {span1:.2f} s |")


if __name__ == "__main__":
    main()
