"""What the SQS worker and the Lambda handler share: turning event references into pipeline inputs and
running them, with the loop guard applied. One message is settled when every object in it is."""

import logging
from dataclasses import dataclass, field

from handler.ops import Ops
from pipeline.adapters.s3_place import S3Object
from pipeline.events import Message, drop_loops
from pipeline.s3keys import is_s3_uri, parse_s3_uri, relative_key

log = logging.getLogger("superres")


@dataclass
class MessageOutcome:
    retry: bool = False  # some object hit a transient error: the message must come back
    results: list = field(default_factory=list)

    @property
    def retry_after_s(self) -> float | None:
        """The longest wait a busy claim asked for (None: no busy claim, an ordinary transient error)."""
        waits = [r.retry_after_s for r in self.results if r.retryable and r.retry_after_s is not None]
        return max(waits) if waits else None


class EventRunner:
    def __init__(self, processor, objects, settings, guard: list[tuple[str, str]], ops: Ops | None = None):
        self.processor = processor
        self.ops = ops or Ops.for_processor(processor)  # Lambda: counted but not served; the log line is the same
        self.objects = objects
        self.guard = guard
        # outputs keep the key's path below the inbox prefix when one is configured, else the whole key
        self.inbox = parse_s3_uri(settings.inbox) if settings.inbox and is_s3_uri(settings.inbox) else None
        self.processed = parse_s3_uri(settings.processed) if settings.processed else None

    def _rel(self, bucket: str, key: str) -> str:
        if self.inbox and bucket == self.inbox[0]:
            try:
                return relative_key(key, self.inbox[1])
            except ValueError:
                pass
        return relative_key(key, "")

    def run(self, message: Message) -> MessageOutcome:
        outcome = MessageOutcome()
        refs, looped = drop_loops(message.objects, self.guard)
        for skipped in [*message.skipped, *looped]:
            log.info("skipped", extra={"fields": {"message_id": message.message_id, "reason": skipped.reason}})
        for ref in refs:
            if self.processor.engine_failure:  # the engine is broken: give the rest back untouched
                outcome.retry = True
                break
            src = S3Object(self.objects, ref.bucket, ref.key, self._rel(ref.bucket, ref.key), size=ref.size,
                           etag=ref.etag, processed=self.processed)
            with self.ops.in_flight():
                result = self.processor.process(src)
            self.ops.record(result)
            outcome.results.append(result)
            outcome.retry |= result.retryable
        return outcome
