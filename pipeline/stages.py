"""The one stage runner: every driver (one-shot, watch, the worker, Lambda, the HTTP server) submits items and
takes their results; the Processor's phases run overlapped on their own threads.

    submit(src) -> [incoming, queue_max] -> reader: prepare -> [depth] -> engine: run_engine_many
                -> encoders (a small pool): encode, stage -> [depth] -> writer: finish_many (publish, ledger, in
                   groups of the items ready together) -> the Futures

Queues are bounded: memory holds at most about 2*depth+3 decoded items plus the encoders' (a GPU: 3 groups) and
one per extra reader, whatever the number submitted (backpressure: `submit` blocks, or raises `Full` when asked
not to). One reader, one engine thread and one writer keep results in submission order and the engine on one
thread (CUDA contexts and OpenCV's thread pool like one caller). Objects in S3 get REMOTE_READERS readers: their
reads are request latency, which one reader would add up item after item; those items publish in the order they
are read. For the same reason an S3 outbox or ledger gets `Processor.publishers` publishes side by side
(started in order, each settling its own Future when done). Encoding, the one CPU stage that grows with the
output, runs on a few threads (PNG/JPEG/WebP encoders release the GIL), and the writer takes their results in
order. Items ready at once share engine calls where the engine batches (a GPU).

Side by side (`Processor.lanes` > 1: onnxruntime on a CPU): the engine thread hands each item to one of a few
lanes, which runs its engine call and then its encode, so small items' networks run several at a time, each on
one thread, instead of one split across the cores (a small image's layers are too short to split: the engine's
own threads spent their time waiting for each other and for the cores the other stages held; docs/benchmarks.md).
An item of several tiles also takes the lanes free when it starts, its tiles side by side on them (alone, it
has every core); an item whose output is over SIDE_BY_SIDE_MAX_PIXELS waits for every lane and runs alone (its
memory), its encode too (a PNG's bands on every lane). Another item's extra lanes go back before its encode.
Results still come out in the order read: the writer waits for each item in turn.

An exception that escapes the Processor for one item (a bug, an unwritable failed place) is that item's: its
Future has it and the runner goes on. Only KeyboardInterrupt/SystemExit are fatal (`failure`): nothing more is
started, and every later item's Future has it."""

import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from pipeline.limits import output_size
from pipeline.process import Job, Processor, Result

log = logging.getLogger("superres")

_END = object()


# glibc's malloc, by default, hands every freed block over 128 kB back to the kernel, and the next image's arrays
# (a few MB each: decoded, float blobs, upscaled) fault their pages in again, zeroed: on small images that was
# over a third of the engine thread's time (docs/benchmarks.md). Blocks up to this size come from the heap...
MALLOC_MMAP_THRESHOLD = 32 << 20  # (glibc's own upper bound for it) ...
MALLOC_TRIM_THRESHOLD = 128 << 20  # ...and this much freed memory is kept for reuse before any goes back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def reuse_freed_memory() -> bool:
    """Keep freed blocks for the next items (glibc; elsewhere nothing changes). True where it was set."""
    import ctypes  # numpy has imported it already

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


# output pixels over which an item runs alone when the engine runs items side by side (a 2000x2000 output: a
# few tiles; the memory of two such items in the engine at once is small beside the limits' budget)
SIDE_BY_SIDE_MAX_PIXELS = 4_000_000


# readers for objects in S3: an object's read is a few requests (its ledger rows, its claim, the GET), whose
# latency, not the CPU, is the read's cost, so one reader kept a fast engine waiting (docs/benchmarks.md)
REMOTE_READERS = 4


def encode_threads() -> int:
    """Encoders: one per core beyond the two the reader and writer use, 1 to 4 (docs/benchmarks.md)."""
    return max(1, min(4, (os.cpu_count() or 1) - 2))


class Full(Exception):
    """`queue_max` items are already waiting to be read: try again later (HTTP: 429/503 with Retry-After)."""


class Closed(Exception):
    """The runner is closing: it takes no more items."""


class _Item:
    __slots__ = ("src", "future", "on_progress", "job", "encoded")

    def __init__(self, src, future: Future, on_progress):
        self.src, self.future, self.on_progress = src, future, on_progress
        self.job: "Job | Result | BaseException | None" = None
        self.encoded: Future | None = None  # the encoder's work on this item's job


class StageRunner:
    def __init__(self, processor: Processor, *, depth: int = 2, queue_max: int = 0, encoders: int = 0,
                 readers: int = 1):
        reuse_freed_memory()
        self.processor = processor
        self._incoming: queue.Queue = queue.Queue(maxsize=queue_max or depth)
        self._prepared: queue.Queue = queue.Queue(maxsize=max(depth, processor.batch))  # room for a GPU's group
        self._finished: queue.Queue = queue.Queue(maxsize=max(depth, processor.batch))  # a group is put at once
        self._encoders = ThreadPoolExecutor(encoders or encode_threads(), thread_name_prefix="superres-encode")
        self._lanes = max(1, processor.lanes)
        self._lane_pool = (ThreadPoolExecutor(self._lanes, thread_name_prefix="superres-lane")
                           if self._lanes > 1 else None)
        self._free_lanes = threading.Semaphore(self._lanes)
        self._lock = threading.Lock()
        self._pending = 0  # submitted, result not yet set
        self._closed = False
        self.failure: BaseException | None = None  # KeyboardInterrupt, SystemExit: fatal
        self._readers_left = max(1, readers)
        phases = [(f"read-{i}" if readers > 1 else "read", self._read) for i in range(self._readers_left)]
        self._threads = [threading.Thread(target=target, name=f"superres-{name}", daemon=True)
                         for name, target in (*phases, ("engine", self._engine), ("write", self._write))]
        for t in self._threads:
            t.start()

    # -- producers ---------------------------------------------------------------------------------------------

    def submit(self, src, *, on_progress=None, block: bool = True, timeout: float | None = None) -> Future:
        """Queue one input; its Future gets the Result. `on_progress(tiles_done, tiles_total)` is called from the
        engine thread (or a lane) while it is upscaled. Blocks while the incoming queue is full, unless `block` is False
        (then `Full`)."""
        future: Future = Future()
        item = _Item(src, future, on_progress)
        with self._lock:
            if self._closed:
                raise Closed("the stage runner is closing")
            self._pending += 1
        try:
            self._incoming.put(item, block=block, timeout=timeout)
        except queue.Full:
            with self._lock:
                self._pending -= 1
            raise Full(f"{self._incoming.maxsize} items are already waiting") from None
        return future

    def pending(self) -> int:
        """Items submitted whose result is not set yet (waiting, or in any phase)."""
        with self._lock:
            return self._pending

    def close(self) -> None:
        """Take no more items; finish those in hand; join the threads. A fatal failure stays in `failure` (each
        item's Future has it too)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._incoming.put(_END)
        for t in self._threads:
            t.join()
        if self._lane_pool is not None:
            self._lane_pool.shutdown(wait=True)
        self._encoders.shutdown(wait=True)

    # -- the phases ---------------------------------------------------------------------------------------------

    def _settle(self, item: _Item, result: Result | None = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self._pending -= 1
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    def _escaped(self, item: _Item, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            self.failure = self.failure or exc
        self._settle(item, exc=exc)

    def _read(self) -> None:
        while (item := self._incoming.get()) is not _END:
            if self.failure is not None:  # the runner is broken: nothing more is started
                self._escaped(item, self.failure)
                continue
            try:
                item.job = self.processor.prepare(item.src)
                if isinstance(item.job, Job):
                    item.job.on_progress = item.on_progress
            except BaseException as exc:  # noqa: BLE001 - handed to the submitter through the Future
                item.job = exc
            self._prepared.put(item)
        with self._lock:
            self._readers_left -= 1
            last = self._readers_left == 0
        if last:
            self._prepared.put(_END)
        else:
            self._incoming.put(_END)  # for the next reader

    def _run_engine(self, jobs: list[Job], workers: int = 1) -> None:
        try:
            self.processor.run_engine_many(jobs, workers=workers)  # errors land on the jobs; finish settles them
        except BaseException as exc:  # noqa: BLE001 - the jobs' too: finish settles them, releasing the claims
            for job in jobs:
                job.error = exc

    def _is_big(self, job: Job) -> bool:
        header, opt = job.plan.header, self.processor.opt
        width, height = output_size(header.width, header.height, scale=self.processor.spec.scale,
                                    policy=opt.policy, cap_side=opt.cap_side)
        return width * height * header.frames > SIDE_BY_SIDE_MAX_PIXELS

    def _take_lanes(self, job: Job, big: bool) -> int:
        """Lanes for this item (waiting for one): a big item waits for all of them; an item of several tiles
        also takes those free now, its tiles running on them side by side."""
        self._free_lanes.acquire()  # only this thread takes lanes: a big item cannot deadlock with another
        if big:
            for _ in range(self._lanes - 1):
                self._free_lanes.acquire()
            return self._lanes
        try:
            tiles = self.processor.engine_tiles(job)
        except Exception:  # noqa: BLE001 - a frame the engine phase will refuse: it says why, on one lane
            tiles = 1
        taken = 1
        while taken < min(self._lanes, tiles) and self._free_lanes.acquire(blocking=False):
            taken += 1
        return taken

    def _in_lane(self, job: Job) -> Future:
        """The item's engine call on the lanes it takes, then its encode: a big item's on all of them (it runs
        alone: its PNG's bands deflated side by side), any other's on one (the others go back first, for the
        next items)."""
        big = self._is_big(job)
        taken = self._take_lanes(job, big)

        def run() -> None:
            held = taken
            try:
                self._run_engine([job], workers=taken)
                if not big:
                    for _ in range(held - 1):
                        self._free_lanes.release()
                    held = 1
                self.processor.encode(job, workers=held)
            finally:
                for _ in range(held):
                    self._free_lanes.release()
        return self._lane_pool.submit(run)

    def _engine(self) -> None:
        ended = False
        while not ended:
            items = [self._prepared.get()]
            # on a GPU, several images ready at once share engine calls; one call per image on a CPU
            while len(items) < max(1, self.processor.batch) and items[-1] is not _END:
                try:
                    items.append(self._prepared.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is _END:
                ended = True
                items.pop()
            if self._lane_pool is not None:
                for item in items:
                    if isinstance(item.job, Job):
                        item.encoded = self._in_lane(item.job)
                    self._finished.put(item)
                continue
            jobs = [item.job for item in items if isinstance(item.job, Job)]
            if jobs:
                self._run_engine(jobs)
            for item in items:
                if isinstance(item.job, Job) and item.job.error is None:
                    item.encoded = self._encoders.submit(self.processor.encode, item.job)
                self._finished.put(item)
        self._finished.put(_END)

    def _write(self) -> None:
        """Publish in submission order, in groups: each round takes the oldest item (waiting for its encoding)
        and the ones after it that are already encoded, up to the Processor's write_group, and publishes them
        together (one ledger commit, one folder fsync: Processor.finish_many). When the writer keeps up a group
        is one item; when publishing is slower than the engine (small images, fsyncs) groups grow and the cost is
        shared. Where each publish is its own requests (S3: Processor.publishers > 1) items are published one
        each, several side by side, started in order."""
        if self.processor.publishers > 1:
            self._write_side_by_side(self.processor.publishers)
            return
        held: deque[_Item] = deque()
        ended = False
        most = max(1, self.processor.write_group)
        while held or not ended:
            if not held:
                if (item := self._finished.get()) is _END:
                    ended = True
                    continue
                held.append(item)
            while not ended and len(held) < most:
                try:
                    item = self._finished.get_nowait()
                except queue.Empty:
                    break
                if item is _END:
                    ended = True
                else:
                    held.append(item)
            group = [held.popleft()]
            while held and len(group) < most and (held[0].encoded is None or held[0].encoded.done()):
                group.append(held.popleft())
            self._write_group(group)

    def _write_side_by_side(self, publishers: int) -> None:
        room = threading.Semaphore(publishers)  # bounds the items held here, as the queues bound the rest
        with ThreadPoolExecutor(publishers, thread_name_prefix="superres-publish") as pool:
            while (item := self._finished.get()) is not _END:
                room.acquire()
                pool.submit(self._write_group, [item]).add_done_callback(lambda _: room.release())

    def _write_group(self, group: list[_Item]) -> None:
        outcomes: dict[int, "Result | BaseException"] = {}
        for item in group:
            if item.encoded is not None:
                try:
                    item.encoded.result()  # the oldest may still be encoding; an encoding error is on the job
                except BaseException as exc:  # noqa: BLE001
                    outcomes[id(item)] = exc
        todo = [item for item in group if isinstance(item.job, Job) and id(item) not in outcomes]
        if todo:
            try:
                outcomes.update(zip(map(id, todo), self.processor.finish_many([item.job for item in todo])))
            except BaseException as exc:  # noqa: BLE001 - handed to the submitters through the Futures
                outcomes.update((id(item), exc) for item in todo)
        for item in group:
            outcome = item.job if not isinstance(item.job, Job) else outcomes[id(item)]
            if isinstance(outcome, BaseException):
                self._escaped(item, outcome)
            else:
                self._settle(item, outcome)


def in_flight_for(processor: Processor, asked: int = 0, readers: int = 1) -> int:
    """How many items a long-running mode keeps submitted at once: enough that the engine never waits on the
    CPU stages (one per reader, a group ready, one in the engine, one done, one per encoder, one per
    publisher), or what was asked."""
    return asked or 3 * max(2, processor.batch) + encode_threads() + readers + processor.publishers


class Window:
    """A long-running driver's items in flight: at most `limit` submitted and not yet taken back, each with a tag
    of the driver's (a path, a message) and, while in flight, the context `track()` gives (ops.in_flight: the
    gauge and /healthz). Everything here runs on the driver's one thread."""

    def __init__(self, runner: StageRunner, limit: int, *, track=None):
        self.runner = runner
        self.limit = max(1, limit)
        self._track = track
        self._open: list[tuple[object, object, Future, object]] = []  # (tag, src, future, tracking context)

    def __len__(self) -> int:
        return len(self._open)

    def room(self) -> int:
        return self.limit - len(self._open)

    def tags(self) -> list:
        return [tag for tag, _, _, _ in self._open]

    def submit(self, src, tag=None) -> None:
        context = self._track() if self._track is not None else None
        if context is not None:
            context.__enter__()
        try:
            future = self.runner.submit(src)
        except BaseException:
            if context is not None:
                context.__exit__(None, None, None)
            raise
        self._open.append((tag, src, future, context))

    def wait(self, timeout: float) -> None:
        """Until some item is done, or `timeout` seconds."""
        if self._open:
            wait([f for _, _, f, _ in self._open], timeout=timeout, return_when=FIRST_COMPLETED)

    def take(self, *, all: bool = False) -> list[tuple[object, Result]]:
        """(tag, Result) of the items done (all of them, waiting, with `all`), in submission order. An exception
        that escaped the Processor for an item is logged and becomes a "retry" result: the item is tried again
        later, the driver goes on. KeyboardInterrupt/SystemExit are raised."""
        done, still = [], []
        for entry in self._open:
            tag, src, future, context = entry
            if not (all or future.done()):
                still.append(entry)
                continue
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the failed place itself is not writable
                log.error("could not settle %r", getattr(src, "rel", src), exc_info=exc)
                result = Result(src, "retry", detail=f"{type(exc).__name__}: {exc}")
            finally:
                if context is not None:
                    context.__exit__(None, None, None)
            done.append((tag, result))
        self._open = still
        return done
