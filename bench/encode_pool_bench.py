"""Does encoding on a pool help? The stage runner with 1, 2 and 4 encoder threads, on the simulated GPU (a fast
one, so that encoding is the slowest stage: a GPU running a small model on big outputs), PNG at the fast setting
and at zlib level 6, and JPEG. Items/s of the whole pipeline (read, decode, engine, encode, publish, ledger), and
the PNG sizes, in one run.

    .venv/bin/python bench/encode_pool_bench.py [--images 16] [--side 256] [--scale-model fsrcnn-x4]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from sim_engine import SimulatedGPU  # noqa: E402


def run(paths: list[Path], model: str, fmt: str, png: str, encoders: int, tmp: Path) -> tuple[float, int]:
    from handler.runtime import _Clients, open_ledger, open_place
    from models.catalog import get_model
    from pipeline.adapters.local_files import LocalFile
    from pipeline.process import Options, Processor
    from pipeline.settings import load_settings
    from pipeline.stages import StageRunner, Window

    out = tmp / f"{fmt}-{png}-{encoders}"
    s = load_settings(outbox=str(out), model=model, format=fmt, png_compression=png)
    spec = get_model(s.model)
    clients = _Clients(None)
    engine = SimulatedGPU(spec, ms_per_mpx=1.0, batch=1, interpolation=cv2.INTER_CUBIC)  # outputs like real ones
    processor = Processor(engine, spec, Options.from_settings(s),
                          open_ledger(s.ledger_location(), 600, clients), open_place(s.outbox, clients),
                          open_place(s.failed_location(), clients))
    runner = StageRunner(processor, queue_max=8, encoders=encoders)
    window = Window(runner, 8)
    start = time.perf_counter()
    for p in paths:
        while not window.room():
            window.wait(1)
            window.take()
        window.submit(LocalFile(p, p.name), p)
    runner.close()
    results = window.take(all=True)
    seconds = time.perf_counter() - start
    processor.close()
    assert all(r.outcome == "done" for _, r in results), {r.outcome for _, r in results}
    return seconds, sum(f.stat().st_size for f in out.glob("*.*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--model", default="fsrcnn-x4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for i, p in enumerate(sorted((SHARED / "datasets" / "BSD100" / "HR").glob("*.png"))[:args.images]):
            cv2.imwrite(str(src / f"p{i:03d}.png"), cv2.imread(str(p))[:args.side, :args.side])
        paths = sorted(src.iterdir())
        rows = []
        for fmt, png in (("png", "fast"), ("png", "6"), ("jpeg", "fast")):
            row = [f"{fmt.upper()}" + (f", compression {png}" if fmt == "png" else " q95")]
            for encoders in (1, 2, 4):
                best = float("inf")
                for attempt in range(args.repeat):
                    seconds, size = run(paths, args.model, fmt, png, encoders, tmp / str(attempt))
                    best = min(best, seconds)
                row.append(len(paths) / best)
            row.append(size / len(paths) / 1e6)
            rows.append(row)
            print(row, file=sys.stderr)
    out_side = args.side * int(args.model.rsplit("x", 1)[1])
    print(f"{len(paths)} BSD100 crops {args.side}x{args.side} -> {out_side}x{out_side} outputs (cubic), simulated GPU "
          f"at 1 ms/Mpx (encoding is the slowest stage), best of {args.repeat}, {os.cpu_count()} cores")
    print("| output | items/s, 1 encoder | 2 encoders | 4 encoders | MB an output |")
    print("|---|---:|---:|---:|---:|")
    for name, one, two, four, mb in rows:
        print(f"| {name} | {one:.2f} | {two:.2f} ({two / one:.2f}x) | {four:.2f} ({four / one:.2f}x) | {mb:.2f} |")


if __name__ == "__main__":
    main()
