"""The catalog against the real model files and MANIFEST.md in ../shared/models (read in place)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import pytest

from models.catalog import CATALOG, ModelSpec, get_model
from pipeline.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = SHARED / "models"
SAMPLE = SHARED / "datasets" / "Set5" / "LR_bicubic" / "X2" / "babyx2.png"

pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason=f"{MODELS} not present")

SHARED_FILES = sorted(MODELS.glob("*.pb"))


def _manifest() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(main table rows by file name, EDSR git blob ids by file name), parsed from MANIFEST.md."""
    text = (MODELS / "MANIFEST.md").read_text()
    rows: dict[str, dict[str, str]] = {}
    blobs: dict[str, str] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif set(cells[0]) <= set("-: "):
            continue  # the |---|---| separator
        elif header[:2] == ["file", "bytes"]:
            rows[cells[0]] = dict(zip(header, cells))
        elif header == ["file", "git blob id"]:
            blobs[cells[0]] = cells[1]
    return rows, blobs


MANIFEST_ROWS, MANIFEST_BLOBS = _manifest()
BY_FILENAME = {spec.filename: spec for spec in CATALOG.values()}


def test_manifest_parsed():
    # Guards the parser itself: 12 files in the main table, 3 EDSR blob ids.
    assert len(MANIFEST_ROWS) == 12
    assert sorted(MANIFEST_BLOBS) == ["EDSR_x2.pb", "EDSR_x3.pb", "EDSR_x4.pb"]


def test_catalog_names_the_fifteen_opencv_models_and_our_six():
    expected = {
        f"{family}-x{s}"
        for family, scales in {
            "edsr": (2, 3, 4),
            "espcn": (2, 3, 4),
            "fsrcnn": (2, 3, 4),
            "fsrcnn-small": (2, 3, 4),
            "lapsrn": (2, 4, 8),
        }.items()
        for s in scales
    }
    own = {"fast-x2", "fast-x3", "fast-x4", "quality-x2", "quality-x3", "quality-x4"}  # bundled (tests/test_own_models.py)
    assert set(CATALOG) == expected | own
    assert {name for name, spec in CATALOG.items() if spec.bundled} == own
    assert all(name == spec.name for name, spec in CATALOG.items())
    assert len({spec.filename for spec in CATALOG.values()}) == 15 + len(own)


@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.name)
def test_every_shared_file_has_one_matching_entry(path: Path):
    matches = [spec for spec in CATALOG.values() if spec.filename == path.name]
    assert len(matches) == 1
    spec = matches[0]
    data = path.read_bytes()
    assert spec.size == len(data)
    assert spec.sha256 == hashlib.sha256(data).hexdigest()
    assert spec.git_blob_sha1 is None


@pytest.mark.parametrize("filename", sorted(MANIFEST_ROWS))
def test_entries_match_manifest(filename: str):
    row = MANIFEST_ROWS[filename]
    spec = BY_FILENAME[filename]
    assert spec.url == row["public URL"]
    assert spec.sha256 == row["sha256"]
    assert spec.size == int(row["bytes"])
    assert spec.license == row["license"] == "Apache-2.0"
    # "opencv setModel(name, scale)" column, e.g. ("fsrcnn", 2)
    name, scale = re.fullmatch(r'\("(\w+)", (\d+)\)', row["opencv setModel(name, scale)"]).groups()
    assert (spec.algorithm, spec.scale) == (name, int(scale))
    assert spec.input_kind == "y"


@pytest.mark.parametrize("filename", sorted(MANIFEST_BLOBS))
def test_edsr_entries_carry_manifest_blob_ids(filename: str):
    spec = BY_FILENAME[filename]
    assert spec.git_blob_sha1 == MANIFEST_BLOBS[filename]
    assert spec.sha256 is None and spec.size is None
    assert spec.algorithm == "edsr" and spec.input_kind == "bgr"
    assert spec.url == (
        "https://raw.githubusercontent.com/Saafke/EDSR_Tensorflow/"
        f"06c7bd65b0305c2955328f8f2721ea86c341f660/models/{filename}"
    )


def test_families_and_descriptors():
    assert get_model("fsrcnn-small-x3").family == "FSRCNN-small"
    assert get_model("fsrcnn-x3").family == "FSRCNN"
    assert get_model("lapsrn-x8").family == "LapSRN"
    assert get_model("edsr-x4").family == "EDSR"
    assert get_model("espcn-x2").family == "ESPCN"
    for spec in CATALOG.values():
        assert isinstance(spec, ModelSpec)
        if spec.bundled:
            assert spec.url == "" and spec.file_format == "onnx"
            continue
        assert spec.file_format == "pb"
        assert spec.url.startswith("https://raw.githubusercontent.com/")
        assert spec.url.endswith("/" + spec.filename)
        assert spec.context_px > 0 and spec.macs_per_pixel > 0
    # Cost ordering from DESIGN.md: EDSR is by far the heaviest, FSRCNN-small the lightest.
    assert get_model("edsr-x3").macs_per_pixel > 1000 * get_model("fsrcnn-x3").macs_per_pixel
    assert get_model("fsrcnn-small-x3").macs_per_pixel < get_model("fsrcnn-x3").macs_per_pixel


def test_get_model_unknown_lists_known_names():
    with pytest.raises(ConfigError) as info:
        get_model("edsr-x5")
    message = str(info.value)
    assert "edsr-x5" in message
    for name in CATALOG:
        assert name in message


def test_spec_is_frozen():
    spec = get_model("fsrcnn-x2")
    with pytest.raises(AttributeError):
        spec.scale = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "spec", [s for s in CATALOG.values() if (MODELS / s.filename).is_file()], ids=lambda s: s.name
)
def test_spec_loads_and_upsamples_in_opencv(spec: ModelSpec):
    image = cv2.imread(str(SAMPLE), cv2.IMREAD_COLOR)
    assert image is not None, SAMPLE
    crop = image[40:57, 30:50].copy()  # 20 wide, 17 high: odd sizes on purpose
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(MODELS / spec.filename))
    sr.setModel(spec.algorithm, spec.scale)
    out = sr.upsample(crop)
    assert out.shape == (17 * spec.scale, 20 * spec.scale, 3)
    assert out.dtype == crop.dtype
