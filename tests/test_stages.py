"""The stage runner every driver submits into: many producers, bounded waiting, progress per item, results per
item, a clean close; and the bytes -> bytes transform that every driver runs."""

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED_MODELS
from handler.runtime import open_processor
from pipeline.adapters.local_files import LocalFile
from pipeline.errors import TransientError
from pipeline.settings import load_settings
from pipeline.stages import Closed, Full, StageRunner
from pipeline.transform import transform_bytes


def processor_for(tmp_path, name, **extra):
    return open_processor(load_settings(outbox=str(tmp_path / name), model="fsrcnn-small-x2", model_dir=SHARED_MODELS,
                                        **extra))


def test_several_producers_get_each_its_own_result(tmp_path, small_images):
    processor = processor_for(tmp_path, "out")
    runner = StageRunner(processor, depth=2, queue_max=2)
    futures = {}

    def produce(paths):
        for p in paths:
            futures[p.name] = runner.submit(LocalFile(p, p.name))  # blocks while the runner is full

    threads = [threading.Thread(target=produce, args=(small_images[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {name: f.result(timeout=120) for name, f in futures.items()}
    runner.close()
    processor.close()
    assert sorted(results) == sorted(p.name for p in small_images)
    by_name = {p.name: p for p in small_images}
    for name, r in results.items():
        assert r.outcome == "done" and r.source.rel == name
        h, w = cv2.imread(str(by_name[name])).shape[:2]
        assert cv2.imread(r.output).shape[:2] == (2 * h, 2 * w)
    assert runner.pending() == 0


def test_a_busy_writer_publishes_in_groups_and_a_lost_claim_costs_only_its_item(tmp_path, small_images):
    processor = processor_for(tmp_path, "out")
    images = small_images[:6]
    encoded = threading.Semaphore(0)
    sizes: list[int] = []
    real_encode, real_finish = processor.encode, processor.finish_many

    def encode(job, workers=1):
        real_encode(job, workers)
        encoded.release()

    def finish_many(jobs):
        sizes.append(len(jobs))
        if len(sizes) == 1:  # the writer is slow once: the next items are encoded meanwhile and wait for it
            for _ in range(4):  # this one, two queued, one held by the engine thread (the queues are 2 deep)
                assert encoded.acquire(timeout=120)
            # the third input's claim is taken over meanwhile (another process, after a long pause of ours)
            db = sqlite3.connect(processor.ledger.path)
            with db:
                db.execute("UPDATE items SET generation=generation+1 WHERE source=?", (str(images[2]),))
            db.close()
        return real_finish(jobs)

    processor.encode, processor.finish_many = encode, finish_many
    runner = StageRunner(processor, depth=2)
    futures = [runner.submit(LocalFile(p, p.name)) for p in images]
    results = [f.result(timeout=120) for f in futures]
    runner.close()
    processor.close()
    assert sizes[0] == 1 and max(sizes) >= 2 and sum(sizes) == len(images)  # later items shared a commit
    assert [r.outcome for r in results] == ["done", "done", "lost-claim", "done", "done", "done"]
    assert not (tmp_path / "out" / images[2].name).exists()  # fenced before the outbox was touched
    for r in results[:2] + results[3:]:
        assert cv2.imread(r.output) is not None
    assert not list((tmp_path / "out" / ".superres" / "tmp").iterdir())  # the lost one's staged output too


def test_an_error_on_one_item_of_a_group_settles_that_item_and_holds_nothing(tmp_path, small_images):
    """A look-up that fails after the rename (an S3 HEAD cut off, here on a local outbox) is that item's: it is
    given back for a retry with its claim released, the rest of its group is done, and the process holds no key
    (found by the fault test: the error escaped the group, the claim stayed held and the worker never stopped)."""
    processor = processor_for(tmp_path, "out")
    images = small_images[:4]
    real_etag = processor.outbox.etag
    broken = str(tmp_path / "out" / images[1].name)

    def etag(url):
        if url == broken:
            raise TransientError(f"looking up {url} failed: the connection was closed", stage="publish")
        return real_etag(url)

    processor.outbox.etag = etag
    groups: list[int] = []
    real_finish = processor.finish_many
    processor.finish_many = lambda jobs: groups.append(len(jobs)) or real_finish(jobs)
    runner = StageRunner(processor, depth=2)
    results = [f.result(timeout=120) for f in [runner.submit(LocalFile(p, p.name)) for p in images]]
    runner.close()
    assert [r.outcome for r in results] == ["done", "retry", "done", "done"]
    assert "connection was closed" in results[1].detail
    rows = sqlite3.connect(processor.ledger.path).execute("SELECT source, state FROM items").fetchall()
    assert sorted(state for _, state in rows) == ["done"] * 3  # the failed one's claim was given back
    assert not processor._inflight and not processor._claims  # nothing held: a stop is not kept waiting
    processor.close()


def test_a_full_queue_is_refused_at_once_when_asked_not_to_wait(tmp_path, small_images):
    processor = processor_for(tmp_path, "out")
    gate = threading.Event()
    real = processor.engine.upscale
    processor.engine.upscale = lambda image: gate.wait(60) and real(image)  # the engine is busy
    runner = StageRunner(processor, depth=1, queue_max=1)
    accepted, refused = [], 0
    for p in small_images:
        try:
            accepted.append(runner.submit(LocalFile(p, p.name), block=False))
        except Full:
            refused += 1
    assert refused > 0 and accepted  # engine 1 + queues 1 + 1 + reader 1 + waiting 1: the rest are refused
    assert runner.pending() == len(accepted)
    gate.set()
    assert all(f.result(timeout=120).outcome == "done" for f in accepted)
    runner.close()
    with pytest.raises(Closed):
        runner.submit(LocalFile(small_images[0], "late.jpg"))
    processor.close()


def test_progress_is_reported_per_item_and_close_finishes_what_is_in_hand(tmp_path, small_images):
    processor = processor_for(tmp_path, "out", tile=32)  # several tiles per image
    runner = StageRunner(processor)
    seen: dict[str, list] = {}
    futures = [runner.submit(LocalFile(p, p.name), on_progress=lambda d, t, n=p.name: seen.setdefault(n, []).append((d, t)))
               for p in small_images[:3]]
    runner.close()  # at once: what was submitted is still finished
    assert all(f.done() and f.result().outcome == "done" for f in futures)
    for name, steps in seen.items():
        total = steps[-1][1]
        assert total > 1 and steps[-1] == (total, total)  # ends complete
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)  # only goes up
        assert all(t == total for _, t in steps)  # the total is known from the first call
    assert len(seen) == 3
    processor.close()


def test_the_transform_is_what_the_pipeline_publishes(tmp_path, small_images):
    processor = processor_for(tmp_path, "out")
    for p in small_images[:2]:
        result = processor.process(LocalFile(p, p.name))
        data, ctype = transform_bytes(p.read_bytes(), processor.engine, processor.spec, processor.opt.transform())
        assert data == open(result.output, "rb").read()
        assert ctype == {".jpg": "image/jpeg", ".png": "image/png"}[p.suffix]
    processor.close()


def _watch_engine_calls(processor, hold_s: float = 0.05):
    """Wrap the processor's engine phase: the most items in it at once, and each call's (source, items in it)."""
    real = processor.run_engine_many
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "calls": []}

    def run_engine_many(jobs, **kw):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["calls"].append((jobs[0].src.rel, state["now"]))
        try:
            threading.Event().wait(hold_s)  # long enough that a second lane, if any, is seen running meanwhile
            return real(jobs, **kw)
        finally:
            with lock:
                state["now"] -= 1

    processor.run_engine_many = run_engine_many
    return state


def test_small_items_run_side_by_side_with_the_same_bytes_in_submission_order(tmp_path, small_images):
    """onnxruntime on a CPU: two small items in the engine at once (each call then its encode, on a lane); the
    outputs are byte for byte those of one item at a time, and results are settled in submission order."""
    outputs = {}
    for lanes in (1, 2):
        processor = processor_for(tmp_path, f"out{lanes}", engine="onnxruntime")
        assert processor.lanes == min(8, os.cpu_count() or 1)  # onnxruntime on a CPU, a thin model: one per core
        processor.lanes = lanes
        calls = _watch_engine_calls(processor)
        settled: list[str] = []
        real_finish = processor.finish_many
        processor.finish_many = lambda jobs: settled.extend(j.src.rel for j in jobs) or real_finish(jobs)
        runner = StageRunner(processor, depth=2)
        futures = [runner.submit(LocalFile(p, p.name)) for p in small_images]
        results = [f.result(timeout=120) for f in futures]
        runner.close()
        processor.close()
        assert [r.outcome for r in results] == ["done"] * len(small_images)
        assert settled == [p.name for p in small_images]
        assert calls["most"] == lanes
        outputs[lanes] = {r.source.rel: Path(r.output).read_bytes() for r in results}
    assert outputs[1] == outputs[2]


def test_a_big_item_runs_alone_when_items_run_side_by_side(tmp_path, small_images, monkeypatch):
    import pipeline.stages as stages

    big = tmp_path / "src" / "big.png"
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(small_images[1])), (96, 80)))  # 4x the others' pixels
    monkeypatch.setattr(stages, "SIDE_BY_SIDE_MAX_PIXELS", 40 * 48 * 4)  # x2: the small ones' output, not more
    processor = processor_for(tmp_path, "out", engine="onnxruntime")
    processor.lanes = 2
    calls = _watch_engine_calls(processor)
    encoders: dict[str, int] = {}
    real_encode = processor.encode
    processor.encode = lambda job, workers=1: encoders.setdefault(job.src.rel, workers) and real_encode(job, workers)
    order = small_images[:3] + [big] + small_images[3:6]
    runner = StageRunner(processor, depth=2)
    results = [f.result(timeout=120) for f in [runner.submit(LocalFile(p, p.name)) for p in order]]
    runner.close()
    processor.close()
    assert [r.outcome for r in results] == ["done"] * len(order)
    assert dict(calls["calls"])["big.png"] == 1  # nothing else was in the engine when it started...
    assert calls["most"] == 2  # ...while the small ones went two at a time
    assert encoders.pop("big.png") == 2 and set(encoders.values()) == {1}  # its encode on both lanes, theirs on one
    assert cv2.imread(results[3].output).shape[:2] == (160, 192)


def _count_lanes(processor, hold_s: float = 0.05):
    """Wrap the processor's engine phase: the lanes (workers) each call was given, and the most in use at once."""
    real = processor.run_engine_many
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "workers": []}

    def run_engine_many(jobs, workers=1):
        with lock:
            state["now"] += workers
            state["most"] = max(state["most"], state["now"])
            state["workers"].append((jobs[0].src.rel, workers))
        try:
            threading.Event().wait(hold_s)
            return real(jobs, workers=workers)
        finally:
            with lock:
                state["now"] -= workers

    processor.run_engine_many = run_engine_many
    return state


def test_an_item_of_several_tiles_takes_the_lanes_that_are_free(tmp_path, small_images):
    """Alone, an item's tiles run on every lane; among other items, no more lanes are in use than there are;
    the outputs are byte for byte those of one lane. An item of one tile takes one lane, even alone."""
    outputs = {}
    for lanes in (1, 2):
        processor = processor_for(tmp_path, f"out{lanes}", engine="onnxruntime", tile=32)  # 40x48: 4 tiles
        processor.lanes = lanes
        state = _count_lanes(processor)
        runner = StageRunner(processor, depth=2)
        first = runner.submit(LocalFile(small_images[0], small_images[0].name)).result(timeout=120)
        results = [first] + [f.result(timeout=120)
                             for f in [runner.submit(LocalFile(p, p.name)) for p in small_images[1:]]]
        runner.close()
        processor.close()
        assert [r.outcome for r in results] == ["done"] * len(small_images)
        assert state["workers"][0] == (small_images[0].name, lanes)  # alone: every lane
        assert state["most"] == lanes  # never more
        outputs[lanes] = {r.source.rel: Path(r.output).read_bytes() for r in results}
    assert outputs[1] == outputs[2]
    processor = processor_for(tmp_path, "one-tile", engine="onnxruntime")
    processor.lanes = 2
    state = _count_lanes(processor)
    runner = StageRunner(processor, depth=2)
    assert runner.submit(LocalFile(small_images[0], small_images[0].name)).result(timeout=120).outcome == "done"
    runner.close()
    processor.close()
    assert state["workers"] == [(small_images[0].name, 1)]


def test_engines_that_group_or_share_state_run_one_item_at_a_time(tmp_path):
    for name, extra in (("opencv", {}), ("grouped", {"engine": "onnxruntime", "tile_batch": 4})):
        processor = processor_for(tmp_path, name, **({"engine": "opencv"} | extra))
        # OpenCV: one cv2.dnn.Net, not for two threads at once; tiles grouped into calls: one call at a time
        assert processor.lanes == 1, name
        processor.close()


_FAULTS_PROBE = """
import resource, sys
import numpy as np
from pipeline.stages import reuse_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # an item's arrays: several live at once, then all freed
        arrays = [np.ones((768, 1024), np.float32) for _ in range(6)]  # 3 MB each, every page written
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
print(reuse_freed_memory(), plain, faults())
"""


def test_freed_item_memory_is_reused_not_faulted_in_again():
    # glibc's default gives freed blocks back to the kernel: every later item's arrays fault in again (zeroed)
    done = subprocess.run([sys.executable, "-c", _FAULTS_PROBE], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    was_set, plain, reused = done.stdout.split()
    if was_set != "True":
        pytest.skip("no glibc mallopt here")
    # measured: ~91,000 page faults by default, ~4,600 once set (the first round's, after the earlier trims)
    assert int(reused) * 5 < int(plain)


class _EngineLike:
    def __init__(self, name, device, **lanes):
        self.name, self.device = name, device
        self.__dict__.update(lanes)


def test_lanes_are_the_engines_choice_unless_asked_and_never_more_than_it_can_take():
    from pipeline.errors import ConfigError
    from pipeline.process import engine_lanes

    onnx_cpu = _EngineLike("onnxruntime", "cpu", side_by_side=2, max_side_by_side=16)
    one_at_a_time = _EngineLike("opencv", "cpu")  # no side_by_side: one item at a time
    assert engine_lanes(onnx_cpu, 0, 1) == 2
    assert engine_lanes(onnx_cpu, 0, 4) == 1  # tiles grouped into calls: one call at a time
    assert engine_lanes(onnx_cpu, 1, 1) == 1 and engine_lanes(onnx_cpu, 5, 1) == 5
    assert engine_lanes(one_at_a_time, 0, 1) == engine_lanes(one_at_a_time, 1, 1) == 1
    with pytest.raises(ConfigError, match="opencv engine on cpu runs one item at a time"):
        engine_lanes(one_at_a_time, 2, 1)
    with pytest.raises(ConfigError, match="grouped calls"):
        engine_lanes(onnx_cpu, 2, 4)
    with pytest.raises(ConfigError, match="at most 16 items"):
        engine_lanes(onnx_cpu, 17, 1)


def test_an_error_escaping_the_engine_in_a_lane_is_that_items_and_holds_no_claim(tmp_path, small_images):
    """A bug in the engine phase (not an engine failure it reports) on a lane: as on the engine thread, the item is
    settled by the writer (given back, its claim released) and the others are done."""
    processor = processor_for(tmp_path, "out", engine="onnxruntime")
    processor.lanes = 2
    real = processor.run_engine_many
    broken = small_images[1].name

    def run_engine_many(jobs, **kw):
        if jobs[0].src.rel == broken:
            raise RuntimeError("a bug in the engine phase")
        return real(jobs, **kw)

    processor.run_engine_many = run_engine_many
    runner = StageRunner(processor, depth=2)
    results = [f.result(timeout=120) for f in [runner.submit(LocalFile(p, p.name)) for p in small_images[:4]]]
    runner.close()
    assert [r.outcome for r in results][0] == "done" and results[2].outcome == results[3].outcome == "done"
    assert results[1].outcome != "done" and "a bug in the engine phase" in results[1].detail
    assert not processor._inflight and not processor._claims  # nothing held: a stop is not kept waiting
    processor.close()


def slowed_and_counted(step, wait_s: float, sizes: list | None = None):
    """`step` that first waits `wait_s` (a request's latency), and the most threads seen in it at once
    (`most[0]`); `sizes` gets the length of each call's argument."""
    inside: set[int] = set()
    most = [0]
    lock = threading.Lock()

    def slowed(arg):
        if sizes is not None:
            sizes.append(len(arg))
        with lock:
            inside.add(threading.get_ident())
            most[0] = max(most[0], len(inside))
        time.sleep(wait_s)
        try:
            return step(arg)
        finally:
            with lock:
                inside.discard(threading.get_ident())
    return slowed, most


def test_several_readers_overlap_slow_reads_and_the_same_content_twice_is_done_once(tmp_path, small_images):
    """Objects in S3: a read is requests whose latency, not the CPU, is its cost. Readers side by side overlap
    them (here each read waits 0.3 s more): 6 items on 3 readers take about two waits, not six. Two copies of
    one image among them are upscaled once (the second waits for the first's key, on its own reader), and close
    ends every reader."""
    processor = processor_for(tmp_path, "out")
    processor.prepare, most = slowed_and_counted(processor.prepare, 0.3)
    src = tmp_path / "in"
    src.mkdir()
    images = small_images[:5]
    for p in images:
        shutil.copy(p, src / p.name)
    shutil.copy(images[0], src / "again.png")  # the same bytes as the first
    runner = StageRunner(processor, depth=2, readers=3)
    started = time.monotonic()
    futures = [runner.submit(LocalFile(p, p.name)) for p in sorted(src.iterdir())]
    results = [f.result(timeout=120) for f in futures]
    took = time.monotonic() - started
    runner.close()
    runs = processor.ledger.stats()["engine_runs"]
    processor.close()
    assert most[0] == 3
    assert took < 6 * 0.3, took
    assert sorted(r.outcome for r in results) == ["done"] * 5 + ["duplicate"]
    assert runs == 5
    assert not [t for t in threading.enumerate() if t.name.startswith("superres-read")]


def test_where_each_publish_is_its_own_requests_several_run_side_by_side(tmp_path, small_images):
    """An S3 outbox or ledger: a publish is requests (mark publishing, PUT, HEAD, mark done) whose latency is its
    cost, and nothing is shared by grouping them (Processor.publishers > 1). Publishes side by side overlap
    them (here each waits 0.3 s more): 6 items on 3 publishers take about two waits, not six; every item still
    gets its own result and output, and close ends every publisher. A local outbox and ledger publish in groups
    instead, one group at a time."""
    processor = processor_for(tmp_path, "out")
    assert (processor.publishers, processor.write_group) == (1, 8)
    processor.publishers, processor.write_group = 3, 1  # as an S3 outbox makes them
    sizes: list[int] = []
    processor.finish_many, most = slowed_and_counted(processor.finish_many, 0.3, sizes)
    images = small_images[:6]
    runner = StageRunner(processor, depth=2)
    started = time.monotonic()
    futures = [runner.submit(LocalFile(p, p.name)) for p in images]
    results = [f.result(timeout=120) for f in futures]
    took = time.monotonic() - started
    runner.close()
    processor.close()
    assert most[0] == 3 and set(sizes) == {1}
    assert took < 6 * 0.3, took
    assert [r.source.rel for r in results] == [p.name for p in images]
    for p, r in zip(images, results):
        assert r.outcome == "done"
        h, w = cv2.imread(str(p)).shape[:2]
        assert cv2.imread(r.output).shape[:2] == (2 * h, 2 * w)
    assert runner.pending() == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("superres-publish")]


def test_each_output_is_fsynced_by_the_writer_before_the_ledger_names_it(tmp_path, small_images, monkeypatch):
    """A publishing mark names a staged temp file, and a recovery renames what it names into the outbox, so that
    file must be on disk first: the writer fsyncs it before the mark. The lanes and encoders that write it do
    not wait for the disk (their cores would sit idle)."""
    processor = processor_for(tmp_path, "out")
    events: list[tuple[str, str, str]] = []  # (what, thread, temp path)
    real_fsync, real_mark = os.fsync, processor.ledger.mark_publishing_many

    def fsync(fd):
        events.append(("fsync", threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def mark_publishing_many(marks):
        for mark in marks:
            events.append(("marked", threading.current_thread().name, mark.temp.partition(":")[2]))
        return real_mark(marks)

    monkeypatch.setattr(os, "fsync", fsync)
    processor.ledger.mark_publishing_many = mark_publishing_many
    runner = StageRunner(processor, depth=2)
    results = [f.result(timeout=120) for f in [runner.submit(LocalFile(p, p.name)) for p in small_images[:6]]]
    runner.close()
    processor.close()
    assert [r.outcome for r in results] == ["done"] * 6
    marked = [(i, path) for i, (what, _, path) in enumerate(events) if what == "marked"]
    assert len(marked) == 6
    for i, temp in marked:
        synced = [j for j, (what, thread, path) in enumerate(events) if what == "fsync" and path == temp]
        assert synced and synced[0] < i, f"{temp} was named before it was fsynced"
        assert {events[j][1] for j in synced} == {"superres-write"}, "a temp file was fsynced off the writer"
