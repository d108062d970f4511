"""The training loop: L1 loss, Adam, cosine decay of the learning rate, seeded, with progress lines.

Reproducible from the seed: torch's and the sampler's generators are seeded, the thread count is fixed, and
only deterministic CPU ops are used; the same command gives the same weights bit for bit on the same machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.arch import ArchSpec, SRNet, fuse, macs_per_pixel
from training.data import Pair, PatchSampler, psnr
from training.export import write_onnx


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20_000
    batch: int = 32
    patch: int = 32  # LR side
    context: int = 0  # LR pixels each side of a patch seen but not in the loss (PatchSampler)
    loss: str = "l1"  # l1; l2 (mean squared error: what PSNR measures, for a last fine-tuning run)
    lr: float = 2e-3
    lr_min: float = 1e-5
    warmup: int = 200
    seed: int = 0
    eval_every: int = 1000
    threads: int = 2
    init: str = ""  # a .pt of another run: its tensors of matching shape start this one (head and body)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from cfg.lr to cfg.lr_min at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))


def masked_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error over the pixels where mask is 1 (all of them without --context)."""
    error = out - target
    error = error.abs() if kind == "l1" else error.square()
    return (error * mask).sum() / mask.sum()


def start_from(net: SRNet, state: dict, log: Callable[[str], None]) -> None:
    """Copy the tensors whose name and shape match (a model of another scale: all but the tail), as EDSR
    starts its x3/x4 from x2."""
    own = net.state_dict()
    taken = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(taken)
    net.load_state_dict(own)
    log(f"started from {len(taken)} of {len(own)} tensors of another run")


@torch.no_grad()
def validate(net: SRNet, pairs: list[Pair]) -> float:
    """Mean luma PSNR (border = scale) over the validation images, whole images, output clipped to [0, 1]."""
    net.eval()
    scores = []
    for pair in pairs:
        out = net(torch.from_numpy(pair.lr)[None, None]).clamp_(0, 1)[0, 0].numpy()
        scores.append(psnr(out, pair.hr, net.arch.scale))
    net.train()
    return float(np.mean(scores))


def train(arch: ArchSpec, train_pairs: list[Pair], val_pairs: list[Pair], cfg: TrainConfig,
          log: Callable[[str], None] = print) -> tuple[SRNet, dict]:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    net = SRNet(arch)
    if cfg.init:
        start_from(net, torch.load(cfg.init, weights_only=True), log)
    net = net.to(memory_format=torch.channels_last)  # oneDNN's small-channel convs: ~1.4x faster in NHWC
    sampler = PatchSampler(train_pairs, arch.scale, cfg.patch, cfg.seed, cfg.context)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    log(f"{arch.name}: x{arch.scale} C{arch.channels} D{arch.depth} {arch.block}, {macs_per_pixel(arch)} MACs/px, "
        f"{sum(p.numel() for p in net.parameters())} trainable params; {len(train_pairs)} training images, "
        f"{len(val_pairs)} validation; {cfg}")
    history = []
    started, cpu_started = time.monotonic(), time.process_time()
    running = 0.0
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        lr_batch, hr_batch, mask = sampler.batch(cfg.batch)
        x = torch.from_numpy(lr_batch).contiguous(memory_format=torch.channels_last)
        loss = masked_loss(net(x), torch.from_numpy(hr_batch), torch.from_numpy(mask), cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            count = cfg.eval_every if done % cfg.eval_every == 0 else done % cfg.eval_every
            val = validate(net, val_pairs) if val_pairs else float("nan")
            history.append({"step": done, "loss": running / count, "val_psnr": val})
            log(f"step {done}/{cfg.steps}  loss {running / count:.5f}  lr {learning_rate(cfg, step):.2e}  "
                f"val PSNR {val:.3f} dB  {time.monotonic() - started:.0f} s")
            running = 0.0
    summary = {
        "arch": asdict(arch),
        "config": asdict(cfg),
        "macs_per_pixel": macs_per_pixel(arch),
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "torch": torch.__version__,
        "history": history,
        "final_val_psnr": history[-1]["val_psnr"] if history else None,
    }
    return net, summary


def save(net: SRNet, summary: dict, out_dir: Path) -> Path:
    """<out>/<name>.onnx (fused), <name>.pt (the trainable state) and <name>.json (config, history, times)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = net.arch.name
    onnx_path = out_dir / f"{name}.onnx"
    seed = summary["config"]["seed"]
    write_onnx(fuse(net), onnx_path, doc=f"{name}: trained by `python -m training train`, seed {seed}")
    torch.save(net.state_dict(), out_dir / f"{name}.pt")
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return onnx_path
