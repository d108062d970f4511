"""`superres upscale`: files, folders (recursive, relative tree kept) and globs through the same pipeline
and ledger as watch mode, with a progress bar on a terminal and a summary at the end."""

import glob
import signal
import logging
import os
import sys
import time
from pathlib import Path

from handler.runtime import open_processor
from pipeline.adapters.s3_objects import S3Objects, s3_client
from pipeline.adapters.s3_place import s3_inputs
from pipeline.errors import ConfigError
from pipeline.overlap import run_overlapped
from pipeline.process import Result
from pipeline.s3keys import is_s3_uri
from pipeline.intake import is_temp_name
from pipeline.adapters.local_files import LocalFile

log = logging.getLogger("superres")


def expand_inputs(args: list[str], *, s3_endpoint_url: str | None = None) -> list:
    """Files as named, folders walked (temp and hidden names skipped), globs expanded, s3:// keys and prefixes
    listed. Two inputs never share an output name: a later one with a taken relative name becomes `name (2)`."""
    sources: list = []
    seen_paths: set[str] = set()
    taken: set[str] = set()

    def add(path: Path, rel: Path, root: Path | None) -> None:
        key = os.path.abspath(path)
        if key in seen_paths:
            return
        seen_paths.add(key)
        candidate, n = rel, 2
        while candidate.as_posix() in taken:
            candidate = rel.with_name(f"{rel.stem} ({n}){rel.suffix}")
            n += 1
        taken.add(candidate.as_posix())
        sources.append(LocalFile(path, candidate.as_posix(), root))

    objects = None
    for arg in args:
        if is_s3_uri(arg):
            if objects is None:
                objects = S3Objects(s3_client(s3_endpoint_url))
            found = s3_inputs(objects, arg)
            if not found:
                raise ConfigError(f"no objects under {arg}")
            for obj in found:
                if obj.rel in taken:
                    raise ConfigError(f"two inputs would share the output name {obj.rel!r}")
                taken.add(obj.rel)
                sources.append(obj)
            continue
        path = Path(arg)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not is_temp_name(name):
                        full = Path(dirpath) / name
                        add(full, full.relative_to(path), path)
        elif os.path.lexists(path):
            add(path, Path(path.name), None)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise ConfigError(f"no files match {arg!r}")
            for match in matches:
                if os.path.isfile(match) and not is_temp_name(os.path.basename(match)):
                    add(Path(match), Path(os.path.basename(match)), None)
        else:
            raise ConfigError(f"no such file or folder: {arg}")
    return sources


def run_upscale(settings, inputs: list[str]) -> int:
    if settings.outbox is None:
        raise ConfigError("give an output folder: --out DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    sources = expand_inputs(inputs, s3_endpoint_url=settings.s3_endpoint_url)
    processor = open_processor(settings)
    counts = {"done": 0, "duplicate": 0, "failed": 0, "skipped": 0, "retry": 0}
    pixels = 0
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)  # finish the items in hand, start no more

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="img", file=sys.stderr)

    def report(result: Result) -> None:
        nonlocal pixels
        counts[result.outcome] += 1
        pixels += result.output_pixels
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: v for k, v in counts.items() if v})
        else:
            where = f" -> {result.output}" if result.output else ""
            print(f"{result.outcome:<9} {result.source.id}{where}" + (f"  ({result.detail})" if result.detail else ""),
                  file=sys.stderr, flush=True)

    started = time.perf_counter()
    # read/decode of the next items and encode/publish of finished ones overlap the engine
    run_overlapped(processor, sources, report, stop=lambda: bool(stopping))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    rate = pixels / 1e6 / seconds if seconds > 0 else 0.0
    not_started = len(sources) - sum(counts.values())
    print(
        f"done {counts['done']}, duplicate {counts['duplicate']}, failed {counts['failed'] + counts['retry']}, "
        f"already done {counts['skipped']}"
        + (f", not started {not_started} (interrupted)" if not_started else "")
        + f"; {seconds:.1f} s, {rate:.2f} output Mpx/s"
    )
    return 1 if counts["failed"] or counts["retry"] or not_started else 0
