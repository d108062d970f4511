"""The PNG compression setting: the same pixels, smaller files at higher levels, and part of the ledger's identity
(outputs made at another level are made again; at the same level nothing is)."""


import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS
from handler.cli import main
from pipeline import codec
from pipeline.adapters.sqlite_ledger import SQLiteLedger
from pipeline.ledger import output_variant, request_id
from pipeline.settings import load_settings

MODEL = ["--model", "fsrcnn-small-x2", "--model-dir", str(SHARED_MODELS)]


def photo_image() -> codec.DecodedImage:
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes()
    image = codec.decode(data, codec.read_header(data))
    image.frames = [cv2.resize(image.frames[0], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)]
    return image


def test_every_level_keeps_the_pixels_and_higher_levels_are_smaller():
    image = photo_image()
    sizes = {}
    for level in codec.PNG_COMPRESSIONS:
        data = codec.encode(image, "PNG", png_compression=level)
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), image.frames[0])
        sizes[level] = len(data)
    assert codec.encode(image, "PNG") == codec.encode(image, "PNG", png_compression="fast")  # the default: as before
    assert sizes["9"] <= sizes["6"] < sizes["1"] < sizes["fast"] < sizes["0"]


def test_the_level_is_part_of_a_png_output_identity_only():
    base = dict(model="m", scale=2, policy="tile")
    fast = output_variant(**base, fmt="PNG", quality=None)
    assert fast == output_variant(**base, fmt="PNG", quality=None, png="fast")
    assert ":c" not in fast  # outputs made before the setting existed keep their keys
    assert output_variant(**base, fmt="PNG", quality=None, png="9") != fast
    assert output_variant(**base, fmt="JPEG", quality=95, png="9") == output_variant(**base, fmt="JPEG", quality=95)
    assert request_id("m", 2, "tile", "keep", 95, 95, "6") != request_id("m", 2, "tile", "keep", 95, 95)


@pytest.mark.parametrize("value, expect", [(6, "6"), ("9", "9"), ("FAST", "fast")])
def test_the_setting_takes_a_level_or_fast(value, expect):
    assert load_settings(png_compression=value, model="fsrcnn-small-x2").png_compression == expect


def test_a_bad_level_is_a_set_up_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["upscale", str(tmp_path), "--png-compression", "11"])
    assert stop.value.code == 2


def test_another_level_makes_the_outputs_again_and_the_same_level_does_not(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((DATASETS / "Set14" / "LR_bicubic" / "X4").glob("*.png"))[:3]:
        cv2.imwrite(str(src / p.name), cv2.imread(str(p))[:64, :64])
    out = tmp_path / "out"
    ledger = lambda: SQLiteLedger(out / ".superres" / "ledger.sqlite3", lease_s=60)  # noqa: E731
    assert main(["upscale", str(src), "--out", str(out), *MODEL]) == 0
    fast = {p.name: p.stat().st_size for p in out.glob("*.png")}
    assert main(["upscale", str(src), "--out", str(out), "--png-compression", "9", *MODEL]) == 0
    small = {p.name: p.stat().st_size for p in out.glob("*.png")}
    assert small.keys() == fast.keys() and all(small[n] < fast[n] for n in fast)
    assert ledger().stats()["engine_runs"] == 6
    assert main(["upscale", str(src), "--out", str(out), "--png-compression", "9", *MODEL]) == 0
    assert ledger().stats()["engine_runs"] == 6  # the same level again: nothing new
    assert {p.name: p.stat().st_size for p in out.glob("*.png")} == small
