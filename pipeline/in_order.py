"""`map_in_order`: one function over many items on a few threads at once, the results in the items' order (an
image's tiles through the engine, a PNG's bands through deflate)."""

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

_NONE = object()


def map_in_order(fn: Callable, items: Sequence, workers: int, thread_name: str = "superres-worker") -> Iterator:
    """fn(item) for each item, at most `workers` at once (never more threads than items), yielded in the items'
    order: memory holds that many results whatever the number of items. An error is raised at its item: nothing
    after it is started, and the calls under way are waited for. One worker: on the calling thread, no thread."""
    workers = min(workers, len(items))
    if workers <= 1:
        yield from map(fn, items)
        return
    todo = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix=thread_name) as pool:
        running: deque = deque()
        try:
            for item in todo:
                running.append(pool.submit(fn, item))
                if len(running) == workers:
                    break
            while running:
                result = running.popleft().result()
                if (following := next(todo, _NONE)) is not _NONE:
                    running.append(pool.submit(fn, following))
                yield result
        finally:
            for call in running:
                call.cancel()
