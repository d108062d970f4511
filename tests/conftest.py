"""Shared test fixtures. Real data is read in place from ../shared (never copied into the project)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MODELS = SHARED / "models"
DATASETS = SHARED / "datasets"


def superres_cmd() -> list[str]:
    """The installed console script, run as a real process."""
    exe = Path(sys.executable).with_name("superres")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "handler.cli"]


def stop_process(proc: subprocess.Popen, timeout_s: float = 60, log: Path | None = None) -> int:
    """SIGTERM, then its exit code (see wait_stopped)."""
    proc.send_signal(signal.SIGTERM)
    return wait_stopped(proc, timeout_s, log)


def wait_stopped(proc: subprocess.Popen, timeout_s: float = 60, log: Path | None = None) -> int:
    """The exit code of a process asked to stop. One that has not stopped within timeout_s is asked for its
    threads' stacks (SIGUSR1: the CLI's faulthandler writes them to its stderr) and killed; the error carries
    the end of `log`, where its stderr goes, so that a slow stop says what it was waiting on."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        proc.wait()
        tail = Path(log).read_text(errors="replace")[-12000:] if log is not None and Path(log).exists() else ""
        raise AssertionError(f"pid {proc.pid} did not stop within {timeout_s} s of SIGTERM; the end of its log, "
                             f"with its threads' stacks:\n{tail}") from None


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
    env.update({"SUPERRES_MODEL_DIR": str(SHARED_MODELS), "PYTHONUNBUFFERED": "1", "SUPERRES_METRICS_PORT": "0"})
    env.update(extra)
    return env


def lr_image(name: str = "baby", scale: int = 2, dataset: str = "Set5") -> np.ndarray:
    return cv2.imread(str(DATASETS / dataset / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"), cv2.IMREAD_UNCHANGED)


@pytest.fixture(autouse=True)
def _no_superres_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SUPERRES_"):
            monkeypatch.delenv(key)


@pytest.fixture
def small_images(tmp_path) -> list[Path]:
    """A handful of real, small, distinct images (crops of Set14 LR) as PNG and JPEG files."""
    out = []
    folder = tmp_path / "src"
    folder.mkdir()
    for i, path in enumerate(sorted((DATASETS / "Set14" / "LR_bicubic" / "X4").glob("*.png"))):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:40, :48]
        target = folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg")
        cv2.imwrite(str(target), img)
        out.append(target)
    return out


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB), with a tiny IDAT: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Real bad files of every kind the pipeline must set aside; returns name -> expected error code."""
    folder.mkdir(parents=True, exist_ok=True)
    real = cv2.imread(str(DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png"))
    ok, jpg = cv2.imencode(".jpg", real)
    ok, png = cv2.imencode(".png", real)
    rng = np.random.default_rng(7)
    files = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpg.tobytes()[: len(jpg) // 2], "truncated"),
        "truncated.png": (png.tobytes()[: len(png) // 2], "truncated"),
        "random.jpg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image"),
        "page.png": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not_an_image"),
        "bomb.png": (png_claiming(100_000, 100_000), "too_many_pixels"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: code for name, (_, code) in files.items()}


from moto_server import moto_endpoint, moto_server_url  # noqa: E402,F401  (fixtures for S3/SQS tests)


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    """Buckets `inbox` and `outbox` on moto's server; the fast real model for the subprocesses and main()."""
    from moto_server import client

    s3, sqs = client("s3", moto_endpoint), client("sqs", moto_endpoint)
    for bucket in ("inbox", "outbox"):
        s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("SUPERRES_MODEL", "fsrcnn-small-x2")
    monkeypatch.setenv("SUPERRES_MODEL_DIR", str(SHARED_MODELS))
    return s3, sqs, moto_endpoint
