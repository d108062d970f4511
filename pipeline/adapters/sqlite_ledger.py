"""The ledger in SQLite (WAL), beside the outbox: one file, safe for several local processes."""

import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.ledger import ClaimOutcome, ItemRow, decide_claim

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    output TEXT NOT NULL,
    temp TEXT,
    source TEXT NOT NULL,
    engine_runs INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    fingerprint TEXT,        -- cheap identity of the source as seen: size:mtime_ns (files), size:etag (S3)
    sha256 TEXT,
    key TEXT,
    outcome TEXT NOT NULL,   -- done | duplicate | failed
    output TEXT,
    detail TEXT,
    updated REAL NOT NULL
);
"""


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(owner: str) -> bool:
    """An owner on this host is alive while its pid is; one on another host is judged by its lease alone."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return pid_alive(int(pid))


class SQLiteLedger:
    def __init__(self, path: Path, lease_s: float = 600.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lease_s = lease_s
        self.owner = this_owner()
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a row must not outlive a power cut less than its output
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self):
        # one connection serves the reader, engine and writer threads (pipeline/overlap.py): one at a time
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, db, key: str) -> ItemRow | None:
        r = db.execute(
            "SELECT key, state, owner, lease_until, output, temp, source, engine_runs, attempts FROM items WHERE key=?",
            (key,),
        ).fetchone()
        return ItemRow(*r) if r else None

    def claim(self, key: str, *, source: str, output: str) -> tuple[ClaimOutcome, ItemRow | None]:
        now = time.time()
        with self._tx() as db:
            row = self._row(db, key)
            outcome = decide_claim(row, owner=self.owner, now=now, owner_alive=row is not None and owner_alive(row.owner))
            if outcome is ClaimOutcome.NEW:
                db.execute(
                    "INSERT INTO items (key, state, owner, lease_until, output, temp, source, engine_runs, attempts, updated)"
                    " VALUES (?, 'claimed', ?, ?, ?, NULL, ?, 0, 1, ?)"
                    " ON CONFLICT(key) DO UPDATE SET state='claimed', owner=excluded.owner, lease_until=excluded.lease_until,"
                    " output=excluded.output, temp=NULL, source=excluded.source, attempts=items.attempts+1, updated=excluded.updated",
                    (key, self.owner, now + self.lease_s, output, source, now),
                )
            elif outcome is ClaimOutcome.RESUME_PUBLISH:
                db.execute("UPDATE items SET owner=?, lease_until=?, updated=? WHERE key=?",
                           (self.owner, now + self.lease_s, now, key))
            return outcome, self._row(db, key)

    def renew(self, key: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET lease_until=? WHERE key=? AND owner=?", (time.time() + self.lease_s, key, self.owner))

    def mark_publishing(self, key: str, temp: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE items SET state='publishing', temp=?, engine_runs=engine_runs+1, updated=? WHERE key=? AND owner=?",
                (temp, time.time(), key, self.owner),
            )

    def mark_done(self, key: str, *, source: str, fingerprint: str | None, sha256: str, output: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE items SET state='done', temp=NULL, output=?, updated=? WHERE key=?", (output, now, key))
            self._settle(db, source, fingerprint, sha256, key, "done", output, None, now)

    def reopen(self, key: str) -> None:
        """The done item's output is gone (deleted by someone): forget it so the next claim upscales again."""
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE key=? AND state='done'", (key,))

    def orphaned_publishes(self) -> list[ItemRow]:
        """Items left in `publishing` by an owner that is gone."""
        rows = self._db.execute(
            "SELECT key, state, owner, lease_until, output, temp, source, engine_runs, attempts FROM items"
            " WHERE state='publishing'"
        ).fetchall()
        return [ItemRow(*r) for r in rows if not owner_alive(r[2]) or r[3] < time.time()]

    def mark_item_done(self, key: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET state='done', temp=NULL, updated=? WHERE key=?", (time.time(), key))

    def release_any(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE key=? AND state!='done'", (key,))

    def release(self, key: str) -> None:
        """Give a claim back (permanent failure, or a transient one to retry later)."""
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE key=? AND owner=? AND state='claimed'", (key, self.owner))

    def record_source(self, source: str, *, fingerprint: str | None, sha256: str | None, key: str | None,
                      outcome: str, output: str | None, detail: str | None) -> None:
        with self._tx() as db:
            self._settle(db, source, fingerprint, sha256, key, outcome, output, detail, time.time())

    @staticmethod
    def _settle(db, source, fingerprint, sha256, key, outcome, output, detail, now) -> None:
        db.execute(
            "INSERT OR REPLACE INTO sources (source, fingerprint, sha256, key, outcome, output, detail, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (source, fingerprint, sha256, key, outcome, output, detail, now),
        )

    def settled(self, source: str, fingerprint: str) -> str | None:
        """The outcome already recorded for this source as it is now (same fingerprint), if any."""
        with self._lock:
            r = self._db.execute("SELECT outcome FROM sources WHERE source=? AND fingerprint=?",
                                 (source, fingerprint)).fetchone()
        return r[0] if r else None

    def item(self, key: str) -> ItemRow | None:
        with self._lock:
            return self._row(self._db, key)

    def stats(self) -> dict:
        items = dict(self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        sources = dict(self._db.execute("SELECT outcome, COUNT(*) FROM sources GROUP BY outcome").fetchall())
        runs = self._db.execute("SELECT COALESCE(MAX(engine_runs), 0), COALESCE(SUM(engine_runs), 0) FROM items").fetchone()
        return {"items": items, "sources": sources, "max_engine_runs": runs[0], "engine_runs": runs[1]}
