"""HTTP serve benchmark: 8 concurrent clients posting the 60 images of the one-shot benchmark to `POST /upscale`,
against `superres upscale` on the same images, in the same run, as a throughput ratio; p50/p95 latency.

    .venv/bin/python bench/serve_bench.py [--model fsrcnn-x3] [--images 60] [--clients 8] [--rounds 2]

- one-shot: `superres upscale IN --out OUT` as a process; its seconds are its own summary's (the engine load
  excluded, as for the server, which is loaded before the clock starts)
- serve: `superres serve` as a process, warmed with one request, then the clock runs from the first post to the
  last answer; each answer is checked against the one-shot output (the same bytes), latency per request
Both use the engine `--engine` names (default: the one serve's `auto` picks, so both run the same code).
The best of `--rounds` alternating runs of each is kept (the machine is shared: the best is the least disturbed).
"""

import argparse
import concurrent.futures
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))

from serve_client import Served, superres_cmd  # noqa: E402


def oneshot_seconds(src: Path, out: Path, model: str, engine: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
    proc = subprocess.run([*superres_cmd(), "upscale", str(src), "--out", str(out), "--model", model, "--engine",
                           engine, "--model-dir", str(SHARED / "models"), "-q"],
                          env=env, capture_output=True, text=True, check=True)
    m = re.search(r"; ([0-9.]+) s, ", proc.stdout)
    assert m, proc.stdout
    return float(m.group(1))


def serve_round(paths: list[Path], expected: Path, work: Path, model: str, engine: str, clients: int):
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    served = Served(work / "served", work / "serve.log", model=model, env={"SUPERRES_ENGINE": engine}).wait_ready()
    try:
        warm = paths[0].read_bytes()[::-1]  # not an image: a quick 422 warms the HTTP path without caching a result
        served.post_image("/upscale", warm)
        served.post_image("/upscale", (SHARED / "datasets" / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes())
        todo: queue.Queue = queue.Queue()
        for path in paths:
            todo.put(path)
        latencies, wrong, lock = [], [], threading.Lock()

        def client():
            while True:
                try:
                    path = todo.get_nowait()
                except queue.Empty:
                    return
                data = path.read_bytes()
                t = time.perf_counter()
                reply = served.post_image("/upscale", data, filename=path.name)
                took = time.perf_counter() - t
                with lock:
                    latencies.append(took)
                    if reply.status != 200 or reply.body != (expected / path.name).read_bytes():
                        wrong.append((path.name, reply.status))

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for f in [pool.submit(client) for _ in range(clients)]:
                f.result()
        seconds = time.perf_counter() - start
        engine_line = next((line for line in served.log().splitlines() if "engine ready" in line), "")
    finally:
        served.stop()
    return seconds, sorted(latencies), wrong, engine_line


def percentile(values: list[float], p: float) -> float:
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fsrcnn-x3")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine", default=None, help="default: what serve's auto picks for the model")
    args = parser.parse_args()
    from models.catalog import get_model

    spec = get_model(args.model)
    engine = args.engine
    if engine is None:
        info = subprocess.run([*superres_cmd(), "info", "--model", args.model, "--model-dir", str(SHARED / "models")],
                              capture_output=True, text=True, check=True)
        engine = json.loads(info.stdout)["engine"]
    paths = sorted((SHARED / "datasets" / "BSD100" / "LR_bicubic" / f"X{min(spec.scale, 4)}").glob("*.png"))[: args.images]
    import cv2

    out_mpx = sum(cv2.imread(str(p)).shape[0] * cv2.imread(str(p)).shape[1] for p in paths) * spec.scale**2 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for p in paths:
            shutil.copy(p, src / p.name)
        oneshot, serve = [], []
        for r in range(args.rounds):
            oneshot.append(oneshot_seconds(src, Path(tmp) / "oneshot", args.model, engine))
            seconds, latencies, wrong, engine_line = serve_round(paths, Path(tmp) / "oneshot", Path(tmp) / "serve",
                                                                 args.model, engine, args.clients)
            assert not wrong, f"answers that are not the one-shot's bytes: {wrong[:5]}"
            serve.append((seconds, latencies))
        best_oneshot = min(oneshot)
        best_serve, latencies = min(serve, key=lambda s: s[0])
    print(f"model {args.model}, engine {engine}, {len(paths)} BSD100 LR images (x{spec.scale}), {out_mpx:.1f} output "
          f"Mpx, {args.clients} clients, best of {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"serve engine: {engine_line.split('engine ready', 1)[-1].strip()}")
    print(f"| {'path':<34} | {'seconds':>8} | {'images/s':>8} | {'out Mpx/s':>9} | {'vs one-shot':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|{'-' * 12}:|")
    for name, seconds in (("one-shot (superres upscale)", best_oneshot),
                          (f"serve, {args.clients} clients, POST /upscale", best_serve)):
        print(f"| {name:<34} | {seconds:8.2f} | {len(paths) / seconds:8.1f} | {out_mpx / seconds:9.2f} | "
              f"{best_oneshot / seconds:11.2f} |")
    print(f"serve latency per request: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p95 {percentile(latencies, 95) * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    print(f"all rounds: one-shot {', '.join(f'{s:.2f}' for s in oneshot)} s; "
          f"serve {', '.join(f'{s[0]:.2f}' for s in serve)} s")


if __name__ == "__main__":
    main()
