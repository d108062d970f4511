"""Uploads as pipeline inputs, and reading results back for the HTTP server.

`Upload` is an in-memory input for the Processor's `InputObject` protocol (pipeline/process.py). Its ledger id
and its name come from the job id, a hash of the content and the request's settings, never from the name the
client gave: an uploaded name is never a path, and the same upload under the same settings is the same source
(after a restart too), so the ledger answers "already done" without a second upscale.

`ResultStore` reads a published output or a failure record back from the outbox or failed place (a local folder
or an S3 prefix), and removes results past their time."""

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.s3keys import is_s3_uri, parse_s3_uri

# a job id is the first 32 hex digits of a sha256: outputs and records named by it, and nothing else, are ours
JOB_ID = re.compile(r"[0-9a-f]{32}")
_RESULT_NAME = re.compile(r"([0-9a-f]{32})(\.[a-z]+)?(\.error\.json)?")
UPLOAD_PREFIX = "upload:"


def job_id(data_sha256: str, request: str) -> str:
    """The job of these bytes under these settings (the Processor's request id): the same every time."""
    return hashlib.sha256(f"{data_sha256}|{request}".encode()).hexdigest()[:32]


class Upload:
    """The bytes of one upload, for the Processor. Nothing to dispose of: the bytes live in memory only."""

    def __init__(self, data: bytes, job: str, *, sha256: str | None = None):
        if not JOB_ID.fullmatch(job):
            raise ValueError(f"not a job id: {job!r}")
        self.data = data
        self.job = job
        self.id = UPLOAD_PREFIX + job  # the ledger's name for this source
        self.rel = job  # the output is JOB.<ext> in the outbox; a failure JOB (+ .error.json) in the failed place
        self._fingerprint = f"{len(data)}:{sha256 or hashlib.sha256(data).hexdigest()}"

    def __repr__(self) -> str:
        return f"Upload({self.job})"

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def read(self, max_bytes: int) -> tuple[bytes, str]:
        return self.data, self._fingerprint  # the size limit is the Processor's check (and the server's, earlier)

    def metadata(self, sha256: str, model: str) -> dict[str, str]:
        return {"superres-job": self.job}

    def dispose(self, disposition: str) -> None:
        pass


@dataclass(frozen=True)
class Stored:
    url: str
    age_s: float


class ResultStore:
    """Read results back from a place, by the URL the Processor returned; list and remove old ones. `s3` is an
    S3Objects (pipeline/adapters/s3_objects.py) when a place is on S3."""

    def __init__(self, s3=None):
        self.s3 = s3

    def read(self, url: str, max_bytes: int = 1 << 40) -> bytes | None:
        """The bytes at `url`; None when nothing is there (removed since)."""
        if is_s3_uri(url):
            from pipeline.errors import InputRejected

            bucket, key = parse_s3_uri(url)
            if self.s3.head(bucket, key) is None:
                return None
            try:
                return self.s3.read(bucket, key, max_bytes)[0]
            except InputRejected:  # vanished between the look and the read
                return None
        try:
            with open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def record(self, where: str) -> dict | None:
        """A failure record (`WHERE.error.json`), or None."""
        data = self.read(where + ".error.json", 1 << 20)
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None

    def results(self, location: str) -> list[Stored]:
        """Every output or failure record named by a job id directly in `location` (a folder or s3:// prefix)."""
        now = time.time()
        found = []
        if is_s3_uri(location):
            bucket, prefix = parse_s3_uri(location)
            prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
            # the listing's LastModified (S3Objects.list gives keys and sizes only)
            for page in self.s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                                  Delimiter="/"):
                for item in page.get("Contents", []):
                    if _RESULT_NAME.fullmatch(item["Key"][len(prefix):]):
                        found.append(Stored(f"s3://{bucket}/{item['Key']}", now - item["LastModified"].timestamp()))
            return found
        try:
            entries = list(os.scandir(location))
        except FileNotFoundError:
            return []
        for entry in entries:
            if _RESULT_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    found.append(Stored(entry.path, now - entry.stat(follow_symlinks=False).st_mtime))
                except FileNotFoundError:
                    continue
        return found

    def remove(self, url: str) -> None:
        if is_s3_uri(url):
            bucket, key = parse_s3_uri(url)
            self.s3.delete(bucket, key)
        else:
            Path(url).unlink(missing_ok=True)
