"""Locating, verifying and pulling model files, against a real HTTP server on 127.0.0.1 (never the internet).

The server serves a pytest tmp_path filled at test time with copies of ../shared/models files, a corrupted
copy (one byte flipped) and a truncated copy. The first URL path segment picks how it answers:
/ok/... normally, /drop/... announces the full length and hangs up mid-body, /nolength/... sends no
Content-Length (body ends when the connection closes), /stall/... sends headers then nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.catalog import CATALOG, ModelSpec, get_model
from models.files import default_model_dir, list_rows, model_path, model_status, pull, verify_file
from pipeline.errors import DownloadError, ModelFileError

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
NAMES = ["fsrcnn-small-x2", "espcn-x3", "fsrcnn-x4"]  # small files: fast tests

pytestmark = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason=f"{SHARED_MODELS} not present")


class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: Counter[str] = Counter()
        self.stop_stalling = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server.requests[self.path] += 1
                _, mode, rest = self.path.split("/", 2)
                file = server.root / rest
                if mode not in {"ok", "drop", "nolength", "stall"} or not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode != "nolength":
                    self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if mode == "ok" or mode == "nolength":
                    self.wfile.write(data)
                elif mode == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # hang up mid-body
                else:  # stall: the client's read timeout must fire
                    self.wfile.flush()
                    server.stop_stalling.wait(10)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def hits(self, filename: str) -> int:
        return sum(n for path, n in self.requests.items() if path.endswith("/" + filename))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "served"
    for sub in ("good", "corrupt", "truncated"):
        (root / sub).mkdir(parents=True)
    for name in NAMES:
        spec = get_model(name)
        data = (SHARED_MODELS / spec.filename).read_bytes()
        (root / "good" / spec.filename).write_bytes(data)
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0xFF  # same size, one byte different: only the checksum can tell
        (root / "corrupt" / spec.filename).write_bytes(bytes(flipped))
        (root / "truncated" / spec.filename).write_bytes(data[:-100])
    srv = _Server(root)
    srv.thread.start()
    yield srv
    srv.stop_stalling.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "superres" / "models"  # not created: pull must create it


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _blob_id(path: Path) -> str:
    return subprocess.run(
        ["git", "hash-object", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def _synthetic_spec(payload_path: Path, **changes) -> ModelSpec:
    """An EDSR-like spec (no size, no sha256, only a git blob id) for a small file made here."""
    spec = ModelSpec(
        name="blobtest-x2",
        algorithm="edsr",
        scale=2,
        filename=payload_path.name,
        url="http://127.0.0.1:9/unused",
        size=None,
        sha256=None,
        git_blob_sha1=_blob_id(payload_path),
        input_kind="bgr",
        context_px=1,
        macs_per_pixel=1,
    )
    return dataclasses.replace(spec, **changes)


# ---- where files live ---------------------------------------------------------------------------


def test_default_model_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "superres" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "superres" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # XDG: relative values are ignored
    assert default_model_dir() == tmp_path / "home" / ".cache" / "superres" / "models"


def test_model_path(tmp_path: Path):
    assert model_path(get_model("lapsrn-x8"), tmp_path) == tmp_path / "LapSRN_x8.pb"


# ---- verify_file / model_status ------------------------------------------------------------------


def test_verify_shared_files_in_place():
    for spec in CATALOG.values():
        path = model_path(spec, SHARED_MODELS)
        if spec.sha256 is not None:
            verify_file(spec, path)
            assert model_status(spec, SHARED_MODELS) == "ok"
        else:
            assert model_status(spec, SHARED_MODELS) == "missing"


def test_verify_missing_says_how_to_pull(tmp_path: Path):
    spec = get_model("fsrcnn-x3")
    with pytest.raises(ModelFileError) as info:
        verify_file(spec, model_path(spec, tmp_path))
    message = str(info.value)
    assert "not found" in message and str(tmp_path) in message
    assert "superres models pull fsrcnn-x3" in message
    assert model_status(spec, tmp_path) == "missing"


def test_verify_detects_corruption(tmp_path: Path):
    spec = get_model("fsrcnn-small-x2")
    data = bytearray((SHARED_MODELS / spec.filename).read_bytes())
    data[1000] ^= 0x01
    path = model_path(spec, tmp_path)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as info:
        verify_file(spec, path)
    assert spec.sha256 in str(info.value)  # expected vs got
    assert hashlib.sha256(data).hexdigest() in str(info.value)
    assert model_status(spec, tmp_path).startswith("corrupt: expected sha256")

    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(ModelFileError, match=f"expected {spec.size} bytes, got {spec.size - 1}"):
        verify_file(spec, path)
    assert model_status(spec, tmp_path) == f"corrupt: expected {spec.size} bytes, got {spec.size - 1}"


def test_git_blob_verification_matches_git(tmp_path: Path):
    payload = tmp_path / "Blob_x2.pb"
    payload.write_bytes(bytes(range(256)) * 41 + b"tail")
    spec = _synthetic_spec(payload)
    verify_file(spec, payload)  # our blob id == `git hash-object`
    assert model_status(spec, tmp_path) == "ok"

    payload.write_bytes(b"X" + payload.read_bytes()[1:])
    with pytest.raises(ModelFileError, match="git blob id") as info:
        verify_file(spec, payload)
    assert spec.git_blob_sha1 in str(info.value) and _blob_id(payload) in str(info.value)
    assert model_status(spec, tmp_path).startswith("corrupt: expected git blob id")


def test_list_rows(tmp_path: Path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    shutil.copyfile(SHARED_MODELS / "ESPCN_x2.pb", model_dir / "ESPCN_x2.pb")
    (model_dir / "FSRCNN_x2.pb").write_bytes(b"not a model")
    rows = {row["name"]: row for row in list_rows(model_dir, shared_hint="../shared/models")}
    assert set(rows) == set(CATALOG)
    assert rows["espcn-x2"] == {
        "name": "espcn-x2",
        "family": "ESPCN",
        "algorithm": "espcn",
        "scale": 2,
        "macs_per_pixel": 21000,
        "size": 86446,
        "status": "ok",
        "note": "",
    }
    assert rows["fsrcnn-x2"]["status"].startswith("corrupt: expected 38973 bytes")
    assert rows["lapsrn-x8"]["status"] == "missing"
    assert "superres models pull lapsrn-x8" in rows["lapsrn-x8"]["note"]
    edsr = rows["edsr-x3"]
    assert edsr["status"] == "missing" and edsr["size"] is None
    assert "weights not in ../shared/models" in edsr["note"]
    assert get_model("edsr-x3").url in edsr["note"]


# ---- pull ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_pull_downloads_and_verifies(server: _Server, model_dir: Path, name: str):
    spec = get_model(name)
    path = pull(spec, model_dir, base_url=server.url + "/ok/good/", timeout_s=5)
    assert path == model_path(spec, model_dir)
    verify_file(spec, path)
    assert path.read_bytes() == (SHARED_MODELS / spec.filename).read_bytes()
    assert _leftovers(model_dir) == [spec.filename]  # no temp file left over
    assert path.stat().st_mode & 0o777 == 0o644


def test_pull_without_content_length(server: _Server, model_dir: Path):
    spec = get_model("espcn-x3")
    pull(spec, model_dir, base_url=server.url + "/nolength/good", timeout_s=5)
    verify_file(spec, model_path(spec, model_dir))


def test_present_file_is_not_downloaded_again(server: _Server, model_dir: Path):
    spec = get_model("fsrcnn-x4")
    base = server.url + "/ok/good"
    pull(spec, model_dir, base_url=base, timeout_s=5)
    assert server.hits(spec.filename) == 1
    pull(spec, model_dir, base_url=base, timeout_s=5)
    assert server.hits(spec.filename) == 1
    pull(spec, model_dir, base_url=base, timeout_s=5, force=True)
    assert server.hits(spec.filename) == 2
    assert _leftovers(model_dir) == [spec.filename]


def test_corrupt_present_file_is_replaced(server: _Server, model_dir: Path):
    spec = get_model("fsrcnn-x4")
    model_dir.mkdir(parents=True)
    model_path(spec, model_dir).write_bytes(b"garbage")
    pull(spec, model_dir, base_url=server.url + "/ok/good", timeout_s=5)
    assert server.hits(spec.filename) == 1
    assert model_status(spec, model_dir) == "ok"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("/ok/corrupt", "expected sha256"),
        ("/ok/truncated", "bytes"),
        ("/ok/missing", "HTTP 404"),
        ("/drop/good", r"connection closed after \d+ of 9595 bytes|broke off"),
        ("/nolength/truncated", "bytes"),
        ("/stall/good", "timed out"),
    ],
    ids=["corrupt", "truncated", "404", "dropped", "truncated-nolength", "stalled"],
)
def test_failed_pull_leaves_nothing(server: _Server, model_dir: Path, where: str, message: str):
    spec = get_model("fsrcnn-small-x2")
    started = time.monotonic()
    with pytest.raises(DownloadError, match=message) as info:
        pull(spec, model_dir, base_url=server.url + where, timeout_s=1)
    assert time.monotonic() - started < 5
    assert spec.name in str(info.value) and server.url in str(info.value)
    assert info.value.stage == "download" and not info.value.retryable
    assert _leftovers(model_dir) == []
    assert server.hits(spec.filename) == 1


def test_connection_refused(model_dir: Path):
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        pull(get_model("espcn-x2"), model_dir, base_url=f"http://127.0.0.1:{port}", timeout_s=5)
    assert _leftovers(model_dir) == []


def test_failed_forced_pull_keeps_the_good_file(server: _Server, model_dir: Path):
    spec = get_model("espcn-x3")
    good = pull(spec, model_dir, base_url=server.url + "/ok/good", timeout_s=5)
    with pytest.raises(DownloadError):
        pull(spec, model_dir, base_url=server.url + "/ok/corrupt", timeout_s=5, force=True)
    assert model_status(spec, model_dir) == "ok"
    assert _leftovers(model_dir) == [good.name]


def test_pull_refuses_more_bytes_than_expected(server: _Server, model_dir: Path):
    # The catalog says 100 bytes; the server streams the whole file with no length: stop, do not fill the disk.
    spec = dataclasses.replace(get_model("espcn-x3"), size=100)
    with pytest.raises(DownloadError, match="more than the expected 100 bytes"):
        pull(spec, model_dir, base_url=server.url + "/nolength/good", timeout_s=5)
    assert _leftovers(model_dir) == []
    with pytest.raises(DownloadError, match="announces"):  # with a Content-Length it fails before the body
        pull(spec, model_dir, base_url=server.url + "/ok/good", timeout_s=5)
    assert _leftovers(model_dir) == []


@pytest.mark.parametrize("mode", ["ok", "nolength"])
def test_pull_verifies_git_blob_id(server: _Server, model_dir: Path, tmp_path: Path, mode: str):
    payload = server.root / "good" / "Blob_x2.pb"
    payload.write_bytes(bytes(range(256)) * 97)
    spec = _synthetic_spec(payload)
    path = pull(spec, model_dir, base_url=f"{server.url}/{mode}/good", timeout_s=5)
    assert _blob_id(path) == spec.git_blob_sha1
    assert _leftovers(model_dir) == [payload.name]

    wrong = dataclasses.replace(spec, git_blob_sha1="0" * 40)
    with pytest.raises(DownloadError, match="expected git blob id 0{40}"):
        pull(wrong, model_dir / "other", base_url=f"{server.url}/{mode}/good", timeout_s=5)
    assert _leftovers(model_dir / "other") == []


def test_pull_uses_pinned_url_without_mirror(server: _Server, model_dir: Path):
    spec = dataclasses.replace(get_model("fsrcnn-x4"), url=f"{server.url}/ok/good/FSRCNN_x4.pb")
    pull(spec, model_dir, timeout_s=5)
    assert server.requests["/ok/good/FSRCNN_x4.pb"] == 1
