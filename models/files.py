"""Model files on disk: where they live, whether they are intact, and `models pull` (the only download).

Nothing downloads at run time: engines call `verify_file` and fail with a ModelFileError that says how to
pull. Bundled models (our own, `spec.bundled`) live in the package's `weights/` folder, whatever the model dir:
they are never pulled, and verified by checksum like the others. `pull` is crash-safe: it streams into a temp
file in the model dir (same filesystem), checks size and checksum, fsyncs and renames, so the final name only
ever holds a verified file. Stdlib `urllib` only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from models.catalog import CATALOG, ModelSpec
from pipeline.errors import DownloadError, ModelFileError

_CHUNK = 1 << 16
# A model whose size the catalog does not know (EDSR, ~40 MB) is still not allowed to fill the disk.
_MAX_UNKNOWN_SIZE = 512 * 1024 * 1024
_USER_AGENT = "superres-models-pull/0.1"


def default_model_dir() -> Path:
    """$XDG_CACHE_HOME/superres/models, or ~/.cache/superres/models (XDG says: ignore a relative value)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "superres" / "models"


def onnx_cache_dir() -> Path:
    """Where converted ONNX graphs (and TensorRT engines) are cached: beside the downloads, in the user's cache
    (not in --model-dir, which may be read-only); XDG_CACHE_HOME moves it (e.g. to /tmp on Lambda)."""
    return default_model_dir() / "onnx"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (the key of the ONNX cache)."""
    return _digest_file(Path(path)).sha256.hexdigest()


BUNDLED_DIR = Path(__file__).resolve().parent / "weights"


def model_path(spec: ModelSpec, model_dir: Path) -> Path:
    """Where `spec`'s file lives: in `model_dir`, or in the package for a bundled model."""
    return (BUNDLED_DIR if spec.bundled else Path(model_dir)) / spec.filename


class _Digests:
    """sha256 and git blob id computed in one pass; the blob id needs the byte count up front."""

    def __init__(self, blob_size: int | None):
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.blob = hashlib.sha1(b"blob %d\0" % blob_size) if blob_size is not None else None

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.sha256.update(chunk)
        if self.blob is not None:
            self.blob.update(chunk)


def _digest_file(path: Path) -> _Digests:
    digests = _Digests(path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digests.update(chunk)
    return digests


def _mismatch(spec: ModelSpec, digests: _Digests) -> str | None:
    """Why these bytes are not `spec`'s file, or None when they are."""
    if spec.size is not None and digests.size != spec.size:
        return f"expected {spec.size} bytes, got {digests.size}"
    if spec.sha256 is not None:
        got = digests.sha256.hexdigest()
        if got != spec.sha256:
            return f"expected sha256 {spec.sha256}, got {got}"
    if spec.git_blob_sha1 is not None:
        # Only valid when the header was built from the final byte count (checked by the caller).
        got = digests.blob.hexdigest() if digests.blob is not None else "(not computed)"
        if got != spec.git_blob_sha1:
            return f"expected git blob id {spec.git_blob_sha1}, got {got}"
    return None


def verify_file(spec: ModelSpec, path: Path) -> None:
    """Raise ModelFileError unless `path` holds exactly `spec`'s file (size, sha256 or git blob id)."""
    path = Path(path)
    if spec.bundled and not (path.is_file() and _mismatch(spec, _digest_file(path)) is None):
        raise ModelFileError(f"bundled model file {path} for {spec.name} is missing or corrupt: reinstall superres")
    if not path.is_file():
        raise ModelFileError(
            f"model file {spec.filename} for {spec.name} not found in {path.parent}; "
            f"run `superres models pull {spec.name}` (downloads {spec.url})"
        )
    problem = _mismatch(spec, _digest_file(path))
    if problem:
        raise ModelFileError(
            f"model file {path} for {spec.name} is corrupt: {problem}; "
            f"delete it and run `superres models pull {spec.name}`"
        )


def model_status(spec: ModelSpec, model_dir: Path) -> str:
    """"ok", "missing" or "corrupt: <why>" for `models list` / `models verify`."""
    path = model_path(spec, model_dir)
    if not path.is_file():
        return "missing"
    try:
        problem = _mismatch(spec, _digest_file(path))
    except OSError as exc:  # unreadable counts as corrupt: the engine could not load it either
        return f"corrupt: cannot read ({exc.strerror or exc})"
    return f"corrupt: {problem}" if problem else "ok"


def list_rows(model_dir: Path, shared_hint: str | None = None) -> list[dict]:
    """One row per catalog model: name, family, algorithm, scale, MACs per input pixel, size, status, note."""
    rows = []
    for spec in CATALOG.values():
        status = model_status(spec, model_dir)
        size = spec.size
        if size is None and status != "missing":
            size = model_path(spec, model_dir).stat().st_size
        note = "bundled" if spec.bundled and status == "ok" else ""
        if status != "ok":
            if spec.bundled:
                note = "bundled with superres: reinstall it"
            elif spec.sha256 is None:  # EDSR: not shipped beside the repo, only pinned by URL + blob id
                where = f"weights not in {shared_hint}" if shared_hint else "weights not bundled (~40 MB)"
                note = f"{where}: pull from {spec.url}"
            else:
                note = f"run `superres models pull {spec.name}`"
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "algorithm": spec.algorithm,
                "scale": spec.scale,
                "macs_per_pixel": spec.macs_per_pixel,
                "size": size,
                "status": status,
                "note": note,
            }
        )
    return rows


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _download_to(spec: ModelSpec, url: str, tmp: Path, timeout_s: float) -> _Digests:
    """Stream `url` into `tmp`, hashing as it goes; raise DownloadError for anything but a complete body."""
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    limit = spec.size if spec.size is not None else _MAX_UNKNOWN_SIZE
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        header = response.headers.get("Content-Length")
        announced = int(header) if header and header.isdigit() else None
        if announced is not None and announced > limit:
            raise DownloadError(f"server announces {announced} bytes, expected at most {limit}")
        if spec.size is not None and announced is not None and announced != spec.size:
            raise DownloadError(f"server announces {announced} bytes, expected {spec.size}")
        # The git blob id hashes its length first: use the known size, else the announced one.
        blob_size = spec.size if spec.size is not None else announced
        digests = _Digests(blob_size if spec.git_blob_sha1 is not None else None)
        with open(tmp, "wb") as out:
            while chunk := response.read(_CHUNK):
                if digests.size + len(chunk) > limit:
                    raise DownloadError(f"server sent more than the expected {limit} bytes")
                digests.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    # http.client returns a short body at EOF rather than raising: say plainly the server hung up.
    if announced is not None and digests.size != announced:
        raise DownloadError(f"connection closed after {digests.size} of {announced} bytes")
    if spec.git_blob_sha1 is not None and blob_size != digests.size:
        digests = _digest_file(tmp)  # no (or a wrong) length up front: hash again with the real one
    return digests


def pull(
    spec: ModelSpec,
    model_dir: Path,
    *,
    base_url: str | None = None,
    timeout_s: float = 60,
    force: bool = False,
) -> Path:
    """Download and verify `spec`'s file into `model_dir`; return its path.

    `base_url` is a mirror (the file is fetched from base_url/filename). A present, verified file is kept
    unless `force`. On any failure a DownloadError is raised and nothing new is left in `model_dir`;
    a file already there is never replaced by an unverified one. `timeout_s` bounds each connect/read.
    """
    model_dir = Path(model_dir)
    final = model_path(spec, model_dir)
    if spec.bundled:  # nothing to download; a bundled file that fails its checksum is a broken install
        verify_file(spec, final)
        return final
    if not force and final.is_file() and model_status(spec, model_dir) == "ok":
        return final
    url = base_url.rstrip("/") + "/" + spec.filename if base_url else spec.url

    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # Same directory as the final name, so os.replace is an atomic rename on one filesystem;
        # a dot name ending .part so watchers and `models list` never take it for a model.
        import tempfile  # a download only: not at every start

        fd, tmp_name = tempfile.mkstemp(dir=model_dir, prefix=f".{spec.filename}.", suffix=".part")
        os.close(fd)
    except OSError as exc:
        raise DownloadError(f"cannot write model dir {model_dir}: {exc}") from exc
    tmp = Path(tmp_name)
    # only `models pull` downloads: every other start is spared http.client and email (~20 ms)
    import urllib.error
    from http.client import HTTPException

    try:
        try:
            digests = _download_to(spec, url, tmp, timeout_s)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise DownloadError(f"cannot connect: {exc.reason}") from exc
        except HTTPException as exc:  # IncompleteRead and friends: the server broke off mid-body
            raise DownloadError(f"connection broke off: {exc!r}") from exc
        except TimeoutError as exc:
            raise DownloadError(f"timed out after {timeout_s:g} s without data") from exc
        except (OSError, ValueError) as exc:  # reset connections, bad URLs, disk full
            raise DownloadError(f"{type(exc).__name__}: {exc}") from exc
        problem = _mismatch(spec, digests)
        if problem:
            raise DownloadError(f"downloaded file does not match the catalog: {problem}")
        try:
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is not a secret
            os.replace(tmp, final)
        except OSError as exc:
            raise DownloadError(f"cannot move the verified file into place: {exc}") from exc
        _fsync_dir(model_dir)
    except DownloadError as exc:
        _remove(tmp)
        raise DownloadError(f"could not pull {spec.name} from {url}: {exc.message}") from exc
    except BaseException:
        _remove(tmp)  # e.g. KeyboardInterrupt mid-download: still leave nothing behind
        raise
    return final


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
