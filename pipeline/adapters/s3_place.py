"""The pipeline's view of S3: an input object, and a prefix to publish into or set failures aside in.
Built on `S3Objects` (the boto3 calls); keys are made safe by `pipeline.s3keys`."""

import json
from pathlib import PurePosixPath

from pipeline.adapters.local_files import (FAILURE_ROOM, RECORD_SUFFIX, Staged, byte_len, candidates, failure_names,
                                          shortened)
from pipeline.adapters.s3_objects import S3Objects
from pipeline.errors import InputRejected
from pipeline.s3keys import join_key, parse_s3_uri, relative_key

KEY_MAX = 1024  # bytes of UTF-8: S3's limit on a key


class S3Object:
    """An input object. `size`/`etag` from a listing or an event give a fingerprint without a read."""

    def __init__(self, objects: S3Objects, bucket: str, key: str, rel: str, *, size: int | None = None,
                 etag: str | None = None, processed: tuple[str, str] | None = None):
        self.objects = objects
        self.bucket = bucket
        self.key = key
        self.rel = rel
        self.id = f"s3://{bucket}/{key}"
        self._size, self._etag = size, etag
        self.processed = processed  # (bucket, prefix) for disposition=move
        self.read_etag: str | None = None  # the version whose bytes were read: the only one dispose() may touch

    def __repr__(self) -> str:
        return f"S3Object({self.id!r})"

    def fingerprint(self) -> str | None:
        return f"{self._size}:{self._etag}" if self._size is not None and self._etag else None

    def read(self, max_bytes: int) -> tuple[bytes, str]:
        data, info = self.objects.read(self.bucket, self.key, max_bytes)
        self._size, self._etag = info.size, info.etag
        self.read_etag = info.etag
        return data, f"{info.size}:{info.etag}"

    def metadata(self, sha256: str, model: str) -> dict[str, str]:
        return {"source-bucket": self.bucket, "source-key": self.key, "source-sha256": sha256, "model": model}

    def dispose(self, disposition: str) -> None:
        """keep: nothing. delete / move: only while the object is still the version read (the delete is
        conditional on its ETag): a newer upload under the key is left alone; nothing is done to one never read."""
        if disposition == "keep" or self.read_etag is None:
            return
        if disposition == "move" and self.processed is not None:
            now = self.objects.head(self.bucket, self.key)
            if now is None or now["ETag"] != self.read_etag:
                return
            bucket, prefix = self.processed
            self.objects.copy(self.bucket, self.key, bucket, join_key(prefix, self.rel))
        self.objects.delete(self.bucket, self.key, if_match=self.read_etag)


class S3Place:
    """A bucket + prefix. A single PUT (or a completed multipart upload) is atomic: nothing to stage."""

    shares_commits = False  # one PUT per object: publishing in groups would only hold results back

    def __init__(self, objects: S3Objects, bucket: str, prefix: str):
        self.objects = objects
        self.bucket = bucket
        self.prefix = prefix

    def url(self, rel: str) -> str:
        key = join_key(self.prefix, rel)
        if byte_len(key) > KEY_MAX:
            raise InputRejected(f"the output key would be {byte_len(key)} bytes; S3 allows {KEY_MAX}",
                                stage="publish", code="name_too_long")
        return f"s3://{self.bucket}/{key}"

    def name(self, url: str) -> str:
        return PurePosixPath(url).name

    def exists(self, url: str) -> bool:
        bucket, key = parse_s3_uri(url)
        return self.objects.head(bucket, key) is not None

    def etag(self, url: str) -> str | None:
        """The output's identity (its ETag), recorded at publish and checked before "already done" (used by the
        Processor): an object deleted or replaced since has another one, or none."""
        bucket, key = parse_s3_uri(url)
        info = self.objects.head(bucket, key)
        return info["ETag"] if info is not None else None

    def stage(self, data: bytes, tag: str) -> Staged:
        """Nothing to stage (a PUT is atomic); the token is the item's tag, which the PUT carries as metadata."""
        return Staged(tag, data)

    def commit(self, staged: Staged, rel: str, *, content_type: str, metadata: dict[str, str]) -> str:
        key = join_key(self.prefix, rel)
        self.objects.publish(self.bucket, key, staged.data, content_type=content_type, metadata=metadata)
        return f"s3://{self.bucket}/{key}"

    def sync_staged(self, staged: list[Staged]) -> list[Exception | None]:
        """Nothing was written before the PUT."""
        return [None] * len(staged)

    def discard(self, staged: Staged) -> None:
        """Nothing was written before the PUT."""

    def commit_many(self, commits: list) -> list[str | Exception]:
        """One PUT each (each atomic on its own): each object's URL, or its error."""
        outcomes: list[str | Exception] = []
        for c in commits:
            try:
                outcomes.append(self.commit(c.staged, c.rel, content_type=c.content_type, metadata=c.metadata))
            except Exception as exc:  # noqa: BLE001 - that item's: settled by the Processor
                outcomes.append(exc)
        return outcomes

    def finish_staged(self, token: str | None, url: str) -> bool:
        """The PUT happened whole or not at all: True if the object there is the one this item put (its
        `superres-item` metadata), not an older one at the same name."""
        bucket, key = parse_s3_uri(url)
        info = self.objects.head(bucket, key)
        return info is not None and token is not None and info.get("superres-item") == token

    def copy(self, from_url: str, rel: str) -> str:
        bucket, key = parse_s3_uri(from_url)
        self.objects.copy(bucket, key, self.bucket, join_key(self.prefix, rel))
        return self.url(rel)

    def failure_key(self, rel: str) -> str:
        """The key for a failure of `rel`, its last name shortened if the key (with room for " (n)" and
        ".error.json") would pass S3's limit."""
        key = join_key(self.prefix, rel)
        if byte_len(key) + FAILURE_ROOM <= KEY_MAX:
            return key
        folder, _, name = key.rpartition("/")
        room = KEY_MAX - FAILURE_ROOM - byte_len(folder) - 1
        if room < 64:  # too deep: one name, directly under the prefix
            folder, room = join_key(self.prefix, "").rstrip("/"), KEY_MAX - FAILURE_ROOM - byte_len(self.prefix) - 1
        return f"{folder}/{shortened(name, room, rel)}" if folder else shortened(name, room, rel)

    def put_failure(self, rel: str, record: dict, data: bytes | None) -> str:
        """`WHERE.error.json` with the record and, when `data` is given, `WHERE` with exactly those bytes. WHERE
        is a key where neither it nor its record existed, so no earlier failure is overwritten."""
        key = next(str(k) for k in candidates(PurePosixPath(self.failure_key(rel)))
                   if self.objects.head(self.bucket, str(k)) is None
                   and self.objects.head(self.bucket, str(k) + RECORD_SUFFIX) is None)
        body = json.dumps({**record, "input_kept": data is not None}, indent=2, ensure_ascii=False).encode() + b"\n"
        self.objects.publish(self.bucket, key + RECORD_SUFFIX, body, content_type="application/json", metadata={})
        if data is not None:
            try:
                self.objects.publish(self.bucket, key, data, content_type="application/octet-stream", metadata={})
            except Exception:
                self.objects.delete(self.bucket, key + RECORD_SUFFIX)  # no record that claims bytes it lacks
                raise
        return f"s3://{self.bucket}/{key}"

    def failures_of(self, rel: str, source: str) -> list[str]:
        """The failure records under `rel`'s names (KEY, KEY (2), …) whose input is `source` (see LocalPlace)."""
        key = self.failure_key(rel)
        folder, _, name = key.rpartition("/")
        names = failure_names(name)
        stem = PurePosixPath(name).stem
        found = []
        for info in self.objects.list(self.bucket, f"{folder}/{stem}" if folder else stem):
            entry = info.key.rpartition("/")[2]
            if info.key.rpartition("/")[0] != folder or not names.fullmatch(entry):
                continue
            try:
                record = json.loads(self.objects.read(self.bucket, info.key, 1 << 20)[0])
            except (InputRejected, ValueError):
                continue
            if isinstance(record, dict) and record.get("input") == source:
                found.append(f"s3://{self.bucket}/{info.key[: -len(RECORD_SUFFIX)]}")
        return found

    def remove_failure(self, where: str) -> None:
        """Remove WHERE and WHERE.error.json (missing is fine); nothing outside this prefix is touched."""
        bucket, key = parse_s3_uri(where)
        if bucket != self.bucket or not key.startswith(join_key(self.prefix, "")):
            return
        self.objects.delete(self.bucket, key)
        self.objects.delete(self.bucket, key + RECORD_SUFFIX)


def s3_inputs(objects: S3Objects, uri: str, *, processed: tuple[str, str] | None = None) -> list[S3Object]:
    """The objects a URI names: a prefix ("s3://b/p/") lists everything below it; otherwise the one key, or, if
    there is no such key, everything below it as a prefix."""
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        info = objects.head(bucket, prefix)
        if info is not None:
            parent = prefix.rpartition("/")[0]
            rel = relative_key(prefix, parent + "/" if parent else "")
            return [S3Object(objects, bucket, prefix, rel, processed=processed)]
        prefix += "/"
    return [
        S3Object(objects, info.bucket, info.key, relative_key(info.key, prefix), size=info.size, etag=info.etag,
                 processed=processed)
        for info in objects.list(bucket, prefix)
    ]
