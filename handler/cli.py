"""`superres` command line: upscale | watch | worker | serve | models list/pull/verify | info.

Every option is also a SUPERRES_* variable (see pipeline/settings.py). Exit codes: 0 all done, 1 some items
failed (each recorded), 2 bad usage or configuration (one line, no traceback)."""

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import ConfigError, DownloadError
from pipeline.settings import Settings, load_settings


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return f"superres {package_version('superres')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "superres (version unknown: not installed)"


class _Version(argparse.Action):
    """--version, the package metadata read only when asked (importlib.metadata costs ~30 ms of every start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default,
                         help=help or "show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())  # on stdout, as argparse's own version action
        parser.exit()


def _common_options() -> argparse.ArgumentParser:
    """On every subcommand (and the top level): --version, -q/--quiet, -v/--verbose."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--version", action=_Version)
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="WARNING",
                      default=argparse.SUPPRESS, help="warnings and errors only (SUPERRES_LOG_LEVEL=WARNING)")
    loud.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                      default=argparse.SUPPRESS, help="debug detail too (SUPERRES_LOG_LEVEL=DEBUG)")
    return p


def _engine_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", help="catalog name, e.g. edsr-x3, fsrcnn-x3, or a family with --scale: "
                                   "fsrcnn (SUPERRES_MODEL)")
    g.add_argument("--scale", type=int, help="upscaling factor: picks the family's model (--model fsrcnn --scale 3 "
                                             "is fsrcnn-x3); with a full name it must match")
    g.add_argument("--model-dir", type=Path, help="where model files are looked up (default: the download cache)")
    g.add_argument("--engine", choices=["auto", "opencv", "onnxruntime", "torch"],
                   help="auto: on a GPU torch, then onnxruntime; on a CPU the model's fastest installed engine")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, fp32 on a CPU; bf16: torch's engine, on CUDA or a CPU with native bf16")
    g.add_argument("--threads", type=int, help="engine threads (0: library default)")
    g.add_argument("--lanes", type=int, help="items in the engine at once (0: the engine's choice: onnxruntime on a "
                                             "CPU 2, others 1)")
    return p


def _pipeline_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pipeline")
    g.add_argument("--failed", help="folder or s3:// prefix for failed inputs and NAME.error.json (default: "
                                    "OUTBOX.failed beside the outbox, e.g. upscaled.failed/; made on the first failure)")
    g.add_argument("--policy", choices=["tile", "cap"], help="tile: full resolution (default); cap: shrink to --cap-side first")
    g.add_argument("--tile", type=int, help="tile side in input pixels (0: the engine's choice)")
    g.add_argument("--tile-batch", type=int, help="tiles per engine call (0: the engine's choice)")
    g.add_argument("--cap-side", type=int)
    g.add_argument("--format", type=str.lower, choices=["keep", "png", "jpeg", "jpg", "webp", "tiff", "tif"],
                   help="output format (default: keep the input's)")
    g.add_argument("--quality", type=int, help="JPEG and WebP quality, 1-100 (default 95)")
    g.add_argument("--jpeg-quality", type=int, help="JPEG quality (default: --quality)")
    g.add_argument("--webp-quality", type=int, help="WebP quality (default: --quality)")
    g.add_argument("--png-compression", choices=["fast", *map(str, range(10))],
                   help="PNG: fast (default; the quickest) or a zlib level 0-9 (6: ~18%% smaller, ~7x slower)")
    g.add_argument("--suffix", help="output names NAME{SUFFIX}.ext, e.g. --suffix _x3: photo_x3.png (default: none)")
    g.add_argument("--overwrite", action="store_const", const=True,
                   help="process again what the ledger says is already done, and publish over its output")
    g.add_argument("--max-bytes", type=int)
    g.add_argument("--max-pixels", type=int)
    g.add_argument("--max-output-pixels", type=int, help="refuse outputs larger than this (width*height*frames)")
    g.add_argument("--min-side", type=int)
    g.add_argument("--on-duplicate", choices=["copy", "record"])
    g.add_argument("--no-dedup", dest="dedup", action="store_const", const=False)
    g.add_argument("--ledger", help="ledger: a SQLite file or s3:// prefix (default: OUT/.superres/ledger.sqlite3; "
                                    "S3: s3://BUCKET/.superres/ledger/PREFIX/)")
    g.add_argument("--lease-s", type=float, help="a claim not renewed for this long is taken over (default 600)")
    g.add_argument("--log-format", choices=["text", "json"])
    g.add_argument("--s3-endpoint-url", help="S3/SQS endpoint (moto, MinIO); default AWS")
    return p


COMMANDS = ("upscale", "watch", "worker", "serve", "enqueue", "models", "info")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `command` only that subcommand's: a run pays for the options it can take, not
    for all seven commands' (argparse's help strings go through gettext, ~4 ms of every start)."""
    common = _common_options()
    parser = argparse.ArgumentParser(prog="superres", description="Super-resolution with OpenCV dnn_superres models.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    engine, pipeline = _engine_options(), _pipeline_options()

    if command in (None, "upscale"):
        up = sub.add_parser("upscale", parents=[common, engine, pipeline], help="upscale files, folders (recursive) and globs")
        up.add_argument("inputs", nargs="+", help="files, folders, glob patterns or s3://bucket/key-or-prefix "
                                                  "(walks and globs take image files only, by extension)")
        up.add_argument("--out", dest="outbox", help="output folder or s3://bucket/prefix/ (SUPERRES_OUTBOX); with one "
                                                     "input file, a name with an image extension (big.png) is the "
                                                     "output file itself")

    if command in (None, "watch"):
        w = sub.add_parser("watch", parents=[common, engine, pipeline], help="upscale files dropped into an inbox folder")
        w.add_argument("--inbox", help="folder, or s3://bucket/prefix/ (polled)")
        w.add_argument("--outbox", help="folder or s3://bucket/prefix/")
        w.add_argument("--processed", help="where settled inputs go with --disposition move (default: INBOX/processed)")
        w.add_argument("--disposition", choices=["keep", "move", "delete"], help="what to do with an input once settled")
        w.add_argument("--poll", action="store_const", const=True, help="poll (network/FUSE mounts): take files once size+mtime are stable")
        w.add_argument("--settle-s", type=float, help="quiet time after a writer's close (with --poll: of stable size "
                                                       "and mtime) before a file is taken; renamed-in files are taken "
                                                       "at once (default 1)")
        w.add_argument("--rescan-s", type=float, help="local: full rescan period; S3: listing period")
        w.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz on this port (0: off; default 9100)")

    if command in (None, "worker"):
        wk = sub.add_parser("worker", parents=[common, engine, pipeline], help="take S3 event messages from an SQS queue")
        wk.add_argument("--queue", dest="queue_url", help="SQS queue URL (SUPERRES_QUEUE_URL)")
        wk.add_argument("--outbox", help="s3://bucket/prefix/")
        wk.add_argument("--inbox", help="s3://bucket/prefix/: outputs keep the key's path below this prefix "
                                        "(default: the whole key)")
        wk.add_argument("--disposition", choices=["keep", "move", "delete"])
        wk.add_argument("--batch-size", type=int, help="messages received at a time (1-10)")
        wk.add_argument("--visibility-s", type=int, help="visibility timeout kept up by heartbeats while an item is in work")
        wk.add_argument("--wait-s", type=int, help="long-poll wait (0-20 s)")
        wk.add_argument("--max-messages", type=int, default=None, help="stop after this many messages (for tests and batch jobs)")
        wk.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz on this port (0: off; default 9100)")
        wk.add_argument("--idle-exit-s", type=float, default=None, help="stop after this long with an empty queue")

    if command in (None, "serve"):
        sv = sub.add_parser("serve", parents=[common, engine, pipeline],
                            help="an HTTP API (POST /upscale, /v1/jobs) and an upload page on the same pipeline")
        sv.add_argument("--host", help="address to bind (SUPERRES_HOST; default 127.0.0.1, the container 0.0.0.0)")
        sv.add_argument("--port", type=int, help="port (SUPERRES_PORT; default 8080; 0: any free one)")
        sv.add_argument("--outbox", "--out", dest="outbox", help="folder or s3://bucket/prefix/ for results and the ledger")
        sv.add_argument("--api-token", help="bearer token required on every endpoint but /healthz (SUPERRES_API_TOKEN; "
                                            "prefer the variable: a flag shows in `ps`)")
        sv.add_argument("--cors-origins", help="comma-separated origins allowed by CORS, or * (default: no CORS)")
        sv.add_argument("--queue-max", type=int, help="uploads waiting for the pipeline before 503 + Retry-After (16)")
        sv.add_argument("--result-ttl-s", type=float, help="results are removed this long after they were made (3600)")

    if command in (None, "enqueue"):
        eq = sub.add_parser("enqueue", parents=[common], help="a backfill: one S3 event message per image under an S3 "
                                                               "prefix, for the workers (superres worker) to upscale")
        eq.add_argument("source", metavar="s3://BUCKET/PREFIX/", help="the objects to process (listed, paginated)")
        eq.add_argument("--queue", dest="queue_url", help="the workers' SQS queue URL (SUPERRES_QUEUE_URL)")
        eq.add_argument("--outbox", help="the workers' outbox: objects in it (and its failed place) are left out")
        eq.add_argument("--s3-endpoint-url", help="S3/SQS endpoint (moto, MinIO); default AWS")

    if command in (None, "models"):
        m = sub.add_parser("models", parents=[common], help="the model catalog")
        msub = m.add_subparsers(dest="models_command", required=True)
        for name, text in (("list", "list catalog models and whether their files are present"),
                           ("verify", "check the checksums of the model files present")):
            mp = msub.add_parser(name, parents=[common], help=text)
            mp.add_argument("--model-dir", type=Path)
        pull = msub.add_parser("pull", parents=[common], help="download models with checksum verification")
        pull.add_argument("names", nargs="+")
        pull.add_argument("--model-dir", type=Path)
        pull.add_argument("--base-url", dest="model_base_url", help="a mirror serving the model files by name")
        pull.add_argument("--force", action="store_true")
        export = msub.add_parser("export", parents=[common], help="write a model's network as ONNX (for trtexec etc.)")
        export.add_argument("names", nargs=1, metavar="NAME")
        export.add_argument("--onnx", type=Path, required=True, metavar="FILE",
                            help="NCHW float32 in and out, dynamic batch/height/width; colour and mean stay in superres")
        export.add_argument("--fp16", action="store_true", help="half-precision weights and arithmetic (float32 edges)")
        export.add_argument("--model-dir", type=Path)

    if command in (None, "info"):
        sub.add_parser("info", parents=[common, engine], help="engine, device, model and the settings in force")
    return parser


SETTING_NAMES = set(Settings.field_names())


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(**{k: v for k, v in vars(args).items() if k in SETTING_NAMES})


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` writes every thread's stack to stderr and the process goes on: what a process that
    seems stuck is waiting on, without a debugger. Not where stderr is no file (main() called in-process, as
    the tests do under capture)."""
    import faulthandler
    import io
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        settings = settings_from_args(args)
        from handler.logs import setup_logging

        setup_logging(settings.log_format, settings.log_level)
        dump_stacks_on_sigusr1()
        if args.command == "upscale":
            from handler.oneshot import run_upscale

            settings = single_output(settings, args.inputs)
            return run_upscale(settings, args.inputs)
        if args.command == "watch":
            from handler.watch import run_watch

            return run_watch(settings)
        if args.command == "worker":
            from handler.worker import run_worker

            return run_worker(settings, max_messages=args.max_messages, idle_exit_s=args.idle_exit_s)
        if args.command == "serve":
            from handler.serve import run_serve

            return run_serve(settings)
        if args.command == "enqueue":
            from handler.enqueue import run_enqueue

            return run_enqueue(settings, args.source)
        if args.command == "models":
            return run_models(settings, args)
        if args.command == "info":
            return run_info(settings)
    except ConfigError as exc:
        print(f"superres: error: {exc.message}", file=sys.stderr)
        return 2
    except DownloadError as exc:
        print(f"superres: error: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `superres models list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except KeyboardInterrupt:  # Ctrl-C before a mode's own handlers are in place (e.g. while the model loads)
        print("superres: interrupted", file=sys.stderr)
        return 130
    return 2


def single_output(settings: Settings, inputs: list[str]) -> Settings:
    """`--out big.png` (a local name with an image extension, not an existing folder) and one input file: that is
    the output file. Its folder is the outbox and its extension the format (a --format that says otherwise is an
    error); anything but one input file is an error, rather than a folder named big.png."""
    name = settings.output_file()
    if name is None:
        return settings
    from pipeline.formats import FORMATS

    one = len(inputs) == 1 and not glob.has_magic(inputs[0]) and not inputs[0].endswith("/") and (
        inputs[0].startswith("s3://") or not os.path.isdir(inputs[0]))
    if not one:
        raise ConfigError(f"--out {settings.outbox} names an output file, so it takes one input file (not "
                          f"{'a folder or a glob' if len(inputs) == 1 else f'{len(inputs)} inputs'}); "
                          "give a folder to --out for several")
    ext = os.path.splitext(name)[1].lower()
    fmt = next(f for f in FORMATS.values() if ext in f.extensions)
    if settings.suffix:
        raise ConfigError(f"--suffix does not apply to --out {settings.outbox}, an output file: name it as wanted")
    if settings.format != "keep":
        if settings.format not in fmt.requested_as:
            raise ConfigError(f"--out {settings.outbox} is a {fmt.name} file name but --format is {settings.format}")
        return settings
    if fmt.requested_as:
        return dataclasses.replace(settings, format=fmt.requested_as[0])
    if os.path.splitext(inputs[0])[1].lower() not in fmt.extensions:  # BMP, GIF: written only when kept
        raise ConfigError(f"superres writes {fmt.name} only for a {fmt.name} input: give --out a .png, .jpg, .webp "
                          "or .tif name")
    return settings


def run_models(settings: Settings, args) -> int:
    from models.catalog import get_model
    from models.files import default_model_dir, list_rows, model_status, pull

    model_dir = settings.model_dir or default_model_dir()
    if args.models_command == "list":
        rows = list_rows(model_dir)
        print(f"{'name':<16} {'algorithm':<8} {'scale':>5} {'MACs/px':>10} {'bytes':>10}  status / note   "
              f"(model dir: {model_dir})")
        for r in rows:
            size = r["size"] if r["size"] is not None else "~40M"
            note = f"  {r['note']}" if r.get("note") else ""
            print(f"{r['name']:<16} {r['algorithm']:<8} {r['scale']:>5} {r['macs_per_pixel']:>10,} {size:>10}  "
                  f"{r['status']}{note}")
        return 0
    if args.models_command == "verify":
        # each catalog model: ok / bad (its checksum or size is wrong: the line says why) / missing. Exit 1 when a
        # file is bad or none is there at all (nothing could run: a script's `models verify && ...` stops), else 0:
        # models never pulled are not an error, most users want one or two.
        rows = list_rows(model_dir)
        present = [r for r in rows if r["status"] != "missing"]
        if not present:
            print(f"no model files in {model_dir}: run `superres models pull NAME` (see `superres models list`)")
            return 1
        print(f"checked {len(present)} model file(s) in {model_dir} (sha256, or git blob id and size for EDSR)")
        bad = 0
        for r in rows:
            state = r["status"] if r["status"] in ("ok", "missing") else f"bad ({r['status']})"
            hint = f"  run `superres models pull {r['name']} --force`" if state.startswith("bad") else ""
            print(f"{r['name']:<16} {state}{hint}")
            bad += state.startswith("bad")
        return 1 if bad else 0
    if args.models_command == "export":
        from models.onnx_export import export_file

        path = export_file(get_model(args.names[0]), model_dir, args.onnx, precision="fp16" if args.fp16 else "fp32")
        print(f"{args.names[0]}: wrote {path}")
        return 0
    for name in args.names:
        spec = get_model(name)
        path = pull(spec, model_dir, base_url=settings.model_base_url, force=args.force)
        if spec.bundled:
            print(f"{spec.name}: bundled with superres, nothing to pull ({path})")
            continue
        print(f"{spec.name}: {model_status(spec, model_dir)} {path}")
    return 0


def run_info(settings: Settings) -> int:
    from models.catalog import get_model
    from models.engines import load_engine, probe_hardware
    from models.engines.base import choose_engine
    from models.files import default_model_dir, model_path, model_status

    spec = get_model(settings.model)
    model_dir = settings.model_dir or default_model_dir()
    state = model_status(spec, model_dir)
    if state != "ok":  # still useful: what would run where, and what to do about the model
        choice = choose_engine(settings.engine, settings.device, probe_hardware(settings.engine, settings.device),
                               fastest_on_cpu=spec.fastest_cpu_engine, precision=settings.precision)
        fix = f"superres models pull {spec.name}" + (" --force" if state != "missing" else "")
        doc = {"engine": choice.engine, "device": choice.device, "model": spec.name, "scale": spec.scale,
               "model_file": str(model_path(spec, model_dir)), "model_status": state, "to_get_it": fix,
               "settings": settings.as_json_dict()}
        print(json.dumps(doc, indent=2))
        print(f"superres: model {spec.name} is {state} in {model_dir}: run `{fix}`", file=sys.stderr)
        return 0
    engine, spec = load_engine(settings)
    batch = settings.tile_batch or engine.default_batch()
    from pipeline.process import engine_lanes

    doc = {**engine.describe(), "context_px": spec.context_px, "tile": settings.tile or engine.default_tile(batch),
           "tile_batch": batch, "lanes": engine_lanes(engine, settings.lanes, batch),
           "settings": settings.as_json_dict()}
    print(json.dumps(doc, indent=2))
    return 0


def run() -> None:
    """The `superres` command: main(), then out at once. Everything main opened is closed and durable by then
    (outputs and ledger rows synced, the ledger closed); what is left is the interpreter's teardown of
    onnxruntime, OpenCV and numpy, ~50 ms of every one-shot run (docs/benchmarks.md)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
