"""The S3 ledger over real HTTP against moto's server: the rules of test_ledger.py, plus real races."""

import multiprocessing
import random
import threading
import time
from collections import Counter

import pytest

from moto_server import client
from pipeline.adapters.s3_ledger import S3Ledger, _Conflict
from pipeline.errors import TransientError
from pipeline.ledger import ClaimLost, ClaimOutcome

BUCKET = "ledger-bucket"
PREFIX = "done/.superres/ledger/"


@pytest.fixture
def atomic_moto(monkeypatch):
    """Make moto's conditional writes atomic, as S3's are.

    moto 5.2 checks IfNoneMatch/IfMatch and then writes, with no lock between: two threads of its server can both
    pass the check (seen: 7 of 300 eight-way races with a tiny GIL switch interval, 0 of 1000 with the default).
    The race tests below test our ledger, not that gap, so serialise moto's object writes and deletes."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)

        def locked(self, _original=original):
            with lock:
                return _original(self)

        monkeypatch.setattr(S3Response, name, locked)


@pytest.fixture
def s3(moto_endpoint):
    c = client("s3", moto_endpoint)
    c.create_bucket(Bucket=BUCKET)
    return c


def ledger(s3, owner: str, **kw) -> S3Ledger:
    return S3Ledger(s3, BUCKET, PREFIX, owner=owner, **kw)


def test_life_of_an_item(s3):
    led = S3Ledger(s3, BUCKET, PREFIX)
    assert led.owner.count(":") == 2  # host:pid:random
    outcome, row = led.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.NEW and row.state == "claimed" and row.owner == led.owner and row.attempts == 1
    assert row.generation == 1 and led.renew("k", 1)
    led.mark_publishing("k", 1, "/tmp/x")
    assert led.item("k").state == "publishing" and led.item("k").temp == "/tmp/x"
    led.mark_done("k", 1, source="/in/a", fingerprint="3:7|r", sha256="ab", output="/out/a", output_etag="e1")
    outcome, found = led.claim("k", source="/in/b", output="/out/b")
    assert outcome is ClaimOutcome.DUPLICATE and found.output == "/out/a" and found.output_etag == "e1"
    source = led.source("/in/a")
    assert (source.outcome, source.fingerprint, source.output_etag) == ("done", "3:7|r", "e1")
    assert led.source("/in/zzz") is None
    assert led.claim_output("/out/a", "/in/a") == "/in/a" and led.claim_output("/out/a", "/in/a2") == "/in/a"
    assert led.item("k").engine_runs == 1 and led.item("k").temp is None
    led.record_source("/in/b", fingerprint="1:1", sha256="ab", key="k", outcome="duplicate", output="/out/a", detail=None)
    assert led.stats() == {"items": {"done": 1}, "sources": {"done": 1, "duplicate": 1},
                           "max_engine_runs": 1, "engine_runs": 1}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert all(k.startswith((PREFIX + "items/", PREFIX + "sources/", PREFIX + "outputs/")) for k in keys)
    led.close()


def test_an_empty_prefix_works(s3):
    led = S3Ledger(s3, BUCKET, "")
    assert led.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.NEW
    assert s3.list_objects_v2(Bucket=BUCKET)["Contents"][0]["Key"].startswith("items/")


def test_an_expired_claim_is_taken_over_and_a_live_one_is_not(s3):
    first = ledger(s3, "machine-a:1:aaaaaa", lease_s=1.5)  # margin for a loaded machine
    second = ledger(s3, "machine-b:1:bbbbbb")
    first.claim("k", source="/in/a", output="/out/a")
    first.mark_publishing("k", 1, "/tmp/t")
    first.claim("j", source="/in/j", output="/out/j")
    assert second.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.BUSY  # lease running
    assert second.orphaned_publishes() == []
    time.sleep(1.6)
    assert [r.key for r in second.orphaned_publishes()] == ["k"]
    outcome, found = second.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.RESUME_PUBLISH and found.temp == "/tmp/t" and found.owner == second.owner
    assert second.orphaned_publishes() == []  # its lease is second's now
    outcome, found = second.claim("j", source="/in/j", output="/out/j")  # a claimed row, lease ran out
    assert outcome is ClaimOutcome.NEW and found.owner == second.owner and found.attempts == 2

    # the first machine comes back late: its writes must not touch what it no longer owns
    with pytest.raises(ClaimLost):
        first.mark_publishing("j", 1, "/tmp/late")
    first.release("j", 1)
    assert not first.renew("j", 1)
    assert found.generation == 2
    assert second.item("j").state == "claimed" and second.item("j").owner == second.owner
    assert second.item("j").lease_until > time.time() + 500

    live = ledger(s3, "machine-c:1:cccccc")  # another machine, lease running
    live.claim("m", source="/in/m", output="/out/m")
    outcome, found = second.claim("m", source="/in/m", output="/out/m")
    assert outcome is ClaimOutcome.BUSY and found.owner == live.owner


def test_renew_keeps_a_claim_from_being_taken_over(s3):
    holder = ledger(s3, "machine-a:1:aaaaaa", lease_s=1.5)  # margin for a loaded machine
    other = ledger(s3, "machine-b:1:bbbbbb")
    holder.claim("k", source="/in/a", output="/out/a")
    for _ in range(4):  # 2 s in all: well past the first lease
        time.sleep(0.5)
        assert holder.renew("k", 1)
    assert other.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.BUSY
    assert not other.renew("k", 1)  # not ours: no effect
    assert other.item("k").owner == holder.owner
    time.sleep(1.6)  # no more heartbeats: now it can be taken
    assert other.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.NEW


def test_release_and_reopen(s3):
    led = ledger(s3, "machine-a:1:aaaaaa")
    other = ledger(s3, "machine-b:1:bbbbbb")
    led.claim("k", source="/in/a", output="/out/a")
    other.release("k", 1)  # not other's claim
    assert led.item("k") is not None
    led.release("k", 1)
    assert led.item("k") is None
    led.release("k", 1)  # nothing left: no error
    _, row = led.claim("k", source="/in/a", output="/out/a")
    led.mark_done("k", row.generation, source="/in/a", fingerprint="1:1", sha256="ab", output="/out/a",
                  output_etag="e")
    led.release_any("k")  # never drops a done row
    led.release("k", row.generation)
    assert led.item("k").state == "done"
    led.reopen("k", row.generation + 1)  # another generation's row: left
    assert led.item("k").state == "done"
    led.reopen("k", row.generation)
    assert led.item("k") is None
    _, row = led.claim("k", source="/in/a", output="/out/a")
    led.reopen("k", row.generation)  # only done rows are reopened
    assert led.item("k").state == "claimed"
    led.mark_publishing("k", row.generation, "/tmp/t")
    other.release_any("k")  # recovery drops a not-done row whoever holds it
    assert led.item("k") is None


def test_mark_item_done_finishes_an_orphaned_publish(s3):
    led = ledger(s3, "machine-a:1:aaaaaa", lease_s=1.5)  # margin for a loaded machine
    led.claim("k", source="/in/a", output="/out/a")
    led.mark_publishing("k", 1, "/tmp/t")
    time.sleep(1.6)
    recovery = ledger(s3, "machine-b:1:bbbbbb")
    [row] = recovery.orphaned_publishes()
    recovery.mark_item_done(row.key, "e")
    assert recovery.item("k").state == "done" and recovery.item("k").temp is None
    assert recovery.orphaned_publishes() == []


def test_a_stale_etag_is_a_conflict(s3):
    """What the ledger stands on: moto (like S3) refuses IfNoneMatch on an existing object, IfMatch on a changed one."""
    a = ledger(s3, "a:1:aaaaaa")
    a.claim("k", source="/in/a", output="/out/a")
    okey = a._item_key("k")
    row, etag = a._read(okey)
    with pytest.raises(_Conflict):
        a._write(okey, row, None)  # create, but it exists
    a.renew("k", 1)  # changes the ETag
    with pytest.raises(_Conflict):
        a._write(okey, row, etag)
    with pytest.raises(_Conflict):
        a._delete(okey, etag)
    a.release("k", 1)
    with pytest.raises(_Conflict):
        a._write(okey, row, etag)  # IfMatch on a deleted row


def test_s3_errors_are_transient(moto_endpoint):
    led = S3Ledger(client("s3", moto_endpoint), "no-such-bucket", PREFIX)
    with pytest.raises(TransientError) as err:
        led.claim("k", source="/in/a", output="/out/a")
    assert err.value.stage == "dedup" and err.value.retryable
    with pytest.raises(TransientError):
        led.record_source("/in/a", fingerprint="1:1", sha256=None, key=None, outcome="failed", output=None, detail="x")


def test_threads_racing_for_the_same_key_one_wins(moto_endpoint, s3, atomic_moto):
    """8 workers, each with its own client and owner, claim each of 20 keys at the same moment."""
    n, keys = 8, [f"key-{i}" for i in range(20)]
    # clients are made here: boto3's default session is not safe to create clients from in several threads
    ledgers = [ledger(client("s3", moto_endpoint), f"machine-{i}:1:{i:06x}") for i in range(n)]
    barrier = threading.Barrier(n)
    outcomes: dict[str, list[ClaimOutcome]] = {k: [] for k in keys}
    errors: list[BaseException] = []

    def work(led: S3Ledger) -> None:
        try:
            for key in keys:
                barrier.wait(timeout=30)
                outcomes[key].append(led.claim(key, source=f"/in/{key}", output=f"/out/{key}")[0])
        except BaseException as exc:  # reported below: a thread's exception would vanish
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(led,)) for led in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for key in keys:
        assert Counter(outcomes[key]) == {ClaimOutcome.NEW: 1, ClaimOutcome.BUSY: n - 1}, key
        assert ledgers[0].item(key).attempts == 1


def _claim_all(endpoint: str, worker: int, keys: list[str], barrier, results) -> None:
    """A worker process: its own client and owner; claims every key, reports the ones it won."""
    led = ledger(client("s3", endpoint), f"proc-{worker}:1:{worker:06x}")
    keys = keys[:]
    random.Random(worker).shuffle(keys)
    barrier.wait(timeout=60)
    won = [k for k in keys if led.claim(k, source=f"/in/{k}", output=f"/out/{k}")[0] is ClaimOutcome.NEW]
    results.put((worker, won))


def test_processes_racing_each_key_is_won_once(moto_endpoint, s3, atomic_moto):
    ctx = multiprocessing.get_context("spawn")
    keys = [f"key-{i}" for i in range(10)]
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(moto_endpoint, w, keys, barrier, results)) for w in range(4)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    wins = Counter(k for _, won in reports for k in won)
    assert wins == Counter(keys)  # every key won exactly once
    owners = {ledger(s3, "x:1:000000").item(k).owner for k in keys}
    assert owners <= {f"proc-{w}:1:{w:06x}" for w in range(4)}
