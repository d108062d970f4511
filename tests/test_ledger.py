"""Ledger rules (pure, table-driven) and the SQLite ledger that applies them."""

import socket

import pytest

from pipeline.adapters.sqlite_ledger import SQLiteLedger, owner_alive
from pipeline.ledger import ClaimOutcome, ItemRow, decide_claim, dedup_key

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


def test_dedup_key_names_every_part():
    assert dedup_key("ab", "fsrcnn-x3", 3, "tile-v1") == "ab:fsrcnn-x3:x3:tile-v1"
    assert dedup_key("ab", "fsrcnn-x3", 3, "tile-v1") != dedup_key("ab", "espcn-x3", 3, "tile-v1")


def test_owner_alive_uses_the_pid_on_this_host():
    host = socket.gethostname()
    assert owner_alive(f"{host}:1")  # init always runs
    assert not owner_alive(f"{host}:99999999")
    assert owner_alive("another-host:99999999")  # judged by its lease alone


def test_sqlite_ledger_life_of_an_item(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    outcome, _ = ledger.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.NEW
    ledger.mark_publishing("k", "/tmp/x")
    ledger.mark_done("k", source="/in/a", fingerprint="3:7", sha256="ab", output="/out/a")
    outcome, found = ledger.claim("k", source="/in/b", output="/out/b")
    assert outcome is ClaimOutcome.DUPLICATE and found.output == "/out/a"
    assert ledger.settled("/in/a", "3:7") == "done"
    assert ledger.settled("/in/a", "3:8") is None  # changed file: not settled
    assert ledger.item("k").engine_runs == 1


def test_a_dead_owners_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    path = tmp_path / "l.sqlite3"
    first = SQLiteLedger(path)
    first.owner = f"{socket.gethostname()}:99999999"  # a process that no longer exists
    first.claim("k", source="/in/a", output="/out/a")
    first.mark_publishing("k", "/tmp/t")
    second = SQLiteLedger(path)
    outcome, found = second.claim("k", source="/in/a", output="/out/a")
    assert outcome is ClaimOutcome.RESUME_PUBLISH and found.temp == "/tmp/t" and found.owner == second.owner

    live = SQLiteLedger(path)  # same pid as `second`, but another owner name on a live pid
    live.owner = f"{socket.gethostname()}:1"
    live.claim("j", source="/in/j", output="/out/j")
    assert second.claim("j", source="/in/j", output="/out/j")[0] is ClaimOutcome.BUSY


def test_release_and_reopen(tmp_path):
    ledger = SQLiteLedger(tmp_path / "l.sqlite3")
    ledger.claim("k", source="/in/a", output="/out/a")
    ledger.release("k")
    assert ledger.item("k") is None
    ledger.claim("k", source="/in/a", output="/out/a")
    ledger.mark_done("k", source="/in/a", fingerprint="1:1", sha256="ab", output="/out/a")
    ledger.reopen("k")
    assert ledger.claim("k", source="/in/a", output="/out/a")[0] is ClaimOutcome.NEW
