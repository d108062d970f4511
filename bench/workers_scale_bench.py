"""N SQS workers on one queue: do they scale? N = 1, 2, 4, 8 real `superres worker` processes on one moto queue,
each with the simulated GPU (bench/sim_engine.py: a fixed time per input megapixel, sleeping, no CPU), so the
engine's compute is not what is measured: what is, is our coordination cost (S3 ledger writes, SQS receives,
heartbeats and deletes, S3 reads and publishes) and how evenly the messages spread. Goal: N workers >= 0.9 * N
times one worker's rate.

    .venv/bin/python bench/workers_scale_bench.py [--per-worker 30] [--side 48] [--ms-per-item 300] [--ns 1,2,4,8]

Workers start before the clock and wait on the empty queue (their cold start is not counted); the clock runs from
the first message sent to the last output published. moto's server is its own process; every worker and moto share
this machine's cores, so the CPU each item costs (hashing, decoding, encoding, the S3/SQS calls on both sides)
is what limits N here."""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from modes_bench import BIN, Moto, event_body, images, sim_env, wait_for  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args, moto: Moto, n: int, data: list[bytes], tmp: Path) -> tuple[float, float, float]:
    """Seconds for the lot, and the CPU seconds the workers and moto spent meanwhile."""
    moto.reset()
    queue = moto.sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    keys = [f"drop/p{i:05d}.png" for i in range(len(data))]
    for key, body in zip(keys, data):
        moto.s3.put_object(Bucket="inbox", Key=key, Body=body)
    ms_per_mpx = args.ms_per_item / (args.side ** 2 / 1e6)
    bench = argparse.Namespace(ms_per_mpx=ms_per_mpx, batch=args.batch)
    logs = [tmp / f"w{n}-{i}.log" for i in range(n)]
    procs = []
    for i, log in enumerate(logs):
        env = sim_env(bench, tmp / f"engine-{n}-{i}.log", SUPERRES_S3_ENDPOINT_URL=moto.endpoint,
                      SUPERRES_LOG_LEVEL="INFO")
        procs.append(subprocess.Popen([str(BIN / "superres"), "worker", "--queue", queue, "--outbox",
                                       "s3://outbox/done/", "--batch-size", "10", "--wait-s", "1",
                                       "--visibility-s", "60"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(log, "w")))
    try:
        wait_for(lambda: all("worker ready" in log.read_text() for log in logs), 300)
        start = time.perf_counter()
        cpu0 = [cpu_s(p.pid) for p in procs], cpu_s(moto.proc.pid)
        for first in range(0, len(keys), 10):
            moto.sqs.send_message_batch(QueueUrl=queue, Entries=[
                {"Id": str(i), "MessageBody": event_body(k)} for i, k in enumerate(keys[first:first + 10])])
        wait_for(lambda: moto.outputs("done/") >= len(keys), 900)
        seconds = time.perf_counter() - start
        workers_cpu = sum(cpu_s(p.pid) for p in procs) - sum(cpu0[0])
        moto_cpu = cpu_s(moto.proc.pid) - cpu0[1]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
    return seconds, workers_cpu, moto_cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-worker", type=int, default=30, help="messages per worker (N workers: N times this)")
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--ms-per-item", type=float, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ns", default="1,2,4,8")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    moto = Moto()
    rates: dict[int, tuple[int, float, float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in ns:
                count = n * args.per_worker
                seconds, workers_cpu, moto_cpu = run(args, moto, n, images(count, args.side), Path(tmp))
                rates[n] = (count, seconds, workers_cpu, moto_cpu)
                print(f"{n} worker(s): {count} items in {seconds:.2f} s", file=sys.stderr)
    finally:
        moto.close()
    one = rates[ns[0]][0] / rates[ns[0]][1] / ns[0]
    ideal = 1000 / args.ms_per_item
    print(f"{args.per_worker} messages per worker, {args.side}x{args.side} real PNG crops (BSD100), simulated GPU "
          f"{args.ms_per_item:g} ms an item (batch {args.batch}; one engine's ceiling {ideal:.2f} items/s), S3 ledger, "
          f"moto server, {os.cpu_count()} cores shared by all")
    print("| workers | items | seconds | items/s | vs N x one worker | >= 0.9 | CPU ms an item: workers + moto | "
          "cores busy (workers + moto) |")
    print("|---:|---:|---:|---:|---:|:---:|---:|---:|")
    for n in ns:
        count, seconds, workers_cpu, moto_cpu = rates[n]
        ratio = count / seconds / (n * one)
        print(f"| {n} | {count} | {seconds:.2f} | {count / seconds:.2f} | {ratio:.2f} | {'yes' if ratio >= 0.9 else 'no'} "
              f"| {workers_cpu / count * 1000:.0f} + {moto_cpu / count * 1000:.0f} | "
              f"{(workers_cpu + moto_cpu) / seconds:.2f} |")


if __name__ == "__main__":
    main()
