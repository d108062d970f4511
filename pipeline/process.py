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
from pipeline.upscale import upscale_frame

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


@dataclass(frozen=True)
class Options:
    limits: Limits
    policy: str
    cap_side: int
    tile: int
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
            policy=s.policy, cap_side=s.cap_side, tile=s.tile, out_format=s.format,
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
        self.current_key: str | None = None  # the claim in hand, for heartbeats from another thread
        self._lock = threading.Lock()
        if recover:
            self.recover()

    def heartbeat(self) -> None:
        """Push the lease of the item in hand forward (called from a heartbeat thread on long items)."""
        key = self.current_key
        if key is not None:
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
        with self._lock:
            try:
                return self._process(src)
            finally:
                self.current_key = None

    def _process(self, src: InputObject) -> Result:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        fingerprint = sha = key = None
        try:
            fingerprint = src.fingerprint()
            if fingerprint is not None:
                settled = self.ledger.settled(src.id, fingerprint)
                if settled is not None:
                    if settled != "failed":
                        src.dispose(self.opt.disposition)  # a crash may have come between the ledger and this
                    return Result(src, "skipped", detail=f"already {settled}")
            data, fingerprint = src.read(self.opt.limits.max_bytes)
            check_size(len(data), self.opt.limits)
            sha = hashlib.sha256(data).hexdigest()
            timings["read"] = time.perf_counter() - t0

            header = codec.read_header(data)
            check_dimensions(header.width, header.height, header.frames, self.opt.limits)
            fmt, ext = codec.output_format(header.format, None if self.opt.out_format == "keep" else self.opt.out_format)
            rel_out = output_rel(src.rel, ext)
            out_url = self.outbox.url(rel_out)
            scope = self.policy if self.opt.dedup else f"{self.policy}:{src.id}"
            key = dedup_key(sha, self.spec.name, self.spec.scale, scope)

            outcome, row = self.ledger.claim(key, source=src.id, output=out_url)
            if outcome is ClaimOutcome.BUSY:
                key = None  # not ours to release
                raise TransientError(f"another worker ({row.owner}) is processing the same content", stage="dedup")
            if outcome is ClaimOutcome.DUPLICATE and not self.outbox.exists(row.output):
                self.ledger.reopen(key)  # the first output was removed since: do the work again
                outcome, row = self.ledger.claim(key, source=src.id, output=out_url)
            if outcome is ClaimOutcome.DUPLICATE:
                return self._duplicate(src, row.output, rel_out, out_url, key, sha, fingerprint)
            if outcome is ClaimOutcome.RESUME_PUBLISH:
                if self.outbox.finish_staged(row.temp, row.output):
                    self.ledger.mark_done(key, source=src.id, fingerprint=fingerprint, sha256=sha, output=row.output)
                    src.dispose(self.opt.disposition)
                    return Result(src, "done", row.output, "finished an interrupted publish", sha256=sha)
                self.ledger.release_any(key)  # nothing to finish: upscale again
                outcome, row = self.ledger.claim(key, source=src.id, output=out_url)
                if outcome is not ClaimOutcome.NEW:
                    raise TransientError("the item changed hands while resuming", stage="dedup")

            self.current_key = key
            log.info("upscaling", extra={"fields": {"source": src.id, "sha256": sha, "width": header.width,
                                                    "height": header.height, "frames": header.frames}})
            try:
                encoded, pixels = self._upscale(data, header, fmt, timings)
                t = time.perf_counter()
                staged = self.outbox.stage(encoded, sha[:32])
                self.ledger.mark_publishing(key, staged.token)
                out_url = self.outbox.commit(staged, rel_out, content_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
                                             metadata=src.metadata(sha, self.spec.name))
                self.ledger.mark_done(key, source=src.id, fingerprint=fingerprint, sha256=sha, output=out_url)
                timings["publish"] = time.perf_counter() - t
            except BaseException:
                self.ledger.release(key)  # only a `claimed` row; a `publishing` one is finished by recovery
                raise
            src.dispose(self.opt.disposition)
            return Result(src, "done", out_url, seconds=timings, output_pixels=pixels, sha256=sha)
        except InputRejected as exc:
            return self._fail(src, exc, sha, fingerprint, key, timings)
        except TransientError as exc:
            log.warning("will retry %r: %s", src.rel, exc.message)
            return Result(src, "retry", detail=exc.message, sha256=sha)
        except Exception as exc:  # a bug must cost one item, not the process; the input is set aside with the reason
            log.exception("unexpected error on %r", src.rel)
            error = InputRejected(f"internal error: {type(exc).__name__}: {exc}", stage="internal", code="internal_error")
            return self._fail(src, error, sha, fingerprint, key, timings)

    def _upscale(self, data: bytes, header, fmt: str, timings: dict) -> tuple[bytes, int]:
        t = time.perf_counter()
        image = codec.decode(data, header)
        timings["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            frames = [
                upscale_frame(f, self.engine, policy=self.opt.policy, cap_side=self.opt.cap_side,
                              tile=self.opt.tile, context=self.spec.context_px)
                for f in image.frames
            ]
        except SuperresError:
            raise
        except Exception as exc:  # an engine failure on this input must not stop the process
            raise InputRejected(f"the engine failed on this image: {exc}", stage="upscale", code="engine_failed") from None
        timings["upscale"] = time.perf_counter() - t
        t = time.perf_counter()
        image.frames = frames
        encoded = codec.encode(image, fmt, jpeg_quality=self.opt.jpeg_quality, webp_quality=self.opt.webp_quality)
        timings["encode"] = time.perf_counter() - t
        return encoded, sum(f.shape[0] * f.shape[1] for f in frames)

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
        if key:
            self.ledger.release(key)
        where = self.failed.put_failure(src.rel, record, src, move=self.opt.disposition != "keep")
        self.ledger.record_source(src.id, fingerprint=fingerprint, sha256=sha, key=key,
                                  outcome="failed", output=where, detail=exc.message)
        log.warning("failed %r at %s: %s", src.rel, exc.stage, exc.message)
        return Result(src, "failed", where, f"{exc.stage}: {exc.message}", seconds=timings, sha256=sha)
