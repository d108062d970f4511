"""A short real training run (a few steps on a few patches of the shared training images): seeded and
reproducible, the loss goes down, and the exported ONNX file gives the trainable module's output in cv2.dnn,
onnxruntime and the torch engine's lowering (within 1 level of 8-bit)."""

import json
import subprocess
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from conftest import DATASETS, REPO
from training.arch import ARCHITECTURES, STUDY, SRNet, fuse, fused_forward, get_arch, macs_per_pixel
from training.data import PatchSampler, image_list, load_pairs
from training.export import to_onnx
from training.train import TrainConfig, learning_rate, train

TRAIN_DIR = DATASETS / "train"
pytestmark = pytest.mark.skipif(not TRAIN_DIR.is_dir(), reason=f"{TRAIN_DIR} not present")


@pytest.fixture(scope="module")
def few_pairs():
    training, validation = image_list(TRAIN_DIR)
    return load_pairs(training[:3], 3), load_pairs(validation[:1], 3)


def test_split_holds_out_validation_and_drops_the_duplicate():
    training, validation = image_list(TRAIN_DIR)
    assert len(validation) == 10 and all(p.parent.name == "BSDS200" for p in validation)
    assert not set(training) & set(validation)
    names = {f"{p.parent.name}/{p.stem}" for p in training}
    assert "T91/t36" in names and "T91/t65" not in names  # byte-identical pair, kept once
    assert len(training) == 90 + 199 - 10
    # the benchmark sets are never among them
    assert all(p.parent.name in ("T91", "BSDS200") for p in training + validation)


def test_patches_are_aligned_and_augmented(few_pairs):
    pairs, _ = few_pairs
    sampler = PatchSampler(pairs, 3, 16, seed=1)
    lr, hr, mask = sampler.batch(64)
    assert mask.shape == hr.shape and mask.min() == 1  # no context: every pixel is in the loss
    assert lr.shape == (64, 1, 16, 16) and hr.shape == (64, 1, 48, 48)
    # HR box-filtered down is close to the (bicubic) LR patch: same place, same orientation
    box = hr.reshape(64, 1, 16, 3, 16, 3).mean(axis=(3, 5))
    assert np.abs(box - lr).mean() < 0.03
    shuffled = np.abs(box - lr[::-1]).mean()
    assert shuffled > 2 * np.abs(box - lr).mean()
    assert np.array_equal(PatchSampler(pairs, 3, 16, seed=1).batch(64)[0], lr)


def test_context_is_left_out_of_the_loss_except_at_image_edges(few_pairs):
    pairs, _ = few_pairs
    s, p, c = 3, 16, 4
    lr, hr, mask = PatchSampler(pairs, s, p, seed=2, context=c).batch(400)
    assert lr.shape == (400, 1, p, p) and mask.shape == hr.shape
    edges_seen = 0
    for m in mask[:, 0]:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        # one rectangle, each side either the margin or the patch's edge (which is then the image's)
        assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].min() == 1 and m.sum() == rows.size * cols.size
        for first, last in ((rows[0], rows[-1]), (cols[0], cols[-1])):
            assert first in (0, c * s) and last + 1 in (p * s, (p - c) * s)
            edges_seen += (first == 0) + (last + 1 == p * s)
    assert 0.1 < edges_seen / (4 * 400) < 0.5  # about one side in four is the image's edge
    with pytest.raises(ValueError):
        PatchSampler(pairs, s, p, seed=2, context=8)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=1000, lr=1e-3, lr_min=1e-5, warmup=100)
    assert learning_rate(cfg, 0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 550) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-2)
    assert learning_rate(cfg, 999) == pytest.approx(1e-5, rel=1e-2)


def test_reparameterised_blocks_fuse_exactly():
    torch.manual_seed(0)
    for name in ("study-rep-c16d3", "study-esq-c16d3", "study-plain-c14d4", "fast-x4"):
        net = SRNet(get_arch(name))
        for p in net.parameters():
            p.data.normal_(0, 0.2)
        x = torch.rand(2, 1, 13, 17)
        assert torch.allclose(net(x), fused_forward(fuse(net), x), rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_residual_is_matlab_bicubic(scale):
    """With the tail at zero the network is the bicubic upscale, equal to MATLAB's away from the border."""
    from training.arch import ArchSpec
    from training.imresize import imresize

    net = SRNet(ArchSpec("t", scale, 8, 1, "plain"))
    with torch.no_grad():
        net.convs[-1].conv3.weight.zero_()
        net.convs[-1].conv3.bias.zero_()
        x = np.random.default_rng(scale).random((1, 1, 20, 23)).astype(np.float32)
        out = net(torch.from_numpy(x))[0, 0].numpy()
    expected = imresize(x[0, 0].astype(np.float64), scale)
    assert out.shape == expected.shape
    assert np.abs(out - expected)[3 * scale:-3 * scale, 3 * scale:-3 * scale].max() < 1e-5


def test_short_run_is_reproducible_and_learns(few_pairs):
    pairs, val = few_pairs
    cfg = TrainConfig(steps=60, batch=8, patch=24, warmup=5, eval_every=20, seed=7)
    arch = get_arch("fast-x3")
    lines = []
    net_a, summary = train(arch, pairs, val, cfg, log=lines.append)
    net_b, _ = train(arch, pairs, val, cfg, log=lambda _: None)
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()):
        assert torch.equal(a, b)
    net_c, _ = train(arch, pairs, val, replace(cfg, seed=8), log=lambda _: None)
    assert not torch.equal(net_a.convs[0].conv3.weight, net_c.convs[0].conv3.weight)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert any("val PSNR" in line for line in lines) and summary["macs_per_pixel"] == macs_per_pixel(arch)


def test_export_runs_the_same_in_every_engine(few_pairs, tmp_path):
    import onnxruntime

    from models.engines.torch_engine import build_onnx_module

    torch.manual_seed(3)
    net = SRNet(get_arch("fast-x3"))
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    path = tmp_path / "m.onnx"
    path.write_bytes(to_onnx(fuse(net)).SerializeToString())
    x = few_pairs[1][0].lr[None, None, :40, :56].copy()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert expected.shape == (1, 1, 120, 168)
    cv_net = cv2.dnn.readNetFromONNX(str(path))
    cv_net.setInput(x)
    ort = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
    with torch.no_grad():
        lowered = build_onnx_module(path, 3)(torch.from_numpy(x)).numpy()
    for got in (cv_net.forward(), ort, lowered):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() * 255 < 1  # within one 8-bit level
    ops = {node.op_type for node in to_onnx(fuse(net)).graph.node}
    assert ops <= {"Conv", "PRelu", "Relu", "Add", "DepthToSpace"}


def test_command_line_run_writes_onnx_and_summary(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "train", "fast-x2", "--steps", "12", "--batch", "4",
                             "--patch", "16", "--eval-every", "6", "--limit-images", "2", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "step 12/12" in result.stdout and "val PSNR" in result.stdout
    summary = json.loads((tmp_path / "fast-x2.json").read_text())
    assert summary["config"]["seed"] == 0 and summary["history"][-1]["step"] == 12
    assert (tmp_path / "fast-x2.onnx").stat().st_size < 100_000


def test_architecture_table():
    for arch in {**ARCHITECTURES, **STUDY}.values():
        assert arch.block in ("plain", "rep", "esq") and arch.residual in ("bicubic", "nearest")
        assert arch.scale in (2, 3, 4)
    assert {a.name for a in ARCHITECTURES.values()} == {f"{t}-x{s}" for t in ("fast", "quality") for s in (2, 3, 4)}
