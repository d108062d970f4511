"""Engine trouble is the engine's, not the input's: a valid image that the engine cannot upscale here (out of
memory: the process runs under an address-space limit) is given back, never filed as failed; a long-running
process then exits non-zero so that it is restarted, and after the restart the same image is done."""

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import cv2
import pytest

from conftest import DATASETS, cli_env, superres_cmd

LIMIT_BYTES = 1_100_000_000  # enough to start and upscale small images; not for a 14000x14000 output


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def write_inputs(inbox: Path) -> None:
    photo = cv2.imread(str(sorted((DATASETS / "BSD100" / "HR").glob("*.png"))[0]))
    cv2.imwrite(str(inbox.parent / "big.png"), cv2.resize(photo, (3500, 3500), interpolation=cv2.INTER_CUBIC))
    os.replace(inbox.parent / "big.png", inbox / "big.png")


@pytest.mark.slow
def test_out_of_memory_gives_the_item_back_exits_3_and_the_restart_does_it(tmp_path):
    inbox, out, failed = tmp_path / "inbox", tmp_path / "out", tmp_path / "failed"
    inbox.mkdir()
    write_inputs(inbox)
    cmd = [*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(out), "--failed", str(failed),
           "--model", "espcn-x4", "--engine", "opencv", "--rescan-s", "1"]
    sick = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert sick.returncode == 3, sick.stderr
    assert "the engine failed" in sick.stderr and "MemoryError" in sick.stderr
    assert not failed.exists() or not any(failed.iterdir())  # nothing filed as failed for it
    assert not (out / "big.png").exists()

    healthy = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "big.png").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        healthy.send_signal(signal.SIGTERM)
        _, err = healthy.communicate(timeout=120)
    assert healthy.returncode == 0, err
    assert cv2.imread(str(out / "big.png")).shape == (14000, 14000, 3)
