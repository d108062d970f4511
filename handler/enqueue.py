"""`superres enqueue s3://bucket/prefix/ --queue URL`: a backfill, fanned out to the worker fleet.

Lists the prefix (ListObjectsV2, 1,000 keys a page) and sends one S3-event-shaped message per image object (the
very shape S3 notifications have, so the workers and pipeline/events.py see no difference), ten per
SendMessageBatch. An existing bucket of millions of objects is then processed by the autoscaled workers (SQS +
KEDA/ECS, infra/) instead of one machine. Idempotent through the workers' ledger: an object already upscaled
under the same settings (same size and ETag) is skipped by the worker that takes its message, so enqueueing a
prefix twice upscales nothing twice; only the messages are sent again.

Image files only, by extension (as one-shot's walks); temporary names and the places the service writes into
(--outbox, its failed place and ledger, when given) are left out. Set-up errors (a bad URI, a missing bucket or
queue, no credentials) are one line and exit 2; a progress line goes to stderr."""

import json
import sys
import time
from datetime import datetime, timezone
from urllib.parse import quote_plus

from pipeline.errors import ConfigError, TransientError
from pipeline.events import ObjectRef, drop_loops
from pipeline.formats import FORMATS
from pipeline.intake import is_temp_name
from pipeline.s3keys import is_s3_uri, parse_s3_uri

BATCH = 10  # SendMessageBatch takes ten entries at most
SEND_TRIES = 5  # entries a batch reports failed are sent again this many times


def image_extensions() -> frozenset[str]:
    return frozenset(e for f in FORMATS.values() for e in f.extensions)


def s3_event_body(bucket: str, key: str, size: int, etag: str | None, *, region: str = "us-east-1",
                  now: datetime | None = None) -> str:
    """The body S3 itself puts on the queue for a new object (pure): one ObjectCreated record, the key encoded
    form-style as S3 does (space -> '+', '+' -> '%2B')."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    obj = {"key": quote_plus(key, safe="/"), "size": size}
    if etag:
        obj["eTag"] = etag
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": region, "eventTime": when,
              "eventName": "ObjectCreated:Put", "userIdentity": {"principalId": "superres-enqueue"},
              "s3": {"s3SchemaVersion": "1.0", "configurationId": "superres-enqueue",
                     "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj}}
    return json.dumps({"Records": [record]}, separators=(",", ":"))


def wanted(refs: list[ObjectRef], guard: list[tuple[str, str]]) -> tuple[list[ObjectRef], int]:
    """The objects that are work (pure): image names, not temporary ones, not in a place we write into. Also
    how many were left out."""
    images = frozenset(image_extensions())
    kept, _ = drop_loops(refs, guard)
    kept = [r for r in kept if not is_temp_name(r.key.rpartition("/")[2])
            and ("." + r.key.rpartition(".")[2].lower()) in images]
    return kept, len(refs) - len(kept)


class Progress:
    """One line on stderr, redrawn in place on a terminal, every few seconds otherwise; the last one stays."""

    def __init__(self, stream=None, every_s: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
        self._last = 0.0

    def show(self, text: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + end)
        self.stream.flush()


def send_batch(sqs, queue_url: str, bodies: list[str]) -> int:
    """Send up to ten bodies; entries SQS reports failed are sent again (a few times). The number sent."""
    from pipeline.adapters.aws_errors import call

    entries = {str(i): body for i, body in enumerate(bodies)}
    for attempt in range(SEND_TRIES):
        answer = call("send_message_batch", sqs.send_message_batch, QueueUrl=queue_url,
                      Entries=[{"Id": i, "MessageBody": body} for i, body in entries.items()])
        for ok in answer.get("Successful", []):
            entries.pop(ok["Id"], None)
        if not entries:
            break
        if any(f.get("SenderFault") for f in answer.get("Failed", [])):
            reasons = {f.get("Message") or f.get("Code") for f in answer.get("Failed", [])}
            raise ConfigError(f"the queue {queue_url} refuses the messages: {'; '.join(sorted(map(str, reasons)))}")
        time.sleep(min(2.0, 0.2 * 2 ** attempt))
    if entries:
        raise TransientError(f"{len(entries)} messages could not be sent after {SEND_TRIES} tries", stage="enqueue")
    return len(bodies)


def check_queue(sqs, queue_url: str) -> None:
    """The queue is there and answers, or a set-up error (one line)."""
    from pipeline.adapters.aws_errors import NO_QUEUE, AwsFailure, call, describe

    try:
        call("get_queue_attributes", sqs.get_queue_attributes, QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except AwsFailure as failure:
        if failure.kind == NO_QUEUE:
            raise ConfigError(f"the queue {queue_url} does not exist") from None
        raise ConfigError(f"cannot reach the queue {queue_url}: {describe(failure.cause)}") from None


def run_enqueue(settings, source: str, *, progress: Progress | None = None) -> int:
    from handler.runtime import check_buckets, loop_guard
    from pipeline.adapters.s3_objects import S3Objects, s3_client, sqs_client

    if not is_s3_uri(source):
        raise ConfigError(f"enqueue takes an S3 prefix (s3://bucket/prefix/), not {source!r}")
    bucket, prefix = parse_s3_uri(source)
    if not settings.queue_url:
        raise ConfigError("enqueue needs --queue URL (or SUPERRES_QUEUE_URL): the workers' queue")
    sqs = sqs_client(settings.s3_endpoint_url)
    check_queue(sqs, settings.queue_url)
    check_buckets(settings.s3_endpoint_url, {bucket: "inbox"})
    guard = loop_guard(settings) if settings.outbox else []
    region = sqs.meta.region_name or "us-east-1"
    progress = progress or Progress()
    listed = sent = left_out = 0
    objects = S3Objects(s3_client(settings.s3_endpoint_url))
    pending: list[str] = []

    def line() -> str:
        return f"enqueue {source}: listed {listed:,}, sent {sent:,}, left out {left_out:,}"

    def flush() -> None:
        nonlocal sent
        if pending:
            sent += send_batch(sqs, settings.queue_url, pending)
            pending.clear()

    try:
        for item in objects.list(bucket, prefix):
            listed += 1
            refs, dropped = wanted([ObjectRef(item.bucket, item.key, item.size, item.etag)], guard)
            left_out += dropped
            for ref in refs:
                pending.append(s3_event_body(ref.bucket, ref.key, ref.size, ref.etag, region=region))
                if len(pending) == BATCH:
                    flush()
            progress.show(line())
        flush()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an outage mid-way: say how far it got; running it again is safe
        progress.show(line(), final=True)
        what = exc.message if isinstance(exc, TransientError) else f"{type(exc).__name__}: {exc}"
        print(f"superres: error: enqueue stopped after {sent:,} messages: {what}; running it again is safe "
              "(what is done is skipped by the workers)", file=sys.stderr)
        return 1
    progress.show(line() + " (done)", final=True)
    return 0
