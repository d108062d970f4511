"""The one stage runner: every driver (one-shot, watch, the worker, Lambda, the HTTP server) submits items and
takes their results; the Processor's three phases run overlapped on three threads.

    submit(src) -> [incoming, queue_max] -> reader: prepare -> [depth] -> engine: run_engine_many
                -> [depth] -> writer: finish -> the item's Future

Queues are bounded: memory holds at most about 2*depth+3 decoded items (plus a GPU's group), whatever the
number submitted (backpressure: `submit` blocks, or raises `Full` when asked not to). One thread per phase keeps
results in submission order and the engine on one thread (CUDA contexts and OpenCV's thread pool like one
caller). Items ready at once share engine calls where the engine batches (a GPU)."""

import queue
import threading
from concurrent.futures import Future

from pipeline.process import Job, Processor, Result

_END = object()


class Full(Exception):
    """`queue_max` items are already waiting to be read: try again later (HTTP: 429/503 with Retry-After)."""


class Closed(Exception):
    """The runner is closing: it takes no more items."""


class _Item:
    __slots__ = ("src", "future", "on_progress", "job")

    def __init__(self, src, future: Future, on_progress):
        self.src, self.future, self.on_progress = src, future, on_progress
        self.job: "Job | Result | None" = None


class StageRunner:
    def __init__(self, processor: Processor, *, depth: int = 2, queue_max: int = 0):
        self.processor = processor
        self._incoming: queue.Queue = queue.Queue(maxsize=queue_max or depth)
        self._prepared: queue.Queue = queue.Queue(maxsize=depth)
        self._finished: queue.Queue = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()
        self._pending = 0  # submitted, result not yet set
        self._closed = False
        self.failure: BaseException | None = None  # what escaped the Processor (a bug, KeyboardInterrupt): fatal
        self._threads = [threading.Thread(target=target, name=f"superres-{name}", daemon=True)
                         for name, target in (("read", self._read), ("engine", self._engine), ("write", self._write))]
        for t in self._threads:
            t.start()

    # -- producers ---------------------------------------------------------------------------------------------

    def submit(self, src, *, on_progress=None, block: bool = True, timeout: float | None = None) -> Future:
        """Queue one input; its Future gets the Result. `on_progress(tiles_done, tiles_total)` is called from the
        engine's thread while it is upscaled. Blocks while the incoming queue is full, unless `block` is False
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

    # -- the three phases -------------------------------------------------------------------------------------

    def _settle(self, item: _Item, result: Result | None = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self._pending -= 1
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    def _fatal(self, item: _Item, exc: BaseException) -> None:
        self.failure = self.failure or exc
        self._settle(item, exc=exc)

    def _read(self) -> None:
        while (item := self._incoming.get()) is not _END:
            if self.failure is not None:  # the runner is broken: nothing more is started
                self._fatal(item, self.failure)
                continue
            try:
                item.job = self.processor.prepare(item.src)
                if isinstance(item.job, Job):
                    item.job.on_progress = item.on_progress
            except BaseException as exc:  # noqa: BLE001 - handed to the submitter through the Future
                item.job = exc
            self._prepared.put(item)
        self._prepared.put(_END)

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
            jobs = [item.job for item in items if isinstance(item.job, Job)]
            if jobs:
                try:
                    self.processor.run_engine_many(jobs)  # errors land on the jobs; finish settles them
                except BaseException as exc:  # noqa: BLE001
                    for job in jobs:
                        job.error = exc
            for item in items:
                self._finished.put(item)
        self._finished.put(_END)

    def _write(self) -> None:
        while (item := self._finished.get()) is not _END:
            job = item.job
            if isinstance(job, BaseException):
                self._fatal(item, job)
                continue
            try:
                result = job if isinstance(job, Result) else self.processor.finish(job)
            except BaseException as exc:  # noqa: BLE001
                self._fatal(item, exc)
                continue
            self._settle(item, result)
