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
from typing import NamedTuple, Protocol

from pipeline import codec
from pipeline.errors import ConfigError, EngineFailure, InputRejected, SuperresError, TransientError
from pipeline.ledger import (ClaimBusy, ClaimLost, ClaimOutcome, Done, Ledger, Publishing, SourceRow, dedup_key,
                             output_intact, output_variant, request_id)
from pipeline.limits import Limits
from pipeline.transform import Plan, Transform, TransformOptions

log = logging.getLogger("superres.pipeline")
WRITE_GROUP = 8  # at most, below the long-running modes' items in flight (stages.in_flight_for)
# items published side by side where each write is its own requests (S3): an item's publish is ~5 requests (mark
# publishing, PUT, HEAD, mark done, its source's record) whose latency, not the CPU, is its cost; one at a time,
# the writer kept a fast engine waiting (docs/design.md, docs/benchmarks.md)
REMOTE_PUBLISHERS = 4

# exceptions of the network libraries that escaped an adapter: a later try may work, the input is not at fault
_NETWORK_MODULES = ("botocore", "boto3", "s3transfer", "urllib3", "http.client", "ssl", "socket")


class InputObject(Protocol):
    id: str  # the ledger's name for it: an absolute path or s3://bucket/key
    rel: str  # its name relative to the folder/prefix it came from; the output keeps it

    def fingerprint(self) -> str | None: ...  # cheap identity as it is now, without reading it
    def read(self, max_bytes: int) -> tuple[bytes, str]: ...  # data and the fingerprint it was read at
    def metadata(self, sha256: str, model: str) -> dict[str, str]: ...  # carried on the output (S3)
    def dispose(self, disposition: str) -> None: ...  # keep | move | delete: only the very bytes read


class Commit(NamedTuple):
    """One staged output to publish under `rel` (Place.commit_many)."""

    staged: object
    rel: str
    content_type: str
    metadata: dict


class Place(Protocol):
    shares_commits: bool  # several commits cost about one (one folder fsync): the writer publishes in groups
    def url(self, rel: str) -> str: ...  # refuses names the place cannot hold (InputRejected)
    def name(self, url: str) -> str: ...
    def etag(self, url: str) -> str | None: ...  # the identity of what is there now; None: nothing
    def stage(self, data: bytes, tag: str): ...
    def sync_staged(self, staged: list) -> list[Exception | None]: ...  # durable (local: fsynced); each one's error
    def commit_many(self, commits: list[Commit]) -> list[str | Exception]: ...  # each one's URL or error
    def discard(self, staged) -> None: ...  # a staged output that will not be published
    def finish_staged(self, token: str | None, url: str) -> bool: ...
    def copy(self, from_url: str, rel: str) -> str: ...
    def put_failure(self, rel: str, record: dict, data: bytes | None) -> str: ...  # a new, unique record
    def remove_failure(self, where: str) -> None: ...
    def failures_of(self, rel: str, source: str) -> list[str]: ...  # records under rel's names naming source


@dataclass
class Result:
    source: InputObject
    outcome: str  # done | duplicate | failed | skipped | retry | lost-claim
    output: str | None = None
    detail: str = ""
    seconds: dict = field(default_factory=dict)
    output_pixels: int = 0
    sha256: str | None = None
    retry_after_s: float | None = None  # retry: not before this (a busy claim's remaining lease)

    @property
    def retryable(self) -> bool:
        # lost-claim: the new holder finishes it; a later look finds it done (or takes it over if that one dies)
        return self.outcome in ("retry", "lost-claim")


@dataclass
class Job:
    """One item between the phases: what `prepare` learned, what the engine made."""

    src: InputObject
    fingerprint: str | None = None
    prior: SourceRow | None = None  # what the ledger said of this source before
    data: bytes | None = None  # the bytes read: hashed, decoded, and set aside as they are if the item fails
    sha: str | None = None
    key: str | None = None
    generation: int = 0  # of our claim on `key`
    claimed: bool = False  # we hold the ledger claim on `key`
    plan: Plan | None = None  # what the header says and what will be made
    rel_out: str = ""
    out_url: str = ""
    image: codec.DecodedImage | None = None
    frames: list | None = None
    encoded: bytes | None = None  # the output's bytes, once encoded
    staged: object = None  # the Place's Staged: the encoded bytes where the publish renames (or PUTs) them from
    output_pixels: int = 0
    error: BaseException | None = None
    timings: dict = field(default_factory=dict)
    on_progress: object = None  # (tiles_done, tiles_total) of this item, from the engine thread or a lane

@dataclass(frozen=True)
class Options:
    limits: Limits
    max_output_pixels: int
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
    suffix: str = ""  # output names NAME{suffix}.ext
    output_name: str | None = None  # `--out big.png`: the one output's name in the outbox folder
    overwrite: bool = False  # settled sources are new work again, and their outputs are published over
    png_compression: str = "fast"  # codec.PNG_COMPRESSIONS
    lanes: int = 0  # items in the engine at once; 0: the engine's choice (engine_lanes)

    @classmethod
    def from_settings(cls, s) -> "Options":
        return cls(
            limits=Limits(s.max_bytes, s.max_pixels, s.max_side, s.min_side), max_output_pixels=s.max_output_pixels,
            policy=s.policy, cap_side=s.cap_side, tile=s.tile, tile_batch=s.tile_batch, out_format=s.format,
            jpeg_quality=s.jpeg_quality, webp_quality=s.webp_quality, dedup=s.dedup,
            on_duplicate=s.on_duplicate, disposition=s.disposition, suffix=s.suffix,
            output_name=s.output_file(), overwrite=s.overwrite, png_compression=s.png_compression, lanes=s.lanes,
        )

    def transform(self) -> TransformOptions:
        return TransformOptions(self.limits, self.max_output_pixels, self.policy, self.cap_side, self.out_format,
                                self.jpeg_quality, self.webp_quality, self.tile, self.tile_batch, self.png_compression)


def engine_lanes(engine, asked: int, batch: int) -> int:
    """Items the stage runner runs through the engine at once: `asked`, else the engine's `side_by_side`
    (onnxruntime on a CPU: 2); at most its `max_side_by_side` (1 for an engine one thread at a time must use:
    OpenCV's one cv2.dnn.Net, torch, a GPU session), and 1 where tiles are grouped into calls (`batch` > 1)."""
    default = int(getattr(engine, "side_by_side", 1))
    most = int(getattr(engine, "max_side_by_side", default))
    if not asked:
        return max(1, min(default, most)) if batch == 1 else 1
    if asked > 1 and batch > 1:
        raise ConfigError(f"--lanes {asked} with {batch} tiles per engine call: grouped calls run one at a time "
                          "(give one of the two)")
    if asked > most:
        held = "one item" if most <= 1 else f"at most {most} items"
        raise ConfigError(f"--lanes {asked}: the {engine.name} engine on {engine.device} runs {held} at a time")
    return asked


def output_rel(rel: str, ext: str, suffix: str = "") -> str:
    """Keep the input's name; when the format changes, append the new extension (a.jpg -> a.jpg.png), so
    a.jpg and a.png never land on the same output. A `suffix` goes after the name's stem, before its extensions:
    a.png -> a_x3.png, a.jpg -> a_x3.jpg.png (still apart from a.png's a_x3.png)."""
    path = PurePosixPath(rel)
    old = path.suffix.lower()
    same = old == ext or (old in (".jpeg", ".jpe") and ext == ".jpg") or (old == ".tiff" and ext == ".tif")
    if suffix:
        rel = str(path.with_name(path.stem + suffix + path.suffix))
    return rel if same else rel + ext


class Processor:
    """Holds what lives for the whole process: the engine (loaded once), the ledger, the places, and a renewer
    thread that keeps the leases of every claim in hand alive (every mode: watch, one-shot, worker, Lambda)."""

    def __init__(self, engine, spec, options: Options, ledger: Ledger, outbox: Place, failed: Place, *,
                 recover: bool = True):
        self.engine = engine
        self.spec = spec
        self.opt = options
        self.ledger = ledger
        self.outbox = outbox
        self.failed = failed
        self.transform = Transform(engine, spec, options.transform())
        self.policy = self.transform.policy
        self.request = request_id(spec.name, spec.scale, self.policy, options.out_format, options.jpeg_quality,
                                  options.webp_quality, options.png_compression)
        if options.suffix:  # another output name: a source done without it is not done with it
            self.request += f"|suffix={options.suffix}"
        self.batch = self.transform.batch
        # items the stage runner's writer publishes together where the ledger and the outbox share commits
        # (SQLite, a local folder: one fsync for many); where each write is its own (S3) grouping shares
        # nothing, so items are published one each, several side by side
        grouped = ledger.shares_commits and outbox.shares_commits
        self.write_group = WRITE_GROUP if grouped else 1
        self.publishers = 1 if grouped else REMOTE_PUBLISHERS
        self.tile = self.transform.tile
        self.lanes = engine_lanes(engine, options.lanes, self.batch)
        self.engine_failure: str | None = None  # set once the engine failed on a valid input: the process is sick
        # progress(tiles_done, tiles_total) during each engine run, on the engine thread or a lane (the one-shot's bar)
        self.on_tiles = None
        # keys being worked on in this process: a second item with the same content waits for the first instead
        # of claiming it again (our own claim would let it through)
        self._inflight: set[str] = set()
        self._inflight_changed = threading.Condition()
        self._claims: dict[str, int] = {}  # key -> generation of each claim we hold: the renewer keeps them
        self._lost: set[str] = set()  # claims a renewal found taken over
        self._closing = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="superres-renew", daemon=True)
        self._renewer.start()
        if recover:
            self.recover()

    def close(self) -> None:
        self._closing.set()
        self._renewer.join(timeout=10)
        self.ledger.close()

    def _renew_loop(self) -> None:
        every = max(0.2, self.ledger.lease_s / 3)  # two renewals may fail before a lease runs out
        while not self._closing.wait(every):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Push the leases of the claims in hand forward; a claim found taken over is marked lost."""
        for key, generation in list(self._claims.items()):
            try:
                if not self.ledger.renew(key, generation):
                    self._lost.add(key)
            except Exception as exc:  # a missed renewal is survivable: the lease has two more in it
                log.warning("could not renew a claim: %s", exc)

    def recover(self) -> None:
        """At start: finish publishes that a killed process left half-way; drop what can't be finished."""
        for row in self.ledger.orphaned_publishes():
            if self.outbox.finish_staged(row.temp, row.output) and (etag := self.outbox.etag(row.output)):
                self.ledger.mark_item_done(row.key, etag)
                log.info("finished an interrupted publish", extra={"fields": {"output": row.output}})
            else:
                self.ledger.release_any(row.key)  # neither staged data nor output: it will be upscaled again

    def process(self, src: InputObject) -> Result:
        """All stages, one after the other. `pipeline.overlap` runs the same three phases on three threads."""
        job = self.prepare(src)
        return job if isinstance(job, Result) else self.finish(self.run_engine(job))

    # -- phase 1: read, hash, dedup claim, decode ---------------------------------------------------------------

    def _fp(self, seen: str | None) -> str | None:
        return None if seen is None else f"{seen}|{self.request}"

    def _settled(self, prior: SourceRow | None, fingerprint: str | None) -> bool:
        """Settled: this source as it is now, under these settings, with its output still the one published."""
        if prior is None or fingerprint is None or prior.fingerprint != fingerprint:
            return False
        return prior.outcome == "failed" or output_intact(prior.output_etag, self.outbox.etag(prior.output or ""))

    def prepare(self, src: InputObject) -> "Job | Result":
        job = Job(src)
        t0 = time.perf_counter()
        try:
            job.prior = prior = self.ledger.source(src.id)
            job.fingerprint = self._fp(src.fingerprint())  # what a failure to read is recorded under
            # a failure whose bytes were never read (sha None) left the input where it was: nothing to dispose of
            if not self.opt.overwrite and self._settled(prior, job.fingerprint) and (
                    self.opt.disposition == "keep" or (prior.outcome == "failed" and prior.sha256 is None)):
                return Result(src, "skipped", prior.output, detail=f"already {prior.outcome}")
            data, seen = src.read(self.opt.limits.max_bytes)
            job.fingerprint = self._fp(seen)
            if not self.opt.overwrite and self._settled(prior, job.fingerprint):
                # settled, but a crash came between the ledger and the disposition: finish that, on these bytes
                # (a failed input's bytes are in the failed place: that move is a delete here)
                src.dispose("delete" if prior.outcome == "failed" else self.opt.disposition)
                return Result(src, "skipped", prior.output, detail=f"already {prior.outcome}")
            job.data = data
            job.sha = hashlib.sha256(data).hexdigest()
            job.timings["read"] = time.perf_counter() - t0
            job.plan = plan = self.transform.plan(data)  # the limits, from the size and header alone
            header = plan.header
            job.rel_out = self.opt.output_name or output_rel(src.rel, plan.ext, self.opt.suffix)
            job.out_url = self.outbox.url(job.rel_out)
            variant = output_variant(self.spec.name, self.spec.scale, self.policy, plan.fmt, plan.quality,
                                     self.opt.png_compression)
            key = dedup_key(job.sha, variant if self.opt.dedup else f"{variant}:{src.id}")
            self._hold(key)
            job.key = key
            done = self._claim(job)
            if done is not None:
                self._let_go(job)
                return done
            log.debug("upscaling", extra={"fields": {"source": src.id, "sha256": job.sha, "width": header.width,
                                                    "height": header.height, "frames": header.frames}})
            t = time.perf_counter()
            job.image = self.transform.decode(data, plan)
            job.timings["decode"] = time.perf_counter() - t
            return job
        except BaseException as exc:
            return self._settle_error(job, exc)

    def _claim(self, job: "Job") -> Result | None:
        """Claim the key; None means "ours: upscale it", else the item is already settled by this call."""
        src, key = job.src, job.key
        writer = self.ledger.claim_output(job.out_url, src.id)
        if writer != src.id:
            raise InputRejected(f"{job.out_url} is the output of another input ({writer}); refused so that it is "
                                "not overwritten (names that differ only by '//' or '/./' are one name)",
                                stage="publish", code="output_collision")
        outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
        if outcome is ClaimOutcome.DUPLICATE and (
                not output_intact(row.output_etag, self.outbox.etag(row.output))
                or (self.opt.overwrite and row.output == job.out_url)):  # --overwrite: this very output, again
            self.ledger.reopen(key, row.generation)  # the output was removed or replaced since: do the work again
            outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
        if outcome is ClaimOutcome.BUSY:
            raise ClaimBusy(f"another worker ({row.owner}) is processing the same content",
                            retry_after_s=max(0.0, row.lease_until - time.time()))
        if outcome is ClaimOutcome.DUPLICATE:
            return self._duplicate(job, row)
        self._took(job, row.generation)
        if outcome is ClaimOutcome.RESUME_PUBLISH:
            if self.outbox.finish_staged(row.temp, row.output) and (etag := self.outbox.etag(row.output)):
                self._done(job, row.output, etag)
                return Result(src, "done", row.output, "finished an interrupted publish", sha256=job.sha)
            self.ledger.release(key, job.generation)  # nothing to finish: upscale again
            self._gave_back(job)
            outcome, row = self.ledger.claim(key, source=src.id, output=job.out_url)
            if outcome is not ClaimOutcome.NEW:
                raise TransientError("the item changed hands while resuming", stage="dedup")
            self._took(job, row.generation)
        return None

    def _took(self, job: "Job", generation: int) -> None:
        job.claimed, job.generation = True, generation
        self._lost.discard(job.key)
        self._claims[job.key] = generation

    def _gave_back(self, job: "Job") -> None:
        job.claimed = False
        self._claims.pop(job.key, None)

    # -- phase 2: the engine --------------------------------------------------------------------------------------

    def run_engine(self, job: "Job") -> "Job":
        return self.run_engine_many([job])[0]

    def run_engine_many(self, jobs: list["Job"], workers: int = 1) -> list["Job"]:
        """The tiles of several images share engine calls (a GPU wants many per call), `workers` calls at once
        (lanes the stage runner gave). If anything fails, the jobs are run again one by one, so one bad image
        costs only itself."""
        t = time.perf_counter()
        frames = [f for job in jobs for f in job.image.frames]
        owner = [job for job in jobs for _ in job.image.frames]  # frame -> its job
        each = None
        if any(job.on_progress for job in jobs):
            counts = {id(f): (0, 0) for f in frames}

            def each(i: int, done: int, total: int) -> None:
                counts[id(frames[i])] = (done, total)
                job = owner[i]
                if job.on_progress:
                    mine = [counts[id(f)] for f in job.image.frames]
                    job.on_progress(sum(d for d, _ in mine), sum(t for _, t in mine))
        try:
            ups = iter(self.transform.upscale(frames, progress=self.on_tiles, progress_each=each, workers=workers))
            for job in jobs:
                job.frames = [next(ups) for _ in job.image.frames]
                job.timings["upscale"] = (time.perf_counter() - t) / len(jobs)  # shared calls: an even share each
            return jobs
        except InputRejected as exc:  # the input's own fault (refused by a rule of the upscale stage)
            if len(jobs) > 1:
                return [self.run_engine_many([job], workers)[0] for job in jobs]
            jobs[0].error = exc
        except Exception as exc:  # noqa: BLE001 - an input that passed every limit: the engine is at fault
            if len(jobs) > 1:
                return [self.run_engine_many([job], workers)[0] for job in jobs]
            jobs[0].error = self._engine_failed(exc)
        except BaseException as exc:
            for job in jobs:
                job.error = exc
        jobs[0].timings["upscale"] = time.perf_counter() - t
        return jobs

    def engine_tiles(self, job: "Job") -> int:
        """The tiles the engine runs for this prepared item (the stage runner's lanes rule)."""
        return self.transform.tiles(job.image.frames)

    def _engine_failed(self, exc: BaseException) -> EngineFailure:
        what = exc.message if isinstance(exc, SuperresError) else f"{type(exc).__name__}: {exc}"
        self.engine_failure = self.engine_failure or what
        log.error("the engine failed on a valid input: %s", what)
        return EngineFailure(f"the engine failed ({what}); the item is given back", stage="upscale")

    # -- phase 3: encode, publish, ledger, disposition -------------------------------------------------------------

    def encode(self, job: "Job", workers: int = 1) -> None:
        """Encode the upscaled frames and stage the bytes (locally: written under a temporary name; `finish_many`
        fsyncs it): the staged output, or the error, lands on the job. On its own so that the stage runner's
        encoders run it on several items at once, off the writer's path; `finish_many` publishes in order.
        `workers`: threads for one big image's encode (the same bytes)."""
        if job.error is not None or job.staged is not None:
            return
        t = time.perf_counter()
        try:
            job.encoded = self.transform.encode(job.image, job.frames, job.plan, workers)
            job.timings["encode"] = time.perf_counter() - t
            t = time.perf_counter()
            # the temporary name is this item's (content and settings) and this process's: nobody else writes it
            job.staged = self.outbox.stage(job.encoded, self._tag(job))
            job.timings["stage"] = time.perf_counter() - t
            # what the publish needs is staged: the pixels go now, so a group waiting for the writer is small
            job.output_pixels = sum(f.shape[0] * f.shape[1] for f in job.frames)
            job.image = job.frames = job.encoded = None
        except Exception as exc:  # noqa: BLE001 - settled by finish, as any error of the item
            job.error = exc

    @staticmethod
    def _tag(job: "Job") -> str:
        return hashlib.sha256(job.key.encode()).hexdigest()[:32]

    def finish(self, job: "Job") -> Result:
        return self.finish_many([job])[0]

    def finish_many(self, jobs: list["Job"]) -> list[Result]:
        """Publish several encoded items at once, in order: their staged files fsynced, one ledger transaction
        marks them publishing, the renames share one folder fsync, one synced transaction marks them done (the
        group commit that keeps the writer ahead of the engine on small images). Each item's failure is its own;
        the others go on, and an item never leaves here still holding its claim."""
        results: list[Result | None] = [None] * len(jobs)

        def fail(i: int, exc: BaseException) -> None:
            results[i] = self._settle_error(jobs[i], exc)

        try:
            self._publish(jobs, results, fail)
        except Exception as exc:  # noqa: BLE001 - a step that failed outside its items' own errors
            for i, result in enumerate(results):
                if result is None:
                    fail(i, exc)
        return results

    def _publish(self, jobs: list["Job"], results: list, fail) -> None:
        def ready(i: int) -> None:
            job = jobs[i]
            if job.error is not None:
                raise job.error
            self._check_claim(job)
            self.encode(job)  # already done where the stage runner's encoders did it
            if job.error is not None:
                raise job.error

        live = self._each_item(range(len(jobs)), fail, ready)
        t = time.perf_counter()
        # the staged bytes on disk before the ledger names them: a recovery renames what a publishing mark names
        live = self._each(live, fail, lambda: self.outbox.sync_staged([jobs[i].staged for i in live]))
        # fenced: a process that lost its claim stops here, before the outbox is touched
        live = self._each(live, fail, lambda: self.ledger.mark_publishing_many(
            [Publishing(jobs[i].key, jobs[i].generation, jobs[i].staged.token) for i in live]))
        commits: dict[int, Commit] = {}

        def described(i: int) -> None:
            job = jobs[i]
            commits[i] = Commit(job.staged, job.rel_out, job.plan.content_type, self._metadata(job))

        live = self._each_item(live, fail, described)
        urls = dict(zip(live, self.outbox.commit_many([commits[i] for i in live]))) if live else {}
        live = self._each(live, fail, lambda: [urls[i] if isinstance(urls[i], Exception) else None for i in live])
        etags: dict[int, str] = {}

        def there(i: int) -> None:
            etag = self.outbox.etag(urls[i])  # an S3 HEAD can fail: that item's error
            if etag is None:
                raise TransientError(f"{urls[i]} is not there right after its publish", stage="publish")
            etags[i] = etag

        live = self._each_item(live, fail, there)
        live = self._done_many([jobs[i] for i in live], [urls[i] for i in live], [etags[i] for i in live],
                               live, fail)
        share = (time.perf_counter() - t) / max(1, len(live))
        for i in live:
            job = jobs[i]
            job.timings["publish"] = share
            results[i] = Result(job.src, "done", urls[i], seconds=job.timings, output_pixels=job.output_pixels,
                                sha256=job.sha)

    @staticmethod
    def _each_item(live, fail, step) -> list[int]:
        """`step(i)` for each live item; one that raises is failed on its own. The items still live."""
        still = []
        for i in live:
            try:
                step(i)
            except BaseException as exc:  # noqa: BLE001 - settled by fail (KeyboardInterrupt re-raised there)
                fail(i, exc)
                continue
            still.append(i)
        return still

    @staticmethod
    def _each(live: list[int], fail, step) -> list[int]:
        """Run one step of a group (`step()` gives each live item's error or None); the items still live."""
        if not live:
            return live
        try:
            errors = step()
        except Exception as exc:  # noqa: BLE001 - the whole step failed (the ledger is unreachable): every item
            errors = [exc] * len(live)
        still = []
        for i, error in zip(live, errors):
            if error is None:
                still.append(i)
            else:
                fail(i, error)
        return still

    def _metadata(self, job: "Job") -> dict[str, str]:
        return {"source-sha256": job.sha, "model": self.spec.name, "superres-item": self._tag(job),
                **job.src.metadata(job.sha, self.spec.name)}

    def _check_claim(self, job: "Job") -> None:
        if job.key in self._lost:
            raise ClaimLost(f"the claim on {job.key} was taken over while the item was in work")

    def _done(self, job: "Job", out_url: str, etag: str) -> None:
        """Settle one item and its source as done, then dispose of the input (raises what went wrong)."""
        errors: list[BaseException] = []
        if not self._done_many([job], [out_url], [etag], [0], lambda i, exc: errors.append(exc)):
            raise errors[0]

    def _done_many(self, jobs: list["Job"], urls: list[str], etags: list[str], ids: list[int], fail) -> list[int]:
        """Settle items and their sources as done in one synced ledger transaction, then dispose of the inputs;
        `fail(id, exc)` for each that could not be. The ids of those done."""
        for job in jobs:
            self._clear_failure(job)
        marks = [Done(job.key, job.generation, job.src.id, job.fingerprint, job.sha, url, etag)
                 for job, url, etag in zip(jobs, urls, etags)]
        by_id = dict(zip(ids, jobs))
        done = self._each(list(ids), fail, lambda: self.ledger.mark_done_many(marks))
        disposed = []
        for i in done:
            job = by_id[i]
            self._gave_back(job)
            self._let_go(job)
            try:
                job.src.dispose(self.opt.disposition)
            except Exception as exc:  # noqa: BLE001 - that item's, as before the group commit
                fail(i, exc)
                continue
            disposed.append(i)
        return disposed

    def _remove_failure(self, where: str) -> None:
        try:
            self.failed.remove_failure(where)
        except Exception as exc:  # noqa: BLE001 - a stale record is untidy, not a loss
            log.warning("could not remove the earlier failure record %s: %s", where, exc)

    def _clear_failure(self, job: "Job") -> None:
        """The source is about to be settled as done: a failure recorded for it before is no longer true
        (failed/ shows what is failed now). Removed before the ledger forgets where it is: a crash in between
        only means the source is looked at again."""
        prior = job.prior
        if prior is not None and prior.outcome == "failed" and prior.output:
            self._remove_failure(prior.output)

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
        """Any error ends the job: release our claim (a staged output of ours is dropped with it: the item is
        upscaled again), then record it."""
        if job.staged is not None:
            try:
                self.outbox.discard(job.staged)
            except Exception as discard_error:  # noqa: BLE001 - a leftover temp is swept at the next start
                log.warning("could not remove a staged output: %s", discard_error)
            job.staged = None
        if job.claimed:
            try:
                self.ledger.release(job.key, job.generation)
            except Exception as release_error:  # noqa: BLE001 - the lease runs out on its own
                log.warning("could not release a claim: %s", release_error)
            self._gave_back(job)
        self._let_go(job)
        src = job.src
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: the claim is released, the process goes
        if isinstance(exc, MemoryError):
            exc = self._engine_failed(exc)  # the machine's trouble, not the input's
        elif not isinstance(exc, SuperresError):
            if type(exc).__module__.split(".")[0] in _NETWORK_MODULES or isinstance(exc, (ConnectionError, TimeoutError)):
                exc = TransientError(f"{type(exc).__name__}: {exc}", stage="io")
            else:
                # a bug must cost one item, not the process; the input is set aside with the reason
                log.error("unexpected error on %r", src.rel, exc_info=exc)
                exc = InputRejected(f"internal error: {type(exc).__name__}: {exc}", stage="internal",
                                    code="internal_error")
        if isinstance(exc, ClaimLost):
            log.warning("lost the claim on %r: abandoned, the new holder finishes it", src.rel)
            return Result(src, "lost-claim", detail=exc.message, seconds=job.timings, sha256=job.sha)
        if isinstance(exc, InputRejected):
            try:
                return self._fail(job, exc)
            except TransientError as failed_too:  # the failed place itself is unreachable: try the item again later
                exc = failed_too
        log.warning("will retry %r: %s", src.rel, exc.message)
        return Result(src, "retry", detail=exc.message, seconds=job.timings, sha256=job.sha,
                      retry_after_s=getattr(exc, "retry_after_s", None))

    def _duplicate(self, job: "Job", row) -> Result:
        src, first = job.src, row.output
        self._clear_failure(job)
        if first == job.out_url:  # this very output, finished before a crash, a restart or a settings change
            self.ledger.record_source(src.id, fingerprint=job.fingerprint, sha256=job.sha, key=job.key,
                                      outcome="done", output=first, detail=None, output_etag=row.output_etag)
            src.dispose(self.opt.disposition)
            return Result(src, "skipped", first, "already done", sha256=job.sha)
        output, etag = first, row.output_etag
        if self.opt.on_duplicate == "copy":
            output = self.outbox.copy(first, job.rel_out)
            etag = self.outbox.etag(output)
        self.ledger.record_source(src.id, fingerprint=job.fingerprint, sha256=job.sha, key=job.key,
                                  outcome="duplicate", output=output, detail=f"duplicate of {first}", output_etag=etag)
        src.dispose(self.opt.disposition)
        return Result(src, "duplicate", output, detail=f"same content as {self.outbox.name(first)}", sha256=job.sha)

    def _fail(self, job: "Job", exc: InputRejected) -> Result:
        src = job.src
        record = {
            "stage": exc.stage, "error": exc.code, "message": exc.message, "sha256": job.sha,
            "model": self.spec.name, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": src.id, "retryable": False,
        }
        # this source's earlier records: the one the ledger knows is replaced after the new one is written (a
        # crash in between leaves two, never none); ones that a process killed between its record and the ledger
        # left behind are unknown to the ledger and go first, so the new record takes the plain name again
        prior = job.prior
        known = prior.output if prior is not None and prior.outcome == "failed" and prior.output else None
        try:
            orphans = set(self.failed.failures_of(src.rel, src.id)) - {known}
        except Exception as scan_error:  # noqa: BLE001 - a stale record is untidy, not a loss
            log.warning("could not look for earlier failure records of %r: %s", src.rel, scan_error)
            orphans = set()
        for old in orphans:
            self._remove_failure(old)
        where = self.failed.put_failure(src.rel, record, job.data)  # the bytes read, never the path again
        self.ledger.record_source(src.id, fingerprint=job.fingerprint, sha256=job.sha, key=job.key,
                                  outcome="failed", output=where, detail=exc.message)
        if known and known != where:
            self._remove_failure(known)
        if self.opt.disposition != "keep" and job.data is not None:
            src.dispose("delete")  # its bytes are in the failed place now: that is the move
        log.warning("failed %r at %s: %s", src.rel, exc.stage, exc.message)
        return Result(src, "failed", where, f"{exc.stage}: {exc.message}", seconds=job.timings, sha256=job.sha)
