"""`superres serve`: an HTTP API and an upload page on the same pipeline as every other mode.

    POST /upscale                 multipart field `image` (or a raw image body): the result itself (the seed's API)
    POST /v1/jobs                 the same upload: 202 {"id", "status_url", "events_url", "result_url"}
    GET  /v1/jobs/ID              {"status": queued|running|done|failed, "progress": {...}, "reason": ...}
    GET  /v1/jobs/ID/events       Server-Sent Events: status, progress ..., then done or failed
    GET  /v1/jobs/ID/result       the output, with its Content-Type
    GET  /v1/models               the model served and the models present
    GET  /healthz  /metrics       as in watch and worker, on this same port
    GET  /                        the upload page (handler/web/, shipped in the package)

One engine per process, loaded once at start in the background (/healthz answers 503 until it is ready). Every
upload becomes an `Upload` (pipeline/adapters/upload.py) submitted to the one `StageRunner` (pipeline/stages.py)
without blocking: the request's coroutine awaits the item's Future, no thread is held per request, the stage
threads overlap read/decode, the engine and encode/publish, and the tiles of concurrent uploads share engine calls
where the engine batches. Results and the ledger live under --outbox, so the same upload under the same settings
(the job id is a hash of both) is answered from the ledger, after a restart too.

ASGI on uvicorn (one process: a second worker process would load a second engine). SIGTERM: no new connections,
uploads answered 503; the jobs in hand finish (their requests and event streams too), then the process exits 0.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources

from pipeline.adapters.upload import JOB_ID, UPLOAD_PREFIX, ResultStore, Upload, job_id
from pipeline.errors import ConfigError
from pipeline.formats import FORMATS, REQUESTABLE
from pipeline.s3keys import is_s3_uri

log = logging.getLogger("superres")

# around the image part of a multipart body: boundaries, part headers, small fields
MULTIPART_SLACK = 64 * 1024
RETRY_AFTER_S = 2  # a full queue or a passing problem: try again this much later
MAX_VARIANTS = 32  # distinct (format, quality) settings asked for by query parameters, each its own Processor
HASH_IN_THREAD_BYTES = 1 << 20  # larger uploads are hashed off the event loop
_HEX = frozenset("0123456789abcdef")
# the routes as metrics name them (the path's template, so ids do not become series)
ENDPOINTS = ("/", "/static", "/healthz", "/metrics", "/upscale", "/v1/models", "/v1/jobs", "/v1/jobs/{id}",
             "/v1/jobs/{id}/events", "/v1/jobs/{id}/result")
# open without the token: the probe, and the page's own files (they hold no data; every call the page makes
# needs the token, which the page asks for)
OPEN_ENDPOINTS = frozenset({"/healthz", "/", "/static"})
# an upload part's declared type that is no image at all: refused before the pipeline (415)
_NOT_IMAGES = ("text/", "application/json", "application/pdf", "application/zip", "audio/", "video/")
# HTTP status of a failed record's error code (the rest of the refusals are 422)
STATUS_OF_ERROR = {"unsupported_format": 415, "too_many_bytes": 413}


class Problem(Exception):
    """An answer that is not the happy one: a status code and the JSON reason (stage, error, message)."""

    def __init__(self, status: int, stage: str, error: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after
        self.doc = {"stage": stage, "error": error, "message": message}


def endpoint_of(path: str) -> str:
    """The route template of a request path, for metrics and the token check."""
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/jobs/"):
        rest = path[len("/v1/jobs/"):].split("/")
        if len(rest) == 1:
            return "/v1/jobs/{id}"
        if len(rest) == 2 and rest[1] in ("events", "result"):
            return f"/v1/jobs/{{id}}/{rest[1]}"
        return "other"
    return path if path in ENDPOINTS else "other"


def mime_of(url: str) -> str:
    ext = os.path.splitext(url)[1].lower()
    return next((f.mime for f in FORMATS.values() if ext in f.extensions), "application/octet-stream")


# -- per-request output settings ---------------------------------------------------------------------------------

class Variants:
    """The Processor for each output variant asked for (`?format=`, `?quality=`), all on one engine, ledger and
    outbox. The upscale step is the same for every variant (engine, policy, tiles), so the stage runner's engine
    thread runs every item through the base Processor; each item is prepared and finished by its own."""

    def __init__(self, base):
        self.base = base
        self.batch = base.batch
        self._by_key = {self._key(base.opt): base}
        self._of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Upload -> its Processor
        self._lock = threading.Lock()

    @staticmethod
    def _key(opt) -> tuple:
        return opt.out_format, opt.jpeg_quality, opt.webp_quality

    def get(self, out_format: str | None, quality: int | None):
        from pipeline.process import Processor

        opt = self.base.opt
        wanted = replace(opt, out_format=out_format or opt.out_format,
                         jpeg_quality=quality or opt.jpeg_quality, webp_quality=quality or opt.webp_quality)
        key = self._key(wanted)
        with self._lock:
            if key not in self._by_key:
                if len(self._by_key) >= MAX_VARIANTS:
                    raise Problem(503, "request", "too_many_variants",
                                  f"this server keeps at most {MAX_VARIANTS} format/quality settings at once",
                                  retry_after=60)
                b = self.base
                self._by_key[key] = Processor(b.engine, b.spec, wanted, b.ledger, b.outbox, b.failed, recover=False)
            return self._by_key[key]

    def assign(self, upload, processor) -> None:
        self._of[upload] = processor

    # the Processor's three phases, as the stage runner calls them
    def prepare(self, src):
        return self._of.get(src, self.base).prepare(src)

    def run_engine_many(self, jobs, workers: int = 1):
        return self.base.run_engine_many(jobs, workers)

    def encode(self, job, workers: int = 1):
        return self._of.get(job.src, self.base).encode(job, workers)

    def finish_many(self, jobs):
        """Each variant's items published together, the results in the order given."""
        results = [None] * len(jobs)
        groups: dict[int, tuple] = {}
        for i, job in enumerate(jobs):
            processor = self._of.get(job.src, self.base)
            groups.setdefault(id(processor), (processor, []))[1].append(i)
        for processor, indexes in groups.values():
            for i, result in zip(indexes, processor.finish_many([jobs[i] for i in indexes])):
                results[i] = result
        return results

    def __getattr__(self, name):  # anything else the runner asks of "the processor" is the base's
        return getattr(self.base, name)

    def close(self) -> None:
        for processor in self._by_key.values():
            if processor is not self.base:
                processor.close()  # its renewer; the shared ledger is closed once more by the base, harmlessly
        self.base.close()


# -- jobs --------------------------------------------------------------------------------------------------------

@dataclass
class JobState:
    id: str
    status: str = "queued"  # queued | running | done | failed
    tiles_done: int = 0
    tiles_total: int = 0
    created: float = field(default_factory=time.time)
    output: str | None = None  # where the result is (done), or the failure record (failed)
    reason: dict | None = None  # failed: stage, error, message (and retryable)
    from_ledger: bool = False  # done before (an earlier request, or before a restart): no upscale this time
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        """Wake whoever waits on this job's next change (its event streams)."""
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def doc(self, root: str = "") -> dict:
        base = f"{root}/v1/jobs/{self.id}"
        return {
            "id": self.id, "status": self.status,
            "progress": {"tiles_done": self.tiles_done, "tiles_total": self.tiles_total},
            "created": datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="seconds"),
            "content_type": mime_of(self.output) if self.status == "done" and self.output else None,
            "reason": self.reason, "from_ledger": self.from_ledger,
            "status_url": base, "events_url": f"{base}/events", "result_url": f"{base}/result",
        }


class Service:
    """What one serve process holds: the runner (once the engine is loaded), the jobs, the metrics."""

    def __init__(self, settings):
        from prometheus_client import CollectorRegistry

        from handler.ops import HttpMetrics

        self.settings = settings
        self.registry = CollectorRegistry()
        self.http = HttpMetrics(self.registry, pending=lambda: self.runner.pending() if self.runner else 0)
        self.processor = None  # the base Processor, once loaded
        self.variants: Variants | None = None
        self.runner = None
        self.ops = None
        self.store: ResultStore | None = None
        self.models: list[dict] = []
        self.jobs: dict[str, JobState] = {}
        self.ready = False
        self.stopping = False
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bound_port = 0
        self.engine_broken = False  # the engine failed on a valid input: /healthz 503, stop, exit 3
        self.server = None  # the uvicorn Server: asked to exit when loading fails or the engine breaks
        self._loader: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- start and stop ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loader = threading.Thread(target=self._load, name="superres-load", daemon=True)
        self._loader.start()
        self._spawn(self._beat())

    def _load(self) -> None:
        """The engine and everything else that lives for the whole process (a thread: /healthz answers 503
        meanwhile). A set-up problem is one line on stderr and exit 2."""
        from handler.ops import Ops, engine_labels
        from handler.runtime import open_processor
        from pipeline.stages import StageRunner

        try:
            processor = open_processor(self.settings, "serve")
        except ConfigError as exc:
            print(f"superres: error: {exc.message}", file=sys.stderr, flush=True)
            self._give_up(2)
            return
        except BaseException as exc:  # noqa: BLE001 - the process cannot serve: say it and stop
            log.error("could not start: %s: %s", type(exc).__name__, exc)
            self._give_up(1)
            return
        self.processor = processor
        self.variants = Variants(processor)
        self.store = ResultStore(self._s3_objects())
        self.models = self._present_models(processor)
        self.ops = Ops(engine_labels(processor), interval_s=1.0, registry=self.registry)
        self.runner = StageRunner(self.variants, depth=2, queue_max=self.settings.queue_max)
        self.loop.call_soon_threadsafe(self._now_ready)

    def _now_ready(self) -> None:
        self.ready = True
        self._spawn(self._expire_loop())
        log.info("serving", extra={"fields": {
            "url": f"http://{self.settings.host}:{self.bound_port}/", "outbox": self.settings.outbox,
            "model": self.processor.spec.name, "engine": self.processor.engine.name,
            "device": self.processor.engine.device, "queue_max": self.settings.queue_max}})

    def _give_up(self, code: int) -> None:
        self.exit_code = code
        if self.server is not None:
            self.server.should_exit = True

    def _s3_objects(self):
        s = self.settings
        if any(is_s3_uri(p) for p in (s.outbox_folder(), s.failed_location())):
            from pipeline.adapters.s3_objects import S3Objects, s3_client

            return S3Objects(s3_client(s.s3_endpoint_url))
        return None

    def _present_models(self, processor) -> list[dict]:
        from models.catalog import CATALOG
        from models.files import default_model_dir, model_path

        model_dir = self.settings.model_dir or default_model_dir()
        served = processor.spec.name
        return [{"name": spec.name, "scale": spec.scale, "served": spec.name == served}
                for spec in CATALOG.values()
                if spec.name == served or model_path(spec, model_dir).is_file()]

    def begin_stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("stopping: no new uploads; the jobs in hand finish")

    async def stop(self) -> None:
        """After the last connection closed: finish what is queued, then close the runner and the processors."""
        self.stopping = True
        if self._loader is not None:
            await asyncio.to_thread(self._loader.join)
        if self.runner is not None:
            await asyncio.to_thread(self.runner.close)  # the jobs in hand (no request waits on them) finish
        followers = [t for t in self._tasks if t.get_name().startswith("job-")]
        if followers:
            await asyncio.gather(*followers, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self.variants is not None:
            self.variants.close()
        if self.processor is not None and self.processor.engine_failure:
            self.exit_code = 3
        log.info("stopped", extra={"fields": {"jobs": len(self.jobs)}})

    def _spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _beat(self) -> None:
        """The loop's heartbeat for /healthz (a stuck event loop stops beating)."""
        while True:
            if self.ops is not None:
                self.ops.heartbeat()
            await asyncio.sleep(1.0)

    async def _expire_loop(self) -> None:
        ttl = self.settings.result_ttl_s
        every = min(60.0, max(0.5, ttl / 4))
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self._expire, ttl)
            except Exception as exc:  # noqa: BLE001 - tidying up: tried again at the next round
                log.warning("could not remove old results: %s", exc)
            cutoff = time.time() - ttl
            for jid in [j for j, job in self.jobs.items() if job.settled.is_set() and job.created < cutoff]:
                del self.jobs[jid]

    def _expire(self, ttl: float) -> None:
        """Results and failure records older than the TTL are removed (a thread: listing may take a while)."""
        s = self.settings
        removed = 0
        for location in (s.outbox_folder(), s.failed_location()):
            for stored in self.store.results(location):
                if stored.age_s > ttl:
                    self.store.remove(stored.url)
                    removed += 1
        if removed:
            log.info("removed old results", extra={"fields": {"count": removed, "ttl_s": ttl}})

    # -- submitting ----------------------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.stopping:
            raise Problem(503, "serve", "stopping", "the server is stopping", retry_after=RETRY_AFTER_S)
        if not self.ready:
            raise Problem(503, "serve", "starting", "the engine is still loading", retry_after=RETRY_AFTER_S)

    async def submit(self, data: bytes, out_format: str | None, quality: int | None) -> JobState:
        """The job for these bytes under these settings: one already known, or a new one in the runner."""
        processor = self.variants.get(out_format, quality)
        if len(data) > HASH_IN_THREAD_BYTES:
            sha = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        else:
            sha = hashlib.sha256(data).hexdigest()
        jid = job_id(sha, processor.request)
        job = self.jobs.get(jid)
        if job is not None and not (job.status == "failed" and (job.reason or {}).get("retryable")):
            return job  # the same upload again: the same job, upscaled once
        self.check_open()
        upload = Upload(data, jid, sha256=sha)
        self.variants.assign(upload, processor)
        job = JobState(jid)
        loop = asyncio.get_running_loop()

        def on_progress(done: int, total: int) -> None:  # the engine thread or a lane
            loop.call_soon_threadsafe(self._progress, job, done, total)

        from pipeline.stages import Closed, Full

        try:
            future = self.runner.submit(upload, on_progress=on_progress, block=False)
        except Full:
            raise Problem(503, "queue", "queue_full", f"{self.settings.queue_max} uploads are already waiting; "
                          "try again shortly", retry_after=RETRY_AFTER_S) from None
        except Closed:
            raise Problem(503, "serve", "stopping", "the server is stopping", retry_after=RETRY_AFTER_S) from None
        self.jobs[jid] = job
        self._spawn(self._follow(job, future), name=f"job-{jid}")
        return job

    def _progress(self, job: JobState, done: int, total: int) -> None:
        job.status = "running"
        job.tiles_done, job.tiles_total = done, total
        job.touch()

    async def _follow(self, job: JobState, future) -> None:
        """Wait for the item's Result without holding a thread, then settle the job from it."""
        with self.ops.in_flight():
            try:
                result = await asyncio.wrap_future(future)
            except BaseException as exc:  # noqa: BLE001 - the runner broke (a bug): this job fails, the process goes on
                log.error("the pipeline failed on job %s: %s", job.id, exc)
                self._settle(job, "failed", reason={"stage": "internal", "error": "internal_error",
                                                    "message": f"{type(exc).__name__}: {exc}", "retryable": True})
                return
        self.ops.record(result)
        await self._settle_result(job, result)
        if self.processor.engine_failure and not self.engine_broken:
            self.engine_broken = True
            self.ops.engine_failed(self.processor.engine_failure)
            self.begin_stop()
            self._give_up(3)  # give the work back: the orchestrator starts a healthy process

    async def _settle_result(self, job: JobState, result) -> None:
        outcome, detail = result.outcome, result.detail
        if outcome in ("done", "duplicate") or (outcome == "skipped" and detail == "already done"):
            self._settle(job, "done", output=result.output, from_ledger=outcome == "skipped")
        elif outcome == "failed" or (outcome == "skipped" and detail == "already failed"):
            reason = await asyncio.to_thread(self._reason_of, job.id, result.output, detail)
            self._settle(job, "failed", output=result.output, reason=reason, from_ledger=outcome == "skipped")
        else:  # retry, lost-claim: a passing problem; the next request for it starts it again
            wait = max(RETRY_AFTER_S, round(result.retry_after_s or 0))  # a busy claim: once its lease could end
            self._settle(job, "failed", reason={"stage": "pipeline", "error": "transient", "message": detail,
                                                "retryable": True, "retry_after_s": wait})

    def _reason_of(self, jid: str, where: str | None, detail: str) -> dict:
        """The failure record's reason (what the failed place holds for this upload)."""
        record = self.store.record(where) if where else None
        if record is None:  # removed since (its time ran out): what the ledger remembers
            row = self.processor.ledger.source(UPLOAD_PREFIX + jid)
            message = (row.detail if row is not None else None) or detail
            return {"stage": "pipeline", "error": "rejected", "message": message, "retryable": False}
        return {k: record.get(k) for k in ("stage", "error", "message")} | {"retryable": False}

    def _settle(self, job: JobState, status: str, *, output=None, reason=None, from_ledger=False) -> None:
        job.status, job.output, job.reason, job.from_ledger = status, output, reason, from_ledger
        if status == "done" and job.tiles_total == 0:
            job.tiles_done = job.tiles_total = 1  # nothing upscaled here (the ledger had it): complete all the same
        job.settled.set()
        job.touch()

    # -- looking up ----------------------------------------------------------------------------------------------

    async def find(self, jid: str) -> JobState:
        """A job of this process, or one the ledger knows (made before a restart); else 404."""
        if len(jid) != 32 or not set(jid) <= _HEX:
            raise Problem(404, "request", "no_such_job", f"no job {jid!r}")
        job = self.jobs.get(jid)
        if job is not None:
            return job
        if not self.ready:
            raise Problem(503, "serve", "starting", "the engine is still loading", retry_after=RETRY_AFTER_S)
        job = await asyncio.to_thread(self._from_ledger, jid)
        if job is None:
            raise Problem(404, "request", "no_such_job", f"no job {jid}")
        return job

    def _from_ledger(self, jid: str) -> JobState | None:
        row = self.processor.ledger.source(UPLOAD_PREFIX + jid)
        if row is None:
            return None
        job = JobState(jid, from_ledger=True)
        if row.outcome == "failed":
            job.status, job.output = "failed", row.output
            job.reason = self._reason_of(jid, row.output, row.detail or "")
        elif row.output and self.processor.outbox.etag(row.output) is not None:
            job.status, job.output = "done", row.output
            job.tiles_done = job.tiles_total = 1
        else:
            return None  # its result was removed: unknown now (uploading it again makes it again)
        job.settled.set()
        return job


# -- reading an upload as it streams in ---------------------------------------------------------------------------

async def read_upload(request, max_bytes: int) -> bytes:
    """The image of a multipart upload (field `image`) or of a raw image body, refused with 413 as soon as it
    is known to be too big: from Content-Length before anything is read, else while streaming (a running count),
    never after reading it all."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    mime, params = parse_options_header(request.headers.get("content-type", ""))
    mime = mime.decode("latin-1").lower()
    raw = mime.startswith("image/") or mime == "application/octet-stream"
    if mime != "multipart/form-data" and not raw:
        raise Problem(415, "request", "unsupported_media_type",
                      "send the image as multipart/form-data (field `image`) or as the body with an image/* type")
    if raw and mime.startswith(_NOT_IMAGES):
        raise Problem(415, "request", "unsupported_media_type", f"{mime} is not an image type")
    limit = max_bytes if raw else max_bytes + MULTIPART_SLACK
    too_big = Problem(413, "read", "too_many_bytes", f"the upload is larger than the limit of {max_bytes} bytes "
                      "(SUPERRES_MAX_BYTES)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    if raw:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "request", "bad_multipart", "the multipart body has no boundary")
    image = bytearray()
    state = {"field": b"", "value": b"", "headers": {}, "is_image": False, "found": False, "type": ""}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, disposition = parse_options_header(state["headers"].get("content-disposition", b""))
        state["is_image"] = disposition.get(b"name") == b"image" and not state["found"]
        if state["is_image"]:
            state["found"] = True
            state["type"] = parse_options_header(state["headers"].get("content-type", b""))[0].decode("latin-1")

    def on_part_data(data, start, end):
        if state["is_image"]:
            image.extend(data[start:end])
            if len(image) > max_bytes:
                raise too_big

    def on_part_begin():
        state["headers"], state["is_image"] = {}, False

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    from starlette.requests import ClientDisconnect

    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_big
            parser.write(chunk)
        parser.finalize()
    except (Problem, ClientDisconnect):
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors: the client's body is malformed
        raise Problem(400, "request", "bad_multipart", f"the multipart body cannot be read: {exc}") from None
    if not state["found"]:
        raise Problem(400, "request", "no_image", "the upload has no `image` field")
    if state["type"].lower().startswith(_NOT_IMAGES):
        raise Problem(415, "request", "unsupported_media_type", f"{state['type']} is not an image type")
    return bytes(image)


def output_settings(query) -> tuple[str | None, int | None]:
    """`?format=` and `?quality=`, checked as the CLI checks --format and --quality."""
    out_format = query.get("format")
    if out_format is not None:
        out_format = out_format.strip().lower()
        if out_format != "keep" and out_format not in REQUESTABLE:
            raise Problem(400, "request", "bad_format", f"format {out_format!r}: use keep, "
                          f"{', '.join(sorted(REQUESTABLE))}")
        out_format = {"jpg": "jpeg", "tif": "tiff"}.get(out_format, out_format)
    quality = query.get("quality")
    if quality is not None:
        if not quality.isdigit() or not 1 <= int(quality) <= 100:
            raise Problem(400, "request", "bad_quality", f"quality {quality!r}: a whole number from 1 to 100")
        quality = int(quality)
    return out_format, quality


# -- the app -------------------------------------------------------------------------------------------------------

def problem_response(problem: Problem):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(problem.retry_after)} if problem.retry_after is not None else None
    return JSONResponse(problem.doc, status_code=problem.status, headers=headers)


def failed_response(job: JobState):
    reason = dict(job.reason or {})
    if reason.get("retryable"):
        return problem_response(Problem(503, reason.get("stage") or "pipeline", reason.get("error") or "transient",
                                        reason.get("message") or "try again",
                                        retry_after=reason.get("retry_after_s") or RETRY_AFTER_S))
    status = STATUS_OF_ERROR.get(reason.get("error"), 422)
    from starlette.responses import JSONResponse

    return JSONResponse({k: reason.get(k) for k in ("stage", "error", "message")} | {"job": job.id},
                        status_code=status)


def build_app(service: Service):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    web = resources.files("handler") / "web"
    settings = service.settings

    async def index(request):
        return FileResponse(str(web / "index.html"), media_type="text/html")

    async def healthz(request):
        if not service.ready:  # ready is set on the loop after everything is built: uploads are taken from then on
            return JSONResponse({"status": "stopping" if service.stopping else "starting"}, status_code=503)
        code, doc = service.ops.health()
        if service.stopping and code == 200:
            code, doc = 503, {**doc, "status": "stopping"}  # a load balancer takes it out while it drains
        return JSONResponse(doc, status_code=code)

    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request):
        service.check_open()
        p = service.processor
        return JSONResponse({"model": p.spec.name, "scale": p.spec.scale, "engine": p.engine.name,
                             "device": p.engine.device, "models": service.models})

    async def take_upload(request) -> JobState:
        service.check_open()
        out_format, quality = output_settings(request.query_params)
        data = await read_upload(request, settings.max_bytes)
        return await service.submit(data, out_format, quality)

    async def upscale(request):
        job = await take_upload(request)
        await job.settled.wait()
        return await result_of(job)

    async def create_job(request):
        job = await take_upload(request)
        doc = job.doc(request.scope.get("root_path", ""))
        return JSONResponse(doc, status_code=202, headers={"Location": doc["status_url"]})

    async def job_status(request):
        job = await service.find(request.path_params["id"])
        return JSONResponse(job.doc(request.scope.get("root_path", "")))

    async def job_events(request):
        job = await service.find(request.path_params["id"])
        root = request.scope.get("root_path", "")

        async def stream():
            kind, last = "status", None
            while True:
                doc = job.doc(root)
                if doc != last:
                    final = job.status if job.status in ("done", "failed") else None
                    yield f"event: {final or kind}\ndata: {json.dumps(doc)}\n\n"
                    if final:
                        return
                    last, kind = doc, "progress"
                changed = job.changed
                try:
                    await asyncio.wait_for(changed.wait(), 15)
                except TimeoutError:
                    yield ": still working\n\n"  # keeps proxies from closing an idle stream

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def job_result(request):
        job = await service.find(request.path_params["id"])
        if job.status in ("queued", "running"):
            return JSONResponse(job.doc(request.scope.get("root_path", "")), status_code=409)
        return await result_of(job)

    async def result_of(job: JobState):
        if job.status == "failed":
            return failed_response(job)
        # named by the job, never by the upload: `curl -OJ` saves ID.ext
        named = {"Content-Disposition": f'inline; filename="{job.id}{os.path.splitext(job.output)[1]}"'}
        if not is_s3_uri(job.output):
            if os.path.isfile(job.output):
                return FileResponse(job.output, media_type=mime_of(job.output), headers=named)
        else:
            data = await asyncio.to_thread(service.store.read, job.output)
            if data is not None:
                return Response(data, media_type=mime_of(job.output), headers=named)
        service.jobs.pop(job.id, None)
        raise Problem(404, "result", "expired", f"the result of job {job.id} was removed (its time ran out); "
                      "upload the image again")

    async def on_problem(request, exc: Problem):
        return problem_response(exc)

    async def on_http(request, exc: HTTPException):
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"stage": "request", "error": error, "message": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_gone(request, exc):
        log.debug("the client left before its upload was read: %s %s", request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it; counted in the metrics as 400

    async def on_error(request, exc: Exception):
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"stage": "internal", "error": "internal_error",
                             "message": f"{type(exc).__name__}: {exc}"}, status_code=500)

    routes = [
        Route("/", index), Route("/healthz", healthz), Route("/metrics", metrics),
        Route("/upscale", upscale, methods=["POST"]), Route("/v1/models", models),
        Route("/v1/jobs", create_job, methods=["POST"]), Route("/v1/jobs/{id}", job_status),
        Route("/v1/jobs/{id}/events", job_events), Route("/v1/jobs/{id}/result", job_result),
        Mount("/static", StaticFiles(directory=str(web)), name="static"),
    ]
    middleware = [Middleware(Guard, service=service)]
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # outermost: a preflight is answered before the token is asked for
        from starlette.middleware.cors import CORSMiddleware

        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"],
                                        expose_headers=["Location", "Retry-After"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={Problem: on_problem, HTTPException: on_http, ClientDisconnect: on_gone,
                                         Exception: on_error})


class Guard:
    """ASGI middleware around every request: the bearer token (when set) and the request metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        token = service.settings.api_token
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope["path"])
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.token is not None and endpoint not in OPEN_ENDPOINTS and not self._authorized(scope):
                body = json.dumps({"stage": "request", "error": "unauthorized",
                                   "message": "send Authorization: Bearer TOKEN (SUPERRES_API_TOKEN)"}).encode()
                await send_and_note({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="superres"')]})
                await send_and_note({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_and_note)
        finally:
            self.service.http.observe(endpoint, status["code"], time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                kind, _, given = value.partition(b" ")
                return kind.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False


# -- running it ----------------------------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; give --port another port "
                          "(or SUPERRES_PORT)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(settings) -> int:
    """Serve until SIGTERM/SIGINT: 0 after a clean stop, 2 for a set-up problem, 3 when the engine failed."""
    import uvicorn

    if settings.outbox is None:
        raise ConfigError("serve needs --outbox DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX): results and the "
                          "ledger live there")
    if settings.api_token is not None and not settings.api_token.strip():
        raise ConfigError("SUPERRES_API_TOKEN is set but empty: give a token, or unset it")
    sock = _bind(settings.host, settings.port)
    service = Service(settings)
    service.bound_port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(service), lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=None, server_header=False, loop="asyncio", http="h11")
    server = _uvicorn_server(config, service)
    service.server = server
    server.run(sockets=[sock])
    return service.exit_code


def _uvicorn_server(config, service):
    """uvicorn's Server, but a stop signal also tells the service to take no more uploads, and the signal is not
    raised again after the clean stop (exit 0, as watch and worker)."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.begin_stop()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server(config)
