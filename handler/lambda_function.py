"""The Lambda entrypoint: `handler.lambda_function.handler` (container image CMD).

Configuration comes from the same `Settings` as the CLI (SUPERRES_OUTBOX=s3://…, SUPERRES_FAILED, SUPERRES_MODEL,
SUPERRES_MODEL_DIR, …). The model is loaded here, at import: once per cold start, not once per event.
The whole batch goes through the stage runner (pipeline/stages.py), several objects in flight, so that the engine
never waits on downloads, decoding, encoding or uploads. For SQS-triggered invocations the return value is the
partial batch response: exactly the messages whose objects hit a transient error are reported, to be retried;
bad inputs are recorded under the failed prefix and not retried. A message is started only while the time left
covers twice the slowest item yet (never under 5 s) plus, at that item's time each, everything in flight and its
own objects; the messages not started are reported for retry unprocessed."""

import logging
import os

from handler.invoked import EventRunner
from handler.logs import setup_logging
from handler.runtime import loop_guard, open_processor
from handler.stop import EXIT_ENGINE_FAILED
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.errors import TransientError
from pipeline.events import parse_lambda_event
from pipeline.settings import load_settings

log = logging.getLogger("superres")

MIN_RESERVE_MS = 5_000  # never start an item with less than this left

_settings = load_settings()
setup_logging(_settings.log_format, _settings.log_level)
_processor = open_processor(_settings, "lambda")  # cold start: a ConfigError here fails the init phase, loudly
_runner = EventRunner(_processor, S3Objects(s3_client(_settings.s3_endpoint_url)), _settings, loop_guard(_settings))
_slowest_ms = 0.0


def handler(event: dict, context) -> dict:
    if _processor.engine_failure:
        # the engine broke in an earlier invocation (whose work was given back): exit before taking any, so
        # Lambda starts a fresh environment; this invocation fails as a whole and is retried
        log.error("exiting: the engine failed (%s)", _processor.engine_failure)
        os._exit(EXIT_ENGINE_FAILED)
    messages = parse_lambda_event(event)
    from_sqs = any(m.message_id for m in messages)
    failures: list[str] = []
    counts = {"done": 0, "duplicate": 0, "failed": 0, "skipped": 0, "retry": 0, "lost-claim": 0}
    outcomes: dict[int, object] = {}
    in_flight = _runner.messages()  # the whole batch through the stage runner, several objects at a time

    def settle(done) -> None:
        global _slowest_ms
        for index, outcome in done:
            outcomes[index] = outcome
            for result in outcome.results:
                counts[result.outcome] += 1
                _slowest_ms = max(_slowest_ms, 1000 * sum(result.seconds.values()))

    try:
        for index, message in enumerate(messages):
            while in_flight.room() <= 0:
                settle(in_flight.take(wait_s=0.5))
            settle(in_flight.take())
            sources = _runner.sources(message)
            remaining = context.get_remaining_time_in_millis() if context is not None else float("inf")
            # what is in flight finishes before the handler returns: time for it and for this message's objects,
            # each counted at the slowest item's whole time (a bound: the stages overlap)
            need = max(MIN_RESERVE_MS, 2 * _slowest_ms) + _slowest_ms * (len(in_flight.window) + len(sources))
            if remaining < need or _processor.engine_failure:
                left = [m.message_id for m in messages[index:] if m.message_id]
                log.warning("time is short: returning the rest for retry", extra={"fields": {
                    "remaining_ms": remaining, "messages": len(left)}})
                failures.extend(left)
                break
            in_flight.add(index, sources)
    finally:
        settle(in_flight.close())
    for index in sorted(outcomes):
        message = messages[index]
        if outcomes[index].retry and message.message_id:
            failures.append(message.message_id)
        elif outcomes[index].retry:
            # a direct S3 or EventBridge invocation has no batch response: raising makes Lambda retry it
            raise TransientError("some objects hit a transient error; the invocation will be retried")
    if from_sqs:
        return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in dict.fromkeys(failures)]}
    return {"results": counts}
