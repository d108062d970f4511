"""Local folders as inbox, outbox and failed place: reads with a size limit, atomic publishes, failure records."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

from pipeline.errors import InputRejected, TransientError


def read_limited(path: Path, max_bytes: int, *, root: Path | None = None) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file of at most max_bytes. Bad entries raise InputRejected naming the problem."""
    try:
        link = path.lstat()
    except FileNotFoundError:
        raise InputRejected("the file disappeared before it could be read", stage="read", code="vanished") from None
    if stat.S_ISLNK(link.st_mode) and root is not None:
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            raise InputRejected(f"the symlink points outside the inbox (to {target}); refused",
                                stage="read", code="symlink_outside")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError:
        raise InputRejected("the file disappeared (or is a broken symlink) before it could be read",
                            stage="read", code="vanished") from None
    except PermissionError:
        raise InputRejected("the file is not readable (permission denied)", stage="read", code="unreadable") from None
    except OSError as exc:
        raise TransientError(f"cannot open the file: {exc.strerror}", stage="read") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputRejected("this is a directory, not an image file", stage="read", code="is_directory")
        raise InputRejected("this is not a regular file (device, FIFO or socket)", stage="read", code="not_a_file")
    if st.st_size > max_bytes:
        os.close(fd)
        raise InputRejected(f"the file is {st.st_size} bytes, more than the limit of {max_bytes} bytes",
                            stage="read", code="too_many_bytes")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise TransientError(f"reading the file failed: {exc.strerror}", stage="read") from None
    if len(data) > max_bytes:
        raise InputRejected(f"the file grew past the limit of {max_bytes} bytes while being read",
                            stage="read", code="too_many_bytes")
    return data, st


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(data: bytes, temp: Path) -> None:
    """Write and fsync a temporary file (in the destination's filesystem, so the rename is atomic)."""
    temp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        temp.unlink(missing_ok=True)
        kind = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
        raise TransientError(f"writing the output failed: {kind}", stage="publish") from None


def commit_temp(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fsync_dir(final.parent)


def publish_bytes(data: bytes, final: Path, temp: Path) -> None:
    write_temp(data, temp)
    commit_temp(temp, final)


def copy_file_atomic(src: Path, final: Path, temp: Path) -> None:
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, temp)
    with open(temp, "rb+") as f:
        os.fsync(f.fileno())
    commit_temp(temp, final)


def unique_path(path: Path) -> Path:
    """`path`, or `name (2).ext`, ... if something is already there."""
    if not os.path.lexists(path):
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def write_failure(record: dict, input_path: Path, failed_path: Path, *, move_input: bool, tmp_dir: Path) -> None:
    """Set a failed input aside: `NAME.error.json` first (atomic), then the input itself, moved or copied untouched.

    Written in that order so a crash in between leaves the input where it was, to be failed again on restart.
    """
    failed_path.parent.mkdir(parents=True, exist_ok=True)
    reason = failed_path.with_name(failed_path.name + ".error.json")
    try:
        link = input_path.lstat()
    except OSError:
        link = None
    if link is None:
        record = {**record, "input_kept": False, "note": "the input no longer exists; only this record remains"}
    publish_bytes(json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n", reason,
                  tmp_dir / f"failure-json.{os.getpid()}.tmp")
    if link is None:
        return
    try:
        if move_input:
            shutil.move(input_path, failed_path)  # a rename on one filesystem; keeps symlinks as links
            fsync_dir(failed_path.parent)
        elif stat.S_ISREG(link.st_mode):
            copy_file_atomic(input_path, failed_path, tmp_dir / f"failure-copy.{os.getpid()}.tmp")
        # keep mode and a symlink or directory: it stays where it is; the record says why it was not taken
    except OSError as exc:
        # e.g. unreadable (chmod 000): the record stands, the input stays where it was
        record = {**record, "input_kept": False, "note": f"could not set the input aside: {exc.strerror}"}
        publish_bytes(json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n", reason,
                      tmp_dir / f"failure-json.{os.getpid()}.tmp")


# -- the pipeline's view of local folders ----------------------------------------------------------------------


class LocalFile:
    """An input file. `rel` is its name relative to the folder it came from: outputs keep that tree."""

    def __init__(self, path: Path, rel: str, root: Path | None = None, *, processed: Path | None = None):
        self.path = path
        self.rel = rel
        self.root = root  # symlinks must stay inside this folder
        self.processed = processed  # where `disposition=move` puts it
        self.id = str(path)

    def __repr__(self) -> str:
        return f"LocalFile({str(self.path)!r})"

    def fingerprint(self) -> str | None:
        try:
            st = self.path.lstat()
        except OSError:
            return None
        return f"{st.st_size}:{st.st_mtime_ns}"

    def read(self, max_bytes: int) -> tuple[bytes, str]:
        data, st = read_limited(self.path, max_bytes, root=self.root)
        return data, f"{st.st_size}:{st.st_mtime_ns}"

    def metadata(self, sha256: str, model: str) -> dict[str, str]:
        return {}

    def dispose(self, disposition: str) -> None:
        if disposition == "keep" or not os.path.lexists(self.path):
            return
        if disposition == "delete":
            self.path.unlink()
            return
        if self.processed is None:
            return
        target = unique_path(self.processed / self.rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.path, target)


class Staged:
    def __init__(self, token: str | None, data: bytes | None = None):
        self.token = token  # what the ledger remembers to finish a publish after a crash (a temp path here)
        self.data = data


class LocalPlace:
    """A local folder to publish into (outbox) or set failures aside in. Temporary files live in
    `ROOT/.superres/tmp`, on the same filesystem, named `<tag>.<pid>.tmp` so leftovers can be told apart."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp_dir = root / ".superres" / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def url(self, rel: str) -> str:
        return str(self.root / rel)

    def name(self, url: str) -> str:
        return Path(url).name

    def exists(self, url: str) -> bool:
        return os.path.lexists(url)

    def _temp(self, tag: str) -> Path:
        return self.tmp_dir / f"{tag}.{os.getpid()}.tmp"

    def stage(self, data: bytes, tag: str) -> Staged:
        temp = self._temp(tag)
        write_temp(data, temp)
        return Staged(str(temp))

    def commit(self, staged: Staged, rel: str, *, content_type: str, metadata: dict[str, str]) -> str:
        final = self.root / rel
        commit_temp(Path(staged.token), final)
        return str(final)

    def finish_staged(self, token: str | None, url: str) -> bool:
        """After a crash between fsync and rename: rename a temp file still there; True if the output is now whole."""
        if token and os.path.exists(token):
            commit_temp(Path(token), Path(url))
            return True
        return os.path.exists(url)

    def copy(self, from_url: str, rel: str) -> str:
        final = self.root / rel
        copy_file_atomic(Path(from_url), final, self._temp("copy"))
        return str(final)

    def put_failure(self, rel: str, record: dict, src, *, move: bool) -> str:
        target = unique_path(self.root / rel)  # an earlier failure of the same name stays
        write_failure(record, src.path, target, move_input=move, tmp_dir=self.tmp_dir)
        return str(target)

    def remove_orphans(self, alive) -> None:
        """Drop temporary files whose writer process is gone."""
        for temp in self.tmp_dir.iterdir():
            parts = temp.name.split(".")
            pid = parts[-2] if len(parts) >= 3 and parts[-1] == "tmp" else ""
            if pid.isdigit() and not alive(int(pid)):
                temp.unlink(missing_ok=True)
