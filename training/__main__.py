"""`python -m training train NAME [options]` (also `superres-train`): train one architecture and export it.

Example (the shipped fast-x3): python -m training train fast-x3 --steps 20000 --seed 0 --out models/weights
`python -m training evaluate MODEL... --scale 3` prints Y-PSNR on Set5/Set14/BSD100 (evaluation only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.arch import ARCHITECTURES, STUDY, get_arch
from training.data import image_list, load_pairs
from training.train import TrainConfig, save, train

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
DEFAULT_TRAIN_DIR = SHARED / "datasets" / "train"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one architecture, export .onnx/.pt/.json into --out")
    t.add_argument("name", choices=sorted({**ARCHITECTURES, **STUDY}))
    d = TrainConfig()
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch", type=int, default=d.batch)
    t.add_argument("--patch", type=int, default=d.patch, help="LR patch side (px)")
    t.add_argument("--context", type=int, default=d.context,
                   help="LR px each side of a patch fed in but left out of the loss, except at image edges")
    t.add_argument("--shrinks", default="1",
                   help="scale augmentation: each training image also shrunk by these factors (e.g. 1,0.9,0.8,0.7,0.6)")
    t.add_argument("--loss", choices=("l1", "l2"), default=d.loss,
                   help="l1 (the standard); l2 for a last fine-tuning run (PSNR is an l2 measure)")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (Adam)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--threads", type=int, default=d.threads)
    t.add_argument("--train-dir", type=Path, default=DEFAULT_TRAIN_DIR, help="T91/ and BSDS200/ (HR PNGs)")
    t.add_argument("--init", default="", help="a .pt of another run to start from (tensors of matching shape)")
    t.add_argument("--limit-images", type=int, default=0, help="use only the first N training images (tests)")
    t.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate", help="Y-PSNR on the benchmark sets (bicubic, catalog models)")
    e.add_argument("models", nargs="+", help="catalog names, or bicubic")
    e.add_argument("--scale", type=int, required=True)
    e.add_argument("--sets", default="Set5,Set14,BSD100")
    e.add_argument("--datasets", type=Path, default=SHARED / "datasets")
    e.add_argument("--shared-models", type=Path, default=SHARED / "models")
    e.add_argument("--weights-dir", type=Path, default=None, help="our ONNX files from here, not the bundled ones")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="every model in the torch engine on the CPU at this precision (default: OpenCV for .pb "
                        "files, torch fp32 for ONNX); bf16 needs a CPU with native bf16")
    return parser


def run_evaluate(args) -> int:
    import torch

    from pipeline.errors import ConfigError
    from training.evaluate import evaluate

    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    sets = tuple(args.sets.split(","))
    print("| model | " + " | ".join(f"{s} x{args.scale}" for s in sets) + " |", flush=True)
    for model in args.models:
        try:
            scores = evaluate(model, args.scale, args.datasets, args.shared_models, args.weights_dir, sets,
                              args.precision)
        except ConfigError as exc:  # a model file not here, bf16 on a CPU without it: one line, exit 2
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        print(f"| {model} | " + " | ".join(f"{scores[s]:.2f}" for s in sets) + " |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "evaluate":
        return run_evaluate(args)
    arch = get_arch(args.name)
    try:
        training, validation = image_list(args.train_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit_images:
        training, validation = training[: args.limit_images], validation[:1]
    cfg = TrainConfig(steps=args.steps, batch=args.batch, patch=args.patch, context=args.context, loss=args.loss, lr=args.lr, seed=args.seed,
                      eval_every=args.eval_every, threads=args.threads, init=args.init)
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(f"making LR x{arch.scale} (MATLAB bicubic) for {len(training)} + {len(validation)} images")
    shrinks = tuple(float(s) for s in args.shrinks.split(","))
    net, summary = train(arch, load_pairs(training, arch.scale, shrinks), load_pairs(validation, arch.scale), cfg,
                         log)
    summary["command"] = "python -m training " + " ".join(argv if argv is not None else sys.argv[1:])
    path = save(net, summary, args.out)
    log(f"wrote {path} (val PSNR {summary['final_val_psnr']:.3f} dB, {summary['cpu_s']:.0f} CPU s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
