"""pipeline.limits: the output checks as tables (pure), the memory estimate against a real item's peak memory,
and available_memory on cgroup trees written the way the kernel shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATASETS, REPO, SHARED_MODELS, cli_env, superres_cmd
from pipeline.errors import InputRejected
from pipeline.formats import FORMATS
from pipeline.limits import TILE_ALLOWANCE, available_memory, check_output, memory_needed, output_size
from pipeline.tiling import capped_size
from pipeline.upscale import apply_policy

LENNA = DATASETS / "Set14" / "HR" / "lenna.png"
GiB = 2**30
MAX_OUT = 300_000_000  # SUPERRES_MAX_OUTPUT_PIXELS's default


# ------------------------------------------------------------------------------------------ output size

@pytest.mark.parametrize(("size", "scale", "policy", "cap", "expected"), [
    ((5000, 5000), 4, "tile", 500, (20000, 20000)),
    ((5000, 5000), 4, "cap", 500, (2000, 2000)),
    ((333, 500), 3, "cap", 500, (999, 1500)),  # fits the cap: not resized
    ((1001, 333), 2, "cap", 500, (1000, 332)),  # 333 * 500/1001 = 166.3 -> 166
    ((1000, 3), 8, "cap", 500, (4000, 16)),  # 1.5 -> 2 (round half to even)
    ((100000, 1), 2, "cap", 500, (1000, 2)),  # never below 1 px
    ((16000, 100), 4, "cap", 4096, (16384, 104)),  # 25.6 -> 26
])
def test_output_size(size, scale, policy, cap, expected):
    assert output_size(*size, scale=scale, policy=policy, cap_side=cap) == expected


@pytest.mark.parametrize("size", [(512, 512), (1001, 333), (333, 1001), (777, 501), (640, 3)])
def test_cap_matches_what_the_upscale_stage_does_to_a_real_image(size):
    frame = cv2.resize(cv2.imread(str(LENNA)), size, interpolation=cv2.INTER_AREA)
    h, w = apply_policy(frame, "cap", 500).shape[:2]
    assert output_size(*size, scale=3, policy="cap", cap_side=500) == (w * 3, h * 3)
    assert capped_size(*size, 500) in (None, (w, h))


# ------------------------------------------------------------------------------------------ check_output

# (input w, h, frames, channels, bytes/sample), scale, policy, format, expected code (None: accepted)[,
# SUPERRES_MAX_OUTPUT_PIXELS when not its default]
CASES = [
    # the two: 5000x5000 at x4 to WebP, and lapsrn-x8 on 4000x4000
    ((5000, 5000, 1, 3, 1), 4, "tile", "WEBP", "output_too_large_for_format"),
    ((4000, 4000, 1, 3, 1), 8, "tile", "PNG", "too_many_output_pixels"),
    ((5000, 5000, 1, 3, 1), 4, "cap", "WEBP", None),  # capped to 500 first
    # each format at its largest side and one more
    ((4095, 100, 1, 3, 1), 4, "tile", "WEBP", None),  # 16380
    ((100, 4096, 1, 3, 1), 4, "tile", "WEBP", "output_too_large_for_format"),  # 16384
    ((16375, 10, 1, 3, 1), 4, "tile", "JPEG", None),  # 65500
    ((10, 16376, 1, 3, 1), 4, "tile", "JPEG", "output_too_large_for_format"),  # 65504
    ((21845, 10, 1, 3, 1), 3, "tile", "GIF", None),  # 65535
    ((21846, 10, 1, 3, 1), 3, "tile", "GIF", "output_too_large_for_format"),  # 65538
    ((500000, 1, 1, 3, 1), 2, "tile", "PNG", None),  # 1,000,000
    ((500001, 1, 1, 3, 1), 2, "tile", "PNG", "output_too_large_for_format"),
    ((500001, 1, 1, 3, 1), 2, "tile", "TIFF", None),
    ((16000, 100, 1, 3, 1), 4, "cap", "WEBP", None),  # cap 500 first: 2000x12
    # BMP: OpenCV stores the file size in an int (measured: 16384x43690 BGR is written, 43691 rows are not);
    # 716 Mpx, so with SUPERRES_MAX_OUTPUT_PIXELS raised
    ((8192, 21845, 1, 3, 1), 2, "tile", "BMP", None, 10**9),
    ((8192, 21846, 1, 3, 1), 2, "tile", "BMP", "output_too_large_for_format", 10**9),
    ((8192, 21846, 1, 4, 2), 2, "tile", "BMP", "output_too_large_for_format", 10**9),  # written as 8-bit BGR
    ((8192, 21846, 1, 1, 1), 2, "tile", "BMP", None, 10**9),  # gray: a third of the bytes
    # pixels: exactly the limit passes, frames count
    ((8660, 8660, 1, 3, 1), 2, "tile", "PNG", None),  # 299,982,400
    ((8661, 8661, 1, 3, 1), 2, "tile", "PNG", "too_many_output_pixels"),  # 300,051,684
    ((1000, 1000, 18, 4, 1), 4, "tile", "WEBP", None),  # 288 Mpx in 18 frames
    ((1000, 1000, 19, 4, 1), 4, "tile", "WEBP", "too_many_output_pixels"),  # 304 Mpx
]


@pytest.mark.parametrize(("header", "scale", "policy", "fmt", "code", "max_pixels"),
                         [case if len(case) == 6 else (*case, MAX_OUT) for case in CASES])
def test_check_output(header, scale, policy, fmt, code, max_pixels):
    kwargs = dict(scale=scale, policy=policy, cap_side=500, fmt=fmt, max_output_pixels=max_pixels,
                  available_bytes=None)
    if code is None:
        plan = check_output(*header, **kwargs)
        assert (plan.width, plan.height) == output_size(*header[:2], scale=scale, policy=policy, cap_side=500)
        assert plan.pixels == plan.width * plan.height * header[2]
        return
    with pytest.raises(InputRejected) as err:
        check_output(*header, **kwargs)
    assert (err.value.stage, err.value.code) == ("limits", code)


def test_messages_name_the_limit_and_what_to_do():
    common = dict(policy="tile", cap_side=500, max_output_pixels=MAX_OUT, available_bytes=None)
    with pytest.raises(InputRejected) as err:
        check_output(5000, 5000, 1, 3, 1, scale=4, fmt="WEBP", **common)
    assert err.value.message == (
        "the output would be 20000x20000 px (5000x5000 at x4), over the largest side WEBP can hold (16383 px): "
        "choose --format png or a smaller scale")
    with pytest.raises(InputRejected) as err:
        check_output(500001, 1, 1, 3, 1, scale=2, fmt="PNG", **common)  # PNG itself is too small: TIFF holds it
    assert "PNG can hold (1000000 px): choose --format tiff or a smaller scale" in err.value.message
    with pytest.raises(InputRejected) as err:
        check_output(4000, 4000, 1, 3, 1, scale=8, fmt="PNG", **common)
    assert "32000x32000 = 1024000000 pixels" in err.value.message
    assert "SUPERRES_MAX_OUTPUT_PIXELS=300000000" in err.value.message
    with pytest.raises(InputRejected) as err:
        check_output(5000, 2000, 1, 3, 1, scale=4, fmt="WEBP", **{**common, "policy": "cap", "cap_side": 8000})
    assert "(5000x2000 at x4)" in err.value.message  # under the cap: not resized
    with pytest.raises(InputRejected) as err:
        check_output(40000, 400, 1, 3, 1, scale=4, fmt="WEBP", **{**common, "policy": "cap", "cap_side": 5000})
    assert "20000x200 px (40000x400 capped to 5000x50 at x4)" in err.value.message
    with pytest.raises(InputRejected) as err:  # the long side capped, the short one stays 1 px
        check_output(1, 20000, 1, 3, 1, scale=4, fmt="WEBP", **{**common, "policy": "cap", "cap_side": 5000})
    assert "4x20000 px (1x20000 capped to 1x5000 at x4)" in err.value.message


def test_the_format_limit_comes_before_the_pixel_limit():
    with pytest.raises(InputRejected) as err:
        check_output(20000, 20000, 1, 3, 1, scale=4, policy="tile", cap_side=500, fmt="WEBP",
                     max_output_pixels=MAX_OUT, available_bytes=None)
    assert err.value.code == "output_too_large_for_format"


def test_memory_counts_the_file_bytes_the_pipeline_holds():
    common = dict(scale=4, policy="tile", cap_side=500, fmt="PNG", max_output_pixels=MAX_OUT, available_bytes=None)
    plain = check_output(1000, 1000, 1, 3, 1, **common).memory_bytes
    assert check_output(1000, 1000, 1, 3, 1, **common, input_bytes=5_000_000).memory_bytes == plain + 5_000_000


def test_memory_is_checked_against_what_is_available_and_skipped_when_unknown():
    header = (2000, 1500, 1, 4, 2)
    need = memory_needed(2000, 1500, 8000, 6000, 1, 4, 2, FORMATS["PNG"])
    common = dict(scale=4, policy="tile", cap_side=500, fmt="PNG", max_output_pixels=MAX_OUT)
    assert check_output(*header, **common, available_bytes=need).memory_bytes == need
    assert check_output(*header, **common, available_bytes=None).memory_bytes == need
    with pytest.raises(InputRejected) as err:
        check_output(*header, **common, available_bytes=need - 1)
    assert (err.value.stage, err.value.code) == ("limits", "output_memory")
    assert f"{need / GiB:.1f} GiB" in err.value.message and "8000x6000" in err.value.message


@pytest.mark.parametrize(("channels", "bps", "fmt", "frames", "factor"), [
    (3, 1, "PNG", 1, 3.2),  # encode dominates: the format's measured factor
    (3, 1, "WEBP", 1, 6.8),
    (4, 1, "WEBP", 1, 11.5),  # the alpha plane's lossless coder
    (4, 1, "PNG", 1, 3.2),
    (4, 1, "JPEG", 1, 3.7),  # composited on white
    (1, 2, "JPEG", 1, 1.8),
    (3, 2, "PNG", 1, 3.2),  # bytes per sample scale it all
    (3, 1, "GIF", 3, 6.0),  # animations: Pillow's RGB frames
])
def test_memory_needed_in_multiples_of_the_raw_output(channels, bps, fmt, frames, factor):
    out = 4000 * 3000 * channels * bps * frames
    need = memory_needed(1000, 750, 4000, 3000, frames, channels, bps, FORMATS[fmt])
    assert need == int(out * factor) + TILE_ALLOWANCE


def test_memory_needed_counts_the_input_when_the_scale_is_small():
    # x2 with alpha: the decoded input and its copies, plus colour/alpha planes and their merge, pass PNG's encode
    need = memory_needed(4000, 3000, 8000, 6000, 1, 4, 1, FORMATS["PNG"]) - TILE_ALLOWANCE
    decoded, out = 4000 * 3000 * 4, 8000 * 6000 * 4
    assert need == decoded * 5 + out * 2 > out * FORMATS["PNG"].encode_memory


# A real item through the real stages: decode, pipeline.upscale.upscale_frames (a stand-in engine that resizes, so
# the test needs no model: the stage allocates the output itself) and codec.encode; peak RSS from VmHWM.
_PEAK = r"""
import json, sys
import cv2
from pipeline import codec
from pipeline.upscale import upscale_frames

class Resize:
    scale = 4
    def upscale(self, im):
        return cv2.resize(im, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    def upscale_batch(self, ims):
        return [self.upscale(i) for i in ims]

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

data = open(sys.argv[1], "rb").read()
header = codec.read_header(data)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here
base = rss("VmRSS")
image = codec.decode(data, header)
image.frames = upscale_frames(image.frames, Resize(), policy="tile", cap_side=500, tile=256, context=8)
encoded = codec.encode(image, sys.argv[2])
print(json.dumps({"peak": rss("VmHWM") - base, "w": header.width, "h": header.height, "c": header.channels,
                  "b": header.bytes_per_sample}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize(("kind", "fmt"), [("bgra", "JPEG"), ("bgr16", "PNG"), ("bgr", "BMP"), ("bgra", "WEBP"),
                                         ("bgr", "WEBP")])
def test_memory_estimate_bounds_the_peak_of_a_real_item(tmp_path, kind, fmt):
    bgr = cv2.resize(cv2.imread(str(LENNA)), (800, 800), interpolation=cv2.INTER_CUBIC)  # 3200x3200 out
    pixels = {"bgr": bgr, "bgr16": bgr.astype(np.uint16) * 257,
              "bgra": np.dstack([bgr, np.where(bgr[..., 1] < 90, 0, 255).astype(np.uint8)])}[kind]
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), pixels)
    run = subprocess.run([sys.executable, "-c", _PEAK, str(path), fmt], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    need = memory_needed(got["w"], got["h"], got["w"] * 4, got["h"] * 4, 1, got["c"], got["b"], FORMATS[fmt])
    assert got["peak"] <= need, f"measured {got['peak'] / 2**20:.0f} MiB over the estimate {need / 2**20:.0f} MiB"
    # and not far over it (a factor is its format's worst case: BGR to WebP is overstated most, about 3x)
    assert got["peak"] > (need - TILE_ALLOWANCE) / 3.5, \
        f"the estimate {need / 2**20:.0f} MiB is far over {got['peak'] / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------ available memory

def _tree(tmp_path: Path, cgroup_line: str, files: dict[str, str], meminfo_kb: int | None = 20 * 2**20) -> tuple:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    if meminfo_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {2 * meminfo_kb} kB\nMemAvailable:   {meminfo_kb} kB\n")
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


V2_POD = "kubepods.slice/pod1.slice/cri-abc.scope"
AVAILABLE_CASES = {
    "no cgroup limit: MemAvailable": (
        "0::/user.slice", {"cgroup.controllers": "cpu memory\n", "user.slice/memory.max": "max\n",
                           "user.slice/memory.current": str(GiB)}, 20 * GiB),
    "v2 limit, inactive page cache counts as free": (
        f"0::/{V2_POD}", {"cgroup.controllers": "cpu memory\n", f"{V2_POD}/memory.max": str(14 * GiB),
                          f"{V2_POD}/memory.current": str(10 * GiB),
                          f"{V2_POD}/memory.stat": f"anon 1\ninactive_file {GiB}\nactive_file 5\n"}, 5 * GiB),
    "v2 parent tighter than the leaf": (
        f"0::/{V2_POD}", {"cgroup.controllers": "memory\n", f"{V2_POD}/memory.max": "max\n",
                          f"{V2_POD}/memory.current": str(GiB),
                          "kubepods.slice/pod1.slice/memory.max": str(4 * GiB),
                          "kubepods.slice/pod1.slice/memory.current": str(3 * GiB)}, 1 * GiB),
    "v2 in a container: its own cgroup at the mount's root": (
        "0::/", {"cgroup.controllers": "memory\n", "memory.max": str(8 * GiB), "memory.current": str(2 * GiB)},
        6 * GiB),
    "v2 on a hybrid host: unified/": (
        "0::/svc", {"unified/svc/memory.max": str(3 * GiB), "unified/svc/memory.current": str(GiB)}, 2 * GiB),
    "v1, unlimited (ECS on Amazon Linux 2 without a task limit)": (
        "4:memory:/ecs/task", {"memory/ecs/task/memory.limit_in_bytes": "9223372036854771712\n",
                               "memory/ecs/task/memory.usage_in_bytes": str(GiB)}, 20 * GiB),
    "v1 limit, host path not visible in the container": (
        "4:memory:/docker/0123abcd", {"memory/memory.limit_in_bytes": str(12 * GiB),
                                      "memory/memory.usage_in_bytes": str(9 * GiB),
                                      "memory/memory.stat": f"cache 7\ntotal_inactive_file {GiB}\n"}, 4 * GiB),
    "over the limit already: none left": (
        "0::/", {"cgroup.controllers": "memory\n", "memory.max": str(GiB), "memory.current": str(2 * GiB)}, 0),
}


@pytest.mark.parametrize("case", list(AVAILABLE_CASES))
def test_available_memory(tmp_path, case):
    line, files, expected = AVAILABLE_CASES[case]
    proc, root = _tree(tmp_path, line, files)
    assert available_memory(proc, root) == expected


def test_available_memory_is_none_when_nothing_can_be_read(tmp_path):
    proc, root = _tree(tmp_path, "0::/", {}, meminfo_kb=None)
    assert available_memory(proc, root) is None
    proc, root = _tree(tmp_path / "b", "0::/", {"cgroup.controllers": "memory\n", "memory.max": str(3 * GiB),
                                                "memory.current": str(GiB)}, meminfo_kb=None)
    assert available_memory(proc, root) == 2 * GiB  # the cgroup alone


def test_available_memory_of_this_machine():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    got = available_memory()
    kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
    assert got is not None and 0 <= got <= kb * 1024 * 1.1  # MemAvailable moves between the two reads


# ------------------------------------------------------------------------------------------ end to end

def _refused(tmp_path: Path, name: str, pixels: np.ndarray, *args: str) -> tuple[dict, float]:
    """Run a real `superres upscale` on one file; return its failure record and the seconds from the engine being
    ready to the item's failure (its read, hash, header and checks), from the JSON log's timestamps."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    cv2.imwrite(str(inbox / name), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    out, failed = tmp_path / "out", tmp_path / "failed"
    run = subprocess.run([*superres_cmd(), "upscale", str(inbox), "--out", str(out), "--failed", str(failed),
                          "--model-dir", str(SHARED_MODELS), "--log-format", "json", *args],
                         env=cli_env(SUPERRES_LOG_LEVEL="DEBUG"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr  # one item, failed
    record = json.loads((failed / f"{name}.error.json").read_text())
    logs = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    when = {doc["message"].split(" ")[0]: datetime.fromisoformat(doc["time"]) for doc in logs}
    assert not [p for p in out.rglob("*") if p.is_file() and ".superres" not in p.parts]  # no output
    return record, (when["failed"] - when["engine"]).total_seconds()


@pytest.mark.slow
def test_upscale_refuses_an_output_webp_cannot_hold_before_any_work(tmp_path):
    # the case: 5000x5000 at x4 to WebP ran 41 s and 2 GB, then "could not encode the image as WEBP"
    big = cv2.resize(cv2.imread(str(LENNA)), (5000, 5000), interpolation=cv2.INTER_CUBIC)
    record, seconds = _refused(tmp_path, "big.jpg", big, "--model", "fsrcnn-x4", "--format", "webp")
    assert (record["stage"], record["error"]) == ("limits", "output_too_large_for_format"), record
    assert "20000x20000" in record["message"] and "WEBP" in record["message"] and "16383" in record["message"]
    assert "choose --format png or a smaller scale" in record["message"]
    assert seconds < 1.0  # reading and hashing the file, its header: no decode, no upscale


@pytest.mark.slow
def test_upscale_refuses_lapsrn_x8_on_a_large_input_by_the_output_pixel_limit(tmp_path):
    # the other case: lapsrn-x8 on 4000x4000 (32000x32000 out) was not refused: 40 min, 5 GB
    big = cv2.resize(cv2.imread(str(LENNA)), (4000, 4000), interpolation=cv2.INTER_CUBIC)
    record, seconds = _refused(tmp_path, "big.jpg", big, "--model", "lapsrn-x8")
    assert (record["stage"], record["error"]) == ("limits", "too_many_output_pixels"), record
    assert "32000x32000" in record["message"] and "SUPERRES_MAX_OUTPUT_PIXELS=300000000" in record["message"]
    assert seconds < 1.0


def test_the_reading_items_are_checked_against_is_at_most_a_moment_old(monkeypatch):
    from pipeline import limits

    readings = iter([5 * GiB, 3 * GiB])
    monkeypatch.setattr(limits, "available_memory", lambda: next(readings))
    monkeypatch.setattr(limits, "_last_reading", (float("-inf"), None))
    assert limits.recent_available_memory(max_age_s=60) == 5 * GiB
    assert limits.recent_available_memory(max_age_s=60) == 5 * GiB  # within the moment: not read again
    assert limits.recent_available_memory(max_age_s=0) == 3 * GiB  # older than asked: read again
