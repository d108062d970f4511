"""Local folders as inbox, outbox and failed place: reads that never follow a symlink nor leave the inbox, atomic
publishes, failure records that never overwrite each other."""

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
from pathlib import Path

from pipeline.errors import InputRejected, SuperresError, TransientError

# O_NOFOLLOW: a symlink is refused, never read through; O_NONBLOCK: a FIFO must not hang us
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RECORD_SUFFIX = ".error.json"
# what put_failure may add to a name: " (n)" to make it unique, then ".error.json"
FAILURE_ROOM = len(" (99999)") + len(RECORD_SUFFIX)
_temp_numbers = itertools.count(1)  # temp names unique across the threads of one process


def _open_error(exc: OSError) -> SuperresError:
    if exc.errno == errno.ELOOP:
        return InputRejected("this is a symlink (or a folder on its way is one): symlinks are never followed, so "
                             "it is refused and left where it is", stage="read", code="symlink")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return InputRejected("the file disappeared before it could be read", stage="read", code="vanished")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputRejected("the file is not readable (permission denied)", stage="read", code="unreadable")
    if exc.errno == errno.ENXIO:  # a socket
        return InputRejected("this is not a regular file (device, FIFO or socket)", stage="read", code="not_a_file")
    return TransientError(f"cannot open the file: {exc.strerror}", stage="read")


def _open_below(root: Path, path: Path) -> int:
    """Open `path` one name at a time from a descriptor of `root`, following no symlink on the way: a folder
    swapped for a link after it was listed cannot lead outside `root`. `root` itself is the configured folder
    and may be a link."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = ("..",)
    if not parts or ".." in parts:
        raise InputRejected(f"{path} is not inside {root}; refused", stage="read", code="outside")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                below = os.open(part, DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:  # O_DIRECTORY answers this for a symlink too: tell the two apart
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlinked folder") from None
                raise
            os.close(fd)
            fd = below
        return os.open(parts[-1], READ_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def read_limited(path: Path, max_bytes: int, *, root: Path | None = None) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file of at most max_bytes from one descriptor. Bad entries raise InputRejected naming
    the problem; a file that changes while it is read raises TransientError (read it again later)."""
    try:
        fd = _open_below(root, path) if root is not None else os.open(path, READ_FLAGS)
    except OSError as exc:
        raise _open_error(exc) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputRejected("this is a directory, not an image file", stage="read", code="is_directory")
        if not stat.S_ISREG(st.st_mode):
            raise InputRejected("this is not a regular file (device, FIFO or socket)", stage="read", code="not_a_file")
        if st.st_size > max_bytes:
            raise InputRejected(f"the file is {st.st_size} bytes, more than the limit of {max_bytes} bytes",
                                stage="read", code="too_many_bytes")
        # what the file holds, +1 to see it grow: never max_bytes up front
        data = os.read(fd, st.st_size + 1)
        while 0 < len(data) <= st.st_size:  # a short read (rare on a regular file): read on to the end
            more = os.read(fd, st.st_size + 1 - len(data))
            if not more:
                break
            data += more
        after = os.fstat(fd)
    except OSError as exc:
        raise TransientError(f"reading the file failed: {exc.strerror}", stage="read") from None
    finally:
        os.close(fd)
    if len(data) != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        if max(len(data), after.st_size) > max_bytes:
            raise InputRejected(f"the file grew past the limit of {max_bytes} bytes while being read",
                                stage="read", code="too_many_bytes")
        raise TransientError("the file changed while it was read (still being written?); it is read again later",
                             stage="read", code="changed")
    return data, st


def fsync_path(path: Path, *, folder: bool = False) -> None:
    """fsync a file (or, `folder`, a folder's entries) by its name: any descriptor of it flushes the same data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, folder=True)


def write_temp(data: bytes, temp: Path, *, durable: bool = True) -> None:
    """Write a temporary file (in the destination's filesystem, so the rename is atomic), fsynced; with
    `durable=False` not yet: `sync_temp` before anything names it."""
    try:
        temp.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _write_failed(exc) from None


def sync_temp(temp: Path) -> None:
    """fsync a temporary file written with `durable=False` (a write-back error surfaces here: the file goes)."""
    try:
        fsync_path(temp)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise _write_failed(exc) from None


def _write_failed(exc: OSError) -> TransientError:
    kind = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
    return TransientError(f"writing the output failed: {kind}", stage="publish")


def commit_temp(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fsync_dir(final.parent)


def copy_file_atomic(src: Path, final: Path, temp: Path) -> None:
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, temp)
    fsync_path(temp)
    commit_temp(temp, final)


def unique_path(path: Path) -> Path:
    """`path`, or `name (2).ext`, ... if something is already there."""
    return next(p for p in candidates(path) if not os.path.lexists(p))


def candidates(path: Path):
    """`path`, then `name (2).ext`, `name (3).ext`, ..."""
    yield path
    for n in itertools.count(2):
        yield path.with_name(f"{path.stem} ({n}){path.suffix}")


def failure_names(name: str) -> re.Pattern:
    """The record names `candidates` makes for `name`: NAME.error.json, NAME (2).error.json, …"""
    stem, suffix = os.path.splitext(name)
    return re.compile(re.escape(stem) + r"( \(\d+\))?" + re.escape(suffix) + re.escape(RECORD_SUFFIX))


def byte_len(name: str) -> int:
    return len(os.fsencode(name))


def shortened(name: str, limit: int, full: str) -> str:
    """The start of `name`, "~" and 8 hex digits of the sha256 of `full` (so two long names stay apart), then
    name's suffix: at most `limit` bytes."""
    tag = "~" + hashlib.sha256(os.fsencode(full)).hexdigest()[:8]
    stem, suffix = os.path.splitext(name)
    if byte_len(suffix) > 16:  # not an extension, just a dot in a long name
        stem, suffix = name, ""
    room = limit - len(tag) - byte_len(suffix)
    start = stem[:room]
    while byte_len(start) > room:  # whole characters only
        start = start[:-1]
    return start + tag + suffix


def link_new(temp: Path, final: Path) -> bool:
    """Give the entry `temp` (a symlink stays a symlink) the name `final` too, only if that name is free: a hard
    link never replaces anything. False if it is taken. Where the file system has no hard links, `temp` is renamed
    after a check instead (then `temp` is gone)."""
    try:
        os.link(temp, final, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
    if os.path.lexists(final):
        return False
    os.rename(temp, final)
    return True


# -- the pipeline's view of local folders ----------------------------------------------------------------------


class LocalFile:
    """An input file. `rel` is its name relative to the folder it came from: outputs keep that tree.

    A symlink is never followed, in every mode: read() refuses it (code "symlink") and dispose() leaves it
    where it is. That holds for files named on the command line too (name the target instead). With `root` (an
    inbox, a walked folder, a glob's fixed folder) the file is opened below a descriptor of `root`, one name at a
    time, so no symlinked folder on the way leads outside it either."""

    def __init__(self, path: Path, rel: str, root: Path | None = None, *, processed: Path | None = None):
        self.path = Path(path)
        self.rel = rel
        self.root = root
        self.processed = processed  # where `disposition=move` puts it
        self.id = os.path.abspath(path)
        self.read_as: tuple[int, int, int, int] | None = None  # (dev, ino, size, mtime_ns) of the bytes read

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
        self.read_as = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return data, f"{st.st_size}:{st.st_mtime_ns}"

    def metadata(self, sha256: str, model: str) -> dict[str, str]:
        return {}

    def _is_as_read(self, path: Path) -> bool:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == self.read_as

    def dispose(self, disposition: str) -> None:
        """keep: nothing. delete / move: only the very file that was read (same device, inode, size and mtime):
        a newer version, or a symlink swapped in, is left alone; nothing is done to a file never read.

        A look before a rename leaves a moment in which the name can be swapped, so the entry is renamed first
        (atomic: it takes whatever is there) and what was taken is checked after; anything else is given back."""
        if disposition == "keep" or self.read_as is None or not self._is_as_read(self.path):
            return
        if disposition == "move" and self.processed is None:
            return
        try:
            if disposition == "delete":
                taken = self._take(self.path.with_name(f".superres-delete-{os.getpid()}-{next(_temp_numbers)}"))
                if taken is not None:
                    os.unlink(taken)
            elif disposition == "move":
                target = unique_path(self.processed / self.rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._take(target)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self._move_across(target)
        except OSError as exc:
            raise TransientError(f"could not {disposition} {self.path}: {exc.strerror}", stage="dispose") from None

    def _take(self, to: Path) -> Path | None:
        """Rename the entry at `path` to `to`; `to` if it is the file read, else None (and it is given back)."""
        try:
            os.rename(self.path, to)  # renames the entry itself: a symlink is never followed
        except FileNotFoundError:
            return None
        if self._is_as_read(to):
            return to
        for name in candidates(self.path):  # its own name, or beside it if that is taken again already
            if link_new(to, name):
                to.unlink(missing_ok=True)
                break
        return None

    def _move_across(self, target: Path) -> None:
        """`processed` on another file system: take the file beside itself, copy it over whole, then drop it."""
        taken = self._take(self.path.with_name(f".superres-move-{os.getpid()}-{next(_temp_numbers)}"))
        if taken is None:
            return
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(taken, temp, follow_symlinks=False)
        fsync_path(temp)
        os.replace(temp, target)
        os.unlink(taken)


class Staged:
    def __init__(self, token: str | None, data: bytes | None = None):
        self.token = token  # what the ledger remembers to finish a publish after a crash (see the places)
        self.data = data


class LocalPlace:
    """A local folder to publish into (outbox) or set failures aside in. Temporary files live in
    `ROOT/.superres/tmp`, on the same filesystem, named `<tag>.<pid>.tmp` so leftovers can be told apart.
    The renames of a group share one folder fsync (`shares_commits`).
    Folders are made on the first write: a place never written to leaves nothing behind."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / ".superres" / "tmp"
        self.shares_commits = True
        self._limits: tuple[int, int] | None = None

    def name_limits(self) -> tuple[int, int]:
        """(NAME_MAX, PATH_MAX) of the file system the place is on (or will be on, once made)."""
        if self._limits is None:
            probe = self.root.absolute()
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            try:
                self._limits = (os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX"))
            except (OSError, ValueError):
                self._limits = (255, 4096)
        return self._limits

    def _too_long(self, rel: str, room: int = 0) -> str | None:
        """Why `rel` (plus `room` bytes on its last name) cannot be a file name here, or None."""
        name_max, path_max = self.name_limits()
        segments = rel.split("/")
        for i, segment in enumerate(segments):
            size = byte_len(segment) + (room if i == len(segments) - 1 else 0)
            if size > name_max:
                return f"a name in it is {size} bytes; this file system allows {name_max} bytes a name"
        size = byte_len(os.path.abspath(self.root / rel)) + room
        if size >= path_max:
            return f"its path would be {size} bytes; this file system allows {path_max - 1}"
        return None

    def url(self, rel: str) -> str:
        problem = self._too_long(rel)
        if problem:
            raise InputRejected(f"the output name cannot be a file name in {self.root}: {problem}",
                                stage="publish", code="name_too_long")
        return str(self.root / rel)

    def name(self, url: str) -> str:
        return Path(url).name

    def exists(self, url: str) -> bool:
        return os.path.lexists(url)

    def etag(self, url: str) -> str | None:
        """The output's identity (inode, size, mtime), recorded at publish and checked before "already done"
        (used by the Processor): a file deleted or replaced since has another one, or none."""
        try:
            st = os.lstat(url)
        except OSError:
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None

    def _temp(self, tag: str) -> Path:
        return self.tmp_dir / f"{tag}.{os.getpid()}.tmp"

    def stage(self, data: bytes, tag: str) -> Staged:
        """The output under a temporary name, not fsynced yet (`sync_staged`). The token is `INODE:PATH`: after
        the rename the output has the temp file's inode, which is how a later process tells our publish from an
        older file."""
        temp = self._temp(tag)
        write_temp(data, temp, durable=False)
        return Staged(f"{os.stat(temp).st_ino}:{temp}")

    def sync_staged(self, staged: list[Staged]) -> list[Exception | None]:
        """fsync each staged file, in the writer: before the ledger marks it publishing (what a recovery renames
        must be whole), and not in the lanes that encoded it, whose cores would sit idle while the disk writes
        (docs/benchmarks.md). Each one's error (the file is then gone), or None."""
        errors: list[Exception | None] = []
        for s in staged:
            try:
                sync_temp(self._staged(s.token)[1])
                errors.append(None)
            except TransientError as exc:
                errors.append(exc)
        return errors

    @staticmethod
    def _staged(token: str) -> tuple[int | None, Path]:
        ino, sep, path = token.partition(":")
        return (int(ino), Path(path)) if sep and ino.isdigit() else (None, Path(token))

    def discard(self, staged: Staged) -> None:
        """A staged output that will not be published (its item failed, or its claim was lost)."""
        self._staged(staged.token)[1].unlink(missing_ok=True)

    def commit_many(self, commits: list) -> list[str | Exception]:
        """Rename each staged file to its name, then fsync each folder once: the renames of a group share that
        fsync (the writer's group commit). `commits`: the Processor's Commit (staged, rel, ...); each output's
        path, or its error."""
        outcomes: list[str | Exception] = []
        folders: dict[Path, list[int]] = {}
        for i, c in enumerate(commits):
            final = self.root / c.rel
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._staged(c.staged.token)[1], final)
            except OSError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(str(final))
            folders.setdefault(final.parent, []).append(i)
        for folder, indexes in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for i in indexes:
                    outcomes[i] = exc
        return outcomes

    def finish_staged(self, token: str | None, url: str) -> bool:
        """After a crash between fsync and rename: rename a temp file still there. True if the output is now
        the one staged (renamed now, or before the crash: the same inode); an older file at the name is not."""
        if not token:
            return False
        ino, temp = self._staged(token)
        if temp.exists():
            commit_temp(temp, Path(url))
            return True
        try:
            return ino is not None and os.lstat(url).st_ino == ino
        except OSError:
            return False

    def copy(self, from_url: str, rel: str) -> str:
        final = self.root / rel
        copy_file_atomic(Path(from_url), final, self._temp("copy"))
        return str(final)

    def failure_rel(self, rel: str) -> str:
        """`rel`, shortened where a name (with room for " (n)" and ".error.json") or the whole path is too long."""
        name_max, _ = self.name_limits()
        segments = [s if byte_len(s) <= name_max else shortened(s, name_max, s) for s in rel.split("/")]
        last = segments[-1]
        if byte_len(last) + FAILURE_ROOM > name_max:
            segments[-1] = shortened(last, name_max - FAILURE_ROOM, last)
        fitted = "/".join(segments)
        if self._too_long(fitted, FAILURE_ROOM):  # too deep: one name, directly in the failed folder
            fitted = shortened(segments[-1], min(name_max - FAILURE_ROOM, byte_len(segments[-1]) + 9), rel)
        return fitted

    def put_failure(self, rel: str, record: dict, data: bytes | None) -> str:
        """`WHERE.error.json` with the record and, when `data` is given, `WHERE` with exactly those bytes, each
        written whole. WHERE is new: neither it nor its record existed, so no earlier failure is overwritten."""
        body = json.dumps({**record, "input_kept": data is not None}, indent=2, ensure_ascii=False).encode() + b"\n"
        number = next(_temp_numbers)
        record_temp, data_temp = self._temp(f"failure-record-{number}"), self._temp(f"failure-data-{number}")
        try:
            write_temp(body, record_temp)
            if data is not None:
                write_temp(data, data_temp)
            for target in candidates(self.root / self.failure_rel(rel)):
                reason = target.with_name(target.name + RECORD_SUFFIX)
                if os.path.lexists(target) or os.path.lexists(reason):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if not link_new(record_temp, reason):
                    continue
                if data is not None and not link_new(data_temp, target):
                    os.unlink(reason)  # the name was taken in between: try the next one
                    continue
                fsync_dir(target.parent)
                return str(target)
        except OSError as exc:
            raise TransientError(f"setting the failure aside in {self.root} failed: {exc.strerror}",
                                 stage="failed") from None
        finally:
            record_temp.unlink(missing_ok=True)
            data_temp.unlink(missing_ok=True)

    def failures_of(self, rel: str, source: str) -> list[str]:
        """The failure records under `rel`'s names (NAME, NAME (2), …) whose input is `source`: what a process
        killed between writing a record and the ledger left behind, found again by the next failure."""
        base = self.root / self.failure_rel(rel)
        names = failure_names(base.name)
        try:
            entries = os.listdir(base.parent)
        except OSError:
            return []
        found = []
        for entry in entries:
            if names.fullmatch(entry):
                try:
                    record = json.loads((base.parent / entry).read_bytes())
                except (OSError, ValueError):
                    continue
                if isinstance(record, dict) and record.get("input") == source:
                    found.append(str(base.parent / entry[: -len(RECORD_SUFFIX)]))
        return found

    def remove_failure(self, where: str) -> None:
        """Remove WHERE and WHERE.error.json (missing is fine); nothing outside this place is touched."""
        if not Path(os.path.abspath(where)).is_relative_to(os.path.abspath(self.root)):
            return
        for path in (where, where + RECORD_SUFFIX):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise TransientError(f"could not remove {path}: {exc.strerror}", stage="failed") from None

    def remove_orphans(self, alive) -> None:
        """Drop temporary files whose writer process is gone."""
        try:
            temps = list(self.tmp_dir.iterdir())
        except FileNotFoundError:  # nothing was ever written here
            return
        for temp in temps:
            parts = temp.name.split(".")
            pid = parts[-2] if len(parts) >= 3 and parts[-1] == "tmp" else ""
            if pid.isdigit() and not alive(int(pid)):
                temp.unlink(missing_ok=True)
