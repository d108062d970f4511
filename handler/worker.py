"""`superres worker`: long-poll an SQS queue of S3 event messages, a batch at a time.

A message is deleted only after every object in it is published (or recorded as a duplicate or a
permanent failure) and in the ledger. While an item is in work a heartbeat thread keeps the message
invisible and the ledger claim alive. A transient failure leaves the message to come back; a message that
keeps failing goes to the queue's dead-letter queue by its redrive policy. SIGTERM finishes the item in
hand, gives the rest of the batch back to the queue at once, and exits 0."""

import logging
import signal
import threading
import time

from handler.invoked import EventRunner
from handler.ops import Ops
from handler.runtime import loop_guard, open_processor
from pipeline.adapters.s3_objects import S3Objects, s3_client, sqs_client
from pipeline.errors import ConfigError
from pipeline.events import Message, parse_sqs_body
from pipeline.s3keys import is_s3_uri

log = logging.getLogger("superres")


class _Interrupted(Exception):
    """Raised by the signal handler while we only wait on the queue: nothing is in hand, leave at once."""


class Heartbeat:
    """Keeps a message invisible and the ledger claim alive while its item is in work."""

    def __init__(self, sqs, queue_url: str, receipt: str, visibility_s: int, processor):
        self._args = (sqs, queue_url, receipt, visibility_s, processor)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        sqs, queue_url, receipt, visibility_s, processor = self._args
        while not self._stop.wait(max(1.0, visibility_s / 3)):
            try:
                sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=visibility_s)
                processor.heartbeat()
            except Exception:  # a missed beat is survivable; the lease and visibility have slack
                log.warning("heartbeat failed", exc_info=True)


def run_worker(settings, *, max_messages: int | None = None, idle_exit_s: float | None = None) -> int:
    if not settings.queue_url:
        raise ConfigError("worker needs --queue URL (or SUPERRES_QUEUE_URL)")
    if not settings.outbox or not is_s3_uri(settings.outbox):
        raise ConfigError("worker needs an S3 outbox: --outbox s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    processor = open_processor(settings)
    sqs = sqs_client(settings.s3_endpoint_url)
    ops = Ops.for_processor(processor, interval_s=settings.wait_s)  # one long poll per wait_s
    runner = EventRunner(processor, S3Objects(s3_client(settings.s3_endpoint_url)), settings, loop_guard(settings), ops)

    state = {"stop": False, "waiting": False}

    def on_signal(signum, _frame):
        log.info("stopping after the item in hand", extra={"fields": {"signal": signal.Signals(signum).name}})
        state["stop"] = True
        if state["waiting"]:
            raise _Interrupted()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ops.serve(settings.metrics_port)
    log.info("worker ready", extra={"fields": {"queue": settings.queue_url, "outbox": settings.outbox}})
    handled, idle_since = 0, time.monotonic()
    try:
        while not state["stop"] and (max_messages is None or handled < max_messages):
            ops.heartbeat()
            try:
                state["waiting"] = True
                messages = sqs.receive_message(
                    QueueUrl=settings.queue_url, MaxNumberOfMessages=settings.batch_size,
                    WaitTimeSeconds=settings.wait_s, VisibilityTimeout=settings.visibility_s,
                    AttributeNames=["ApproximateReceiveCount"],
                ).get("Messages", [])
            except _Interrupted:
                break
            finally:
                state["waiting"] = False
            if not messages:
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                continue
            for i, message in enumerate(messages):
                if state["stop"]:
                    release(sqs, settings.queue_url, messages[i:])
                    break
                handle(sqs, settings, runner, processor, message)
                handled += 1
            idle_since = time.monotonic()
    finally:
        processor.ledger.close()
    log.info("stopped", extra={"fields": {"messages": handled}})
    return 0


def handle(sqs, settings, runner: EventRunner, processor, message: dict) -> None:
    refs, skipped = parse_sqs_body(message.get("Body", ""))
    with Heartbeat(sqs, settings.queue_url, message["ReceiptHandle"], settings.visibility_s, processor):
        outcome = runner.run(Message(message["MessageId"], refs, skipped))
    if outcome.retry:
        # back on the queue after a short pause that grows with each receive; the redrive policy ends it
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        sqs.change_message_visibility(QueueUrl=settings.queue_url, ReceiptHandle=message["ReceiptHandle"],
                                      VisibilityTimeout=min(settings.visibility_s, 5 * receives))
        return
    sqs.delete_message(QueueUrl=settings.queue_url, ReceiptHandle=message["ReceiptHandle"])


def release(sqs, queue_url: str, messages: list[dict]) -> None:
    """Give messages we will not work on back to the queue now, instead of after their visibility timeout."""
    for message in messages:
        try:
            sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
        except Exception:
            log.warning("could not release a message; it returns after its visibility timeout", exc_info=True)
