"""Run the Processor's three phases on three threads, so the engine is not idle while the next items are read,
hashed and decoded, or while finished ones are encoded and published.

    reader:  prepare(src)  -> [queue, `depth`] -> engine: run_engine(job) -> [queue, `depth`] -> writer: finish(job)

Queues are bounded: memory holds at most about 2*depth+3 items (plus a GPU's group), whatever the number of
inputs (backpressure).
Results come out in input order. The engine stays on the calling thread (CUDA contexts and OpenCV's thread pool
like one caller)."""

import queue
import threading
from collections.abc import Callable, Iterable

from pipeline.process import Job, Processor, Result

_END = object()


def run_overlapped(processor: Processor, sources: Iterable, on_result: Callable[[Result], None], *,
                   depth: int = 2, stop: Callable[[], bool] = lambda: False) -> None:
    prepared: queue.Queue = queue.Queue(maxsize=depth)
    finished: queue.Queue = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            for src in sources:
                if stop() or failure:
                    break
                prepared.put(processor.prepare(src))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(exc)
        finally:
            prepared.put(_END)

    def writer() -> None:
        while (item := finished.get()) is not _END:
            try:
                on_result(item if isinstance(item, Result) else processor.finish(item))
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)

    threads = [threading.Thread(target=reader, name="superres-read", daemon=True),
               threading.Thread(target=writer, name="superres-write", daemon=True)]
    for t in threads:
        t.start()
    # on a GPU, several images ready at once share engine calls; one call per image on a CPU
    group = processor.batch if processor.batch > 1 else 1
    try:
        ended = False
        while not ended:
            items = [prepared.get()]
            while len(items) < group and items[-1] is not _END:
                try:
                    items.append(prepared.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is _END:
                ended = True
                items.pop()
            jobs = [item for item in items if isinstance(item, Job)]
            if jobs:
                processor.run_engine_many(jobs)
            for item in items:  # in input order; jobs were filled in place
                finished.put(item)
    finally:
        finished.put(_END)
        for t in threads:
            t.join()
    if failure:
        raise failure[0]
