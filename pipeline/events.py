"""What AWS sends when an object lands in S3, reduced to the objects to process and the things skipped.

Pure: no boto3, no I/O. Shapes handled: S3 notifications (direct to Lambda, or as an SQS message body,
incl. the s3:TestEvent S3 sends when a notification is configured), EventBridge "Object Created" events,
and SNS envelopes (SNS -> SQS) around either. Nothing here raises on a foreign document: it is skipped
with a reason, so one odd message never fails a whole batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from pipeline.s3keys import join_key


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str  # decoded
    size: int | None = None
    etag: str | None = None  # without quotes
    sequencer: str | None = None
    version_id: str | None = None


@dataclass(frozen=True)
class Skipped:
    reason: str


@dataclass(frozen=True)
class Message:
    message_id: str | None  # the SQS messageId (for batchItemFailures); None for a direct S3/EventBridge event
    objects: list[ObjectRef]
    skipped: list[Skipped]


LOOP_GUARD = "in the outbox prefix (loop guard)"
UNRECOGNISED = "unrecognised event"

Parsed = tuple[list[ObjectRef], list[Skipped]]


def _not_s3(why: str) -> Parsed:
    return [], [Skipped(f"not an S3 notification: {why}")]


def _size(value: Any) -> int | None:
    # bool is an int in Python; neither it nor a string size is what S3 sends
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _etag(value: Any) -> str | None:
    text = _text(value)
    return text.strip('"') if text else None


def _s3_record(record: Any) -> ObjectRef | Skipped:
    if not isinstance(record, dict):
        return Skipped("not an S3 notification: a record is not an object")
    if record.get("eventSource") != "aws:s3":
        return Skipped(f"not an S3 notification: eventSource {record.get('eventSource')!r}")
    name = str(record.get("eventName") or "")
    if not name.startswith("ObjectCreated:"):
        # Removals are expected noise on a shared bucket; anything else is worth naming as unknown.
        return Skipped(name if name.startswith("ObjectRemoved:") else f"unknown event {name or '(no eventName)'}")
    s3 = record.get("s3") if isinstance(record.get("s3"), dict) else {}
    bucket = s3.get("bucket") if isinstance(s3.get("bucket"), dict) else {}
    obj = s3.get("object") if isinstance(s3.get("object"), dict) else {}
    if not _text(bucket.get("name")) or not _text(obj.get("key")):
        return Skipped(f"malformed S3 record: {name} without s3.bucket.name or s3.object.key")
    return ObjectRef(
        bucket=bucket["name"],
        # S3 encodes keys form-style (space -> "+", "+" -> "%2B"; moto also encodes "/" as "%2F").
        key=unquote_plus(obj["key"]),
        size=_size(obj.get("size")),
        etag=_etag(obj.get("eTag")),
        sequencer=_text(obj.get("sequencer")),
        version_id=_text(obj.get("versionId")),
    )


def parse_s3_notification(doc: dict) -> Parsed:
    """Records[] of eventSource "aws:s3": ObjectCreated:* -> ObjectRef; the rest -> Skipped. s3:TestEvent -> Skipped."""
    if not isinstance(doc, dict):
        return _not_s3(f"JSON {type(doc).__name__}")
    if "Event" in doc and "Records" not in doc:
        event = str(doc.get("Event"))
        return [], [Skipped(event if event == "s3:TestEvent" else f"unknown event {event}")]
    records = doc.get("Records")
    if not isinstance(records, list) or not records:
        return _not_s3("no Records")
    objects: list[ObjectRef] = []
    skipped: list[Skipped] = []
    for record in records:
        item = _s3_record(record)
        if isinstance(item, ObjectRef):
            objects.append(item)
        else:
            skipped.append(item)
    return objects, skipped


def parse_eventbridge(doc: dict) -> Parsed:
    """source "aws.s3", detail-type "Object Created" -> ObjectRef (keys are not encoded); others -> Skipped."""
    if not isinstance(doc, dict) or doc.get("source") != "aws.s3":
        return _not_s3(f"EventBridge source {doc.get('source') if isinstance(doc, dict) else None!r}")
    kind = str(doc.get("detail-type") or "")
    detail = doc.get("detail") if isinstance(doc.get("detail"), dict) else {}
    if kind != "Object Created":
        return [], [Skipped(kind if kind == "Object Deleted" else f"unknown event {kind or '(no detail-type)'}")]
    bucket = detail.get("bucket") if isinstance(detail.get("bucket"), dict) else {}
    obj = detail.get("object") if isinstance(detail.get("object"), dict) else {}
    if not _text(bucket.get("name")) or not _text(obj.get("key")):
        return [], [Skipped("malformed EventBridge event: Object Created without bucket.name or object.key")]
    ref = ObjectRef(
        bucket=bucket["name"],
        key=obj["key"],  # EventBridge sends the key as is
        size=_size(obj.get("size")),
        etag=_etag(obj.get("etag")),
        sequencer=_text(obj.get("sequencer")),
        version_id=_text(obj.get("version-id")),
    )
    return [ref], []


def _parse_doc(doc: Any, *, in_sns: bool = False) -> Parsed:
    if not isinstance(doc, dict):
        return _not_s3(f"JSON {type(doc).__name__}")
    if "Records" in doc or "Event" in doc:
        return parse_s3_notification(doc)
    if "detail-type" in doc and "source" in doc:
        return parse_eventbridge(doc)
    if doc.get("Type") == "Notification" and "Message" in doc and not in_sns:
        message = doc.get("Message")
        try:
            inner = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            inner = None
        if inner is None:
            return _not_s3("SNS message is not JSON")
        return _parse_doc(inner, in_sns=True)
    if "Type" in doc and "TopicArn" in doc:
        return _not_s3(f"SNS {doc.get('Type')}")
    return _not_s3("JSON with keys " + ", ".join(sorted(map(str, doc))[:5]))


def parse_sqs_body(body: str) -> Parsed:
    """An SQS message body: S3 notification, s3:TestEvent, EventBridge event or an SNS envelope of one."""
    if not isinstance(body, str):
        return _not_s3(f"body is {type(body).__name__}")
    try:
        doc = json.loads(body)
    except ValueError:
        return _not_s3("body is not JSON")
    return _parse_doc(doc)


def parse_lambda_event(event: dict) -> list[Message]:
    """A Lambda invocation: SQS batch -> one Message per record; direct S3 or EventBridge -> one Message(None)."""
    unrecognised = [Message(None, [], [Skipped(UNRECOGNISED)])]
    if not isinstance(event, dict):
        return unrecognised
    records = event.get("Records")
    if isinstance(records, list) and records:
        sources = {r.get("eventSource") if isinstance(r, dict) else None for r in records}
        if sources == {"aws:sqs"}:
            return [Message(r.get("messageId"), *parse_sqs_body(r.get("body"))) for r in records]
        if sources == {"aws:s3"}:
            return [Message(None, *parse_s3_notification(event))]
        return unrecognised  # e.g. SNS -> Lambda (EventSource "aws:sns")
    if event.get("source") == "aws.s3" and "detail-type" in event:
        return [Message(None, *parse_eventbridge(event))]
    if event.get("Event") == "s3:TestEvent":
        return [Message(None, *parse_s3_notification(event))]
    return unrecognised


def drop_loops(objects: list[ObjectRef], excluded: list[tuple[str, str]]) -> Parsed:
    """Skip objects under any (bucket, prefix) in `excluded` (the outbox's and failed place's own prefixes),
    so writing outputs never triggers more work. A prefix is a folder ("out" == "out/"); "" is the whole bucket."""
    folders = [(bucket, join_key(prefix, "")) for bucket, prefix in excluded]
    kept: list[ObjectRef] = []
    skipped: list[Skipped] = []
    for ref in objects:
        if any(ref.bucket == bucket and ref.key.startswith(folder) for bucket, folder in folders):
            skipped.append(Skipped(LOOP_GUARD))
        else:
            kept.append(ref)
    return kept, skipped
