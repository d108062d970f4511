"""One object through the pipeline: read -> hash -> dedup -> decode -> resize policy -> upscale -> encode ->
publish -> ledger -> inbox disposition. Any failure ends in the failed place with a JSON reason."""

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import codec
from pipeline.adapters import local_files
from pipeline.adapters.sqlite_ledger import SQLiteLedger, pid_alive
from pipeline.errors import InputRejected, SuperresError, TransientError
from pipeline.ledger import ClaimOutcome, dedup_key
from pipeline.limits import Limits, check_dimensions, check_size
from pipeline.tiling import policy_id
from pipeline.upscale import upscale_frame

log = logging.getLogger("superres.pipeline")


@dataclass(frozen=True)
class Source:
    path: Path  # where the input is now
    rel: Path  # its name relative to the inbox/folder: the output keeps this relative tree
    root: Path | None = None  # symlinks must stay inside this folder


@dataclass
class Result:
    source: Source
    outcome: str  # done | duplicate | failed | skipped | retry
    output: Path | None = None
    detail: str = ""
    seconds: dict = field(default_factory=dict)
    output_pixels: int = 0


@dataclass(frozen=True)
class Options:
    outbox: Path
    failed: Path
    processed: Path | None
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
        processed = s.processed or (s.inbox / "processed" if s.inbox else None)
        return cls(
            outbox=s.outbox, failed=s.failed_dir(), processed=processed,
            limits=Limits(s.max_bytes, s.max_pixels, s.max_side, s.min_side),
            policy=s.policy, cap_side=s.cap_side, tile=s.tile, out_format=s.format,
            jpeg_quality=s.jpeg_quality, webp_quality=s.webp_quality, dedup=s.dedup,
            on_duplicate=s.on_duplicate, disposition=s.disposition,
        )


def output_rel(rel: Path, ext: str) -> Path:
    """Keep the input's name; when the format changes, append the new extension (a.jpg -> a.jpg.png), so
    a.jpg and a.png never land on the same output."""
    if rel.suffix.lower() == ext or (rel.suffix.lower() in (".jpeg", ".jpe") and ext == ".jpg") or (
        rel.suffix.lower() == ".tiff" and ext == ".tif"
    ):
        return rel
    return rel.with_name(rel.name + ext)


class Processor:
    """Holds what lives for the whole process: the engine (loaded once), the ledger, the options."""

    def __init__(self, engine, spec, options: Options, ledger: SQLiteLedger):
        self.engine = engine
        self.spec = spec
        self.opt = options
        self.ledger = ledger
        self.policy = policy_id(options.policy, options.cap_side)
        self.tmp_dir = options.outbox / ".superres" / "tmp"
        self.failed_tmp_dir = options.failed / ".superres" / "tmp"  # temp files live beside their final names' filesystem
        for d in (self.tmp_dir, self.failed_tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.recover()

    # -- the stages -------------------------------------------------------------------------------

    def process(self, src: Source) -> Result:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        fingerprint = sha = key = None
        try:
            try:
                st = src.path.lstat()
                fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                pass
            if fingerprint is not None:
                done_before = self.ledger.settled(str(src.path), fingerprint)
                if done_before is not None:
                    if done_before != "failed":
                        self._dispose(src)  # a crash may have come between the ledger and the disposition
                    return Result(src, "skipped", detail=f"already {done_before}")
            data, st = local_files.read_limited(src.path, self.opt.limits.max_bytes, root=src.root)
            fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
            check_size(len(data), self.opt.limits)
            sha = hashlib.sha256(data).hexdigest()
            timings["read"] = time.perf_counter() - t0

            header = codec.read_header(data)
            check_dimensions(header.width, header.height, header.frames, self.opt.limits)
            ext = codec.output_format(header.format, None if self.opt.out_format == "keep" else self.opt.out_format)[1]
            out_path = self.opt.outbox / output_rel(src.rel, ext)
            key = dedup_key(sha, self.spec.name, self.spec.scale, self.policy if self.opt.dedup else f"{self.policy}:{src.path}")
            outcome, row = self.ledger.claim(key, source=str(src.path), output=str(out_path))
            if outcome is ClaimOutcome.BUSY:
                raise TransientError(f"another worker ({row.owner}) is processing the same content", stage="dedup")
            if outcome is ClaimOutcome.DUPLICATE and Path(row.output) == out_path and out_path.exists():
                # this very input was finished before a crash or restart: settle it, no work
                self.ledger.mark_done(key, source=str(src.path), fingerprint=fingerprint, sha256=sha, output=row.output)
                self._dispose(src)
                return Result(src, "skipped", out_path, "already done")
            if outcome is ClaimOutcome.DUPLICATE:
                first = Path(row.output)
                if not first.exists():
                    self.ledger.reopen(key)  # the first output was removed: do the work again
                    outcome, row = self.ledger.claim(key, source=str(src.path), output=str(out_path))
                else:
                    return self._duplicate(src, first, out_path, key, sha, fingerprint)
            if outcome is ClaimOutcome.RESUME_PUBLISH:
                self._finish_publish(row)
                self.ledger.mark_done(key, source=str(src.path), fingerprint=fingerprint, sha256=sha, output=row.output)
                self._dispose(src)
                return Result(src, "done", Path(row.output), "resumed an interrupted publish")
            try:
                encoded, pixels = self._upscale(data, header, timings)
                t = time.perf_counter()
                temp = self._temp(sha[:32])
                local_files.write_temp(encoded, temp)
                self.ledger.mark_publishing(key, str(temp))
                local_files.commit_temp(temp, out_path)
                self.ledger.mark_done(key, source=str(src.path), fingerprint=fingerprint, sha256=sha, output=str(out_path))
                timings["publish"] = time.perf_counter() - t
            except BaseException:
                self.ledger.release(key)
                raise
            self._dispose(src)
            return Result(src, "done", out_path, seconds=timings, output_pixels=pixels)
        except InputRejected as exc:
            return self._fail(src, exc, sha, fingerprint, key)
        except TransientError as exc:
            log.warning("will retry %r: %s", str(src.rel), exc.message)
            return Result(src, "retry", detail=exc.message)
        except Exception as exc:  # a bug must cost one item, not the process; the input is set aside with the reason
            log.exception("unexpected error on %r", str(src.rel))
            error = InputRejected(f"internal error: {type(exc).__name__}: {exc}", stage="internal", code="internal_error")
            return self._fail(src, error, sha, fingerprint, key)

    def _upscale(self, data: bytes, header, timings: dict) -> tuple[bytes, int]:
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
        fmt = codec.output_format(header.format, None if self.opt.out_format == "keep" else self.opt.out_format)[0]
        encoded = codec.encode(image, fmt, jpeg_quality=self.opt.jpeg_quality, webp_quality=self.opt.webp_quality)
        timings["encode"] = time.perf_counter() - t
        return encoded, sum(f.shape[0] * f.shape[1] for f in frames)

    def _temp(self, tag: str) -> Path:
        # `<tag>.<pid>.tmp`: the pid tells start-up recovery whose leftovers these are
        return self.tmp_dir / f"{tag}.{os.getpid()}.tmp"

    def recover(self) -> None:
        """At start: finish publishes that a killed process left half-way, then drop its temporary files."""
        for row in self.ledger.orphaned_publishes():
            try:
                self._finish_publish(row)
            except TransientError:
                self.ledger.release_any(row.key)  # neither temp nor output: it will be upscaled again
                continue
            self.ledger.mark_item_done(row.key)
            log.info("finished an interrupted publish", extra={"fields": {"output": row.output}})
        for temp in [*self.tmp_dir.iterdir(), *self.failed_tmp_dir.iterdir()]:
            parts = temp.name.split(".")
            pid = parts[-2] if len(parts) >= 3 and parts[-1] == "tmp" else ""
            if pid.isdigit() and not pid_alive(int(pid)):
                temp.unlink(missing_ok=True)

    def _finish_publish(self, row) -> None:
        """After a crash between fsync and rename: the temp file is still there -> rename it; else it was renamed."""
        temp = Path(row.temp) if row.temp else None
        if temp is not None and temp.exists():
            local_files.commit_temp(temp, Path(row.output))
        elif not Path(row.output).exists():
            raise TransientError("an interrupted publish left neither the temporary file nor the output", stage="publish")

    def _duplicate(self, src, first: Path, out_path: Path, key, sha, fingerprint) -> Result:
        output = None
        if first != out_path and self.opt.on_duplicate == "copy":
            local_files.copy_file_atomic(first, out_path, self._temp("duplicate"))
            output = out_path
        self.ledger.record_source(str(src.path), fingerprint=fingerprint, sha256=sha, key=key,
                                  outcome="duplicate", output=str(output or first), detail=f"duplicate of {first}")
        self._dispose(src)
        return Result(src, "duplicate", output or first, detail=f"same content as {first.name}")

    def _fail(self, src: Source, exc: InputRejected, sha, fingerprint, key) -> Result:
        record = {
            "stage": exc.stage, "error": exc.code, "message": exc.message, "sha256": sha,
            "model": self.spec.name, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": str(src.rel), "retryable": False,
        }
        if key:
            self.ledger.release(key)
        failed_path = local_files.unique_path(self.opt.failed / src.rel)  # an earlier failure of that name stays
        local_files.write_failure(record, src.path, failed_path,
                                  move_input=self.opt.disposition != "keep", tmp_dir=self.failed_tmp_dir)
        self.ledger.record_source(str(src.path), fingerprint=fingerprint, sha256=sha, key=key,
                                  outcome="failed", output=str(failed_path), detail=exc.message)
        log.warning("failed %r at %s: %s", str(src.rel), exc.stage, exc.message)
        return Result(src, "failed", failed_path, f"{exc.stage}: {exc.message}")

    def _dispose(self, src: Source) -> None:
        if self.opt.disposition == "keep" or not os.path.lexists(src.path):
            return
        if self.opt.disposition == "delete":
            src.path.unlink()
        else:
            target = local_files.unique_path(self.opt.processed / src.rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src.path, target)
