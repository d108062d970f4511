"""The ledger in S3 alone (no database): shared by many workers on many machines.

One small JSON object per item at `{prefix}items/{sha256(key)}.json`, kept under its own prefix (by default
`s3://OUTBOX-BUCKET/.superres/ledger/<outbox prefix>/`), never among the outputs. Every transition is
read (body + ETag) -> apply the rules of `pipeline.ledger` -> conditional write:
`IfNoneMatch="*"` to create a row, `IfMatch=etag` to change or delete one. A 412 means another
worker moved first; we re-read and decide again (a bounded loop), so each dedup key is claimed by
exactly one worker at a time. Sources (`{prefix}sources/{sha256(source)}.json`) are plain PUTs:
the last writer wins, as with SQLite's INSERT OR REPLACE. Outputs (`{prefix}outputs/{sha256(url)}.json`) are
created once with `IfNoneMatch="*"`: the first source to write an output name owns it.

Owners are `host:pid:random`; S3 cannot see other hosts' processes, so a claim is judged by its
lease alone (keep it alive with `renew`).
"""

import hashlib
import json
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, replace

from pipeline.adapters.aws_errors import CONFLICT, MISSING, AwsFailure, call
from pipeline.errors import TransientError
from pipeline.ledger import ClaimLost, ClaimOutcome, Done, ItemRow, Publishing, SourceRow, decide_claim, holds

_TRIES = 20  # conditional-write retries before giving up; losers of a race need one or two
_DELETE = object()  # what a change returns to delete the row
_ALREADY = object()  # what a change returns when the row already is as asked (our write whose answer was lost)


class _Conflict(Exception):
    """The object changed (or vanished) since we read it: re-read and decide again."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _transient(failure: AwsFailure) -> TransientError:
    # every ledger error is a retry later: a missing or refused ledger bucket is a set-up error, never an input's
    return TransientError(f"S3 ledger: {failure}", stage="dedup", code=failure.kind)


def _lost_or_none(mark, *args, **kwargs) -> ClaimLost | None:
    try:
        mark(*args, **kwargs)
    except ClaimLost as lost:
        return lost
    return None


class S3Ledger:
    shares_commits = False  # one conditional PUT per row whatever the grouping

    def __init__(self, client, bucket: str, prefix: str, *, lease_s: float = 600.0, owner: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.lease_s = lease_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # the last row (and its ETag) we read or wrote, per object: a change tries it first and skips a GET;
        # a stale one only costs a 412 and a re-read
        self._known: dict[str, tuple[ItemRow, str]] = {}

    # --- storage -----------------------------------------------------------------------------------

    def _item_key(self, key: str) -> str:
        return f"{self.prefix}items/{_sha(key)}.json"

    def _source_key(self, source: str) -> str:
        return f"{self.prefix}sources/{_sha(source)}.json"

    def _fetch(self, okey: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and ETag (None, None: no such object). A body cut off on the way is a transient
        error of the whole GET, which `call` tries again."""
        def get():
            resp = self.client.get_object(Bucket=self.bucket, Key=okey)
            return resp["Body"].read(), resp["ETag"]
        try:
            return call(f"reading {okey}", get)
        except AwsFailure as failure:
            if failure.kind == MISSING:  # not NoSuchBucket: that is a broken setup, not a missing row
                return None, None
            raise _transient(failure) from None

    def _get_json(self, okey: str) -> tuple[dict | None, str | None]:
        data, etag = self._fetch(okey)
        if data is None:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError as exc:
            raise TransientError(f"S3 ledger: {okey} is not JSON: {exc}", stage="dedup") from None

    def _read(self, okey: str) -> tuple[ItemRow | None, str | None]:
        body, etag = self._get_json(okey)
        if body is None:
            self._known.pop(okey, None)
            return None, None
        body.pop("updated", None)
        row = ItemRow(**body)
        self._known[okey] = (row, etag)
        return row, etag

    def _write(self, okey: str, row: ItemRow, etag: str | None) -> None:
        """Create (etag None) or replace the row only if nobody changed it since we read `etag`."""
        body = json.dumps({**asdict(row), "updated": time.time()}).encode()
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        self._known.pop(okey, None)
        try:
            resp = call(f"writing {okey}", self.client.put_object, Bucket=self.bucket, Key=okey, Body=body,
                        ContentType="application/json", **condition)
            self._known[okey] = (row, resp["ETag"])
        except AwsFailure as failure:
            if failure.kind == CONFLICT:
                if self._landed(okey, body, row):
                    return
                raise _Conflict() from None
            if etag is not None and failure.kind == MISSING:  # 404 on IfMatch: the row was deleted since we read it
                raise _Conflict() from None
            raise _transient(failure) from None

    def _landed(self, okey: str, body: bytes, row: ItemRow) -> bool:
        """After a 412: was it this very write that got there first? A try whose answer was lost (a reset, a
        cut-off response) may have landed, and the retry (botocore's or ours) then finds its own row. Taking
        that for someone else's would apply a change twice (engine_runs + 2) or call our own claim lost. The
        body carries its write time to the microsecond, so only our write has these bytes."""
        try:
            data, etag = self._fetch(okey)
        except TransientError:
            return False  # cannot tell: the caller re-reads and decides again
        if data != body:
            return False
        self._known[okey] = (row, etag)
        return True

    def _delete(self, okey: str, etag: str) -> None:
        try:
            call(f"deleting {okey}", self.client.delete_object, Bucket=self.bucket, Key=okey, IfMatch=etag)
        except AwsFailure as failure:
            # changed or gone since we read it (gone is also what a retry finds after our own delete landed:
            # the re-read then sees no row, and there is nothing left to do)
            if failure.kind in (CONFLICT, MISSING):
                raise _Conflict() from None
            raise _transient(failure) from None

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # jitter so racing workers do not collide again

    def _change(self, key: str, change: Callable[[ItemRow], ItemRow | object | None]) -> bool:
        """Read-modify-write one existing row: `change` returns the new row, _DELETE, or None (leave it).
        True when the change was written; False when there was no row or `change` left it."""
        okey = self._item_key(key)
        for attempt in range(_TRIES):
            known = self._known.get(okey) if attempt == 0 else None
            row, etag = known if known else self._read(okey)
            if row is None:
                return False
            new = change(row)
            if new is None:
                return False
            if new is _ALREADY:
                return True
            try:
                if new is _DELETE:
                    self._known.pop(okey, None)
                    self._delete(okey, etag)
                else:
                    self._write(okey, new, etag)
                return True
            except _Conflict:
                self._backoff(attempt)
        raise TransientError(f"S3 ledger: {key} kept changing under us ({_TRIES} tries)", stage="dedup")

    # --- the Ledger protocol -------------------------------------------------------------------------

    def claim(self, key: str, *, source: str, output: str) -> tuple[ClaimOutcome, ItemRow | None]:
        okey = self._item_key(key)
        for attempt in range(_TRIES):
            row, etag = self._read(okey)
            now = time.time()
            # other hosts' pids are invisible: every owner counts as alive, its lease alone decides
            outcome = decide_claim(row, owner=self.owner, now=now, owner_alive=True)
            if outcome is ClaimOutcome.NEW:
                new = ItemRow(key=key, state="claimed", owner=self.owner, lease_until=now + self.lease_s, output=output,
                              temp=None, source=source, engine_runs=row.engine_runs if row else 0,
                              attempts=(row.attempts if row else 0) + 1,
                              generation=(row.generation if row else 0) + 1)
            elif outcome is ClaimOutcome.RESUME_PUBLISH:
                new = replace(row, owner=self.owner, lease_until=now + self.lease_s, generation=row.generation + 1)
            else:  # DUPLICATE or BUSY: nothing to write
                return outcome, row
            try:
                self._write(okey, new, etag)
                return outcome, new
            except _Conflict:
                self._backoff(attempt)  # someone moved first: their row decides on the next read
        raise TransientError(f"S3 ledger: the claim on {key} kept changing ({_TRIES} tries)", stage="dedup")

    def _ours(self, generation: int):
        return lambda r: holds(r, self.owner, generation)

    def renew(self, key: str, generation: int) -> bool:
        ours = self._ours(generation)
        return self._change(key, lambda r: replace(r, lease_until=time.time() + self.lease_s) if ours(r) else None)

    def mark_publishing(self, key: str, generation: int, temp: str | None) -> None:
        ours = self._ours(generation)

        def publishing(r: ItemRow):
            if not ours(r):
                return None
            if r.state == "publishing" and r.temp == temp:  # our earlier write landed: count the upscale once
                return _ALREADY
            return replace(r, state="publishing", temp=temp, engine_runs=r.engine_runs + 1,
                           lease_until=time.time() + self.lease_s)

        if not self._change(key, publishing):
            raise ClaimLost(f"the claim on {key} was taken over before publishing")

    def mark_done(self, key: str, generation: int, *, source: str, fingerprint: str | None, sha256: str,
                  output: str, output_etag: str) -> None:
        # two writes where SQLite has one transaction: a crash between them leaves the source unsettled,
        # and the next look at it finds the item done (a duplicate of itself), which settles it then
        ours = self._ours(generation)

        def done(r: ItemRow):
            if r.state == "done" and r.owner == self.owner and r.generation == generation and r.output == output:
                return _ALREADY  # our earlier write landed and its answer was lost
            return replace(r, state="done", temp=None, output=output, output_etag=output_etag) if ours(r) else None

        if not self._change(key, done):
            raise ClaimLost(f"the claim on {key} was taken over before it was done")
        self.record_source(source, fingerprint=fingerprint, sha256=sha256, key=key, outcome="done",
                           output=output, detail=None, output_etag=output_etag)

    def mark_publishing_many(self, items: list[Publishing]) -> list[ClaimLost | None]:
        return [_lost_or_none(self.mark_publishing, p.key, p.generation, p.temp) for p in items]

    def mark_done_many(self, items: list[Done]) -> list[ClaimLost | None]:
        # one conditional PUT per row (S3 has no transaction over objects)
        return [_lost_or_none(self.mark_done, d.key, d.generation, source=d.source, fingerprint=d.fingerprint,
                              sha256=d.sha256, output=d.output, output_etag=d.output_etag) for d in items]

    def mark_item_done(self, key: str, output_etag: str) -> None:
        self._change(key, lambda r: replace(r, state="done", temp=None, output_etag=output_etag))

    def reopen(self, key: str, generation: int) -> None:
        self._change(key, lambda r: _DELETE if r.state == "done" and r.generation == generation else None)

    def release(self, key: str, generation: int) -> None:
        ours = self._ours(generation)
        self._change(key, lambda r: _DELETE if ours(r) else None)

    def release_any(self, key: str) -> None:
        self._change(key, lambda r: _DELETE if r.state != "done" else None)

    def record_source(self, source: str, *, fingerprint: str | None, sha256: str | None, key: str | None,
                      outcome: str, output: str | None, detail: str | None, output_etag: str | None = None) -> None:
        body = json.dumps({"source": source, "fingerprint": fingerprint, "sha256": sha256, "key": key,
                           "outcome": outcome, "output": output, "output_etag": output_etag, "detail": detail,
                           "updated": time.time()}).encode()
        try:
            call(f"recording the source {source}", self.client.put_object, Bucket=self.bucket,
                 Key=self._source_key(source), Body=body, ContentType="application/json")
        except AwsFailure as failure:
            raise _transient(failure) from None

    def source(self, source: str) -> SourceRow | None:
        body, _ = self._get_json(self._source_key(source))
        if body is None:
            return None
        return SourceRow(source=body["source"], fingerprint=body.get("fingerprint"), sha256=body.get("sha256"),
                         key=body.get("key"), outcome=body["outcome"], output=body.get("output"),
                         output_etag=body.get("output_etag"), detail=body.get("detail"))

    def claim_output(self, output: str, source: str) -> str:
        okey = f"{self.prefix}outputs/{_sha(output)}.json"
        body = json.dumps({"output": output, "source": source}).encode()
        try:
            call(f"recording the writer of {output}", self.client.put_object, Bucket=self.bucket, Key=okey,
                 Body=body, ContentType="application/json", IfNoneMatch="*")
            return source
        except AwsFailure as failure:
            if failure.kind != CONFLICT:
                raise _transient(failure) from None
        found, _ = self._get_json(okey)  # someone has it (perhaps our own try whose answer was lost): who?
        return found["source"] if found else source

    def orphaned_publishes(self) -> list[ItemRow]:
        """Rows left in `publishing` whose lease ran out (one GET per item row: meant for start-up)."""
        now = time.time()
        return [r for r in self._rows() if r.state == "publishing" and r.lease_until < now]

    def item(self, key: str) -> ItemRow | None:
        return self._read(self._item_key(key))[0]

    def stats(self) -> dict:
        items: dict[str, int] = {}
        runs = [0]
        for row in self._rows():
            items[row.state] = items.get(row.state, 0) + 1
            runs.append(row.engine_runs)
        sources: dict[str, int] = {}
        for okey in self._list(f"{self.prefix}sources/"):
            body, _ = self._get_json(okey)
            if body is not None:
                sources[body["outcome"]] = sources.get(body["outcome"], 0) + 1
        return {"items": items, "sources": sources, "max_engine_runs": max(runs), "engine_runs": sum(runs)}

    def close(self) -> None:
        pass  # the client belongs to the caller

    # --- listing -------------------------------------------------------------------------------------

    def _list(self, prefix: str) -> list[str]:
        keys, params = [], {"Bucket": self.bucket, "Prefix": prefix}
        while True:  # page by page, each its own call: a fault costs a retry of one page
            try:
                page = call(f"listing {prefix}", self.client.list_objects_v2, **params)
            except AwsFailure as failure:
                raise _transient(failure) from None
            keys += [obj["Key"] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            params["ContinuationToken"] = page["NextContinuationToken"]

    def _rows(self) -> list[ItemRow]:
        rows = []
        for okey in self._list(f"{self.prefix}items/"):
            row, _ = self._read(okey)
            if row is not None:  # deleted between the list and the read
                rows.append(row)
        return rows
