"""What the SQS worker and the Lambda handler share: turning event references into pipeline inputs, with the
loop guard applied, and keeping messages in flight: every object of every message in hand goes through the one
stage runner (pipeline/stages.py), and a message is settled when every object in it is."""

import logging
from dataclasses import dataclass, field

from handler.ops import Ops
from pipeline.adapters.s3_place import S3Object
from pipeline.events import Message, drop_loops
from pipeline.s3keys import is_s3_uri, parse_s3_uri, relative_key
from pipeline.stages import REMOTE_READERS, StageRunner, Window, in_flight_for

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
        self.in_flight = in_flight_for(processor, settings.in_flight, REMOTE_READERS)
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

    def sources(self, message: Message) -> list[S3Object]:
        """The message's objects as pipeline inputs; what is no work (test events, our own outputs) is logged."""
        refs, looped = drop_loops(message.objects, self.guard)
        for skipped in [*message.skipped, *looped]:
            log.info("skipped", extra={"fields": {"message_id": message.message_id, "reason": skipped.reason}})
        return [S3Object(self.objects, ref.bucket, ref.key, self._rel(ref.bucket, ref.key), size=ref.size,
                         etag=ref.etag, processed=self.processed) for ref in refs]

    def messages(self) -> "MessagesInFlight":
        """A stage runner and a window over it for a batch (Lambda) or a process's life (the worker)."""
        runner = StageRunner(self.processor, queue_max=self.in_flight + 10,  # the window bounds, not submit
                             readers=REMOTE_READERS)
        return MessagesInFlight(Window(runner, self.in_flight, track=self.ops.in_flight), self.ops)


class _InHand:
    __slots__ = ("tag", "left", "outcome")

    def __init__(self, tag, left: int):
        self.tag, self.left, self.outcome = tag, left, MessageOutcome()


class MessagesInFlight:
    """Messages whose objects are in the stage runner. All of a message's objects are submitted when it is
    taken (a window holds objects, so a message of many may go past `room` once); `take` gives back the messages
    whose every object has its result, each with its outcome."""

    def __init__(self, window: Window, ops: Ops):
        self.window = window
        self.ops = ops
        self._settled: list[_InHand] = []  # messages with no work in them, or all of it done, not yet taken
        self._in_hand = 0  # messages taken and not yet given back by `take`

    def __len__(self) -> int:
        return self._in_hand

    def room(self) -> int:
        return self.window.room()

    def add(self, tag, sources: list) -> None:
        hand = _InHand(tag, len(sources))
        self._in_hand += 1
        if not sources:
            self._settled.append(hand)
        for src in sources:
            self.window.submit(src, hand)

    def take(self, *, wait_s: float = 0.0, all: bool = False) -> list[tuple[object, MessageOutcome]]:
        if wait_s and not self._settled:
            self.window.wait(wait_s)
        for hand, result in self.window.take(all=all):
            self.ops.record(result)
            hand.outcome.results.append(result)
            hand.outcome.retry |= result.retryable
            hand.left -= 1
            if hand.left == 0:
                self._settled.append(hand)
        done, self._settled = self._settled, []
        self._in_hand -= len(done)
        return [(hand.tag, hand.outcome) for hand in done]

    def close(self) -> list[tuple[object, MessageOutcome]]:
        """Finish what is in hand; the messages it settles."""
        self.window.runner.close()
        return self.take(all=True)
