"""The overlapped runner: same results as one-by-one, in input order, with bounded read-ahead."""

import shutil

from conftest import SHARED_MODELS
from handler.runtime import open_processor
from pipeline.adapters.local_files import LocalFile
from pipeline.overlap import run_overlapped
from pipeline.settings import load_settings


def processor_for(tmp_path, name):
    return open_processor(load_settings(outbox=str(tmp_path / name), model="fsrcnn-small-x2", model_dir=SHARED_MODELS))


def test_overlapped_equals_sequential_in_order_with_bounded_read_ahead(tmp_path, small_images):
    sources = [LocalFile(p, p.name) for p in small_images]
    shutil.copy(small_images[0], tmp_path / "same-bytes.jpg")  # a duplicate inside one batch: waits for the first
    sources.insert(3, LocalFile(tmp_path / "same-bytes.jpg", "same-bytes.jpg"))

    sequential = processor_for(tmp_path, "seq")
    expected = [sequential.process(s) for s in sources]

    pulled, ahead, results = [0], [], []

    def feed():
        for s in sources:
            pulled[0] += 1
            yield s

    def collect(result):
        results.append(result)
        ahead.append(pulled[0] - len(results))

    depth = 2
    run_overlapped(processor_for(tmp_path, "ovl"), feed(), collect, depth=depth)
    assert [r.source.id for r in results] == [s.id for s in sources]
    assert [r.outcome for r in results] == [r.outcome for r in expected]
    assert [r.outcome for r in results].count("duplicate") == 1
    for got, want in zip(results, expected):
        if got.outcome == "done":
            assert open(got.output, "rb").read() == open(want.output, "rb").read()
    # two queues of decoded items, one item in each of the three threads, one waiting reference, and the input
    # just pulled while the oldest is reported
    assert max(ahead) <= 2 * depth + 5


def test_stop_finishes_what_is_in_hand_and_starts_nothing_more(tmp_path, small_images):
    sources = [LocalFile(p, p.name) for p in small_images]
    results = []
    run_overlapped(processor_for(tmp_path, "o"), sources, results.append, stop=lambda: len(results) >= 2)
    assert 2 <= len(results) < len(sources)
    assert all(r.outcome == "done" for r in results)


def test_several_images_share_engine_calls_with_the_same_results(tmp_path, small_images):
    """What the overlapped runner does on a GPU with the jobs that are ready at once."""
    import cv2
    import numpy as np

    sources = [LocalFile(p, p.name) for p in small_images]
    one = processor_for(tmp_path, "one")
    expected = {r.source.id: r.output for r in map(one.process, sources)}
    grouped = open_processor(load_settings(outbox=str(tmp_path / "grp"), model="fsrcnn-small-x2",
                                           model_dir=SHARED_MODELS, engine="torch", tile_batch=8))
    calls = []
    real = grouped.engine.upscale_batch
    grouped.engine.upscale_batch = lambda images: calls.append(len(images)) or real(images)
    jobs = [grouped.prepare(s) for s in sources]
    results = [grouped.finish(job) for job in grouped.run_engine_many(jobs)]
    assert all(r.outcome == "done" for r in results) and len(results) == len(sources)
    assert max(calls) > 1  # tiles of different images went through one call
    for r in results:
        a = cv2.imread(r.output, cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(expected[r.source.id], cv2.IMREAD_UNCHANGED).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # torch vs OpenCV: at most a rounding flip
