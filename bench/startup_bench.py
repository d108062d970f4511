"""Start-up and end-to-end benchmark (issue 13), whole processes, medians of interleaved runs, as ratios.

    .venv/bin/python bench/startup_bench.py [--model fsrcnn-x4] [--rounds 7] [--images 60] [--engines auto,opencv,...]
        [--also-code DIR]

(an engine as ENGINE/N runs it with --lanes N: `--engines auto,onnxruntime/1` shows what two lanes bring;
`--also-code DIR` adds each engine's row again with another checkout's code, e.g. `git worktree add DIR COMMIT`:
the code before a change and after it, in the same interleaved rounds)

1. Start-up: one 64x64 image, the whole process (interpreter, imports, model load, run, write), `superres upscale`
   with each engine vs the seed script (bench/seed_upscale.py: cv2.dnn_superres read, upsample, write).
2. End to end: the same on 60 small real images (Set14 + BSD100 LR x4, as they are: 70x70 to 180x125 px).
Rounds interleave every command, so a machine busy with something else slows all of them alike; the ONNX cache
is warmed first (as after a first use or in the image), each run writes into a fresh output folder.
"""

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from models.catalog import get_model  # noqa: E402


def small_images(count: int, folder: Path) -> list[Path]:
    sources = sorted((SHARED / "datasets" / "Set14" / "LR_bicubic" / "X4").glob("*.png")) + sorted(
        (SHARED / "datasets" / "BSD100" / "LR_bicubic" / "X4").glob("*.png"))
    folder.mkdir(parents=True)
    out = []
    for path in sources[:count]:
        shutil.copy(path, folder / path.name)
        out.append(folder / path.name)
    return out


def one_small_image(folder: Path) -> Path:
    folder.mkdir(parents=True)
    image = cv2.imread(str(SHARED / "datasets" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"))[:64, :64]
    path = folder / "one64.png"
    cv2.imwrite(str(path), image)
    return path


def commands(spec, engines: list[str], inputs: list[Path], out: Path, input_arg: Path,
             also_code: Path | None = None) -> dict[str, tuple[list[str], dict]]:
    """label -> (command, environment additions)."""
    model_file = SHARED / "models" / spec.filename
    cmds = {"seed script": ([sys.executable, str(REPO / "bench" / "seed_upscale.py"), str(model_file), spec.algorithm,
                             str(spec.scale), str(out), *map(str, inputs)], {})}
    codes = [("", {})] + ([(f" (code at {also_code.name})", {"PYTHONPATH": str(also_code)})] if also_code else [])
    for entry in engines:  # ENGINE, or ENGINE/LANES: that engine with --lanes LANES (e.g. onnxruntime/1)
        engine, _, lanes = entry.partition("/")
        label = f"superres --engine {engine}" + (f" --lanes {lanes}" if lanes else "")
        command = [str(BIN / "superres"), "upscale", str(input_arg), "--out", str(out), "--engine", engine,
                   "--model", spec.name, "--model-dir", str(SHARED / "models"), "-q",
                   *(["--lanes", lanes] if lanes else [])]
        for suffix, extra in codes:  # PYTHONPATH comes before the editable install's finder
            cmds[label + suffix] = (command, extra)
    return cmds


def run_rounds(cmds: dict[str, tuple[list[str], dict]], out: Path, rounds: int, env: dict) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, (cmd, extra) in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            subprocess.run(cmd, env={**env, **extra}, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return times


def table(title: str, times: dict[str, list[float]], count: int) -> None:
    seed = statistics.median(times["seed script"])
    width = max(30, *map(len, times))
    print(f"\n{title}")
    print(f"| {'command':<{width}} | {'median s':>8} | {'min s':>6} | {'images/s':>8} | {'speed vs seed':>13} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}:|{'-' * 7}:|{'-' * 9}:|{'-' * 14}:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:<{width}} | {median:8.3f} | {min(values):6.3f} | {count / median:8.1f} | "
              f"{seed / median:12.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fsrcnn-x4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--engines", default="auto,opencv,onnxruntime,torch")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--also-code", type=Path, help="another checkout whose code runs the same rows again")
    args = parser.parse_args()
    spec = get_model(args.model)
    also = args.also_code.resolve() if args.also_code else None
    if also is not None and not (also / "pipeline" / "stages.py").is_file():
        parser.error(f"--also-code {args.also_code}: not a checkout of this project")
    # our modules' bytecode, as `pip install` compiles it: an editable checkout (PYTHONDONTWRITEBYTECODE set, or
    # files just edited) would otherwise compile them again in every timed process
    for root in (REPO, also) if also else (REPO,):
        for package in ("handler", "pipeline", "models"):
            compileall.compile_dir(str(root / package), quiet=1)
    engines = [e for e in args.engines.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
        env.update({"XDG_CACHE_HOME": str(tmp / "cache"), "SUPERRES_METRICS_PORT": "0"})
        out = tmp / "out"
        one = one_small_image(tmp / "one")
        # warm-up: the ONNX conversion is cached by the model file's checksum (as after a first use)
        run_rounds(commands(spec, engines, [one], out, one, also), out, 1, env)
        print(f"model {spec.name}; {os.cpu_count()} cores; medians of {args.rounds} interleaved rounds; "
              f"python {sys.version.split()[0]}, OpenCV {cv2.__version__}")
        if not args.skip_startup:
            times = run_rounds(commands(spec, engines, [one], out, one, also), out, args.rounds, env)
            table("start-up: one 64x64 image, whole process", times, 1)
        if not args.skip_e2e:
            images = small_images(args.images, tmp / "many")
            times = run_rounds(commands(spec, engines, images, out, tmp / "many", also), out, args.rounds, env)
            table(f"end to end: {len(images)} small images (Set14 + BSD100 LR x4), whole process", times, len(images))


if __name__ == "__main__":
    main()
