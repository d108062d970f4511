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
from pipeline.s3keys import is_s3_uri, parse_s3_uri
from pipeline.intake import is_temp_name
from pipeline.adapters.local_files import LocalFile

log = logging.getLogger("superres")


def expand_inputs(args: list[str], *, s3_endpoint_url: str | None = None, exclude: list[str] = ()) -> list:
    """Files as named, folders walked (temp and hidden names skipped), globs expanded, s3:// keys and prefixes
    listed. Two inputs never share an output name: a later one with a taken relative name becomes `name (2)`.

    `exclude`: the places this run writes into (outbox, failed, processed). Their contents, and any `.superres`
    folder, are never inputs: skipped in walks, globs and listings (compared as resolved real paths); an input
    folder that is one of them (its originals would be overwritten by their upscales), or a file or folder named
    inside one, is a ConfigError.

    Symlinks are never followed: walks and globs do not enter symlinked folders, and a symlinked file (walked,
    matched or named) is refused by LocalFile.read with a failure record and left where it is."""
    sources: list = []
    seen_paths: set[str] = set()
    taken: set[str] = set()
    places = [p for p in exclude if p and not is_s3_uri(str(p))]
    real_places = [os.path.realpath(p) for p in places]
    s3_places = [parse_s3_uri(str(p)) for p in exclude if p and is_s3_uri(str(p))]

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
            bucket, prefix = parse_s3_uri(arg)
            if (bucket, _folder(prefix)) in [(b, _folder(p)) for b, p in s3_places]:
                raise ConfigError(f"{arg} is both an input and where this run writes: the upscales would overwrite "
                                  "the originals; give --out another prefix")
            found = s3_inputs(objects, arg)
            if not found:
                raise ConfigError(f"no objects under {arg}")
            found = [obj for obj in found if ".superres" not in obj.key.split("/") and not any(
                b == obj.bucket and obj.key.startswith(_folder(p)) for b, p in s3_places)]  # this run's own writes
            if not found:
                raise ConfigError(f"every object under {arg} lies where this run writes (outbox or failed prefix); "
                                  "its own outputs are never inputs")
            for obj in found:
                if obj.rel in taken:
                    raise ConfigError(f"two inputs would share the output name {obj.rel!r}")
                taken.add(obj.rel)
                sources.append(obj)
            continue
        path = Path(arg)
        if path.is_dir():  # a folder named here may be a link: it is taken as named
            real = os.path.realpath(path)
            if real in real_places:
                named = places[real_places.index(real)]
                raise ConfigError(f"{arg} is an input folder and also where this run writes ({named}): the upscales "
                                  "would overwrite the originals; give --out (and --failed) a folder of their own "
                                  f"(one inside it, like {os.path.join(arg, 'upscaled')}, is fine)")
            _refuse_inside(arg, real, places, real_places)
            for dirpath, dirnames, filenames in os.walk(path):  # never enters a symlinked folder
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                     and os.path.realpath(os.path.join(dirpath, d)) not in real_places)
                for name in sorted(filenames):
                    if not is_temp_name(name):
                        full = Path(dirpath) / name
                        add(full, full.relative_to(path), path)
        elif os.path.lexists(path):
            _refuse_inside(arg, os.path.join(os.path.realpath(path.parent), path.name), places, real_places)
            add(path, Path(path.name), None)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise ConfigError(f"no files match {arg!r}")
            base = _glob_base(arg)
            before, ours = len(sources), 0
            for match in matches:
                if (os.path.isdir(match) or is_temp_name(os.path.basename(match)) or ".superres" in Path(match).parts
                        or _through_symlinked_folder(Path(match), base)):
                    continue  # like a walk: folders are not inputs, and a symlinked one is never entered
                if _inside(os.path.join(os.path.realpath(os.path.dirname(match)), os.path.basename(match)),
                           real_places):
                    ours += 1
                    continue
                add(Path(match), Path(os.path.basename(match)), base)
            if ours and len(sources) == before:
                raise ConfigError(f"every file matching {arg!r} lies where this run writes (outbox, failed or "
                                  "processed folder); its own outputs are never inputs")
        else:
            raise ConfigError(f"no such file or folder: {arg}")
    return sources


def _folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _inside(real: str, real_places: list[str]) -> str | None:
    """The place that `real` (a resolved path) is, or lies in; None if none."""
    return next((p for p in real_places if real == p or real.startswith(p.rstrip(os.sep) + os.sep)), None)


def _refuse_inside(arg: str, real: str, places: list[str], real_places: list[str]) -> None:
    place = _inside(real, real_places)
    if place is not None:
        named = places[real_places.index(place)]
        raise ConfigError(f"{arg} lies in {named}, where this run writes: its own outputs are never inputs "
                          "(copy the file elsewhere to upscale it again)")


def _glob_base(pattern: str) -> Path:
    """The folder a glob starts from: its leading parts without wildcards."""
    parts = Path(pattern).parts[:-1]
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _through_symlinked_folder(match: Path, base: Path) -> bool:
    """Whether a folder between `base` and the matched file is a symlink (a `*` or `**` that went through it)."""
    here = base
    try:
        parts = match.relative_to(base).parts[:-1]
    except ValueError:  # not below its own base: take no chances
        return True
    for part in parts:
        here = here / part
        if here.is_symlink():
            return True
    return False


def run_upscale(settings, inputs: list[str]) -> int:
    if settings.outbox is None:
        raise ConfigError("give an output folder: --out DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    sources = expand_inputs(inputs, s3_endpoint_url=settings.s3_endpoint_url,
                            exclude=[settings.outbox, settings.failed_location(), settings.processed or ""])
    processor = open_processor(settings, "oneshot")
    counts = {"done": 0, "duplicate": 0, "failed": 0, "skipped": 0, "retry": 0, "lost-claim": 0}
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
    try:
        run_overlapped(processor, sources, report, stop=lambda: bool(stopping) or bool(processor.engine_failure))
    finally:
        processor.close()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    rate = pixels / 1e6 / seconds if seconds > 0 else 0.0
    not_started = len(sources) - sum(counts.values())
    print(
        f"done {counts['done']}, duplicate {counts['duplicate']}, failed {counts['failed'] + counts['retry']}, "
        f"already done {counts['skipped']}"
        + (f", lost claim {counts['lost-claim']} (another process finished them)" if counts["lost-claim"] else "")
        + (f", not started {not_started} (interrupted)" if not_started else "")
        + f"; {seconds:.1f} s, {rate:.2f} output Mpx/s"
    )
    if processor.engine_failure:
        print(f"superres: error: the engine failed ({processor.engine_failure}); nothing was filed as failed for it: "
              "run again", file=sys.stderr)
    return 1 if counts["failed"] or counts["retry"] or not_started else 0
