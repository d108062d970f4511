"""Operations: a real `superres watch` serves /metrics and /healthz and logs one JSON line per item; `observe`
on a fresh registry counts what it is given."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moto_server import free_port
from conftest import DATASETS, cli_env, stop_process, superres_cmd
from handler.ops import Ops
from pipeline.process import Result

ITEM_FIELDS = {"source", "sha256", "outcome", "read_s", "decode_s", "upscale_s", "encode_s", "publish_s", "total_s",
               "engine", "device", "model"}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"watch exited with {proc.returncode} while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]  # every line is JSON


def test_watch_serves_metrics_and_health_and_logs_one_json_line_per_item(tmp_path):
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    port = free_port()
    log_path = tmp_path / "watch.log"
    proc = subprocess.Popen(
        [*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(tmp_path / "outbox"),
         "--failed", str(tmp_path / "failed"), "--model", "fsrcnn-small-x2", "--settle-s", "0.3", "--rescan-s", "1",
         "--metrics-port", str(port)],
        env=cli_env(SUPERRES_LOG_FORMAT="json"), stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "watching" in log_path.read_text(), 60, "start", proc)
        inputs = {"baby.png": (DATASETS / "Set5" / "LR_bicubic" / "X2" / "babyx2.png").read_bytes(),
                  "bird.png": (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes(),
                  "bad.png": b"this is not an image\n"}
        for name, data in inputs.items():  # written elsewhere, renamed in: each is taken once, complete
            (staging / name).write_bytes(data)
            os.rename(staging / name, inbox / name)

        def items() -> list[dict]:
            return [doc for doc in json_lines(log_path) if doc.get("message") == "item"]

        wait_for(lambda: len(items()) >= 3, 60, "three item lines", proc)

        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        got = samples(text)
        outcomes = {o: got[("superres_items_total", frozenset({("outcome", o)}))]
                    for o in ("done", "duplicate", "failed", "skipped", "retry", "lost-claim")}
        assert outcomes == {"done": 2, "duplicate": 0, "failed": 1, "skipped": 0, "retry": 0, "lost-claim": 0}
        assert got[("superres_stage_seconds_count", frozenset({("stage", "upscale")}))] == 2
        assert got[("superres_stage_seconds_count", frozenset({("stage", "read")}))] >= 2
        assert got[("superres_engine_output_megapixels_per_second", frozenset())] > 0
        assert got[("superres_items_in_flight", frozenset())] == 0
        info = [dict(labels) for (name, labels), value in got.items() if name == "superres_engine_info" and value == 1]
        assert len(info) == 1 and info[0]["model"] == "fsrcnn-small-x2" and info[0]["device"] in ("cpu", "cuda")
        assert info[0]["engine"]

        status, text = get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(text)
        assert status == 200 and health["status"] == "ok" and health["model"] == "fsrcnn-small-x2"
        assert isinstance(health["last_item_age_s"], float)
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        assert stop_process(proc, 30, log_path) == 0

    docs = json_lines(log_path)
    assert docs[-1]["message"] == "stopped"
    lines = [doc for doc in docs if doc["message"] == "item"]
    assert Counter(Path(doc["source"]).name for doc in lines) == Counter(set(inputs))  # one line per input
    for doc in lines:
        assert ITEM_FIELDS <= doc.keys(), doc
        assert {k: doc[k] for k in ("engine", "device", "model")} == info[0]
    by_name = {Path(doc["source"]).name: doc for doc in lines}
    assert by_name["bad.png"]["outcome"] == "failed"
    for name in ("baby.png", "bird.png"):
        doc = by_name[name]
        assert doc["outcome"] == "done" and len(doc["sha256"]) == 64
        assert all(doc[f"{stage}_s"] >= 0 for stage in ("read", "decode", "upscale", "encode", "publish"))
        assert doc["upscale_s"] > 0 and doc["total_s"] >= doc["upscale_s"]


class _Source:
    id = rel = "in/a.png"


def test_sigusr1_writes_every_threads_stack_and_the_process_goes_on(tmp_path):
    """What a watch that seems stuck is waiting on, without a debugger: its threads' stacks, then it still works."""
    inbox, log_path = tmp_path / "inbox", tmp_path / "watch.log"
    inbox.mkdir()
    proc = subprocess.Popen(
        [*superres_cmd(), "watch", "--inbox", str(inbox), "--outbox", str(tmp_path / "outbox"), "--model",
         "fsrcnn-small-x2", "--settle-s", "0.3", "--rescan-s", "1"],
        env=cli_env(), stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "watching" in log_path.read_text(), 60, "start", proc)
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "run_watch" in log_path.read_text(), 20, "the stacks", proc)  # the main thread's loop
        text = log_path.read_text()
        assert "Current thread" in text and "in _engine" in text and "in _write" in text  # and the stages
        (inbox / "baby.png").write_bytes((DATASETS / "Set5" / "LR_bicubic" / "X2" / "babyx2.png").read_bytes())
        wait_for(lambda: (tmp_path / "outbox" / "baby.png").exists(), 60, "an item after the dump", proc)
    finally:
        assert stop_process(proc, 30, log_path) == 0


def test_observe_counts_on_a_fresh_registry():
    ops = Ops({"engine": "opencv", "device": "cpu", "model": "fsrcnn-small-x2"})
    value = ops.registry.get_sample_value
    assert value("superres_items_total", {"outcome": "done"}) == 0  # every outcome is there from the start
    assert value("superres_engine_info", {"engine": "opencv", "device": "cpu", "model": "fsrcnn-small-x2"}) == 1

    seconds = {"read": 0.002, "decode": 0.01, "upscale": 0.5, "encode": 0.03, "publish": 0.004}
    with ops.in_flight():
        assert value("superres_items_in_flight") == 1
        ops.observe(Result(_Source(), "done", seconds=seconds, output_pixels=2_000_000, sha256="0" * 64))
    ops.observe(Result(_Source(), "failed", seconds={"read": 0.001}))
    ops.observe(Result(_Source(), "skipped"))

    assert value("superres_items_in_flight") == 0
    assert {o: value("superres_items_total", {"outcome": o}) for o in ("done", "duplicate", "failed", "skipped", "retry", "lost-claim")} \
        == {"done": 1, "duplicate": 0, "failed": 1, "skipped": 1, "retry": 0, "lost-claim": 0}
    assert value("superres_stage_seconds_count", {"stage": "upscale"}) == 1
    assert value("superres_stage_seconds_count", {"stage": "read"}) == 2
    assert value("superres_stage_seconds_bucket", {"stage": "upscale", "le": "0.5"}) == 1
    assert value("superres_stage_seconds_bucket", {"stage": "upscale", "le": "0.25"}) == 0
    assert value("superres_engine_output_megapixels_per_second") == 4.0  # 2 Mpx in 0.5 s
    assert Ops({"engine": "e", "device": "d", "model": "m"}).registry is not ops.registry  # no global state


def test_healthz_turns_503_when_the_loop_stops_beating():
    ops = Ops({"engine": "opencv", "device": "cpu", "model": "m"}, interval_s=20)
    assert ops.stale_after_s == 120  # 2 x max(20, 60)
    assert ops.health()[0] == 200
    ops._beat -= 121
    code, doc = ops.health()
    assert code == 503 and doc["status"] == "stalled"
    ops.heartbeat()
    assert ops.health()[0] == 200


# ------------------------------------------------------------------------------------------ bind address, engine

def _other_address() -> str | None:
    """An IPv4 address of this machine that is not loopback: the hostname's, else the one a route out would use
    (a UDP connect sends nothing)."""
    candidates = []
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is asked
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)


def _reaches(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_metrics_server_binds_loopback_unless_told_otherwise():
    other = _other_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to check the binding against")
    ops = Ops({"engine": "opencv", "device": "cpu", "model": "m"})
    port = free_port()
    server = ops.serve(port)  # the default host
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert not _reaches(other, port), f"the default metrics server answers on {other}"
    finally:
        server.shutdown()
        server.server_close()
    # the control: told 0.0.0.0, as the container is, the same address does reach it
    port = free_port()
    server = ops.serve(port, "0.0.0.0")
    try:
        assert _reaches(other, port)
        assert get(f"http://{other}:{port}/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_port_costs_the_metrics_not_the_service():
    ops = Ops({"engine": "opencv", "device": "cpu", "model": "m"})
    port = free_port()
    first = ops.serve(port)
    try:
        assert Ops({"engine": "e", "device": "d", "model": "m"}).serve(port) is None  # a warning, no raise
    finally:
        first.shutdown()
        first.server_close()


def test_healthz_is_503_with_the_reason_once_the_engine_failed():
    ops = Ops({"engine": "torch", "device": "cuda", "model": "edsr-x3"})
    value = ops.registry.get_sample_value
    assert value("superres_engine_healthy") == 1
    port = free_port()
    server = ops.serve(port)
    try:
        status, text = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(text)["status"] == "ok" and "reason" not in json.loads(text)

        ops.engine_failed("CUDA error: an illegal memory access was encountered")
        status, text = get(f"http://127.0.0.1:{port}/healthz")
        doc = json.loads(text)
        assert status == 503
        assert doc["status"] == "engine_failed"
        assert doc["reason"] == "CUDA error: an illegal memory access was encountered"
        assert doc["model"] == "edsr-x3" and doc["device"] == "cuda"
        got = samples(get(f"http://127.0.0.1:{port}/metrics")[1])
        assert got[("superres_engine_healthy", frozenset())] == 0

        ops.heartbeat()  # a beating loop does not make a broken engine healthy
        assert ops.health()[0] == 503
    finally:
        server.shutdown()
        server.server_close()
