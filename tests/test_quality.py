"""Faithful to the model: Set5/Set14 LR through the whole pipeline (decode, tiles, engine, encode) reproduce
the Y-PSNR that OpenCV's own dnn_superres gets on the whole image (../shared/datasets/README.md), within
0.05 dB, with the default tile policy and with tiles small enough to force many seams."""

import re

import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS
from handler.cli import main
from models.catalog import CATALOG


def reference_table() -> dict[tuple[str, str, int], float]:
    """(family, set, scale) -> dB, parsed from the shared README so the numbers are not copied here."""
    text = (DATASETS / "README.md").read_text()
    section = text[text.index("## Reference: each shared model"):]
    header = next(line for line in section.splitlines() if line.startswith("| model"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]  # "Set5 x2", ...
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(columns) + 1 or not re.match(r"^[A-Za-z]", cells[0]) or cells[0] == "model":
            continue
        for column, cell in zip(columns, cells[1:]):
            if re.fullmatch(r"\d+\.\d+", cell):
                dataset, scale = column.split(" x")
                table[(cells[0], dataset, int(scale))] = float(cell)
    return table


def y_channel(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image.astype(np.float64)
    b, g, r = (image[:, :, i].astype(np.float64) for i in range(3))
    return 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255  # BT.601, MATLAB rgb2ycbcr, not rounded


def y_psnr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    a = y_channel(sr)[border:-border, border:-border]
    b = y_channel(hr)[border:-border, border:-border]
    return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))


def cases():
    for (family, dataset, scale), expected in sorted(reference_table().items()):
        spec = next((s for s in CATALOG.values() if s.family == family and s.scale == scale), None)
        if spec is not None and (SHARED_MODELS / spec.filename).exists():
            yield pytest.param(spec.name, dataset, scale, expected, id=f"{spec.name}-{dataset}")


def test_reference_table_is_complete():
    assert len(reference_table()) == 22  # 4 families x 6 columns, less LapSRN's two x3 dashes
    assert len(list(cases())) == 22


@pytest.mark.parametrize("model, dataset, scale, expected", list(cases()))
def test_pipeline_psnr_matches_opencv_reference(tmp_path, model, dataset, scale, expected):
    lr_dir = DATASETS / dataset / "LR_bicubic" / f"X{scale}"
    for tile in (None, 40):  # default policy, then tiles small enough to put seams everywhere
        out = tmp_path / f"out-{tile}"
        args = ["upscale", str(lr_dir), "--out", str(out), "--model", model, "--model-dir", str(SHARED_MODELS)]
        assert main(args + (["--tile", str(tile)] if tile else [])) == 0
        scores = []
        for lr_path in sorted(lr_dir.glob("*.png")):
            sr = cv2.imread(str(out / lr_path.name), cv2.IMREAD_UNCHANGED)
            hr = cv2.imread(str(DATASETS / dataset / "HR" / lr_path.name.replace(f"x{scale}.png", ".png")), cv2.IMREAD_UNCHANGED)
            lr = cv2.imread(str(lr_path), cv2.IMREAD_UNCHANGED)
            assert sr.shape[:2] == (lr.shape[0] * scale, lr.shape[1] * scale) and sr.ndim == lr.ndim
            scores.append(y_psnr(sr, hr[: sr.shape[0], : sr.shape[1]], scale))
        got = float(np.mean(scores))
        assert abs(got - expected) <= 0.05, f"{model} {dataset} tile={tile}: {got:.3f} dB vs reference {expected}"
