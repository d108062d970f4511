"""`superres worker`: long-poll an SQS queue of S3 event messages and keep several in flight.

Every object of every message in hand goes through the one stage runner (pipeline/stages.py), so that the engine
never waits on downloads, decoding, encoding or uploads; the worker receives more while there is room. A message
is deleted only after every object in it is published (or recorded as a duplicate or a permanent failure) and in
the ledger. While any of its objects is in flight one heartbeat thread keeps every message in hand invisible (the
Processor renews each ledger claim itself). A transient failure leaves the message to come back; a message that
keeps failing goes to the queue's dead-letter queue by its redrive policy. SIGTERM: receive nothing more, finish
the items in hand, settle their messages, exit 0."""

import json
import logging
import threading
import time

from handler.invoked import EventRunner
from handler.ops import Ops
from handler.runtime import loop_guard, open_processor
from handler.stop import Backoff, StopFlag, how_it_ended
from pipeline.adapters.aws_errors import NO_QUEUE, AwsFailure, call, describe
from pipeline.adapters.s3_objects import S3Objects, s3_client, sqs_client
from pipeline.errors import ConfigError
from pipeline.events import Message, parse_sqs_body
from pipeline.s3keys import is_s3_uri
from pipeline.settings import CLAIM_MARGIN_S, SQS_MAX_VISIBILITY_S

log = logging.getLogger("superres")


class _Interrupted(Exception):
    """Raised by the signal handler while we only wait on the queue: nothing is in hand, leave at once."""


class Heartbeat:
    """Keeps every message in hand invisible while its objects are in work: one thread, every `every_s`, a
    ChangeMessageVisibilityBatch per ten messages (the Processor renews the ledger claims itself)."""

    def __init__(self, sqs, queue_url: str, visibility_s: int, every_s: float):
        self._sqs, self._queue_url, self._visibility_s, self._every_s = sqs, queue_url, visibility_s, every_s
        self._receipts: set[str] = set()  # receipt handles of the messages in hand
        self._lock = threading.Lock()  # a message is never renewed after it is let go (deleted or deferred)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="superres-sqs-heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def hold(self, message: dict) -> None:
        with self._lock:
            self._receipts.add(message["ReceiptHandle"])

    def let_go(self, message: dict) -> None:
        with self._lock:
            self._receipts.discard(message["ReceiptHandle"])

    def _run(self) -> None:
        while not self._stop.wait(max(1.0, self._every_s)):
            with self._lock:
                held = sorted(self._receipts)
                for start in range(0, len(held), 10):
                    self._beat(held[start:start + 10])

    def _beat(self, held: list[str]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": self._visibility_s}
                   for i, receipt in enumerate(held)]
        try:
            answer = call("change_message_visibility_batch", self._sqs.change_message_visibility_batch,
                          QueueUrl=self._queue_url, Entries=entries)
            for failed in answer.get("Failed", []):
                log.warning("heartbeat failed for a message: %s", failed.get("Message") or failed.get("Code"))
        except Exception as exc:  # noqa: BLE001 - a missed beat is survivable: the visibility has slack
            log.warning("heartbeat failed: %s", describe(exc))


def max_receive_count(sqs, queue_url: str) -> int | None:
    """The queue's redrive maxReceiveCount (None: no dead-letter queue). A queue that is not there is a set-up
    error, said at start."""
    try:
        attrs = call("get_queue_attributes", sqs.get_queue_attributes, QueueUrl=queue_url,
                     AttributeNames=["RedrivePolicy"]).get("Attributes", {})
    except AwsFailure as failure:  # after the retries of a transient fault: the worker cannot start
        if failure.kind == NO_QUEUE:
            raise ConfigError(f"the queue {queue_url} does not exist") from None
        raise ConfigError(f"cannot reach the queue {queue_url}: {describe(failure.cause)}") from None
    policy = attrs.get("RedrivePolicy")
    return int(json.loads(policy)["maxReceiveCount"]) if policy else None


def run_worker(settings, *, max_messages: int | None = None, idle_exit_s: float | None = None) -> int:
    if not settings.queue_url:
        raise ConfigError("worker needs --queue URL (or SUPERRES_QUEUE_URL)")
    if not settings.outbox or not is_s3_uri(settings.outbox):
        raise ConfigError("worker needs an S3 outbox: --outbox s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    sqs = sqs_client(settings.s3_endpoint_url)
    state = {"waiting": False}
    # before the engine loads: a SIGTERM during start-up is a clean stop too
    stop = StopFlag(on_stop=lambda: _raise_if_waiting(state))
    processor = open_processor(settings, "worker", max_receive_count=max_receive_count(sqs, settings.queue_url))
    ops = Ops.for_processor(processor, interval_s=settings.wait_s)  # one long poll per wait_s
    runner = EventRunner(processor, S3Objects(s3_client(settings.s3_endpoint_url)), settings, loop_guard(settings), ops)
    ops.serve(settings.metrics_port, settings.metrics_host)
    log.info("worker ready", extra={"fields": {"queue": settings.queue_url, "outbox": settings.outbox}})
    handled, received, idle_since, outage = 0, 0, time.monotonic(), Backoff()
    in_flight = runner.messages()
    heartbeat = Heartbeat(sqs, settings.queue_url, settings.visibility_s, settings.sqs_heartbeat_s())

    def settle(done) -> None:
        nonlocal handled
        for message, _ in done:
            heartbeat.let_go(message)
        settle_messages(sqs, settings, processor, done, stopping=stop.set)
        handled += len(done)

    def taking() -> bool:
        return (not stop.set and not processor.engine_failure and in_flight.window.runner.failure is None
                and (max_messages is None or received < max_messages))

    try:
        with heartbeat:
            try:
                while taking():
                    ops.heartbeat()
                    settle(in_flight.take())
                    room = in_flight.room()
                    if room <= 0:
                        settle(in_flight.take(wait_s=0.5))  # the engine has enough: wait for one to be done
                        continue
                    want = min(settings.batch_size, room, max_messages - received if max_messages else 10)
                    try:
                        state["waiting"] = True
                        messages = call(
                            "receive_message", sqs.receive_message, QueueUrl=settings.queue_url,
                            MaxNumberOfMessages=want,
                            # items in flight: a short wait, so that their messages are settled soon after
                            WaitTimeSeconds=min(1, settings.wait_s) if len(in_flight) else settings.wait_s,
                            VisibilityTimeout=settings.visibility_s, AttributeNames=["ApproximateReceiveCount"],
                        ).get("Messages", [])
                        outage.reset()
                    except _Interrupted:
                        break
                    except Exception as exc:  # noqa: BLE001 - an outage of any length: wait and try again
                        state["waiting"] = False
                        log.warning("cannot receive from the queue (%s); retrying in %.0f s", describe(exc),
                                    outage.peek())
                        stop.sleep(outage.next())
                        continue
                    finally:
                        state["waiting"] = False
                    if not messages:
                        if not len(in_flight) and idle_exit_s is not None and \
                                time.monotonic() - idle_since > idle_exit_s:
                            break
                        continue
                    for message in messages:
                        received += 1
                        heartbeat.hold(message)
                        refs, skipped = parse_sqs_body(message.get("Body", ""))
                        in_flight.add(message, runner.sources(Message(message["MessageId"], refs, skipped)))
                    idle_since = time.monotonic()
            finally:
                settle(in_flight.close())  # the items in hand are finished, their messages settled
    finally:
        processor.close()
    return how_it_ended(processor, ops, messages=handled)


def _raise_if_waiting(state: dict) -> None:
    if state["waiting"]:
        raise _Interrupted()


def retry_delay_s(settings, outcome, receives: int) -> int:
    """When a message whose items must be retried comes back (pure). A busy claim: once its lease could have
    run out (plus a margin), never on a short fixed pause that would spend the message's receives; the engine
    failed here: at once, for another worker; other transient trouble: backing off with each receive."""
    if outcome.retry_after_s is not None:
        delay = outcome.retry_after_s + CLAIM_MARGIN_S
    else:
        delay = min(settings.visibility_s, 10 * 2 ** max(0, receives - 1))
    return int(min(SQS_MAX_VISIBILITY_S, max(0, delay)))


def settle_messages(sqs, settings, processor, done: list, *, stopping: bool = False) -> None:
    """Every object of these messages has its result: delete them (DeleteMessageBatch, ten at a time: messages
    are often done together, the engine runs several at once), or defer each for the retry its outcome asks (at
    once, for another worker, when this one is stopping or its engine failed)."""
    finished = [message for message, outcome in done if not outcome.retry]
    for start in range(0, len(finished), 10):
        chunk = finished[start:start + 10]
        try:
            answer = call("delete_message_batch", sqs.delete_message_batch, QueueUrl=settings.queue_url,
                          Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)])
            for failed in answer.get("Failed", []):
                log.warning("could not delete a message: %s", failed.get("Message") or failed.get("Code"))
        except Exception as exc:  # noqa: BLE001 - they come back after their visibility; settled items are skipped
            log.warning("could not delete %d message(s): %s", len(chunk), describe(exc))
    for message, outcome in done:
        if not outcome.retry:
            continue
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        delay = 0 if processor.engine_failure or stopping else retry_delay_s(settings, outcome, receives)
        try:
            call("change_message_visibility", sqs.change_message_visibility, QueueUrl=settings.queue_url,
                 ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=delay)
        except Exception as exc:  # noqa: BLE001 - the message comes back after its visibility anyway
            log.warning("could not defer a message: %s", describe(exc))
