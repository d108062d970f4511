"""S3 as inbox, outbox and failed place: reads with a size limit, all-or-nothing publishes, failure records.

The S3 counterpart of `local_files`. boto3's own errors stop here: callers see InputRejected (this object can never
be processed), TransientError (a later try may work) or ConfigError (the bucket itself is wrong).
"""

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ConfigError, InputRejected, TransientError

MIB = 1024 * 1024
MIN_PART_SIZE = 8 * MIB  # S3 needs >= 5 MiB for every part but the last; 8 MiB is boto3's default

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# Printable ASCII except "%": kept as is in metadata values, so they stay readable and the encoding is reversible.
_META_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

_AWS_ERRORS = (ClientError, BotoCoreError, Boto3Error, OSError)


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


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


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
        """Every object under prefix, page by page (1,000 keys a page); "folder/" placeholders are skipped."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):
                        continue
                    yield ObjectInfo(bucket, item["Key"], item["Size"], _etag(item.get("ETag", "")))
        except ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                raise ConfigError(f"the bucket {bucket!r} does not exist", stage="read", code="no_bucket") from None
            raise TransientError(f"listing s3://{bucket}/{prefix} failed: {_describe(exc)}", stage="read") from None
        except _AWS_ERRORS as exc:
            raise TransientError(f"listing s3://{bucket}/{prefix} failed: {_describe(exc)}", stage="read") from None

    def read(self, bucket: str, key: str, max_bytes: int) -> tuple[bytes, ObjectInfo]:
        """The whole object, if it is at most max_bytes; a bigger one is refused before its body is read."""
        where = f"s3://{bucket}/{key}"
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING:
                raise InputRejected("the object disappeared before it could be read",
                                    stage="read", code="vanished") from None
            if code in _DENIED:
                raise InputRejected(f"the object is not readable (access denied): {where}",
                                    stage="read", code="unreadable") from None
            if code == "InvalidObjectState":  # archived (Glacier): not readable without a restore
                raise InputRejected(f"the object is archived and cannot be read: {where}",
                                    stage="read", code="unreadable") from None
            if code == "NoSuchBucket":  # e.g. a stale event for a deleted bucket: this input is gone for good
                raise InputRejected(f"the bucket {bucket!r} no longer exists", stage="read", code="vanished") from None
            raise TransientError(f"reading {where} failed: {_describe(exc)}", stage="read") from None
        except _AWS_ERRORS as exc:  # botocore has already retried these
            raise TransientError(f"reading {where} failed: {_describe(exc)}", stage="read") from None

        body = response["Body"]
        size = int(response.get("ContentLength", 0))
        info = ObjectInfo(bucket, key, size, _etag(response.get("ETag", "")))
        try:
            if size > max_bytes:
                raise InputRejected(f"the object is {size} bytes, more than the limit of {max_bytes} bytes",
                                    stage="read", code="too_many_bytes")
            try:
                data = body.read(max_bytes + 1)  # never more than the limit, whatever the header said
            except _AWS_ERRORS as exc:
                raise TransientError(f"reading {where} failed: {_describe(exc)}", stage="read") from None
        finally:
            body.close()  # unread bytes are not downloaded: the connection is dropped instead
        if len(data) > max_bytes:
            raise InputRejected(f"the object grew past the limit of {max_bytes} bytes while being read",
                                stage="read", code="too_many_bytes")
        if len(data) != size:
            raise TransientError(f"reading {where} stopped after {len(data)} of {size} bytes", stage="read")
        return data, info

    def head(self, bucket: str, key: str) -> dict | None:
        """The object's user metadata (decoded) plus "ContentLength" and "ETag", or None if there is no object."""
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING | {"NoSuchBucket"}:  # HEAD has no body: a missing bucket is a bare 404 too
                return None
            raise TransientError(f"looking up s3://{bucket}/{key} failed: {_describe(exc)}", stage="read") from None
        except _AWS_ERRORS as exc:
            raise TransientError(f"looking up s3://{bucket}/{key} failed: {_describe(exc)}", stage="read") from None
        return {**decode_metadata(response.get("Metadata", {})),
                "ContentLength": int(response.get("ContentLength", 0)), "ETag": _etag(response.get("ETag", ""))}

    def publish(self, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> None:
        """Write the whole object or nothing: one PUT, or a multipart upload that is completed or aborted.

        S3 shows an object only once its PUT or CompleteMultipartUpload succeeds, so readers never see a part."""
        extra = {"ContentType": content_type, "Metadata": encode_metadata(metadata)}
        try:
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
            else:
                # s3transfer aborts the multipart upload when a part or the completion fails
                chunk = max(MIN_PART_SIZE, self.multipart_threshold)
                config = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk)
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=config)
        except _AWS_ERRORS as exc:
            raise TransientError(f"publishing s3://{bucket}/{key} failed: {_describe(exc)}", stage="publish") from None

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
        """A server-side copy with the source's metadata (one request: objects up to 5 GB)."""
        try:
            self.client.copy_object(CopySource={"Bucket": src_bucket, "Key": src_key},
                                    Bucket=dst_bucket, Key=dst_key, MetadataDirective="COPY")
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise InputRejected("the object disappeared before it could be copied",
                                    stage="publish", code="vanished") from None
            raise TransientError(f"copying s3://{src_bucket}/{src_key} to s3://{dst_bucket}/{dst_key} failed: "
                                 f"{_describe(exc)}", stage="publish") from None
        except _AWS_ERRORS as exc:
            raise TransientError(f"copying s3://{src_bucket}/{src_key} failed: {_describe(exc)}",
                                 stage="publish") from None

    def delete(self, bucket: str, key: str, if_match: str | None = None) -> None:
        """Delete an object; one already gone is fine (S3 answers 204 either way). With `if_match` (an ETag), only
        that version: a newer object under the key is left alone."""
        extra = {"IfMatch": f'"{if_match}"'} if if_match else {}
        try:
            self.client.delete_object(Bucket=bucket, Key=key, **extra)
        except ClientError as exc:
            if if_match and (_code(exc) in _MISSING or _code(exc) in ("PreconditionFailed", "412")):
                return
            raise TransientError(f"deleting s3://{bucket}/{key} failed: {_describe(exc)}", stage="publish") from None
        except _AWS_ERRORS as exc:
            raise TransientError(f"deleting s3://{bucket}/{key} failed: {_describe(exc)}", stage="publish") from None

    def write_failure(self, record: dict, src_bucket: str, src_key: str, failed_bucket: str, failed_key: str) -> None:
        """Set a failed input aside: `failed_key.error.json` first, then a copy of the untouched input.

        The record goes first so that a crash in between leaves the input in place, to be failed again later."""
        reason_key = failed_key + ".error.json"
        if self.head(src_bucket, src_key) is None:
            self._put_record({**record, "input_kept": False,
                              "note": "the input no longer exists; only this record remains"},
                             failed_bucket, reason_key)
            return
        self._put_record(record, failed_bucket, reason_key)
        try:
            self.copy(src_bucket, src_key, failed_bucket, failed_key)
        except InputRejected:  # deleted between the lookup and the copy
            self._put_record({**record, "input_kept": False,
                              "note": "the input disappeared before it could be copied; only this record remains"},
                             failed_bucket, reason_key)

    def _put_record(self, record: dict, bucket: str, key: str) -> None:
        body = json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n"
        self.publish(bucket, key, body, content_type="application/json", metadata={})
