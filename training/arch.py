"""The architectures, as data, and their two forms: the trainable module and the fused plain graph.

Every design here is the same shape at inference: `depth + 2` 3x3 convolutions at LR resolution (a head
1 -> C, `depth` bodies C -> C, a tail C -> scale^2), PReLU after all but the tail, plus the input itself added
to every one of the scale^2 sub-pixel channels (a nearest-neighbour residual: a fixed 1x1 conv of ones, so it
costs scale^2 MACs instead of a bicubic kernel's 25 * scale^2), then DepthToSpace. The block kind changes only
training: "rep" trains each 3x3 conv as 3x3 + 1x1 (+ identity where C -> C), which is one linear map, fused
into a single 3x3 at export (RepVGG / ECBSR's re-parameterisation without BatchNorm); "esq" trains it as a 3x3
expanding to 2x the width then a 1x1 back, plus the 1x1 and identity branches (ECBSR's expand-squeeze, SESR's
collapsible linear block), also one linear map, also fused.

Call contract of both forms: input N x 1 x H x W float32 luma in [0, 1] (Y of YCrCb, as dnn_superres feeds
its Y models), output N x 1 x sH x sW, not clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """One trainable design: name, scale, width, number of body convs, block kind, residual."""

    name: str
    scale: int
    channels: int
    depth: int
    block: str  # "plain" | "rep" | "esq"
    residual: str = "bicubic"  # "bicubic" (separable, 5s + 5s^2 MACs) | "nearest" (s^2 MACs)


def bicubic_phases(scale: int) -> np.ndarray:
    """(scale, 5) float32: the 1-D MATLAB bicubic weights (a = -0.5) of LR taps -2..2 for each of the `scale`
    output phases of an integer upscale (phase r samples LR coordinate i + (r + 0.5) / scale - 0.5)."""
    offsets = (np.arange(scale) + 0.5) / scale - 0.5
    distance = np.abs(offsets[:, None] - np.arange(-2, 3)[None, :])
    weights = np.where(distance <= 1, 1.5 * distance**3 - 2.5 * distance**2 + 1,
                       np.where(distance < 2, -0.5 * distance**3 + 2.5 * distance**2 - 4 * distance + 2, 0))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def residual_kernels(scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The bicubic upscale as two fixed convs: vertical (s, 1, 5, 1) 1 -> s phases, then horizontal grouped
    (s*s, 1, 1, 5), group v making sub-pixels v*s + h. With DepthToSpace that is MATLAB's bicubic x s (zero
    padding at the image border instead of MATLAB's mirror: the network learns the difference)."""
    phases = bicubic_phases(scale)
    vertical = phases[:, None, :, None].copy()
    horizontal = np.tile(phases, (scale, 1))[:, None, None, :].copy()
    return vertical, horizontal


# The shipped tiers. fast-xN: at most the MACs/px of the GSoC FSRCNN of the same scale (8,152 / 8,432 / 8,824,
# counted from its layers); x4 is one channel narrower because its tail is 16 sub-pixels wide.
# quality-xN: at most 10x that. The design study (docs/models.md: plain beat rep and esq per CPU second, and
# four 14-wide bodies beat three 16-wide ones at the same MACs) picked plain convs, deeper and narrower.
ARCHITECTURES: dict[str, ArchSpec] = {a.name: a for a in [
    ArchSpec("fast-x2", 2, 14, 4, "plain"),
    ArchSpec("fast-x3", 3, 14, 4, "plain"),
    ArchSpec("fast-x4", 4, 13, 4, "plain"),
    ArchSpec("quality-x2", 2, 32, 8, "plain"),
    ArchSpec("quality-x3", 3, 32, 8, "plain"),
    ArchSpec("quality-x4", 4, 32, 8, "plain"),
]}

# The designs compared at x3 before choosing (docs/models.md "Design study"): same MACs budget, ~8.4 k/px.
STUDY: dict[str, ArchSpec] = {a.name: a for a in [
    ArchSpec("study-plain-c16d3", 3, 16, 3, "plain", "nearest"),
    ArchSpec("study-rep-c16d3", 3, 16, 3, "rep", "nearest"),
    ArchSpec("study-plain-c14d4", 3, 14, 4, "plain", "nearest"),
    ArchSpec("study-plain-c12d5", 3, 12, 5, "plain", "nearest"),
    ArchSpec("study-esq-c16d3", 3, 16, 3, "esq", "nearest"),
    ArchSpec("study-plain-c14d4-bicubic", 3, 14, 4, "plain", "bicubic"),
]}


def get_arch(name: str) -> ArchSpec:
    table = {**ARCHITECTURES, **STUDY}
    if name not in table:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(table)}")
    return table[name]


def layer_shapes(arch: ArchSpec) -> list[tuple[int, int]]:
    """(in, out) channels of each 3x3 conv, head to tail."""
    c = arch.channels
    return [(1, c)] + [(c, c)] * arch.depth + [(c, arch.scale**2)]


class RepConv(nn.Module):
    """A 3x3 conv trained as 3x3 (or 3x3 expand + 1x1 squeeze) + 1x1 (+ identity when in == out); `fused()` is
    the one equivalent 3x3."""

    def __init__(self, cin: int, cout: int, block: str):
        super().__init__()
        self.expand = nn.Conv2d(cin, 2 * max(cin, cout), 3, padding=1) if block == "esq" else None
        self.conv3 = nn.Conv2d(2 * max(cin, cout), cout, 1) if block == "esq" else nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 1) if block != "plain" else None
        self.identity = block != "plain" and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.expand(x) if self.expand is not None else x)
        if self.conv1 is not None:
            y = y + self.conv1(x)
        if self.identity:
            y = y + x
        return y

    @torch.no_grad()
    def fused(self) -> tuple[np.ndarray, np.ndarray]:
        if self.expand is not None:  # squeeze(expand(x)): W[o, i] = sum_e S[o, e] E[e, i], b = S b_E + b_S
            squeeze = self.conv3.weight[:, :, 0, 0]
            weight = torch.einsum("oe,eihw->oihw", squeeze, self.expand.weight)
            bias = squeeze @ self.expand.bias + self.conv3.bias
        else:
            weight = self.conv3.weight.detach().clone()
            bias = self.conv3.bias.detach().clone()
        if self.conv1 is not None:
            weight[:, :, 1:2, 1:2] += self.conv1.weight
            bias += self.conv1.bias
        if self.identity:
            weight[:, :, 1, 1] += torch.eye(weight.shape[0])
        return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)


class SRNet(nn.Module):
    """The trainable form of an ArchSpec."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.arch = arch
        shapes = layer_shapes(arch)
        self.convs = nn.ModuleList(RepConv(cin, cout, arch.block) for cin, cout in shapes)
        self.acts = nn.ModuleList(nn.PReLU(cout, init=0.1) for _, cout in shapes[:-1])
        self.shuffle = nn.PixelShuffle(arch.scale)
        vertical, horizontal = residual_kernels(arch.scale)
        self.register_buffer("res_vertical", torch.from_numpy(vertical), persistent=False)
        self.register_buffer("res_horizontal", torch.from_numpy(horizontal), persistent=False)
        # The tail starts near zero so the untrained net is the nearest-neighbour upscale, not noise.
        with torch.no_grad():
            tail = self.convs[-1]
            for conv in (tail.conv3, tail.conv1):
                if conv is not None:
                    conv.weight.mul_(0.1)
                    conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv, act in zip(self.convs[:-1], self.acts):
            y = act(conv(y))
        return self.shuffle(self.convs[-1](y) + residual(self.arch, x, self.res_vertical, self.res_horizontal))


def residual(arch: "ArchSpec", x: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The upscale the network's sub-pixels are added to, before DepthToSpace."""
    if arch.residual == "nearest":
        return x  # broadcast: the input added to every sub-pixel channel
    y = nn.functional.conv2d(x, vertical, padding=(2, 0))
    return nn.functional.conv2d(y, horizontal, padding=(0, 2), groups=arch.scale)


@dataclass
class FusedNet:
    """The inference form: plain 3x3 convs (weight OIHW, bias, PReLU slope or None for the tail)."""

    scale: int
    layers: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    residual: str = "bicubic"


def fuse(net: SRNet) -> FusedNet:
    layers = []
    for i, conv in enumerate(net.convs):
        weight, bias = conv.fused()
        slope = net.acts[i].weight.detach().numpy().astype(np.float32).copy() if i < len(net.acts) else None
        layers.append((weight, bias, slope))
    return FusedNet(net.arch.scale, layers, net.arch.residual)


def fused_forward(fused: FusedNet, x: torch.Tensor) -> torch.Tensor:
    """The fused graph in torch ops (for tests: it must equal the trainable module)."""
    y = x
    for weight, bias, slope in fused.layers:
        y = nn.functional.conv2d(y, torch.from_numpy(weight), torch.from_numpy(bias), padding=1)
        if slope is not None:
            y = nn.functional.prelu(y, torch.from_numpy(slope))
    arch = ArchSpec("fused", fused.scale, 0, 0, "plain", fused.residual)
    vertical, horizontal = (torch.from_numpy(k) for k in residual_kernels(fused.scale))
    return nn.functional.pixel_shuffle(y + residual(arch, x, vertical, horizontal), fused.scale)


def macs_per_pixel(arch: ArchSpec) -> int:
    """Multiply-accumulates per LR input pixel of the fused graph: the 3x3 convs plus the residual's convs."""
    s = arch.scale
    return sum(9 * cin * cout for cin, cout in layer_shapes(arch)) + (5 * s + 5 * s * s if arch.residual == "bicubic"
                                                                       else s * s)


def receptive_radius(arch: ArchSpec) -> int:
    """LR pixels of context each side: one per 3x3 conv."""
    return len(layer_shapes(arch))
