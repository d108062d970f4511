"""The ledger in SQLite (WAL), beside the outbox: one file, safe for several local processes.

Durability: only what must outlive a power cut is synced (`synchronous=FULL` for that transaction: done,
a settled source); claims, renewals, publishing marks and releases commit without an fsync (`NORMAL`: safe
from a crashed process, not from a power cut). A claim lost to a power cut costs a repeated upscale, never an
output, and every later synced commit makes the ones before it durable too, WAL frames being in order. That
takes an item's ledger fsyncs from five to one, shared by the items the writer settles together."""

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.ledger import ClaimLost, ClaimOutcome, Done, ItemRow, Publishing, SourceRow, decide_claim

SCHEMA_VERSION = 2  # ledgers of version 1 keyed items without the output's settings: they are started anew

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
    generation INTEGER NOT NULL DEFAULT 0,
    output_etag TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    fingerprint TEXT,        -- the source as seen (size:mtime_ns, size:etag) | the request's settings
    sha256 TEXT,
    key TEXT,
    outcome TEXT NOT NULL,   -- done | duplicate | failed
    output TEXT,
    output_etag TEXT,
    detail TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    output TEXT PRIMARY KEY,
    source TEXT NOT NULL     -- the one input that writes this output
);
"""

_ITEM_COLUMNS = "key, state, owner, lease_until, output, temp, source, engine_runs, attempts, generation, output_etag"
_SOURCE_COLUMNS = "source, fingerprint, sha256, key, outcome, output, output_etag, detail"


def host_name() -> str:
    return os.uname().nodename  # what socket.gethostname() reads, without importing socket (~4 ms of a start)


def this_owner() -> str:
    return f"{host_name()}:{os.getpid()}"


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
    if host != host_name() or not pid.isdigit():
        return True
    return pid_alive(int(pid))


class SQLiteLedger:
    shares_commits = True  # several items marked in one transaction cost one fsync (the writer's group commit)

    def __init__(self, path: Path, lease_s: float = 600.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lease_s = lease_s
        self.owner = this_owner()
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # FULL where a row must outlive a power cut (_tx durable)
        self._lock = threading.RLock()
        if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # made before: no write at start (a start is one fsync shorter)
        with self._tx() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                db.execute("DROP TABLE IF EXISTS items")
                db.execute("DROP TABLE IF EXISTS sources")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self, durable: bool = False):
        """One transaction; `durable`: synced before it returns (a done or failed row must not outlive a power
        cut less than the output or record it names, which are fsynced before)."""
        # one connection serves the reader, engine, writer and renewer threads: one at a time
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def _row(self, db, key: str) -> ItemRow | None:
        r = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE key=?", (key,)).fetchone()
        return ItemRow(*r) if r else None

    def claim(self, key: str, *, source: str, output: str) -> tuple[ClaimOutcome, ItemRow | None]:
        now = time.time()
        with self._tx() as db:
            row = self._row(db, key)
            outcome = decide_claim(row, owner=self.owner, now=now, owner_alive=row is not None and owner_alive(row.owner))
            if outcome is ClaimOutcome.NEW:
                db.execute(
                    "INSERT INTO items (key, state, owner, lease_until, output, temp, source, engine_runs, attempts,"
                    " generation, output_etag, updated) VALUES (?, 'claimed', ?, ?, ?, NULL, ?, 0, 1, 1, NULL, ?)"
                    " ON CONFLICT(key) DO UPDATE SET state='claimed', owner=excluded.owner, lease_until=excluded.lease_until,"
                    " output=excluded.output, temp=NULL, source=excluded.source, attempts=items.attempts+1,"
                    " generation=items.generation+1, output_etag=NULL, updated=excluded.updated",
                    (key, self.owner, now + self.lease_s, output, source, now),
                )
            elif outcome is ClaimOutcome.RESUME_PUBLISH:
                db.execute("UPDATE items SET owner=?, lease_until=?, generation=generation+1, updated=? WHERE key=?",
                           (self.owner, now + self.lease_s, now, key))
            return outcome, self._row(db, key)

    def _fenced(self, db, sql: str, params: tuple, key: str, generation: int) -> int:
        """Run an UPDATE/DELETE that names our claim; the row count says whether it still was ours."""
        return db.execute(sql + " WHERE key=? AND owner=? AND generation=? AND state!='done'",
                          (*params, key, self.owner, generation)).rowcount

    def renew(self, key: str, generation: int) -> bool:
        with self._tx() as db:
            return self._fenced(db, "UPDATE items SET lease_until=?", (time.time() + self.lease_s,), key, generation) == 1

    def mark_publishing(self, key: str, generation: int, temp: str | None) -> None:
        if lost := self.mark_publishing_many([Publishing(key, generation, temp)])[0]:
            raise lost

    def mark_publishing_many(self, items: list[Publishing]) -> list[ClaimLost | None]:
        now = time.time()
        with self._tx() as db:
            return [None if self._fenced(db, "UPDATE items SET state='publishing', temp=?, engine_runs=engine_runs+1,"
                                             " lease_until=?, updated=?", (p.temp, now + self.lease_s, now),
                                         p.key, p.generation) == 1
                    else ClaimLost(f"the claim on {p.key} was taken over before publishing") for p in items]

    def mark_done(self, key: str, generation: int, *, source: str, fingerprint: str | None, sha256: str,
                  output: str, output_etag: str) -> None:
        if lost := self.mark_done_many([Done(key, generation, source, fingerprint, sha256, output, output_etag)])[0]:
            raise lost

    def mark_done_many(self, items: list[Done]) -> list[ClaimLost | None]:
        now = time.time()
        outcomes: list[ClaimLost | None] = []
        with self._tx(durable=True) as db:
            for d in items:
                if self._fenced(db, "UPDATE items SET state='done', temp=NULL, output=?, output_etag=?, updated=?",
                                (d.output, d.output_etag, now), d.key, d.generation) != 1:
                    outcomes.append(ClaimLost(f"the claim on {d.key} was taken over before it was done"))
                    continue
                self._settle(db, d.source, d.fingerprint, d.sha256, d.key, "done", d.output, d.output_etag, None, now)
                outcomes.append(None)
        return outcomes

    def reopen(self, key: str, generation: int) -> None:
        """The done item's output is gone or replaced: forget it so the next claim upscales again."""
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE key=? AND state='done' AND generation=?", (key, generation))

    def orphaned_publishes(self) -> list[ItemRow]:
        """Items left in `publishing` by an owner that is gone."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE state='publishing'").fetchall()
        return [ItemRow(*r) for r in rows if not owner_alive(r[2]) or r[3] < time.time()]

    def mark_item_done(self, key: str, output_etag: str) -> None:
        with self._tx(durable=True) as db:
            db.execute("UPDATE items SET state='done', temp=NULL, output_etag=?, updated=? WHERE key=?",
                       (output_etag, time.time(), key))

    def release_any(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE key=? AND state!='done'", (key,))

    def release(self, key: str, generation: int) -> None:
        """Give a claim back (permanent failure, or a transient one to retry later)."""
        with self._tx() as db:
            self._fenced(db, "DELETE FROM items", (), key, generation)

    def record_source(self, source: str, *, fingerprint: str | None, sha256: str | None, key: str | None,
                      outcome: str, output: str | None, detail: str | None, output_etag: str | None = None) -> None:
        with self._tx(durable=True) as db:
            self._settle(db, source, fingerprint, sha256, key, outcome, output, output_etag, detail, time.time())

    @staticmethod
    def _settle(db, source, fingerprint, sha256, key, outcome, output, output_etag, detail, now) -> None:
        db.execute(
            f"INSERT OR REPLACE INTO sources ({_SOURCE_COLUMNS}, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (source, fingerprint, sha256, key, outcome, output, output_etag, detail, now),
        )

    def source(self, source: str) -> SourceRow | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE source=?", (source,)).fetchone()
        return SourceRow(*r) if r else None

    def claim_output(self, output: str, source: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO outputs (output, source) VALUES (?, ?)", (output, source))
            return db.execute("SELECT source FROM outputs WHERE output=?", (output,)).fetchone()[0]

    def item(self, key: str) -> ItemRow | None:
        with self._lock:
            return self._row(self._db, key)

    def stats(self) -> dict:
        with self._lock:
            items = dict(self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
            sources = dict(self._db.execute("SELECT outcome, COUNT(*) FROM sources GROUP BY outcome").fetchall())
            runs = self._db.execute("SELECT COALESCE(MAX(engine_runs), 0), COALESCE(SUM(engine_runs), 0) FROM items").fetchone()
        return {"items": items, "sources": sources, "max_engine_runs": runs[0], "engine_runs": runs[1]}
