"""One object through the pipeline: read -> hash -> dedup -> decode -> resize policy -> upscale -> encode ->
publish -> ledger -> inbox disposition. Any failure ends in the failed place with a JSON reason.

The Processor sees inputs, places and the ledger only through small interfaces (a local file or an S3
object; a local folder or an S3 prefix; SQLite or S3), so every mode runs exactly this code."""

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Protocol

from pipeline import codec
from pipeline.errors import InputRejected, SuperresError, TransientError
from pipeline.ledger import ClaimOutcome, Ledger, dedup_key
from pipeline.limits import Limits, check_dimensions, check_size
from pipeline.tiling import policy_id
from pipeline.upscale import upscale_frames

log = logging.getLogger("superres.pipeline")

CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".tif": "image/tiff",
                 ".bmp": "image/bmp", ".gif": "image/gif"}


class InputObject(Protocol):
    id: str  # the ledger's name for it: a path or s3://bucket/key
    rel: str  # its name relative to the folder/prefix it came from; the output keeps it

    def fingerprint(self) -> str | None: ...  # cheap identity as it is now, without reading it
    def read(self, max_bytes: int) -> tuple[bytes, str]: ...  # data and the fingerprint it was read at
    def metadata(self, sha256: str, model: str) -> dict[str, str]: ...  # carried on the output (S3)
    def dispose(self, disposition: str) -> None: ...  # keep | move | delete, once settled


class Place(Protocol):
    def url(self, rel: str) -> str: ...
    def name(self, url: str) -> str: ...
    def exists(self, url: str) -> bool: ...
    def stage(self, data: bytes, tag: str): ...
    def commit(self, staged, rel: str, *, content_type: str, metadata: dict[str, str]) -> str: ...
    def finish_staged(self, token: str | None, url: str) -> bool: ...
    def copy(self, from_url: str, rel: str) -> str: ...
    def put_failure(self, rel: str, record: dict, src, *, move: bool) -> str: ...


@dataclass
class Result:
    source: InputObject
    outcome: str  # done | duplicate | failed | skipped | retry
    output: str | None = None
    detail: str = ""
    seconds: dict = field(default_factory=dict)
    output_pixels: int = 0
    sha256: str | None = None

    @property
    def retryable(self) -> bool:
        return self.outcome == "retry"


@dataclass
class Job:
    """One item between the phases: what `prepare` learned, what the engine made."""

    src: InputObject
    fingerprint: str | None = None
    sha: str | None = None
    key: str | None = None
    claimed: bool = False  # we hold the ledger claim on `key`
    fmt: str = ""
    content_type: str = ""
    rel_out: str = ""
    out_url: str = ""
    image: codec.DecodedImage | None = None
    frames: list | None = None
    error: BaseException | None = None
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    limits: Limits
    policy: str
    cap_side: int
    tile: int  # 0: the engine's choice
    tile_batch: int  # 0: the engine's choice
    out_format: str
    jpeg_quality: int
    webp_quality: int
    dedup: bool
    on_duplicate: str
    disposition: str  # keep | move | delete

    @classmethod
    def from_settings(cls, s) -> "Options":
        return cls(
            limits=Limits(s.max_bytes, s.max_pixels, s.max_side, s.min_side),
            policy=s.policy, cap_side=s.cap_side, tile=s.tile, tile_batch=s.tile_batch, out_format=s.format,
            jpeg_quality=s.jpeg_quality, webp_quality=s.webp_quality, dedup=s.dedup,
            on_duplicate=s.on_duplicate, disposition=s.disposition,
        )


def output_rel(rel: str, ext: str) -> str:
    """Keep the input's name; when the format changes, append the new extension (a.jpg -> a.jpg.png), so
    a.jpg and a.png never land on the same output."""
    suffix = PurePosixPath(rel).suffix.lower()
    same = suffix == ext or (suffix in (".jpeg", ".jpe") and ext == ".jpg") or (suffix == ".tiff" and ext == ".tif")
    return rel if same else rel + ext


class Processor:
    """Holds what lives for the whole process: the engine (loaded once), the ledger, the places."""

    def __init__(self, engine, spec, options: Options, ledger: Ledger, outbox: Place, failed: Place, *,
                 recover: bool = True):
        self.engine = engine
        self.spec = spec
        self.opt = options
        self.ledger = ledger
        self.outbox = outbox
        self.failed = failed
        self.policy = policy_id(options.policy, options.cap_side)
        self.batch = options.tile_batch or engine.default_batch()
        self.tile = options.tile or engine.default_tile(self.batch)
        # keys claimed by this process and not yet settled: heartbeats renew them, and a second item with the
        # same content waits for the first instead of claiming it again (our own claim would let it through)
        self._inflight: set[str] = set()
        self._inflight_changed = threading.Condition()
        if recover:
            self.recover()

    def heartbeat(self) -> None:
        """Push the leases of the items in hand forward (called from a heartbeat thread on long items)."""
        for key in list(self._inflight):
            self.ledger.renew(key)

    def recover(self) -> None:
        """At start: finish publishes that a killed process left half-way; drop what can't be finished."""
        for row in self.ledger.orphaned_publishes():
            if self.outbox.finish_staged(row.temp, row.output):
                self.ledger.mark_item_done(row.key)
                log.info("finished an interrupted publish", extra={"fields": {"output": row.output}})
            else:
                self.ledger.release_any(row.key)  # neither staged data nor output: it will be upscaled again

    def process(self, src: InputObject) -> Result:
        """All stages, one after the other. `pipeline.overlap` runs the same three phases on three threads."""
        job = self.prepare(src)
        return job if isinstance(job, Result) else self.finish(self.run_engine(job))

    # -- phase 1: read, hash, dedup claim, decode ---------------------------------------------------------------

    def prepare(self, src: InputObject) -> "Job | Result":
        job = Job(src)
        t0 = time.perf_counter()
        try:
            job.fingerprint = src.fingerprint()
            if job.fingerprint is not None:
                settled = self.ledger.settled(src.id, job.fingerprint)
                if settled is not None:
                    if settled != "failed":
                        src.dispose(self.opt.disposition)  # a crash may have come between the ledger and this
                    return Result(src, "skipped", detail=f"already {settled}")
            data, job.fingerprint = src.read(self.opt.limits.max_bytes)
            check_size(len(data), self.opt.limits)
            job.sha = hashlib.sha256(data).hexdigest()
            job.timings["read"] = time.perf_counter() - t0

            header = codec.read_header(data)
            check_dimensions(header.width, header.height, header.frames, self.opt.limits)
            job.fmt, ext = codec.output_format(header.format, None if self.opt.out_format == "keep" else self.opt.out_format)
            job.content_type = CONTENT_TYPES.get(ext, "application/octet-stream")
            job.rel_out = output_rel(src.rel, ext)
            job.out_url = self.outbox.url(job.rel_out)
            scope = self.policy if self.opt.dedup else f"{self.policy}:{src.id}"
            key = dedup_key(job.sha, self.spec.name, self.spec.scale, scope)
            self._hold(key)
            job.key = key
            done = self._claim(job)
            if done is not None:
                self._let_go(job)
                return done
            log.info("upscaling", extra={"fields": {"source": src.id, "sha256": job.sha, "width": header.width,
                                                    "height": header.height, "frames": header.frames}})
            t = time.perf_counter()
            job.image = codec.decode(data, header)
            job.timings["decode"] = time.perf_counter() - t
            return job
        except BaseException as exc:
            return self._settle_error(job, exc)

    def _claim(self, job: "Job") -> Result | None:
        """Claim the key; None means "ours: upscale it", else the item is already settled by this call."""
        src, key = job.src, job.key
        outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
        if outcome is ClaimOutcome.BUSY:
            job.claimed = False
            raise TransientError(f"another worker ({row.owner}) is processing the same content", stage="dedup")
        if outcome is ClaimOutcome.DUPLICATE and not self.outbox.exists(row.output):
            self.ledger.reopen(key)  # the first output was removed since: do the work again
            outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
        if outcome is ClaimOutcome.DUPLICATE:
            return self._duplicate(src, row.output, job.rel_out, job.out_url, key, job.sha, job.fingerprint)
        if outcome is ClaimOutcome.RESUME_PUBLISH:
            if self.outbox.finish_staged(row.temp, row.output):
                self.ledger.mark_done(key, source=src.id, fingerprint=job.fingerprint, sha256=job.sha, output=row.output)
                src.dispose(self.opt.disposition)
                return Result(src, "done", row.output, "finished an interrupted publish", sha256=job.sha)
            self.ledger.release_any(key)  # nothing to finish: upscale again
            outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
            if outcome is not ClaimOutcome.NEW:
                raise TransientError("the item changed hands while resuming", stage="dedup")
        job.claimed = True
        return None

    # -- phase 2: the engine --------------------------------------------------------------------------------------

    def run_engine(self, job: "Job") -> "Job":
        return self.run_engine_many([job])[0]

    def run_engine_many(self, jobs: list["Job"]) -> list["Job"]:
        """The tiles of several images share engine calls (a GPU wants many per call). If anything fails, the
        jobs are run again one by one, so one bad image costs only itself."""
        t = time.perf_counter()
        frames = [f for job in jobs for f in job.image.frames]
        try:
            ups = iter(upscale_frames(frames, self.engine, policy=self.opt.policy, cap_side=self.opt.cap_side,
                                      tile=self.tile, context=self.spec.context_px, batch=self.batch))
            for job in jobs:
                job.frames = [next(ups) for _ in job.image.frames]
                job.timings["upscale"] = (time.perf_counter() - t) / len(jobs)  # shared calls: an even share each
            return jobs
        except SuperresError as exc:
            if len(jobs) > 1:
                return [self.run_engine(job) for job in jobs]
            jobs[0].error = exc
        except Exception as exc:  # an engine failure on this input must not stop the process
            if len(jobs) > 1:
                return [self.run_engine(job) for job in jobs]
            jobs[0].error = InputRejected(f"the engine failed on this image: {exc}", stage="upscale",
                                          code="engine_failed")
        except BaseException as exc:
            for job in jobs:
                job.error = exc
        jobs[0].timings["upscale"] = time.perf_counter() - t
        return jobs

    # -- phase 3: encode, publish, ledger, disposition -------------------------------------------------------------

    def finish(self, job: "Job") -> Result:
        src = job.src
        try:
            if job.error is not None:
                raise job.error
            t = time.perf_counter()
            job.image.frames = job.frames
            encoded = codec.encode(job.image, job.fmt, jpeg_quality=self.opt.jpeg_quality, webp_quality=self.opt.webp_quality)
            job.timings["encode"] = time.perf_counter() - t
            t = time.perf_counter()
            staged = self.outbox.stage(encoded, job.sha[:32])
            self.ledger.mark_publishing(job.key, staged.token)
            out_url = self.outbox.commit(staged, job.rel_out, content_type=job.content_type,
                                         metadata=src.metadata(job.sha, self.spec.name))
            self.ledger.mark_done(job.key, source=src.id, fingerprint=job.fingerprint, sha256=job.sha, output=out_url)
            job.claimed = False
            job.timings["publish"] = time.perf_counter() - t
            pixels = sum(f.shape[0] * f.shape[1] for f in job.frames)
            self._let_go(job)
            src.dispose(self.opt.disposition)
            return Result(src, "done", out_url, seconds=job.timings, output_pixels=pixels, sha256=job.sha)
        except BaseException as exc:
            return self._settle_error(job, exc)

    # -- the rest ---------------------------------------------------------------------------------------------

    def _hold(self, key: str) -> None:
        with self._inflight_changed:
            while key in self._inflight:
                self._inflight_changed.wait()
            self._inflight.add(key)

    def _let_go(self, job: "Job") -> None:
        if job.key is None:
            return
        with self._inflight_changed:
            self._inflight.discard(job.key)
            self._inflight_changed.notify_all()

    def _settle_error(self, job: "Job", exc: BaseException) -> Result:
        """Any error ends the job: release our claim (a `publishing` row is left to recovery), then record it."""
        if job.claimed:
            self.ledger.release(job.key)
            job.claimed = False
        self._let_go(job)
        src = job.src
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: the claim is released, the process goes
        if not isinstance(exc, SuperresError):
            # a bug must cost one item, not the process; the input is set aside with the reason
            log.error("unexpected error on %r", src.rel, exc_info=exc)
            exc = InputRejected(f"internal error: {type(exc).__name__}: {exc}", stage="internal", code="internal_error")
        if isinstance(exc, InputRejected):
            try:
                return self._fail(src, exc, job.sha, job.fingerprint, job.key, job.timings)
            except TransientError as failed_too:  # the failed place itself is unreachable: try the item again later
                exc = failed_too
        log.warning("will retry %r: %s", src.rel, exc.message)
        return Result(src, "retry", detail=exc.message, seconds=job.timings, sha256=job.sha)

    def _duplicate(self, src, first: str, rel_out: str, out_url: str, key, sha, fingerprint) -> Result:
        if first == out_url:  # this very input, finished before a crash or restart: settle it, no work
            self.ledger.mark_done(key, source=src.id, fingerprint=fingerprint, sha256=sha, output=first)
            src.dispose(self.opt.disposition)
            return Result(src, "skipped", first, "already done", sha256=sha)
        output = first
        if self.opt.on_duplicate == "copy":
            output = self.outbox.copy(first, rel_out)
        self.ledger.record_source(src.id, fingerprint=fingerprint, sha256=sha, key=key,
                                  outcome="duplicate", output=output, detail=f"duplicate of {first}")
        src.dispose(self.opt.disposition)
        return Result(src, "duplicate", output, detail=f"same content as {self.outbox.name(first)}", sha256=sha)

    def _fail(self, src, exc: InputRejected, sha, fingerprint, key, timings: dict) -> Result:
        record = {
            "stage": exc.stage, "error": exc.code, "message": exc.message, "sha256": sha,
            "model": self.spec.name, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": src.id, "retryable": False,
        }
        where = self.failed.put_failure(src.rel, record, src, move=self.opt.disposition != "keep")
        self.ledger.record_source(src.id, fingerprint=fingerprint, sha256=sha, key=key,
                                  outcome="failed", output=where, detail=exc.message)
        log.warning("failed %r at %s: %s", src.rel, exc.stage, exc.message)
        return Result(src, "failed", where, f"{exc.stage}: {exc.message}", seconds=timings, sha256=sha)
