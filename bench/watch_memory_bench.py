"""Memory of a long-running `superres watch`: does its RSS level off, or grow with every item?

Runs the real console script on N tiny distinct images (12x12 PNGs of random pixels, written under a
temporary name and renamed into the inbox, so each is complete when it appears), fed in batches so the inbox
holds a bounded backlog. Every N/20 settled items (outputs + failures) it reads the process's VmRSS from
/proc/PID/status, then prints a table and the slope over the second half (a process that has levelled off
shows ~0 MiB per 1000 items there).

    .venv/bin/python bench/watch_memory_bench.py --items 5000
    .venv/bin/python bench/watch_memory_bench.py            # 50000: long; run it in the background
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def count_files(folder: Path, suffix: str) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.name.endswith(suffix))


def count_settled(outbox: Path, failed: Path) -> int:
    """Outputs and failure records: every item ends as exactly one of them."""
    return count_files(outbox, ".png") + count_files(failed, ".error.json")


def write_batch(inbox: Path, start: int, count: int, rng: np.random.Generator) -> None:
    for i in range(start, start + count):
        ok, png = cv2.imencode(".png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        assert ok
        part = inbox / f"img{i:07d}.png.part"  # a temporary name: the watcher ignores it until the rename
        part.write_bytes(png.tobytes())
        os.rename(part, inbox / f"img{i:07d}.png")


def slope_mib_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS over items, in MiB per 1000 items."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 1000) if len(points) >= 2 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=200, help="images written per batch")
    ap.add_argument("--backlog", type=int, default=1000, help="most items in the inbox not yet settled")
    ap.add_argument("--model", default="fsrcnn-x2")
    ap.add_argument("--model-dir", default=str(REPO.parent / "shared" / "models"))
    ap.add_argument("--disposition", default="keep", choices=("keep", "move", "delete"))
    ap.add_argument("--workdir", help="where inbox/outbox/failed go (default: a new temporary folder, removed after)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="give up when nothing settles for this long")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="watch-mem-"))
    inbox, outbox, failed = work / "inbox", work / "outbox", work / "failed"
    for folder in (inbox, outbox, failed):
        folder.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("superres")
    cmd = [str(exe), "watch", "--inbox", str(inbox), "--outbox", str(outbox), "--failed", str(failed),
           "--model", args.model, "--model-dir", args.model_dir, "--metrics-port", "0",
           "--disposition", args.disposition]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
    log_path = work / "watch.log"
    rng = np.random.default_rng(20240601)
    every = max(1, args.items // SAMPLES)
    points: list[tuple[int, float]] = []
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        while "watching" not in log_path.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"watch exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        points.append((0, rss_mib(proc.pid)))
        print(f"watch pid {proc.pid} ready after {time.monotonic() - started:.1f} s, RSS {points[0][1]:.1f} MiB; "
              f"work folder {work}", flush=True)
        written = settled = 0
        last_progress = time.monotonic()
        t0 = time.monotonic()
        while settled < args.items:
            if written < args.items and written - settled < args.backlog:
                count = min(args.batch, args.items - written)
                write_batch(inbox, written, count, rng)
                written += count
            else:
                time.sleep(0.05)
            if proc.poll() is not None:
                raise SystemExit(f"watch exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            now_settled = count_settled(outbox, failed)
            if now_settled > settled:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > args.timeout_s:
                raise SystemExit(f"nothing settled for {args.timeout_s:.0f} s at {settled} items")
            settled = now_settled
            if settled >= len(points) * every and len(points) <= SAMPLES:
                points.append((settled, rss_mib(proc.pid)))
                print(f"  {settled:>7} items  {points[-1][1]:8.1f} MiB  {time.monotonic() - t0:7.1f} s", flush=True)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    failures = count_files(failed, ".error.json")

    print(f"\nsuperres watch, {args.items} items of 12x12 PNG, model {args.model}, disposition {args.disposition}: "
          f"{elapsed:.0f} s ({args.items / elapsed:.0f} items/s), {failures} failed")
    print(f"{'items':>8} {'RSS MiB':>9} {'MiB/1000 items':>15}")
    for i, (items, rss) in enumerate(points):
        if i == 0:
            print(f"{items:>8} {rss:>9.1f} {'':>15}")
        else:
            prev_items, prev_rss = points[i - 1]
            per_1000 = (rss - prev_rss) / max(1, items - prev_items) * 1000
            print(f"{items:>8} {rss:>9.1f} {per_1000:>15.3f}")
    half = [p for p in points if p[0] >= args.items / 2]
    print(f"slope over the second half ({half[0][0]}..{half[-1][0]} items): "
          f"{slope_mib_per_1000(half):.3f} MiB per 1000 items")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
