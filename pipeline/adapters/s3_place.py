"""The pipeline's view of S3: an input object, and a prefix to publish into or set failures aside in.
Built on `S3Objects` (the boto3 calls); keys are made safe by `pipeline.s3keys`."""

import json
from pathlib import PurePosixPath
from urllib.parse import quote

from pipeline.adapters.local_files import Staged
from pipeline.adapters.s3_objects import S3Objects
from pipeline.s3keys import join_key, parse_s3_uri, relative_key


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

    def __repr__(self) -> str:
        return f"S3Object({self.id!r})"

    def fingerprint(self) -> str | None:
        return f"{self._size}:{self._etag}" if self._size is not None and self._etag else None

    def read(self, max_bytes: int) -> tuple[bytes, str]:
        data, info = self.objects.read(self.bucket, self.key, max_bytes)
        self._size, self._etag = info.size, info.etag
        return data, f"{info.size}:{info.etag}"

    def metadata(self, sha256: str, model: str) -> dict[str, str]:
        return {"source-bucket": self.bucket, "source-key": self.key, "source-sha256": sha256, "model": model}

    def dispose(self, disposition: str) -> None:
        if disposition == "keep":
            return
        if disposition == "move" and self.processed is not None:
            bucket, prefix = self.processed
            self.objects.copy(self.bucket, self.key, bucket, join_key(prefix, self.rel))
        self.objects.delete(self.bucket, self.key)


class S3Place:
    """A bucket + prefix. A single PUT (or a completed multipart upload) is atomic: nothing to stage."""

    def __init__(self, objects: S3Objects, bucket: str, prefix: str):
        self.objects = objects
        self.bucket = bucket
        self.prefix = prefix

    def url(self, rel: str) -> str:
        return f"s3://{self.bucket}/{join_key(self.prefix, rel)}"

    def name(self, url: str) -> str:
        return PurePosixPath(url).name

    def exists(self, url: str) -> bool:
        bucket, key = parse_s3_uri(url)
        return self.objects.head(bucket, key) is not None

    def stage(self, data: bytes, tag: str) -> Staged:
        return Staged(None, data)

    def commit(self, staged: Staged, rel: str, *, content_type: str, metadata: dict[str, str]) -> str:
        key = join_key(self.prefix, rel)
        self.objects.publish(self.bucket, key, staged.data, content_type=content_type, metadata=metadata)
        return f"s3://{self.bucket}/{key}"

    def finish_staged(self, token: str | None, url: str) -> bool:
        return self.exists(url)  # the PUT happened whole, or not at all

    def copy(self, from_url: str, rel: str) -> str:
        bucket, key = parse_s3_uri(from_url)
        self.objects.copy(bucket, key, self.bucket, join_key(self.prefix, rel))
        return self.url(rel)

    def put_failure(self, rel: str, record: dict, src, *, move: bool) -> str:
        key = join_key(self.prefix, rel)
        if isinstance(src, S3Object):
            self.objects.write_failure(record, src.bucket, src.key, self.bucket, key)
            if move:
                self.objects.delete(src.bucket, src.key)
        else:  # a local file failing into an S3 failed place: the record, and the bytes if they can be read
            self.objects.publish(self.bucket, key + ".error.json", json.dumps(record, indent=2).encode(),
                                 content_type="application/json", metadata={"source": quote(src.id)})
            try:
                self.objects.publish(self.bucket, key, src.path.read_bytes(), content_type="application/octet-stream",
                                     metadata={})
            except OSError:
                pass
        return f"s3://{self.bucket}/{key}"


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
