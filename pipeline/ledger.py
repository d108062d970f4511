"""Ledger rules: the record of what is claimed, being published, done or failed (pure).

An item is one distinct piece of work: the dedup key `sha256 + model + scale + policy version`.
States of an item:  (none) -> claimed -> publishing -> done
- claimed:    someone is upscaling it; a claim is a lease (owner + expiry), taken over when the owner is
              gone or the lease ran out.
- publishing: the output is encoded and fsynced under a temporary name; only the rename is left. A
              process that finds this after a crash finishes the rename (or sees it done) and never
              upscales again. `engine_runs` is counted on the move to publishing: once per finished upscale.
- done:       the output exists; the same key again is a duplicate.
A permanent failure releases the claim (the item row is deleted) and is recorded per source.
Backends (SQLite here; S3 or DynamoDB for many machines) store rows and apply these rules atomically.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


def dedup_key(sha256: str, model: str, scale: int, policy: str) -> str:
    return f"{sha256}:{model}:x{scale}:{policy}"


@dataclass(frozen=True)
class ItemRow:
    key: str
    state: str  # "claimed" | "publishing" | "done"
    owner: str
    lease_until: float
    output: str  # where the output is (done) or goes (claimed/publishing)
    temp: str | None  # the temporary file (publishing)
    source: str  # the source that first claimed it
    engine_runs: int
    attempts: int


class ClaimOutcome(Enum):
    NEW = "new"  # upscale it
    RESUME_PUBLISH = "resume_publish"  # an earlier process encoded it: finish the rename
    DUPLICATE = "duplicate"  # done before: record a duplicate
    BUSY = "busy"  # another live owner holds it: try later


def decide_claim(row: ItemRow | None, *, owner: str, now: float, owner_alive: bool) -> ClaimOutcome:
    """What to do with a key, given its row (None: never seen) and whether the row's owner still runs."""
    if row is None:
        return ClaimOutcome.NEW
    if row.state == "done":
        return ClaimOutcome.DUPLICATE
    held_by_other = row.owner != owner and owner_alive and now < row.lease_until
    if held_by_other:
        return ClaimOutcome.BUSY
    if row.state == "publishing":
        return ClaimOutcome.RESUME_PUBLISH
    return ClaimOutcome.NEW


class Ledger(Protocol):
    """What the pipeline needs from a ledger backend. Each call is atomic in the backend.

    `fingerprint` is a cheap identity of a source as seen (files: "size:mtime_ns"; S3: "size:etag") so a
    rescan can skip what is settled without reading it. `source` and `output` are ids/URLs (a path or s3://…).
    """

    owner: str

    def claim(self, key: str, *, source: str, output: str) -> tuple[ClaimOutcome, ItemRow | None]:
        """Apply `decide_claim`; on NEW (or a take-over) the row becomes `claimed` by `owner`, attempts+1."""

    def renew(self, key: str) -> None:
        """Heartbeat: push the lease of our claim forward (long items)."""

    def mark_publishing(self, key: str, temp: str | None) -> None:
        """claimed -> publishing, engine_runs+1; `temp` is where the staged output waits (None if none)."""

    def mark_done(self, key: str, *, source: str, fingerprint: str | None, sha256: str, output: str) -> None:
        """-> done, and the source settled as done."""

    def mark_item_done(self, key: str) -> None:
        """-> done without a source (start-up recovery of an orphaned publish)."""

    def reopen(self, key: str) -> None:
        """Forget a done item whose output was removed, so it is upscaled again."""

    def release(self, key: str) -> None:
        """Give back our `claimed` row (failure, or retry later)."""

    def release_any(self, key: str) -> None:
        """Drop a not-done row whoever holds it (recovery found nothing to finish)."""

    def record_source(self, source: str, *, fingerprint: str | None, sha256: str | None, key: str | None,
                      outcome: str, output: str | None, detail: str | None) -> None:
        """Settle a source: done | duplicate | failed."""

    def settled(self, source: str, fingerprint: str) -> str | None:
        """The outcome recorded for this source with this fingerprint, if any."""

    def orphaned_publishes(self) -> list[ItemRow]:
        """Rows left in `publishing` by owners that are gone or whose lease ran out."""

    def item(self, key: str) -> ItemRow | None: ...

    def close(self) -> None: ...
