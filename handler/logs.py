"""Logging set up once: plain text for people, or one JSON object per line for log pipelines.
Structured values travel in `extra={"fields": {...}}`.

On a terminal with a progress bar drawn (`progress_bar`), log lines are written through `tqdm.write`: above the
bar, which stays whole. Native libraries' own stderr lines (libpng's "libpng error: …", OpenCV's "[ WARN:0@…]")
can be routed through this logging too (`native_stderr_routed`), instead of reaching the terminal raw."""

import json
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone

# libraries' loggers that say too much for us below WARNING (boto's "Found credentials in environment
# variables.") or at DEBUG (Pillow's "STREAM b'IHDR'", watchdog's every event)
NOISY = ("botocore", "boto3", "s3transfer", "urllib3")
CHATTY_AT_DEBUG = ("PIL", "watchdog", "asyncio", "filelock", "fsspec", "matplotlib")

_bars: list = []  # the progress bars drawn now (tqdm objects): log lines go above them
_bars_lock = threading.Lock()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class BarAwareHandler(logging.StreamHandler):
    """A StreamHandler that, while a progress bar is drawn on its stream, writes through `tqdm.write`: the bar
    is cleared, the line printed, the bar drawn again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _bars:
            return super().emit(record)
        try:
            write_line(self.format(record), self.stream)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)


def write_line(text: str, stream=None) -> None:
    """Print one line to `stream` (stderr), above the progress bar if one is drawn."""
    stream = stream if stream is not None else sys.stderr
    if _bars:
        from tqdm import tqdm

        tqdm.write(text, file=stream)
    else:
        stream.write(text + "\n")
        stream.flush()


@contextmanager
def progress_bar(**kwargs):
    """A tqdm bar on stderr; while it is open, log lines and `write_line` go above it."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    bar = tqdm(**kwargs)
    with _bars_lock:
        _bars.append(bar)
    try:
        yield bar
    finally:
        with _bars_lock:
            _bars.remove(bar)
        bar.close()


def quiet_opencv(level: str = "INFO") -> None:
    """OpenCV's own log lines ("[ WARN:0@0.1] … PNG input buffer is incomplete") only for errors; all of them
    with DEBUG. Set before cv2 is first imported (OPENCV_LOG_LEVEL), and on cv2 itself if it already is."""
    wanted = "WARNING" if level == "DEBUG" else "ERROR"
    os.environ.setdefault("OPENCV_LOG_LEVEL", wanted)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        try:
            cv2.utils.logging.setLogLevel(getattr(cv2.utils.logging, f"LOG_LEVEL_{os.environ['OPENCV_LOG_LEVEL']}",
                                                  cv2.utils.logging.LOG_LEVEL_ERROR))
        except Exception:  # noqa: BLE001 - an OpenCV without its logging module: its default stays
            pass


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = BarAwareHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # boto's INFO lines ("Found credentials in environment variables.") are not ours to show
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    for chatty in CHATTY_AT_DEBUG:
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLevelName(level)))
    quiet_opencv(level)


# what native libraries write to stderr themselves, and the level it is logged at here: a libpng error goes with
# an item that fails with the reason in words, so the raw line is only for -v
_NATIVE = (
    (re.compile(r"^libpng (error|warning): "), logging.DEBUG),
    (re.compile(r"^\[ ?(WARN|INFO|DEBUG|VERBOSE)[: ]"), logging.DEBUG),  # OpenCV: [ WARN:0@0.123] …
    (re.compile(r"^\[ ?(ERROR|FATAL)[: ]"), logging.WARNING),
)
native_log = logging.getLogger("superres.native")


def _route_native(line: str, real_fd: int) -> None:
    for pattern, level in _NATIVE:
        if pattern.search(line):
            native_log.log(level, "%s", line.strip())
            return
    # anything else (a library's message we do not know): shown as it is, above a bar if one is drawn
    if _bars:
        write_line(line.rstrip("\n"))
    else:
        os.write(real_fd, line.encode("utf-8", "backslashreplace"))


@contextmanager
def native_stderr_routed():
    """While inside: file descriptor 2 (where C libraries such as libpng write) is a pipe read by a thread that
    logs the lines it knows (see _NATIVE) and passes the rest on. Python's sys.stderr, when it is fd 2, is
    pointed at the real stderr meanwhile, so our own lines and the bar go straight out. Restored on exit."""
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    try:
        real_fd = os.dup(2)
    except OSError:  # no stderr at all (closed): nothing to route
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    old_stderr = sys.stderr
    swapped = None
    try:
        if old_stderr.fileno() == 2:
            swapped = open(real_fd, "w", buffering=1, encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                           errors="backslashreplace", closefd=False)
    except (AttributeError, OSError, ValueError):  # not a real file (pytest's capsys): it is not fd 2 either
        pass
    retargeted = []
    if swapped is not None:
        sys.stderr = swapped
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is old_stderr:
                h.setStream(swapped)
                retargeted.append(h)

    def pump() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="backslashreplace", newline="") as pipe:
            for line in pipe:
                try:
                    _route_native(line, real_fd)
                except Exception:  # noqa: BLE001 - never lose the pump: a blocked pipe would hang the libraries
                    pass

    reader = threading.Thread(target=pump, name="superres-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        os.dup2(real_fd, 2)  # the pipe's last writer is gone: the reader sees its end
        reader.join(timeout=5)
        if swapped is not None:
            swapped.flush()
            for h in retargeted:
                h.setStream(old_stderr)
            sys.stderr = old_stderr
            swapped.close()
        os.close(real_fd)
