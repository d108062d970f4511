"""Ledger rules (pure, table-driven) and the SQLite ledger that applies them."""

import socket

import pytest

from pipeline.adapters.sqlite_ledger import SQLiteLedger, owner_alive
from pipeline.ledger import (PIPELINE_VERSION, ClaimLost, ClaimOutcome, Done, ItemRow, Publishing, decide_claim,
                             dedup_key, holds, output_intact, output_variant, request_id)

ME, OTHER = "host:1", "host:2"


def row(state, owner=OTHER, lease_until=100.0):
    return ItemRow("k", state, owner, lease_until, "/out/a.png", None, "/in/a.png", 0, 1)


@pytest.mark.parametrize(
    "existing, alive, now, expect",
    [
        (None, False, 0, ClaimOutcome.NEW),
        (row("done"), True, 0, ClaimOutcome.DUPLICATE),
        (row("claimed"), True, 50, ClaimOutcome.BUSY),  # live owner, lease running
        (row("claimed"), False, 50, ClaimOutcome.NEW),  # owner died (SIGKILL): take over at once
        (row("claimed"), True, 150, ClaimOutcome.NEW),  # lease ran out
        (row("claimed", owner=ME), True, 50, ClaimOutcome.NEW),  # our own leftover claim
        (row("publishing"), False, 50, ClaimOutcome.RESUME_PUBLISH),  # encoded before the crash: only rename
        (row("publishing"), True, 50, ClaimOutcome.BUSY),
    ],
)
def test_decide_claim(existing, alive, now, expect):
    assert decide_claim(existing, owner=ME, now=now, owner_alive=alive) is expect


def test_the_key_names_everything_that_changes_the_output_bytes():
    base = dict(model="fsrcnn-x3", scale=3, policy="tile", fmt="PNG", quality=None)
    key = dedup_key("ab", output_variant(**base))
    for change in (dict(model="espcn-x3"), dict(scale=2), dict(policy="cap-500"), dict(fmt="JPEG", quality=95)):
        assert dedup_key("ab", output_variant(**{**base, **change})) != key, change
    assert output_variant(**{**base, "fmt": "JPEG", "quality": 90}) != output_variant(**{**base, "fmt": "JPEG", "quality": 95})
    assert f"v{PIPELINE_VERSION}" in key
    assert request_id("m", 3, "tile", "keep", 95, 95) != request_id("m", 3, "tile", "png", 95, 95)


@pytest.mark.parametrize(
    "existing, generation, expect",
    [
        (None, 1, False),
        (row("claimed", owner=ME), 0, True),
        (row("claimed", owner=ME), 1, False),  # taken over and back: another generation
        (row("claimed"), 0, False),  # another owner
        (row("publishing", owner=ME), 0, True),
        (row("done", owner=ME), 0, False),
    ],
)
def test_holds_is_the_fence(existing, generation, expect):
    assert holds(existing, ME, generation) is expect


@pytest.mark.parametrize("recorded, current, expect", [
    ("e1", "e1", True), ("e1", "e2", False), ("e1", None, False), (None, "e1", False), (None, None, False),
])
def test_an_output_is_intact_only_with_the_identity_recorded_at_publish(recorded, current, expect):
    assert output_intact(recorded, current) is expect


def test_owner_alive_uses_the_pid_on_this_host():
    host = socket.gethostname()
    assert owner_alive(f"{host}:1")  # init always runs
    assert not owner_alive(f"{host}:99999999")
    assert owner_alive("another-host:99999999")  # judged by its lease alone


def test_sqlite_ledger_life_of_an_item(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    outcome, mine = ledger.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.NEW and mine.generation == 1
    assert ledger.renew("k", mine.generation)
    ledger.mark_publishing("k", mine.generation, "/tmp/x")
    ledger.mark_done("k", mine.generation, source="/in/a", fingerprint="3:7|r", sha256="ab", output="/out/a",
                     output_etag="e1")
    outcome, found = ledger.claim("k", source="/in/b", output="/out/b")
    assert outcome is ClaimOutcome.DUPLICATE and found.output == "/out/a" and found.output_etag == "e1"
    source = ledger.source("/in/a")
    assert (source.outcome, source.fingerprint, source.output_etag) == ("done", "3:7|r", "e1")
    assert ledger.source("/in/zzz") is None
    assert ledger.item("k").engine_runs == 1


def test_a_group_is_marked_together_and_a_lost_claim_fails_only_itself(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    rows = {k: ledger.claim(k, source=f"/in/{k}", output=f"/out/{k}")[1] for k in "abc"}
    stale = rows["b"].generation + 1  # as if "b" had been taken over since
    publishing = [Publishing("a", rows["a"].generation, "/t/a"), Publishing("b", stale, "/t/b"),
                  Publishing("c", rows["c"].generation, "/t/c")]
    lost = ledger.mark_publishing_many(publishing)
    assert lost[0] is None and isinstance(lost[1], ClaimLost) and lost[2] is None
    assert [ledger.item(k).state for k in "abc"] == ["publishing", "claimed", "publishing"]
    marks = [Done(k, rows[k].generation if k != "b" else stale, f"/in/{k}", None, "ab", f"/out/{k}", f"e-{k}")
             for k in "abc"]
    lost = ledger.mark_done_many(marks)
    assert lost[0] is None and isinstance(lost[1], ClaimLost) and lost[2] is None
    assert [ledger.item(k).state for k in "abc"] == ["done", "claimed", "done"]
    assert ledger.source("/in/a").outcome == "done" and ledger.source("/in/b") is None
    with pytest.raises(ClaimLost):  # the one-item calls say it by raising
        ledger.mark_done("b", stale, source="/in/b", fingerprint=None, sha256="ab", output="/out/b", output_etag="e")


def test_a_dead_owners_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    path = tmp_path / "l.sqlite3"
    first = SQLiteLedger(path)
    first.owner = f"{socket.gethostname()}:99999999"  # a process that no longer exists
    _, row1 = first.claim("k", source="/in/a", output="/out/a")
    first.mark_publishing("k", row1.generation, "/tmp/t")
    second = SQLiteLedger(path)
    outcome, found = second.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.RESUME_PUBLISH and found.temp == "/tmp/t" and found.owner == second.owner
    assert found.generation == row1.generation + 1

    live = SQLiteLedger(path)  # same pid as `second`, but another owner name on a live pid
    live.owner = f"{socket.gethostname()}:1"
    live.claim("j", source="/in/j", output="/out/j")
    assert second.claim("j", source="/in/j", output="/out/j")[0] is ClaimOutcome.BUSY


def test_a_holder_whose_lease_ran_out_is_fenced_off(tmp_path):
    """The old holder paused past its lease; the new one took over: every change of the old one is refused."""
    path = tmp_path / "l.sqlite3"
    old, new = SQLiteLedger(path, lease_s=0.05), SQLiteLedger(path)
    old.owner, new.owner = f"{socket.gethostname()}:1", f"{socket.gethostname()}:{__import__('os').getpid()}"
    _, old_row = old.claim("k", source="/in/a", output="/out/a")
    __import__("time").sleep(0.1)
    outcome, new_row = new.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.NEW and new_row.generation == old_row.generation + 1
    assert not old.renew("k", old_row.generation)
    with pytest.raises(ClaimLost):
        old.mark_publishing("k", old_row.generation, "/tmp/old")
    with pytest.raises(ClaimLost):
        old.mark_done("k", old_row.generation, source="/in/a", fingerprint=None, sha256="ab", output="/out/a",
                      output_etag="old")
    old.release("k", old_row.generation)  # not ours: nothing happens
    assert new.item("k").owner == new.owner and new.item("k").state == "claimed"
    new.mark_publishing("k", new_row.generation, "/tmp/new")
    new.mark_done("k", new_row.generation, source="/in/a", fingerprint=None, sha256="ab", output="/out/a",
                  output_etag="new")
    assert new.item("k").output_etag == "new"


def test_release_and_reopen(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    _, row1 = ledger.claim("k", source="/in/a", output="/out/a")
    ledger.release("k", row1.generation)
    assert ledger.item("k") is None
    _, row2 = ledger.claim("k", source="/in/a", output="/out/a")
    ledger.mark_done("k", row2.generation, source="/in/a", fingerprint="1:1", sha256="ab", output="/out/a",
                     output_etag="e")
    ledger.reopen("k", row2.generation + 5)  # another generation's done row: not this one
    assert ledger.item("k").state == "done"
    ledger.reopen("k", row2.generation)
    assert ledger.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.NEW


def test_an_output_has_one_writer(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    assert ledger.claim_output("s3://b/out/a/x.png", "s3://b/in/a//x.png") == "s3://b/in/a//x.png"
    assert ledger.claim_output("s3://b/out/a/x.png", "s3://b/in/a/x.png") == "s3://b/in/a//x.png"
    assert ledger.claim_output("s3://b/out/a/x.png", "s3://b/in/a//x.png") == "s3://b/in/a//x.png"


def test_a_version_1_ledger_is_started_anew(tmp_path):
    import sqlite3

    path = tmp_path / "l.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE items (key TEXT PRIMARY KEY, state TEXT, owner TEXT, lease_until REAL, output TEXT,"
                " temp TEXT, source TEXT, engine_runs INTEGER, attempts INTEGER, updated REAL)")
    old.execute("INSERT INTO items VALUES ('k', 'done', 'h:1', 0, '/o', NULL, '/i', 1, 1, 0)")
    old.commit()
    old.close()
    ledger = SQLiteLedger(path)
    assert ledger.item("k") is None and ledger.claim("k", source="/i", output="/o")[0] is ClaimOutcome.NEW
