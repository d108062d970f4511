"""`superres upscale`: files, folders (recursive, relative tree kept) and globs through the same pipeline
and ledger as watch mode, with a progress bar on a terminal and a summary at the end."""

import glob
from contextlib import nullcontext
import signal
import logging
import os
import sys
import time
from pathlib import Path

from handler.runtime import open_processor
from pipeline.errors import ConfigError
from pipeline.overlap import run_overlapped
from pipeline.process import Result
from pipeline.s3keys import is_s3_uri, parse_s3_uri
from pipeline.intake import is_temp_name
from pipeline.adapters.local_files import LocalFile, read_limited

log = logging.getLogger("superres")


class Inputs(list):
    """What expand_inputs found: the sources (this list itself), and beside them

    - `skipped`: paths met in folder walks and globs that are not images by their extension (notes.txt): no
      input, no failure; the runner shows each as a Result with outcome "skipped" and detail NOT_AN_IMAGE;
    - `missing`: arguments that name nothing (no such file or folder, a glob matching nothing), when others do:
      the runner says each in one line on stderr (`missing_lines`: "no such file or folder: X"), processes the
      rest and exits 1."""

    def __init__(self, sources=(), skipped=(), missing=(), missing_lines=()):
        super().__init__(sources)
        self.skipped: list[str] = list(skipped)
        self.missing: list[str] = list(missing)
        self.missing_lines: list[str] = list(missing_lines)


NOT_AN_IMAGE = "not an image file (by extension)"


def image_extensions() -> frozenset[str]:
    """The extensions (lower case, with the dot) that walks and globs take: every one of pipeline.formats."""
    from pipeline.formats import FORMATS

    return frozenset(e for f in FORMATS.values() for e in f.extensions)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def expand_inputs(args: list[str], *, s3_endpoint_url: str | None = None, exclude: list[str] = ()) -> Inputs:
    """Files as named, folders walked (temp and hidden names skipped), globs expanded, s3:// keys and prefixes
    listed. Two inputs never share an output name: a later one with a taken relative name becomes `name (2)`.

    Returns an `Inputs`: a list of the sources, with `.skipped` (walked or globbed paths whose extension is not
    an image's: jpg/jpeg/jpe/png/webp/tif/tiff/bmp/gif, any case; a file named explicitly is tried whatever its
    name) and `.missing` (arguments that named nothing, while others did). Every argument naming nothing is a
    ConfigError (one line, exit 2), as is an S3 input whose bucket is missing or cannot be reached.

    `exclude`: the places this run writes into (outbox, failed, processed). Their contents, and any `.superres`
    folder, are never inputs: skipped in walks, globs and listings (compared as resolved real paths); an input
    folder that is one of them (its originals would be overwritten by their upscales), or a file or folder named
    inside one, is a ConfigError.

    Symlinks are never followed: walks and globs do not enter symlinked folders, and a symlinked file (walked,
    matched or named) is refused by LocalFile.read with a failure record and left where it is."""
    sources: list = []
    skipped: list[str] = []
    missing: list[tuple[str, str]] = []  # (argument, what is wrong with it)
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
    checked_buckets: set[str] = set()
    for arg in args:
        if is_s3_uri(arg):
            if objects is None:
                from pipeline.adapters.s3_objects import S3Objects, s3_client  # boto3: ~0.1 s, S3 runs only
                from pipeline.adapters.s3_place import s3_inputs

                objects = S3Objects(s3_client(s3_endpoint_url))
            bucket, prefix = parse_s3_uri(arg)
            if (bucket, _folder(prefix)) in [(b, _folder(p)) for b, p in s3_places]:
                raise ConfigError(f"{arg} is both an input and where this run writes: the upscales would overwrite "
                                  "the originals; give --out another prefix")
            if bucket not in checked_buckets:  # a missing bucket, no credentials, a dead endpoint: said in seconds
                from handler.runtime import check_buckets

                check_buckets(s3_endpoint_url, {bucket: "input"})
                checked_buckets.add(bucket)
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
                        if not is_image_name(name):
                            skipped.append(str(full))
                            continue
                        add(full, full.relative_to(path), path)
        elif os.path.lexists(path):
            _refuse_inside(arg, os.path.join(os.path.realpath(path.parent), path.name), places, real_places)
            add(path, Path(path.name), None)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                missing.append((arg, f"no files match {arg!r}"))
                continue
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
                if not is_image_name(match):
                    skipped.append(match)
                    continue
                add(Path(match), Path(os.path.basename(match)), base)
            if ours and len(sources) == before:
                raise ConfigError(f"every file matching {arg!r} lies where this run writes (outbox, failed or "
                                  "processed folder); its own outputs are never inputs")
        else:
            missing.append((arg, f"no such file or folder: {arg}"))
    if missing and len(missing) == len(args):
        raise ConfigError(missing[0][1] if len(missing) == 1 else
                          f"none of the inputs exist: {', '.join(arg for arg, _ in missing)}")
    return Inputs(sources, skipped, [arg for arg, _ in missing], [line for _, line in missing])


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


SMALL_RUN_FILES = 8  # a run of more inputs than this, or of more bytes, is not weighed as small (no header is read)
SMALL_RUN_BYTES = 4 << 20


def small_run_pixels(sources: list) -> int | None:
    """The input pixels of a run of a few small local files, from their headers (what auto weighs: see
    models.engines.base.SMALL_RUN_GMAC); None for any other run. Read as the reader reads them (no symlink, a
    regular file, within the bytes left); one that cannot be read counts no pixels: the reader says why."""
    from pipeline.codec import read_header
    from pipeline.errors import InputRejected, TransientError

    if len(sources) > SMALL_RUN_FILES or not all(isinstance(src, LocalFile) for src in sources):
        return None
    pixels, bytes_left = 0, SMALL_RUN_BYTES
    for src in sources:
        try:
            data, _ = read_limited(src.path, bytes_left, root=src.root)
            bytes_left -= len(data)
            header = read_header(data)
        except InputRejected as exc:
            if exc.code == "too_many_bytes":
                return None  # more bytes than a small run's
            continue
        except TransientError:
            continue
        pixels += header.width * header.height * header.frames
    return pixels


def run_upscale(settings, inputs: list[str]) -> int:
    if settings.outbox is None:
        raise ConfigError("give an output folder: --out DIR or s3://bucket/prefix/ (or SUPERRES_OUTBOX)")
    sources = expand_inputs(inputs, s3_endpoint_url=settings.s3_endpoint_url,
                            exclude=[settings.outbox, settings.failed_location(), settings.processed or ""])
    item_filter = _filter_logs(settings)  # before the engine loads: its "engine ready" line is for -v
    try:
        processor = open_processor(settings, "oneshot", work_pixels=small_run_pixels(sources))
    except BaseException:
        _unfilter_logs(item_filter)
        raise
    for line in getattr(sources, "missing_lines", ()):  # named nothing: said once, the others are processed
        print(f"superres: error: {line}", file=sys.stderr)
    return _upscale_all(settings, processor, sources, item_filter)


# the pipeline's own per-item lines: the one-shot's item line says the same (one line per item); shown with -v
_PER_ITEM = ("upscaling", "failed %r at", "will retry %r", "lost the claim on %r")


class _OneLinePerItem(logging.Filter):
    """On the log handlers while `superres upscale` runs: below `min_level` nothing (at the default level the
    item lines are the INFO output; "engine ready" and the like are for -v), and none of the pipeline's per-item
    lines unless -v."""

    def __init__(self, min_level: int, drop_per_item: bool) -> None:
        super().__init__()
        self.min_level, self.drop_per_item = min_level, drop_per_item

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return False
        return not (self.drop_per_item and record.name == "superres.pipeline" and isinstance(record.msg, str)
                    and record.msg.startswith(_PER_ITEM))


def _kind(result: Result) -> str:
    """What the summary counts an item as."""
    if result.outcome == "skipped":
        if result.detail == "already failed":
            return "still failed"  # failed in an earlier run, unchanged since: still failed
        if result.detail.startswith("not an image"):
            return "not images"  # skipped by its extension: not a failure
        return "already done"
    return result.outcome


def _filter_logs(settings) -> "_OneLinePerItem":
    level = logging.getLevelName(settings.log_level)
    min_level = level if (settings.log_format == "json" or level != logging.INFO) else logging.WARNING
    # with -q the JSON item objects (INFO) are not shown: then the pipeline's own warning is a failure's one line
    json_quiet = settings.log_format == "json" and level >= logging.WARNING
    item_filter = _OneLinePerItem(min_level, drop_per_item=level > logging.DEBUG and not json_quiet)
    for h in logging.getLogger().handlers:
        h.addFilter(item_filter)
    return item_filter


def _unfilter_logs(item_filter: "_OneLinePerItem") -> None:
    for h in logging.getLogger().handlers:
        h.removeFilter(item_filter)


def _upscale_all(settings, processor, sources: list, item_filter: "_OneLinePerItem") -> int:
    """Every source through the pipeline, one line per item (a bar on a terminal), a summary, the exit code:
    0 all done; 1 some failed (in this run, or earlier and still failed), to retry, or not started after an
    engine failure; 130 interrupted by SIGINT (143 by SIGTERM)."""
    from handler.logs import native_stderr_routed, progress_bar, write_line
    from handler.ops import engine_labels, log_result

    json_logs = settings.log_format == "json"
    level = logging.getLevelName(settings.log_level)
    quiet = level >= logging.WARNING
    labels = engine_labels(processor) if json_logs else {}
    failed_place = settings.failed_location()
    kinds = ("done", "duplicate", "failed", "already done", "still failed", "retry", "not images", "lost-claim")
    counts = dict.fromkeys(kinds, 0)
    pixels = 0
    stopping: list[int] = []

    def stop(signum, _frame):
        stopping.append(signum)  # first: finish the items in hand, start no more; second: abandon them too

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    use_bar = sys.stderr.isatty() and not quiet and not json_logs
    started = time.perf_counter()
    bar = None
    said_stopping = False
    tiles_note = ""
    last_draw = 0.0

    def postfix() -> str:
        seconds = time.perf_counter() - started
        parts = [f"{k} {counts[k]}" for k in ("failed", "still failed", "retry") if counts[k]]
        if tiles_note:
            parts.append(tiles_note)
        parts.append(f"{pixels / 1e6 / seconds if seconds > 0 else 0.0:.2f} Mpx/s")
        if stopping:
            parts.append("stopping")
        return ", ".join(parts)

    def announce_stop() -> None:
        nonlocal said_stopping
        if stopping and not said_stopping:
            said_stopping = True
            if json_logs:
                log.warning("stopping after the items in hand", extra={"fields": {
                    "signal": signal.Signals(stopping[0]).name}})
            else:
                write_line("superres: stopping after the items in hand (interrupt again to abandon them)")

    def on_tiles(done: int, total: int) -> None:  # the engine thread or a lane, after each engine call
        nonlocal tiles_note, last_draw
        if len(stopping) > 1:
            raise KeyboardInterrupt  # the item in hand is given back (its claim released), not finished
        announce_stop()
        if bar is None or total < 2:
            return
        tiles_note = f"tiles {done}/{total}" if done < total else ""
        now = time.perf_counter()
        if now - last_draw >= 0.2 or not tiles_note:
            last_draw = now
            bar.set_postfix_str(postfix())

    def report(result: Result) -> None:  # the writer's thread, in input order
        nonlocal pixels
        kind = _kind(result)
        counts[kind] += 1
        pixels += result.output_pixels
        announce_stop()
        line = f"{result.outcome:<9} {result.source.id}" + (f" -> {result.output}" if result.output else "") + (
            f"  ({result.detail})" if result.detail else "")
        problem = kind in ("failed", "retry", "lost-claim")
        if json_logs:
            log_result(result, labels)
        elif bar is not None:
            if problem:
                write_line(line)  # above the bar
            bar.update(1)
            bar.set_postfix_str(postfix())
        elif problem or not quiet:
            write_line(line)

    processor.on_tiles = on_tiles
    interrupted = False
    not_images = list(getattr(sources, "skipped", ()))  # walked or globbed, not images by their extension
    total = len(sources) + len(not_images)
    try:
        with native_stderr_routed(), (progress_bar(total=total, unit="img", dynamic_ncols=True)
                                      if use_bar else nullcontext()) as bar:
            for path in not_images:
                report(Result(LocalFile(Path(path), Path(path).name), "skipped", detail=NOT_AN_IMAGE))
            # read/decode of the next items and encode/publish of finished ones overlap the engine
            try:
                run_overlapped(processor, sources, report,
                               stop=lambda: bool(stopping) or bool(processor.engine_failure))
            except KeyboardInterrupt:
                interrupted = True
    finally:
        processor.on_tiles = None
        processor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _unfilter_logs(item_filter)
    interrupted = interrupted or bool(stopping)
    seconds = time.perf_counter() - started
    rate = pixels / 1e6 / seconds if seconds > 0 else 0.0
    not_started = total - sum(counts.values())
    parts = [f"done {counts['done']}", f"duplicate {counts['duplicate']}",
             f"failed {counts['failed']}" + (f" (records in {failed_place})" if counts["failed"] else ""),
             f"already done {counts['already done']}"]
    if counts["still failed"]:
        parts.append(f"still failed {counts['still failed']} (records in {failed_place})")
    if counts["retry"]:
        parts.append(f"to retry {counts['retry']} (a passing problem: run again)")
    if counts["not images"]:
        parts.append(f"not images {counts['not images']}")
    if counts["lost-claim"]:
        parts.append(f"lost claim {counts['lost-claim']} (another process finished them)")
    if interrupted:
        what = "not finished" if len(stopping) > 1 else "not started"  # a second signal abandons those in hand
        parts.append(f"interrupted ({not_started} {what})" if not_started else "interrupted")
    elif not_started:
        parts.append(f"not started {not_started}")
    summary = ", ".join(parts) + f"; {seconds:.1f} s, {rate:.2f} output Mpx/s"
    if json_logs:
        log.info("summary", extra={"fields": {**{k.replace(" ", "_").replace("-", "_"): v for k, v in counts.items()},
                                              "not_started": not_started, "interrupted": interrupted,
                                              "seconds": round(seconds, 3), "output_mpx_s": round(rate, 3)}})
    print(summary, flush=True)
    if processor.engine_failure:
        print(f"superres: error: the engine failed ({processor.engine_failure}); nothing was filed as failed for it: "
              "run again", file=sys.stderr)
    if interrupted:
        signum = stopping[0] if stopping else signal.SIGINT
        return 128 + int(signum)  # 130: SIGINT (Ctrl-C), 143: SIGTERM
    failures = counts["failed"] + counts["retry"] + counts["still failed"]
    missing = getattr(sources, "missing", ())  # inputs that named nothing (said at the start)
    return 1 if failures or not_started or processor.engine_failure or missing else 0
