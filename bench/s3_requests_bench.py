"""S3 requests per object: what exactly-once costs in round trips, counted (not timed: a count does not care how
loaded the machine is). A counting proxy (tests/fault_proxy.py with no faults) sits in front of moto's server;
`superres upscale s3://…` runs as a real process through it, first on new objects, then again (all done).

    .venv/bin/python bench/s3_requests_bench.py [--objects 20] [--code DIR]

`--code DIR` runs another checkout's code (PYTHONPATH=DIR) for a before/after table.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_proxy import FaultProxy  # noqa: E402
from moto_server import AWS_ENV, free_port  # noqa: E402

SHARED = REPO.parent / "shared"


def run(endpoint: str, code: str | None, args: list[str]) -> None:
    env = {**os.environ, **AWS_ENV, "SUPERRES_S3_ENDPOINT_URL": endpoint, "SUPERRES_METRICS_PORT": "0"}
    if code:
        env["PYTHONPATH"] = code
    exe = Path(sys.executable).with_name("superres")
    done = subprocess.run([str(exe), "upscale", *args, "--model", "fsrcnn-small-x2", "--model-dir",
                           str(SHARED / "models")], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"superres failed ({done.returncode}): {done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--code", help="another checkout to run instead of this one")
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    upstream = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    for bucket in ("inbox", "outbox"):
        s3.create_bucket(Bucket=bucket)
    photos = sorted((SHARED / "datasets" / "BSD100" / "LR_bicubic" / "X4").glob("*.png"))[:args.objects]
    for i, path in enumerate(photos):
        s3.put_object(Bucket="inbox", Key=f"in/p{i:03d}.png", Body=cv2.imencode(".png", cv2.imread(str(path)))[1].tobytes())
    cli = ["s3://inbox/in/", "--out", "s3://outbox/up/", "--failed", "s3://outbox/failed/"]
    rows = []
    with tempfile.TemporaryDirectory(), FaultProxy(upstream, rate=0.0) as proxy:
        for label in ("new objects", "again (all done)"):
            before = proxy.counts["requests"]
            run(proxy.url, args.code, cli)
            rows.append((label, (proxy.counts["requests"] - before) / len(photos)))
    server.stop()
    print(f"code: {args.code or REPO}; {len(photos)} objects; fsrcnn-small-x2; one-shot s3:// -> s3://")
    print(f"| {'run':<18} | requests per object |")
    print(f"|{'-' * 20}|{'-' * 21}|")
    for label, per in rows:
        print(f"| {label:<18} | {per:>19.2f} |")


if __name__ == "__main__":
    main()
