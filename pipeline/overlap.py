"""A finite list of inputs through the stage runner (pipeline/stages.py), results in input order on the
calling thread: what one-shot and a Lambda batch need.

Memory holds at most about 2*depth+3 decoded items (plus a GPU's group), whatever the number of inputs."""

from collections import deque
from collections.abc import Callable, Iterable

from pipeline.process import Processor, Result
from pipeline.stages import Full, StageRunner


def run_overlapped(processor: Processor, sources: Iterable, on_result: Callable[[Result], None], *,
                   depth: int = 2, stop: Callable[[], bool] = lambda: False) -> None:
    runner = StageRunner(processor, depth=depth, queue_max=1)  # one waiting reference: the read-ahead is the reader's
    in_order: deque = deque()

    def take_oldest() -> None:
        on_result(in_order.popleft().result())  # re-raises what escaped the Processor (KeyboardInterrupt, a bug)

    try:
        for src in sources:
            if stop() or runner.failure is not None:
                break
            while True:
                try:
                    in_order.append(runner.submit(src, block=False))
                    break
                except Full:
                    take_oldest()  # makes room, and reports in order meanwhile
            while in_order and in_order[0].done():
                take_oldest()
        while in_order:
            take_oldest()
    finally:
        runner.close()
