"""A real `superres serve` as a subprocess on a free loopback port, and a plain HTTP client for it (stdlib only:
what a user's script would do). Used by tests/test_serve.py, tests/test_serve_browser.py and bench/serve_bench.py."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from moto_server import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def superres_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("superres")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "handler.cli"]


def multipart(data: bytes, *, name: str = "image", filename: str = "photo.png",
              content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """(body, content type) of a form with one file field."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


class Served:
    """`superres serve` with the given settings (SUPERRES_* variables), started and waited for."""

    def __init__(self, outbox: "Path | str", log_path: Path, *, model: str = "fsrcnn-small-x2", env: dict | None = None,
                 args: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
        base.update({"SUPERRES_MODEL_DIR": str(SHARED_MODELS), "PYTHONUNBUFFERED": "1", "SUPERRES_ENGINE": "opencv"})
        base.update(env or {})
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [*superres_cmd(), "serve", "--port", str(self.port), "--outbox", str(outbox), "--model", model, *args],
            env=base, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO))
        self.first_health: int | None = None

    def wait_ready(self, timeout_s: float = 60) -> "Served":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = self.request("GET", "/healthz", timeout=5).status
            except OSError:
                time.sleep(0.05)
                continue
            if self.first_health is None:
                self.first_health = status
            if status == 200:
                return self
            time.sleep(0.05)
        raise AssertionError(f"serve not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def post_image(self, path: str, data: bytes, *, headers: dict | None = None, **form) -> Reply:
        body, ctype = multipart(data, **form)
        return self.request("POST", path, body, {"Content-Type": ctype, **(headers or {})})

    def events(self, job_id: str, headers: dict | None = None, timeout: float = 120) -> list[tuple[str, dict]]:
        """Every Server-Sent Event of a job's stream, until the server ends it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", f"/v1/jobs/{job_id}/events", headers=headers or {})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("Content-Type").startswith("text/event-stream")
            text = response.read().decode()
        finally:
            conn.close()
        found = []
        for block in text.split("\n\n"):
            lines = [line for line in block.splitlines() if not line.startswith(":")]
            kind = next((line[6:].strip() for line in lines if line.startswith("event:")), "message")
            data = "".join(line[5:].strip() for line in lines if line.startswith("data:"))
            if data:
                found.append((kind, json.loads(data)))
        return found

    def metrics(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics").body.decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
