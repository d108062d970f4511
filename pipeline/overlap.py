"""A finite list of inputs through the stage runner (pipeline/stages.py), results in input order on the
calling thread: what one-shot and a Lambda batch need.

Memory holds at most about 2*depth+3 decoded items (plus a GPU's group), whatever the number of inputs."""

from collections import deque
from collections.abc import Callable, Iterable

from pipeline.process import Processor, Result
from pipeline.stages import Full, StageRunner


REPORT_EVERY_S = 0.05  # while the runner is full, results are reported at least this often


def run_overlapped(processor: Processor, sources: Iterable, on_result: Callable[[Result], None], *,
                   depth: int = 2, stop: Callable[[], bool] = lambda: False) -> None:
    runner = StageRunner(processor, depth=depth, queue_max=1)  # one waiting reference: the read-ahead is the reader's
    in_order: deque = deque()

    def take_oldest() -> None:
        on_result(in_order.popleft().result())  # re-raises what escaped the Processor (KeyboardInterrupt, a bug)

    def take_done() -> None:
        while in_order and in_order[0].done():
            take_oldest()

    try:
        for src in sources:
            if stop() or runner.failure is not None:
                break
            # wait for room, not for the oldest result: the reader must never run dry while the oldest item is
            # still being published (that left the engine idle two thirds of the time on small images)
            while True:
                try:
                    in_order.append(runner.submit(src, timeout=REPORT_EVERY_S))
                    break
                except Full:
                    take_done()  # reports in order meanwhile
            take_done()
        while in_order:
            take_oldest()
    finally:
        runner.close()
