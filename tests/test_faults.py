"""Faults between superres and S3/SQS: connection resets (before and after the request took effect), 500/503
answers, cut-off bodies and an outage, made by `fault_proxy` in front of moto's server. A fault may cost a retry or
a delay, never an image: no image is filed as failed, none is upscaled and published twice, no worker dies.

The small tests put one fault at one place; the slow one runs real workers through thousands of requests."""

import json
import signal
import subprocess
import time
from collections import Counter

import cv2
import pytest

from conftest import DATASETS, SHARED_MODELS, cli_env, superres_cmd
from fault_proxy import FAULTS, FaultProxy
from handler.cli import main
from moto_server import aws_env, client, keys, queue_depth, queue_with_dlq, s3_event
from pipeline.adapters.s3_ledger import S3Ledger
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.errors import TransientError

MODEL = "fsrcnn-small-x2"


@pytest.fixture
def proxy(moto_endpoint):
    """A proxy in front of moto that breaks nothing until told (`plan`, `outage`)."""
    with FaultProxy(moto_endpoint, rate=0.0) as p:
        yield p


# -- one fault at one place ------------------------------------------------------------------------------------


def test_a_cut_off_body_is_read_again(moto_endpoint, proxy):
    raw = client("s3", moto_endpoint)
    raw.create_bucket(Bucket="inbox")
    raw.put_object(Bucket="inbox", Key="a.png", Body=b"image bytes" * 100)
    objects = S3Objects(s3_client(proxy.url))
    proxy.plan(["cut", "cut"])  # botocore does not retry a streamed body: S3Objects GETs it again
    data, info = objects.read("inbox", "a.png", max_bytes=10_000)
    assert data == b"image bytes" * 100 and info.size == 1100
    assert proxy.counts["cut"] == 2 and proxy.counts["requests"] == 3


def test_a_body_cut_off_on_every_try_is_transient_not_a_failure(moto_endpoint, proxy):
    raw = client("s3", moto_endpoint)
    raw.create_bucket(Bucket="inbox")
    raw.put_object(Bucket="inbox", Key="a.png", Body=b"x" * 1000)
    proxy.plan(["cut"] * 3)
    with pytest.raises(TransientError) as err:
        S3Objects(s3_client(proxy.url)).read("inbox", "a.png", max_bytes=10_000)
    assert err.value.stage == "read" and "IncompleteRead" in err.value.message
    assert proxy.counts["cut"] == 3


@pytest.mark.parametrize("fault", ["reset_after", "cut"])
def test_a_ledger_write_whose_answer_was_lost_is_applied_once(moto_endpoint, proxy, fault):
    """The write landed, its answer did not: the retry (botocore's or ours) meets a 412 from our own write. Taken
    for someone else's, mark_publishing would count engine_runs twice and mark_done would call its claim lost."""
    raw = client("s3", moto_endpoint)
    raw.create_bucket(Bucket="outbox")
    ledger = S3Ledger(s3_client(proxy.url), "outbox", ".superres/ledger/")
    ledger.claim("k", source="s3://inbox/a.png", output="s3://outbox/a.png")
    proxy.plan([fault])  # the conditional PUT of mark_publishing (the row is known: no GET first)
    ledger.mark_publishing("k", 1, None)
    proxy.plan([fault])  # and of mark_done
    ledger.mark_done("k", 1, source="s3://inbox/a.png", fingerprint="f", sha256="s", output="s3://outbox/a.png",
                     output_etag="e")
    row = S3Ledger(raw, "outbox", ".superres/ledger/").item("k")
    assert (row.state, row.engine_runs, row.generation) == ("done", 1, 1)
    # for a cut, an empty answer has no body to cut: the proxy resets it after forwarding instead
    assert proxy.counts["reset_after"] + proxy.counts["cut"] == 2


def test_an_outage_longer_than_the_retries_is_transient(moto_endpoint, proxy):
    raw = client("s3", moto_endpoint)
    raw.create_bucket(Bucket="inbox")
    objects = S3Objects(s3_client(proxy.url, max_attempts=2))
    proxy.outage(30)
    with pytest.raises(TransientError):
        objects.read("inbox", "a.png", max_bytes=100)
    with pytest.raises(TransientError):
        objects.publish("inbox", "a.png", b"x", content_type="image/png", metadata={})
    with pytest.raises(TransientError):
        S3Ledger(s3_client(proxy.url, max_attempts=2), "inbox", "l/").claim("k", source="s", output="o")
    assert proxy.counts["outage"] >= 3 * 3  # three calls, each tried 3 times by us (and more by botocore)


# -- real workers, thousands of requests, faults all along and an outage ----------------------------------------

N_IMAGES = 100
VISIBILITY_S = 20


def crops(n: int, side: int = 32) -> list[bytes]:
    """n distinct small real images: corners of BSD100's LR photos."""
    paths = sorted((DATASETS / "BSD100" / "LR_bicubic" / "X2").glob("*.png"))[:n]
    images = [cv2.imencode(".png", cv2.imread(str(p))[:side, :side])[1].tobytes() for p in paths]
    assert len(set(images)) == n
    return images


def expected(tmp_path, outputs: list[str], images: list[bytes]) -> dict[str, bytes]:
    """Output key -> what it should hold: the same model, run here on the same bytes (one thread, as the workers)."""
    src, out = tmp_path / "ref-in", tmp_path / "ref"
    src.mkdir()
    for i, data in enumerate(images):
        (src / f"{i:03d}.png").write_bytes(data)
    assert main(["upscale", str(src), "--out", str(out), "--model", MODEL, "--model-dir", str(SHARED_MODELS),
                 "--threads", "1"]) == 0
    return {key: (out / f"{i:03d}.png").read_bytes() for i, key in enumerate(outputs)}


def check_published_once(s3, outputs: dict[str, bytes]) -> None:
    """Every object has exactly one output, the one it should give; its ledger item was published once; nothing
    was filed as failed."""
    assert keys(s3, "outbox", "done/") == set(outputs)
    for key, data in outputs.items():
        assert s3.get_object(Bucket="outbox", Key=key)["Body"].read() == data, key
    rows = S3Ledger(s3, "outbox", ".superres/ledger/done/")._rows()
    assert len(rows) == len(outputs) and {r.state for r in rows} == {"done"}
    assert [r.source for r in rows if r.engine_runs != 1] == []
    assert keys(s3, "outbox", "failed/") == set()


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def log_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_faults_on_every_tenth_request_and_an_outage_cost_no_image(moto_endpoint, tmp_path):
    s3, sqs = client("s3", moto_endpoint), client("sqs", moto_endpoint)  # the test's own view: moto directly
    for bucket in ("inbox", "outbox"):
        s3.create_bucket(Bucket=bucket)
    images = crops(N_IMAGES)
    names = [f"drop/{i:03d}.png" for i in range(N_IMAGES)]
    outputs = expected(tmp_path, [f"done/{name}" for name in names], images)  # outputs keep the whole key
    for name, data in zip(names, images):
        s3.put_object(Bucket="inbox", Key=name, Body=data)
    queue, dlq = queue_with_dlq(sqs, max_receives=5, visibility=VISIBILITY_S)

    started = time.monotonic()
    with FaultProxy(moto_endpoint, rate=0.12, seed=20261201) as proxy:
        # S3 and SQS both through the proxy
        env = cli_env(**aws_env(proxy.url), SUPERRES_MODEL=MODEL, SUPERRES_THREADS="1", SUPERRES_LOG_LEVEL="DEBUG")
        logs = [tmp_path / f"w{i}.log" for i in range(2)]
        workers = [subprocess.Popen(
            [*superres_cmd(), "worker", "--queue", queue, "--outbox", "s3://outbox/done/", "--failed",
             "s3://outbox/failed/", "--visibility-s", str(VISIBILITY_S), "--lease-s", "30", "--wait-s", "1",
             "--log-format", "json"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
        try:
            for name in names:
                sqs.send_message(QueueUrl=queue, MessageBody=s3_event("inbox", name))
            wait_for(lambda: len(keys(s3, "outbox", "done/")) >= N_IMAGES // 3, 120, "a third of the outputs")
            outage_at = time.monotonic() - started
            proxy.outage(40)
            time.sleep(40)
            wait_for(lambda: len(keys(s3, "outbox", "done/")) == N_IMAGES and queue_depth(sqs, queue) == 0, 180,
                     "every output and an empty queue")
            alive = [w.poll() is None for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            codes = [w.wait(timeout=60) for w in workers]
        counts = dict(proxy.counts)
    duration = time.monotonic() - started

    lines = [line for log in logs for line in log_lines(log)]
    outcomes = Counter(line["outcome"] for line in lines if line.get("message") == "item")
    upscaled = Counter(line["source"] for line in lines if line.get("message") == "upscaling")
    print(f"\nfaults: {counts}; outage at {outage_at:.0f} s; outcomes: {dict(outcomes)}; "
          f"engine started more than once for {sum(1 for n in upscaled.values() if n > 1)} sources; "
          f"{duration:.0f} s")
    assert alive == [True, True], "a worker died"
    assert codes == [0, 0]
    # faults on >= 10% of the requests outside the outage, of every kind, and the outage
    assert sum(counts.get(kind, 0) for kind in FAULTS) >= 0.1 * (counts["requests"] - counts["outage"])
    assert all(counts.get(kind, 0) > 0 for kind in (*FAULTS, "outage")), counts

    check_published_once(s3, outputs)
    assert outcomes["failed"] == 0
    assert queue_depth(sqs, dlq) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_s3_watch_rides_out_faults_and_an_outage(moto_endpoint, tmp_path):
    """The S3 inbox watch through the same faults: half the objects are there at start, half come during a 40 s
    outage; it lists again when the outage is over and takes every object once."""
    s3 = client("s3", moto_endpoint)
    for bucket in ("inbox", "outbox"):
        s3.create_bucket(Bucket=bucket)
    n = 30
    images = crops(n)
    names = [f"watch/{i:03d}.png" for i in range(n)]
    outputs = expected(tmp_path, [f"done/{i:03d}.png" for i in range(n)], images)  # keys below the inbox prefix
    for name, data in zip(names[: n // 2], images):
        s3.put_object(Bucket="inbox", Key=name, Body=data)
    with FaultProxy(moto_endpoint, rate=0.12, seed=7) as proxy:
        env = cli_env(**aws_env(proxy.url), SUPERRES_MODEL=MODEL, SUPERRES_THREADS="1")
        log = tmp_path / "watch.log"
        watch = subprocess.Popen(
            [*superres_cmd(), "watch", "--inbox", "s3://inbox/watch/", "--outbox", "s3://outbox/done/", "--failed",
             "s3://outbox/failed/", "--rescan-s", "0.5", "--lease-s", "30", "--log-format", "json"],
            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        try:
            wait_for(lambda: len(keys(s3, "outbox", "done/")) >= n // 4, 120, "a quarter of the outputs")
            proxy.outage(40)
            for name, data in zip(names[n // 2:], images[n // 2:]):
                s3.put_object(Bucket="inbox", Key=name, Body=data)
            time.sleep(40)
            wait_for(lambda: len(keys(s3, "outbox", "done/")) == n, 120, "every output")
            alive = watch.poll() is None
        finally:
            if watch.poll() is None:
                watch.send_signal(signal.SIGTERM)
            code = watch.wait(timeout=60)
        counts = dict(proxy.counts)
    print(f"\nfaults: {counts}")
    assert alive and code == 0
    assert counts["outage"] > 0 and sum(counts.get(kind, 0) for kind in FAULTS) > 0
    check_published_once(s3, outputs)
