"""`superres` command line: upscale | watch | models list/pull/verify | info.

Every option is also a SUPERRES_* variable (see pipeline/settings.py). Exit codes: 0 all done, 1 some items
failed (each recorded), 2 bad usage or configuration (one line, no traceback)."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import ConfigError, DownloadError
from pipeline.settings import Settings, load_settings


def _engine_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", help="catalog name, e.g. edsr-x3, fsrcnn-x3 (SUPERRES_MODEL)")
    g.add_argument("--model-dir", type=Path, help="where model files are looked up (default: the download cache)")
    g.add_argument("--engine", choices=["auto", "opencv", "torch"])
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="torch engine (auto: fp16 on CUDA)")
    g.add_argument("--threads", type=int, help="engine threads (0: library default)")
    return p


def _pipeline_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pipeline")
    g.add_argument("--failed", help="folder or s3:// prefix for failed inputs and NAME.error.json (default: beside the outbox)")
    g.add_argument("--policy", choices=["tile", "cap"], help="tile: full resolution (default); cap: shrink to --cap-side first")
    g.add_argument("--tile", type=int, help="tile side in input pixels (0: the engine's choice)")
    g.add_argument("--tile-batch", type=int, help="tiles per engine call (0: the engine's choice)")
    g.add_argument("--cap-side", type=int)
    g.add_argument("--format", choices=["keep", "png", "jpeg", "webp", "tiff"], help="output format (default: keep the input's)")
    g.add_argument("--jpeg-quality", type=int)
    g.add_argument("--webp-quality", type=int)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superres", description="Super-resolution with OpenCV dnn_superres models.")
    sub = parser.add_subparsers(dest="command", required=True)
    engine, pipeline = _engine_options(), _pipeline_options()

    up = sub.add_parser("upscale", parents=[engine, pipeline], help="upscale files, folders (recursive) and globs")
    up.add_argument("inputs", nargs="+", help="files, folders, glob patterns or s3://bucket/key-or-prefix")
    up.add_argument("--out", dest="outbox", help="output folder or s3://bucket/prefix/ (SUPERRES_OUTBOX)")

    w = sub.add_parser("watch", parents=[engine, pipeline], help="upscale files dropped into an inbox folder")
    w.add_argument("--inbox", help="folder, or s3://bucket/prefix/ (polled)")
    w.add_argument("--outbox", help="folder or s3://bucket/prefix/")
    w.add_argument("--processed", help="where settled inputs go with --disposition move (default: INBOX/processed)")
    w.add_argument("--disposition", choices=["keep", "move", "delete"], help="what to do with an input once settled")
    w.add_argument("--poll", action="store_const", const=True, help="poll (network/FUSE mounts): take files once size+mtime are stable")
    w.add_argument("--settle-s", type=float)
    w.add_argument("--rescan-s", type=float, help="local: full rescan period; S3: listing period")
    w.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz on this port (0: off; default 9100)")

    wk = sub.add_parser("worker", parents=[engine, pipeline], help="take S3 event messages from an SQS queue")
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

    m = sub.add_parser("models", help="the model catalog")
    msub = m.add_subparsers(dest="models_command", required=True)
    for name, text in (("list", "list catalog models and whether their files are present"),
                       ("verify", "check the checksums of the model files present")):
        mp = msub.add_parser(name, help=text)
        mp.add_argument("--model-dir", type=Path)
    pull = msub.add_parser("pull", help="download models with checksum verification")
    pull.add_argument("names", nargs="+")
    pull.add_argument("--model-dir", type=Path)
    pull.add_argument("--base-url", dest="model_base_url", help="a mirror serving the model files by name")
    pull.add_argument("--force", action="store_true")

    sub.add_parser("info", parents=[engine], help="engine, device, model and the settings in force")
    return parser


SETTING_NAMES = set(Settings.model_fields)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(**{k: v for k, v in vars(args).items() if k in SETTING_NAMES})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        from handler.logs import setup_logging

        setup_logging(settings.log_format, settings.log_level)
        if args.command == "upscale":
            from handler.oneshot import run_upscale

            return run_upscale(settings, args.inputs)
        if args.command == "watch":
            from handler.watch import run_watch

            return run_watch(settings)
        if args.command == "worker":
            from handler.worker import run_worker

            return run_worker(settings, max_messages=args.max_messages, idle_exit_s=args.idle_exit_s)
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
    return 2


def run_models(settings: Settings, args) -> int:
    from models.catalog import get_model
    from models.files import default_model_dir, list_rows, model_status, pull

    model_dir = settings.model_dir or default_model_dir()
    if args.models_command == "list":
        rows = list_rows(model_dir)
        print(f"{'name':<16} {'algorithm':<8} {'scale':>5} {'bytes':>10}  status / note   (model dir: {model_dir})")
        for r in rows:
            size = r["size"] if r["size"] is not None else "~40M"
            note = f"  {r['note']}" if r.get("note") else ""
            print(f"{r['name']:<16} {r['algorithm']:<8} {r['scale']:>5} {size:>10}  {r['status']}{note}")
        return 0
    if args.models_command == "verify":
        bad = 0
        for r in list_rows(model_dir):
            if r["status"] == "missing":
                continue
            print(f"{r['name']:<16} {r['status']}")
            bad += r["status"] != "ok"
        return 1 if bad else 0
    for name in args.names:
        spec = get_model(name)
        path = pull(spec, model_dir, base_url=settings.model_base_url, force=args.force)
        print(f"{spec.name}: {model_status(spec, model_dir)} {path}")
    return 0


def run_info(settings: Settings) -> int:
    from models.engines import load_engine

    engine, spec = load_engine(settings)
    batch = settings.tile_batch or engine.default_batch()
    doc = {**engine.describe(), "context_px": spec.context_px, "tile": settings.tile or engine.default_tile(batch),
           "tile_batch": batch,
           "settings": json.loads(settings.model_dump_json())}
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
