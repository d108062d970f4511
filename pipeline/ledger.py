"""Ledger rules: the record of what is claimed, being published, done or failed (pure).

An item is one distinct piece of work: the same content asked for the same output bytes,
`dedup_key(sha256, variant)` with `variant` naming everything that changes those bytes (model, scale, resize
policy, output format and its quality, the pipeline's version). Another model or format is another item.

States of an item:  (none) -> claimed -> publishing -> done
- claimed:    someone is upscaling it. A claim is a lease: an owner, a generation and an expiry. It is taken
              over when the owner is gone or the lease ran out; each take-over adds one to the generation.
- publishing: the output is encoded (and, locally, fsynced under a temporary name); only the rename is left.
              A process that finds this after a crash finishes it and never upscales again. `engine_runs` is
              counted on the move to publishing: once per finished upscale.
- done:       the output exists, with the identity (`output_etag`: an S3 ETag, a local inode/size/mtime)
              recorded at publish. "Already done" needs that output to still be there with that identity:
              an output deleted or replaced since is made again.

Fencing: every change a holder makes (renew, publishing, done, release) names its owner and generation and
succeeds only while both are still the row's; a process that lost its claim (it paused past its lease and
someone took over) gets `ClaimLost` and abandons the item without touching the outbox.

Sources (one row per input id) remember the outcome for the source as it was seen (its fingerprint, which
includes the request's settings): done | duplicate | failed, with the output or failure record.
Outputs (one row per output name) remember which source writes there: two inputs whose names collapse to one
output (S3 keys that differ only by `//` or `/./`) are refused, never overwritten silently.
Backends (SQLite; S3 by conditional writes) store rows and apply these rules atomically.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from pipeline.errors import TransientError

# Bump when the same settings would give other output pixels (codec, tiling or engine changes beyond a rounding
# level). Not for other compressed bytes of the same pixels (a faster PNG writer): the earlier outputs stand, and
# a bump would have every ledger do all its work again.
PIPELINE_VERSION = 2


def dedup_key(sha256: str, variant: str) -> str:
    return f"{sha256}:{variant}"


def output_variant(model: str, scale: int, policy: str, fmt: str, quality: int | None, png: str = "fast") -> str:
    """Everything that changes the output bytes of one content (`policy` already names its cap side; `png`:
    the PNG compression, named only when not the default, so that outputs made before the setting keep their keys)."""
    q = f":q{quality}" if quality is not None else ""
    c = f":c{png}" if fmt.upper() == "PNG" and png != "fast" else ""
    return f"{model}:x{scale}:{policy}:{fmt.lower()}{q}{c}:v{PIPELINE_VERSION}"


def request_id(model: str, scale: int, policy: str, out_format: str, jpeg_quality: int, webp_quality: int,
               png: str = "fast") -> str:
    """The settings of a run that change outputs, known before any input is read: a source settled under
    other settings is not "already done"."""
    c = f":p{png}" if png != "fast" else ""
    return f"{model}:x{scale}:{policy}:{out_format}:j{jpeg_quality}:w{webp_quality}{c}:v{PIPELINE_VERSION}"


@dataclass(frozen=True)
class ItemRow:
    key: str
    state: str  # "claimed" | "publishing" | "done"
    owner: str
    lease_until: float
    output: str  # where the output is (done) or goes (claimed/publishing)
    temp: str | None  # the staged output (publishing)
    source: str  # the source that last claimed it
    engine_runs: int
    attempts: int
    generation: int = 0  # +1 on every claim and take-over: the fence
    output_etag: str | None = None  # the output's identity at publish (done)


@dataclass(frozen=True)
class SourceRow:
    source: str
    fingerprint: str | None  # "<size:mtime_ns or size:etag>|<request_id>"
    sha256: str | None
    key: str | None
    outcome: str  # done | duplicate | failed
    output: str | None  # the output (done, duplicate copy) or the failure record's place (failed)
    output_etag: str | None
    detail: str | None


class ClaimOutcome(Enum):
    NEW = "new"  # upscale it
    RESUME_PUBLISH = "resume_publish"  # an earlier process encoded it: finish the publish
    DUPLICATE = "duplicate"  # done before: check its output, then record a duplicate
    BUSY = "busy"  # another live owner holds it: try when its lease can be taken over


class ClaimLost(TransientError):
    """Our claim was taken over (we paused past the lease): abandon the item, touch nothing."""

    default_stage = "dedup"
    default_code = "lost_claim"


class ClaimBusy(TransientError):
    """Another live holder works on the same content; its claim can be taken over in `retry_after_s` at the
    latest (if it dies), and it is usually done sooner."""

    default_stage = "dedup"
    default_code = "busy"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


def holds(row: ItemRow | None, owner: str, generation: int) -> bool:
    """The fence: is this still the claim `owner` took at `generation`?"""
    return row is not None and row.owner == owner and row.generation == generation and row.state != "done"


def output_intact(recorded_etag: str | None, current_etag: str | None) -> bool:
    """An output counts as done only while it is there with the identity recorded at publish."""
    return current_etag is not None and recorded_etag is not None and current_etag == recorded_etag


@dataclass(frozen=True)
class Publishing:
    """One item's move to publishing (Ledger.mark_publishing_many)."""

    key: str
    generation: int
    temp: str | None


@dataclass(frozen=True)
class Done:
    """One item's move to done, with its source settled (Ledger.mark_done_many)."""

    key: str
    generation: int
    source: str
    fingerprint: str | None
    sha256: str
    output: str
    output_etag: str


class Ledger(Protocol):
    """What the pipeline needs from a ledger backend. Each call is atomic in the backend.

    `source` and `output` are ids/URLs (an absolute path or s3://…). Calls that change a claim take the
    generation the claim was taken at and raise `ClaimLost` when it is no longer ours.
    """

    owner: str
    lease_s: float
    shares_commits: bool  # several marks in one call cost about one (one transaction): the writer groups items

    def claim(self, key: str, *, source: str, output: str) -> tuple[ClaimOutcome, ItemRow | None]:
        """Apply `decide_claim`; on NEW or RESUME_PUBLISH the row is ours (owner, generation+1, lease)."""

    def renew(self, key: str, generation: int) -> bool:
        """Push our lease forward; False when the claim is no longer ours."""

    def mark_publishing(self, key: str, generation: int, temp: str | None) -> None:
        """claimed -> publishing, engine_runs+1; `temp` is where the staged output waits (None if none)."""

    def mark_publishing_many(self, items: list[Publishing]) -> list[ClaimLost | None]:
        """mark_publishing for several items at once (SQLite: one transaction): each item's ClaimLost or None."""

    def mark_done(self, key: str, generation: int, *, source: str, fingerprint: str | None, sha256: str,
                  output: str, output_etag: str) -> None:
        """-> done with the output's identity, and the source settled as done."""

    def mark_done_many(self, items: list[Done]) -> list[ClaimLost | None]:
        """mark_done for several items at once (SQLite: one durable transaction, the writer's group commit):
        each item's ClaimLost or None."""

    def mark_item_done(self, key: str, output_etag: str) -> None:
        """-> done without a source (start-up recovery of an orphaned publish)."""

    def reopen(self, key: str, generation: int) -> None:
        """Forget a done item whose output was removed or replaced, so it is upscaled again."""

    def release(self, key: str, generation: int) -> None:
        """Give back our claim (failure, or retry later). Not ours any more: nothing happens."""

    def release_any(self, key: str) -> None:
        """Drop a not-done row whoever holds it (recovery found nothing to finish)."""

    def record_source(self, source: str, *, fingerprint: str | None, sha256: str | None, key: str | None,
                      outcome: str, output: str | None, detail: str | None, output_etag: str | None = None) -> None:
        """Settle a source: done | duplicate | failed."""

    def source(self, source: str) -> SourceRow | None:
        """What was last recorded for this source."""

    def claim_output(self, output: str, source: str) -> str:
        """Record `source` as the writer of `output` unless another source already is; returns the writer."""

    def orphaned_publishes(self) -> list[ItemRow]:
        """Rows left in `publishing` by owners that are gone or whose lease ran out."""

    def item(self, key: str) -> ItemRow | None: ...

    def close(self) -> None: ...
