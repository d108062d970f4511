"""`superres serve`, for real: the server as a subprocess on a free loopback port, an HTTP client against each
endpoint and status, the same bytes as `superres upscale`, the bad inputs of test_bad_inputs through HTTP, 16
concurrent clients, a restart answered from the ledger, SIGTERM finishing the jobs in hand."""

import concurrent.futures
import http.client
import json
import signal
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATASETS, SHARED_MODELS, make_bad_inputs
from handler.cli import main
from serve_client import Served, multipart

pytestmark = pytest.mark.slow
MODEL = "fsrcnn-small-x2"
# the same settings on both sides: `--engine auto` weighs a one-shot run's known size (a small one takes OpenCV for
# its start-up) where serve, open-ended, takes the fastest; engines agree only to a level on a few pixels
ENGINE = "opencv"
DOUBLES = Path(__file__).resolve().parent / "engine_doubles.py"


def oneshot(inputs: list[Path], out: Path, *args: str) -> Path:
    """The one-shot command's outputs for the same inputs and settings: what the server must answer."""
    assert main(["upscale", *map(str, inputs), "--out", str(out), "--model", MODEL, "--model-dir",
                 str(SHARED_MODELS), "--engine", ENGINE, "-q", *args]) == 0
    return out


def distinct_images(folder: Path, count: int, side: int = 48) -> list[Path]:
    """`count` different small real images (crops of Set14's LR pictures), PNG and JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [cv2.imread(str(p)) for p in sorted((DATASETS / "Set14" / "LR_bicubic" / "X2").glob("*.png"))]
    paths = []
    for i in range(count):
        img = sources[i % len(sources)]
        y, x = (i // len(sources)) * 7, (i // len(sources)) * 5
        path = folder / f"pic{i:02d}.{'jpg' if i % 3 == 2 else 'png'}"
        cv2.imwrite(str(path), img[y:y + side, x:x + side])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    served = Served(root / "served", root / "serve.log")
    try:
        yield served.wait_ready()
    finally:
        served.kill()


# -- start, health, metrics -----------------------------------------------------------------------------------------

def test_healthz_is_503_while_the_engine_loads_then_200(tmp_path):
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={
        "SUPERRES_TEST_ENGINE": f"{DOUBLES}:slow_start", "SLOW_START_S": "3"})
    try:
        deadline = time.monotonic() + 60
        while True:  # the port answers at once, before the engine is loaded
            try:
                reply = served.request("GET", "/healthz", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and served.proc.poll() is None, served.log()
                time.sleep(0.05)
        assert reply.status == 503 and reply.json()["status"] == "starting", reply
        data = (DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png").read_bytes()
        early = served.post_image("/upscale", data)
        assert early.status == 503 and early.headers["retry-after"].isdigit(), early
        served.wait_ready()
        reply = served.request("GET", "/healthz")
        assert reply.status == 200 and reply.json()["model"] == MODEL, reply
        assert served.post_image("/upscale", data).status == 200
        assert f"url=http://127.0.0.1:{served.port}/" in served.log()  # loopback unless told otherwise
    finally:
        assert served.stop() == 0


def test_the_page_and_its_static_files_are_served_from_the_package(server):
    page = server.request("GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    text = page.body.decode()
    assert "static/app.js" in text and "static/style.css" in text
    assert "http://" not in text and "https://" not in text  # nothing from elsewhere: works offline
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        reply = server.request("GET", f"/static/{name}")
        assert reply.status == 200 and kind in reply.headers["content-type"], reply
        assert b"https://" not in reply.body
    assert server.request("GET", "/static/../serve.py").status == 404


def test_models_names_the_one_served(server):
    doc = server.request("GET", "/v1/models").json()
    assert doc["model"] == MODEL and doc["scale"] == 2
    served = [m for m in doc["models"] if m["served"]]
    assert [m["name"] for m in served] == [MODEL]
    assert len(doc["models"]) > 1  # the others present in the model folder are listed


# -- the seed's endpoint: the same bytes as one-shot ------------------------------------------------------------------

@pytest.mark.parametrize("query,args", [("", ()), ("?format=webp&quality=80", ("--format", "webp", "--quality", "80")),
                                        ("?format=jpg", ("--format", "jpg"))])
def test_upscale_answers_the_same_bytes_as_the_one_shot_command(server, tmp_path, query, args):
    inputs = distinct_images(tmp_path / "in", 2, side=64)
    expected = oneshot(inputs, tmp_path / "oneshot", *args)
    for path in inputs:
        reply = server.post_image(f"/upscale{query}", path.read_bytes(), filename=path.name)
        assert reply.status == 200, reply
        made = [p for p in expected.iterdir() if p.name.startswith(path.name)]
        assert len(made) == 1
        assert reply.body == made[0].read_bytes()  # full resolution: the seed's 500 px cap is gone
        want = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}[made[0].suffix]
        assert reply.headers["content-type"] == want
        h, w = cv2.imdecode(np.frombuffer(reply.body, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert (h, w) == (128, 128)


def test_a_raw_image_body_works_too(server):
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes()
    reply = server.request("POST", "/upscale", data, {"Content-Type": "image/png"})
    assert reply.status == 200 and reply.headers["content-type"] == "image/png", reply


# -- jobs: 202, status, events, result --------------------------------------------------------------------------------

def test_a_job_is_202_then_progress_events_then_done_and_its_result(server, tmp_path):
    big = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "comicx2.png"))
    data = cv2.imencode(".png", big)[1].tobytes()
    reply = server.post_image("/v1/jobs", data, filename="comic.png")
    assert reply.status == 202, reply
    job = reply.json()
    assert set(job) >= {"id", "status_url", "result_url", "events_url", "status", "progress"}
    assert reply.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
    events = server.events(job["id"])
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1, kinds
    assert set(kinds[:-1]) <= {"status", "progress"}
    last = events[-1][1]
    assert last["status"] == "done" and last["progress"]["tiles_done"] == last["progress"]["tiles_total"] >= 1
    status = server.request("GET", job["status_url"]).json()
    assert status["status"] == "done" and status["content_type"] == "image/png"
    result = server.request("GET", job["result_url"])
    assert result.status == 200 and result.headers["content-type"] == "image/png"
    assert result.body == oneshot([_write(tmp_path / "comic.png", data)], tmp_path / "o").joinpath("comic.png").read_bytes()
    # the same upload again: the same job, nothing upscaled twice
    again = server.post_image("/v1/jobs", data, filename="other name.png")
    assert again.json()["id"] == job["id"] and again.json()["status"] == "done"


def test_tile_progress_is_reported_while_a_job_runs(tmp_path):
    big = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "comicx2.png"))
    served = Served(tmp_path / "out", tmp_path / "serve.log", args=("--tile", "32")).wait_ready()
    try:
        job = served.post_image("/v1/jobs", cv2.imencode(".png", big)[1].tobytes()).json()
        events = served.events(job["id"])
        progress = [data["progress"] for kind, data in events if kind == "progress"]
        assert progress, events
        totals = {p["tiles_total"] for p in progress if p["tiles_total"]}
        assert len(totals) == 1 and totals.pop() > 4
        done = [p["tiles_done"] for p in progress]
        assert done == sorted(done)
        assert events[-1][0] == "done"
    finally:
        assert served.stop() == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unknown_jobs_are_404_and_results_of_unfinished_ones_409(server):
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/nope", "/v1/jobs/../../etc/passwd",
                 "/v1/jobs/0123456789abcdef0123456789abcdef/result", "/v1/jobs/0123456789abcdef0123456789abcdef/events",
                 "/no/such/page"):
        reply = server.request("GET", path)
        assert reply.status == 404, (path, reply)
        assert reply.json()["error"] in ("no_such_job", "not_found")
    assert server.request("GET", "/upscale").status == 405


# -- errors with status codes, never a traceback -------------------------------------------------------------------------

def test_the_bad_inputs_through_http_are_422_with_the_failed_records_reason(server, tmp_path):
    expected = make_bad_inputs(tmp_path / "bad")
    for name, code in expected.items():
        data = (tmp_path / "bad" / name).read_bytes()
        for path in ("/upscale", "/v1/jobs"):
            reply = server.post_image(path, data, filename=name)
            if path == "/v1/jobs":
                assert reply.status == 202, reply
                events = server.events(reply.json()["id"])
                assert events[-1][0] == "failed", events
                reason = events[-1][1]["reason"]
                reply = server.request("GET", reply.json()["result_url"])
                assert reply.json()["error"] == reason["error"] == code
            assert reply.status == 422, (name, reply)
            doc = reply.json()
            assert doc["error"] == code and doc["stage"] and doc["message"], (name, doc)
            assert "Traceback" not in reply.body.decode()
    # the reason is the failed record's own (the failed place beside the outbox holds it)
    records = [json.loads(p.read_text()) for p in Path(server.log_path.parent / "served.failed").glob("*.error.json")]
    assert {r["error"] for r in records} == set(expected.values())
    assert all(r["input"].startswith("upload:") for r in records)  # uploaded names are never paths


def test_a_client_that_leaves_mid_upload_costs_nothing(server):
    for path in ("/upscale", "/v1/jobs"):
        for ctype in ("multipart/form-data; boundary=xyz", "image/png"):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                         "Content-Length: 100000\r\n\r\n".encode() + b"--xyz\r\n" + b"\0" * 1000)
            time.sleep(0.2)
            sock.close()
    time.sleep(0.5)
    assert server.request("GET", "/healthz").status == 200
    assert "Traceback" not in server.log() and "unexpected error" not in server.log()


def test_unsupported_types_are_415(server):
    text = b"just some words\n"
    reply = server.post_image("/upscale", text, filename="notes.txt", content_type="text/plain")
    assert reply.status == 415 and reply.json()["error"] == "unsupported_media_type", reply
    reply = server.request("POST", "/upscale", b'{"image": 1}', {"Content-Type": "application/json"})
    assert reply.status == 415, reply
    # a real image in a format superres does not take (ICO): the pipeline's unsupported_format is 415 as well
    ok, ico = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.open(io.BytesIO(ico.tobytes())).save(buf, format="ICO")
    reply = server.post_image("/upscale", buf.getvalue(), filename="favicon.ico")
    assert reply.status in (415, 422), reply
    assert reply.json()["error"] in ("unsupported_format", "not_an_image")
    if reply.json()["error"] == "unsupported_format":
        assert reply.status == 415


def test_no_image_field_and_bad_parameters_are_400(server):
    body, ctype = multipart(b"x", name="picture")
    assert server.request("POST", "/upscale", body, {"Content-Type": ctype}).json()["error"] == "no_image"
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes()
    for query in ("?format=gif", "?quality=0", "?quality=high"):
        reply = server.post_image(f"/upscale{query}", data)
        assert reply.status == 400 and reply.json()["error"] in ("bad_format", "bad_quality"), reply


def test_too_big_is_413_decided_while_streaming_before_the_body_is_read(tmp_path):
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={"SUPERRES_MAX_BYTES": "100000"}).wait_ready()
    try:
        # Content-Length says too much: refused before a byte of the body is sent
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.putrequest("POST", "/upscale")
        conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        response = conn.getresponse()  # would time out if the server waited for the body
        assert response.status == 413 and json.loads(response.read())["error"] == "too_many_bytes"
        conn.close()
        # no length given (chunked): refused once the running count passes the limit, the rest never sent
        head, ctype = multipart(b"")
        head = head[: head.index(b"\r\n\r\n") + 4]
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"\0" * 50_000
        for part in (head, chunk, chunk, chunk):  # 150 KB of image: more than the limit; the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        answer = sock.recv(65536).decode("latin-1")
        while "\r\n\r\n" not in answer or not answer.rstrip().endswith("}"):
            more = sock.recv(65536).decode("latin-1")
            if not more:
                break
            answer += more
        assert answer.startswith("HTTP/1.1 413"), answer
        assert '"too_many_bytes"' in answer
        sock.close()
        # within the limit: fine
        small = (DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png").read_bytes()
        assert len(small) < 100_000
        assert served.post_image("/upscale", small).status == 200
        m = served.metrics()
        assert m[("superres_http_requests_total", frozenset({("endpoint", "/upscale"), ("status", "413")}))] == 1
        assert m[("superres_http_requests_total", frozenset({("endpoint", "/v1/jobs"), ("status", "413")}))] == 1
    finally:
        assert served.stop() == 0


def test_a_full_queue_is_503_with_retry_after_and_the_accepted_ones_finish(tmp_path):
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={"SUPERRES_QUEUE_MAX": "1"}).wait_ready()
    try:
        big = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "comicx2.png"))
        posts = [cv2.imencode(".png", np.roll(big, i, axis=1))[1].tobytes() for i in range(24)]  # all different
        replies = [served.post_image("/v1/jobs", data) for data in posts]
        statuses = [r.status for r in replies]
        assert 503 in statuses and 202 in statuses, statuses
        for r in replies:
            if r.status == 503:
                assert r.headers["retry-after"].isdigit() and r.json()["error"] == "queue_full", r
        for r in replies:
            if r.status == 202:
                assert served.events(r.json()["id"])[-1][0] == "done"
    finally:
        assert served.stop() == 0


# -- concurrency --------------------------------------------------------------------------------------------------------

def test_16_concurrent_clients_all_get_their_own_correct_picture(server, tmp_path):
    inputs = distinct_images(tmp_path / "in", 16)
    expected = oneshot(inputs, tmp_path / "oneshot")

    def client(path: Path):
        return path, server.post_image("/upscale", path.read_bytes(), filename=path.name)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client, inputs))
    for path, reply in answers:
        assert reply.status == 200, (path, reply)
        assert reply.body == (expected / path.name).read_bytes(), path.name
    # no thread is held per request: the server's threads are its stage threads, whatever the number of clients
    threads = int(Path(f"/proc/{server.proc.pid}/status").read_text().split("Threads:")[1].split()[0])
    assert threads < 40, threads


def test_concurrent_uploads_share_engine_calls_on_a_batching_engine(tmp_path):
    """On a GPU-like engine (bench/sim_engine.py: batches of 4 tiles, time per pixel, no CPU) the tiles of
    concurrent requests go through the engine together: fewer calls than uploads, calls carrying several."""
    log = tmp_path / "engine.calls"
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={
        "SUPERRES_TEST_ENGINE": f"{Path(__file__).resolve().parents[1] / 'bench' / 'sim_engine.py'}:load",
        "SIM_GPU_MS_PER_MPX": "20000", "SIM_GPU_BATCH": "4", "SIM_GPU_LOG": str(log)}).wait_ready()
    try:
        inputs = distinct_images(tmp_path / "in", 16, side=64)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda p: served.post_image("/upscale", p.read_bytes()), inputs))
        for reply in replies:
            assert reply.status == 200, reply
            assert cv2.imdecode(np.frombuffer(reply.body, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (128, 128)
    finally:
        assert served.stop() == 0
    pixels = [int(line.split()[2]) for line in log.read_text().splitlines()]
    assert sum(pixels) == 16 * 64 * 64  # every tile once (each 64 px image is one tile)
    assert len(pixels) < 16 and max(pixels) >= 2 * 64 * 64, pixels


# -- the token, CORS ------------------------------------------------------------------------------------------------------

def test_the_token_is_asked_everywhere_but_healthz_and_cors_only_when_configured(tmp_path, server):
    assert "access-control-allow-origin" not in server.request(
        "GET", "/v1/models", headers={"Origin": "http://elsewhere.test"}).headers
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={
        "SUPERRES_API_TOKEN": "s3cret", "SUPERRES_CORS_ORIGINS": "http://app.test"}).wait_ready()
    try:
        good = {"Authorization": "Bearer s3cret"}
        assert served.request("GET", "/healthz").status == 200
        data = (DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png").read_bytes()
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/jobs/" + "0" * 32)):
            assert served.request(method, path).status == 401
            assert served.request(method, path, headers={"Authorization": "Bearer wrong"}).status == 401
        reply = served.post_image("/upscale", data)
        assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer")
        assert served.post_image("/upscale", data, headers=good).status == 200
        assert served.request("GET", "/v1/models", headers=good).status == 200
        preflight = served.request("OPTIONS", "/upscale", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status == 200 and preflight.headers["access-control-allow-origin"] == "http://app.test"
        other = served.request("GET", "/v1/models", headers={**good, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        assert served.stop() == 0


# -- the ledger across restarts, results' time, SIGTERM ---------------------------------------------------------------------

def test_a_restart_answers_the_same_upload_from_the_ledger_without_a_second_upscale(tmp_path):
    from pipeline.adapters.sqlite_ledger import SQLiteLedger

    outbox = tmp_path / "out"
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "headx2.png").read_bytes()
    first = Served(outbox, tmp_path / "one.log").wait_ready()
    try:
        reply = first.post_image("/v1/jobs", data)
        job = reply.json()["id"]
        assert first.events(job)[-1][0] == "done"
        made = first.request("GET", f"/v1/jobs/{job}/result").body
    finally:
        assert first.stop() == 0
    second = Served(outbox, tmp_path / "two.log").wait_ready()
    try:
        status = second.request("GET", f"/v1/jobs/{job}").json()  # known from the ledger before any upload
        assert status["status"] == "done" and status["from_ledger"] is True
        reply = second.post_image("/upscale", data, filename="another-name.png")
        assert reply.status == 200 and reply.body == made
        m = second.metrics()
        assert m[("superres_items_total", frozenset({("outcome", "skipped")}))] == 1
        assert m[("superres_items_total", frozenset({("outcome", "done")}))] == 0
    finally:
        assert second.stop() == 0
    stats = SQLiteLedger(outbox / ".superres" / "ledger.sqlite3").stats()
    assert stats["engine_runs"] == 1 and stats["max_engine_runs"] == 1, stats


def test_an_s3_outbox_holds_results_and_ledger_and_answers_a_restart(aws, tmp_path):
    from moto_server import aws_env, keys

    s3, _, endpoint = aws
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes()
    env = aws_env(endpoint)
    answers = []
    for run in ("one", "two"):
        served = Served("s3://outbox/served/", tmp_path / f"{run}.log", env=env).wait_ready()
        try:
            reply = served.post_image("/upscale", data)
            assert reply.status == 200 and reply.headers["content-type"] == "image/png", reply
            answers.append(reply.body)
            bad = served.post_image("/upscale", b"<html>not an image</html>")
            assert bad.status == 422 and bad.json()["error"] == "not_an_image", bad
            m = served.metrics()
        finally:
            assert served.stop() == 0
    assert answers[0] == answers[1]
    assert m[("superres_items_total", frozenset({("outcome", "done")}))] == 0  # the second run: from the ledger
    outputs = keys(s3, "outbox", "served/")
    assert len(outputs) == 1 and outputs.pop().endswith(".png")
    assert keys(s3, "outbox", ".superres/ledger/served/")  # the ledger beside the outputs, not among them
    assert any(k.endswith(".error.json") for k in keys(s3, "outbox", "served.failed/"))


def test_results_are_removed_after_their_time(tmp_path):
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={"SUPERRES_RESULT_TTL_S": "1"}).wait_ready()
    try:
        data = (DATASETS / "Set5" / "LR_bicubic" / "X4" / "birdx4.png").read_bytes()
        job = served.post_image("/v1/jobs", data).json()
        assert served.events(job["id"])[-1][0] == "done"
        assert list((tmp_path / "out").glob(f"{job['id']}.*"))
        deadline = time.monotonic() + 15
        while list((tmp_path / "out").glob(f"{job['id']}.*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list((tmp_path / "out").glob(f"{job['id']}.*"))
        assert served.request("GET", job["result_url"]).status == 404
        # uploaded again: made again
        assert served.post_image("/upscale", data).status == 200
    finally:
        assert served.stop() == 0


def test_sigterm_stops_taking_requests_finishes_the_jobs_in_hand_then_exits_0(tmp_path):
    outbox = tmp_path / "out"
    served = Served(outbox, tmp_path / "serve.log").wait_ready()
    big = cv2.imread(str(DATASETS / "Set14" / "LR_bicubic" / "X2" / "comicx2.png"))
    jobs = [served.post_image("/v1/jobs", cv2.imencode(".png", np.roll(big, i, axis=0))[1].tobytes()).json()["id"]
            for i in range(6)]
    body, ctype = multipart(cv2.imencode(".png", big[:, ::-1])[1].tobytes())
    in_hand = concurrent.futures.ThreadPoolExecutor(1).submit(
        served.request, "POST", "/upscale", body, {"Content-Type": ctype})
    time.sleep(0.3)
    served.proc.send_signal(signal.SIGTERM)
    reply = in_hand.result(timeout=120)
    assert reply.status == 200, reply  # the request in hand is answered
    assert served.proc.wait(120) == 0
    with pytest.raises(OSError):
        served.request("GET", "/healthz", timeout=2)
    for job in jobs:  # each queued job finished: its result is in the outbox
        assert len(list(outbox.glob(f"{job}.png"))) == 1, job
    assert "Traceback" not in served.log()


def test_an_engine_failure_gives_the_upload_back_with_503_and_the_process_exits_3(tmp_path):
    served = Served(tmp_path / "out", tmp_path / "serve.log", env={
        "SUPERRES_TEST_ENGINE": f"{DOUBLES}:broken"}).wait_ready()
    data = (DATASETS / "Set5" / "LR_bicubic" / "X2" / "birdx2.png").read_bytes()
    try:
        reply = served.post_image("/upscale", data)
        assert reply.status == 503 and reply.headers["retry-after"].isdigit(), reply
        assert reply.json()["error"] == "transient" and "engine failed" in reply.json()["message"]
        assert served.proc.wait(60) == 3  # the orchestrator starts a healthy one
    finally:
        served.kill()
    assert not (tmp_path / "out.failed").exists()  # nothing filed as failed: the input was not at fault
    assert "Traceback" not in served.log()


def test_setup_mistakes_are_one_line_and_exit_2(tmp_path):
    import subprocess

    from serve_client import superres_cmd

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    env = {"SUPERRES_MODEL_DIR": str(SHARED_MODELS), "PATH": "/usr/bin:/bin"}
    cases = [
        ["serve", "--port", str(port), "--outbox", str(tmp_path / "o"), "--model", MODEL],  # port taken
        ["serve", "--port", "0", "--outbox", str(tmp_path / "o"), "--model", "no-such-model"],  # bad model
        ["serve", "--port", "0", "--model", MODEL],  # no outbox
    ]
    try:
        for args in cases:
            result = subprocess.run([*superres_cmd(), *args], env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2, (args, result.stderr)
            lines = [line for line in result.stderr.splitlines() if line.startswith("superres: error:")]
            assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    finally:
        taken.close()


def test_metrics_count_requests_by_endpoint_and_status_beside_the_pipelines(server):
    server.request("GET", "/v1/jobs/" + "f" * 32)
    m = server.metrics()
    assert m[("superres_http_requests_total", frozenset({("endpoint", "/v1/jobs/{id}"), ("status", "404")}))] >= 1
    assert m[("superres_http_request_seconds_count", frozenset({("endpoint", "/healthz"), ("status", "200")}))] >= 1
    assert ("superres_items_total", frozenset({("outcome", "done")})) in m
    assert ("superres_queue_pending", frozenset()) in m
    assert m[("superres_engine_healthy", frozenset())] == 1
