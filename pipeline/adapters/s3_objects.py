"""S3 as inbox, outbox and failed place: reads with a size limit, all-or-nothing publishes, failure records.

The S3 counterpart of `local_files`. boto3's own errors stop here, classified by `aws_errors` (transient ones
retried there): callers see InputRejected (this object can never be processed), TransientError (a later try may
work, or the outbox/failed bucket is unusable) or ConfigError (a listed bucket does not exist).
"""

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import IncompleteReadError

from pipeline.adapters.aws_errors import (ARCHIVED, BAD_BUCKET, CONFLICT, DENIED, MISSING, NO_BUCKET, AwsFailure,
                                          call)
from pipeline.errors import ConfigError, InputRejected, TransientError

MIB = 1024 * 1024
MIN_PART_SIZE = 8 * MIB  # S3 needs >= 5 MiB for every part but the last; 8 MiB is boto3's default

# Printable ASCII except "%": kept as is in metadata values, so they stay readable and the encoding is reversible.
_META_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _config(endpoint_url: str | None, max_attempts: int, connect_timeout: float, read_timeout: float) -> Config:
    extra = {"s3": {"addressing_style": "path"}} if endpoint_url else {}  # moto and MinIO have no bucket subdomains
    return Config(retries={"mode": "standard", "max_attempts": max_attempts},
                  connect_timeout=connect_timeout, read_timeout=read_timeout, **extra)


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = 5,
              connect_timeout: float = 10, read_timeout: float = 60):
    """A boto3 S3 client with standard retries (throttling, 5xx, timeouts) and bounded timeouts."""
    # a fresh session: boto3's default session is not safe to create clients from in several threads
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=_region(),
        config=_config(endpoint_url, max_attempts, connect_timeout, read_timeout))


def sqs_client(endpoint_url: str | None = None, *, max_attempts: int = 5,
               connect_timeout: float = 10, read_timeout: float = 60):
    """A boto3 SQS client with the same retries and timeouts (read_timeout must exceed long-poll waits of 20 s)."""
    return boto3.session.Session().client(
        "sqs", endpoint_url=endpoint_url, region_name=_region(),
        config=Config(retries={"mode": "standard", "max_attempts": max_attempts},
                      connect_timeout=connect_timeout, read_timeout=read_timeout))


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str  # without quotes


def _transient(failure: AwsFailure, stage: str) -> TransientError:
    # the class names the cause where it is not a plain network fault: no_bucket, denied, credentials, ...
    return TransientError(str(failure), stage=stage, code=failure.kind)


def _etag(value: str) -> str:
    return value.strip('"')


def encode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """S3 user metadata travels in HTTP headers and must be ASCII: percent-encode the rest (and "%" itself, so
    `decode_metadata` gives back exactly what was written). Plain ASCII values stay readable."""
    return {k: quote(str(v), safe=_META_SAFE) for k, v in metadata.items()}


def decode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: unquote(v) for k, v in metadata.items()}


class S3Objects:
    """Objects in S3 (or moto, MinIO): the few operations the pipeline needs, with its errors."""

    def __init__(self, client, *, multipart_threshold: int = 16 * MIB) -> None:
        self.client = client
        self.multipart_threshold = multipart_threshold

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under prefix, page by page (1,000 keys a page); "folder/" placeholders are skipped.
        Each page is its own call, so a fault costs a retry of that page, not of the listing."""
        params = {"Bucket": bucket, "Prefix": prefix}
        while True:
            try:
                page = call(f"listing s3://{bucket}/{prefix}", self.client.list_objects_v2, **params)
            except AwsFailure as failure:
                if failure.kind in (NO_BUCKET, BAD_BUCKET):
                    raise ConfigError(f"the bucket {bucket!r} does not exist", stage="read",
                                      code="no_bucket") from None
                raise _transient(failure, "read") from None
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield ObjectInfo(bucket, item["Key"], item["Size"], _etag(item.get("ETag", "")))
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    def read(self, bucket: str, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo]:
        """The whole object, if it is at most max_bytes; a bigger one is refused before its body is read.
        A body cut off on the way is read again (the whole GET), a few times."""
        where = f"s3://{bucket}/{key}"
        try:
            return call(f"reading {where}", self._get, bucket, key, max_bytes)
        except AwsFailure as failure:
            # the source object itself is gone or cannot be read: a permanent record, never a retry
            if failure.kind == MISSING:
                raise InputRejected("the object disappeared before it could be read",
                                    stage="read", code="vanished") from None
            if failure.kind == NO_BUCKET:  # e.g. a stale event for a deleted bucket: this input is gone for good
                raise InputRejected(f"the bucket {bucket!r} no longer exists", stage="read", code="vanished") from None
            if failure.kind == BAD_BUCKET:  # an event naming a bucket that cannot exist
                raise InputRejected(f"source unreadable: {bucket!r} is not a valid bucket name",
                                    stage="read", code="unreadable") from None
            if failure.kind == DENIED:
                raise InputRejected(f"source unreadable: access denied to {where}",
                                    stage="read", code="unreadable") from None
            if failure.kind == ARCHIVED:  # Glacier: not readable without a restore
                raise InputRejected(f"source unreadable: the object is archived: {where}",
                                    stage="read", code="unreadable") from None
            raise _transient(failure, "read") from None

    def _get(self, bucket: str, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo]:
        response = self.client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = int(response["ContentLength"])
            if size > max_bytes:
                raise InputRejected(f"the object is {size} bytes, more than the limit of {max_bytes} bytes",
                                    stage="read", code="too_many_bytes")
            data = body.read(size + 1)  # what the object holds, +1 to notice more: never max_bytes up front
        finally:
            body.close()  # unread bytes are not downloaded: the connection is dropped instead
        if len(data) != size:  # cut off (or more than announced): transient, the GET is tried again
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=size)
        return data, ObjectInfo(bucket, key, size, _etag(response.get("ETag", "")))

    def head(self, bucket: str, key: str) -> dict | None:
        """The object's user metadata (decoded) plus "ContentLength" and "ETag", or None if there is no object."""
        try:
            response = call(f"looking up s3://{bucket}/{key}", self.client.head_object, Bucket=bucket, Key=key)
        except AwsFailure as failure:
            if failure.kind in (MISSING, NO_BUCKET, BAD_BUCKET):  # HEAD has no body: a missing bucket is a bare 404
                return None
            raise _transient(failure, "read") from None
        return {**decode_metadata(response.get("Metadata", {})),
                "ContentLength": int(response.get("ContentLength", 0)), "ETag": _etag(response.get("ETag", ""))}

    def publish(self, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> None:
        """Write the whole object or nothing: one PUT, or a multipart upload that is completed or aborted.

        S3 shows an object only once its PUT or CompleteMultipartUpload succeeds, so readers never see a part.
        A retry writes the same bytes again: harmless."""
        extra = {"ContentType": content_type, "Metadata": encode_metadata(metadata)}
        if len(data) <= self.multipart_threshold:
            def upload():
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        else:
            # s3transfer aborts the multipart upload when a part or the completion fails
            chunk = max(MIN_PART_SIZE, self.multipart_threshold)
            config = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk)

            def upload():  # a fresh stream for every try
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=config)
        try:
            call(f"publishing s3://{bucket}/{key}", upload)
        except AwsFailure as failure:
            raise _transient(failure, "publish") from None

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
        """A server-side copy with the source's metadata (one request: objects up to 5 GB).

        Every failure is transient, a missing object too: what is copied is an output (a duplicate's copy) or an
        input already settled (disposition move), and neither makes the input in hand a failure; a later look
        finds the output gone (and makes it again) or the input gone (nothing left to move)."""
        try:
            self._copy(src_bucket, src_key, dst_bucket, dst_key)
        except AwsFailure as failure:
            raise _transient(failure, "publish") from None

    def _copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
        call(f"copying s3://{src_bucket}/{src_key} to s3://{dst_bucket}/{dst_key}", self.client.copy_object,
             CopySource={"Bucket": src_bucket, "Key": src_key}, Bucket=dst_bucket, Key=dst_key,
             MetadataDirective="COPY")

    def delete(self, bucket: str, key: str, if_match: str | None = None) -> None:
        """Delete an object; one already gone is fine (S3 answers 204 either way). With `if_match` (an ETag), only
        that version: a newer object under the key is left alone."""
        extra = {"IfMatch": f'"{if_match}"'} if if_match else {}
        try:
            call(f"deleting s3://{bucket}/{key}", self.client.delete_object, Bucket=bucket, Key=key, **extra)
        except AwsFailure as failure:
            # gone, or another version now (also what a retry sees after our own delete landed)
            if failure.kind in (MISSING, CONFLICT):
                return
            raise _transient(failure, "publish") from None

    def write_failure(self, record: dict, src_bucket: str, src_key: str, failed_bucket: str, failed_key: str) -> None:
        """Set a failed input aside: `failed_key.error.json` first, then a copy of the untouched input.

        The record goes first so that a crash in between leaves the input in place, to be failed again later.
        An input that cannot be copied for good (gone, its bucket gone or impossible, access denied) leaves
        only the record: that is settled, never retried."""
        reason_key = failed_key + ".error.json"
        self._put_record(record, failed_bucket, reason_key)
        try:
            self._copy(src_bucket, src_key, failed_bucket, failed_key)
        except AwsFailure as failure:
            if failure.kind not in (MISSING, NO_BUCKET, BAD_BUCKET, DENIED):
                raise _transient(failure, "publish") from None
            note = ("the input no longer exists" if failure.kind in (MISSING, NO_BUCKET)
                    else f"the input cannot be read ({failure.kind})")
            self._put_record({**record, "input_kept": False, "note": f"{note}; only this record remains"},
                             failed_bucket, reason_key)

    def _put_record(self, record: dict, bucket: str, key: str) -> None:
        body = json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n"
        self.publish(bucket, key, body, content_type="application/json", metadata={})
