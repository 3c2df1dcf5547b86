"""Model directories on S3, copied once per node into a local cache.

``s3://bucket/prefix`` is listed (names, sizes, modification times); the URI and that
listing name a directory under the cache root (``$BLIP_MODERATE_MODEL_CACHE``, default
``~/.cache/blip-moderate/models``), so a re-uploaded model lists differently and is fetched
again, while an unchanged one is reused across runs. On a node, the first process that needs
the model (a model actor, a decode task) downloads it into a temporary directory and renames
that into place while holding an exclusive file lock; the others wait on the lock and find
the finished copy. A directory under its final name is always complete: the rename is atomic,
and a download killed halfway leaves only a temporary directory, removed by the next one.
Old versions are not deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from . import s3

CACHE_ENV = "BLIP_MODERATE_MODEL_CACHE"
SOURCE_RECORD = ".blip-moderate-source.json"
_CHUNK = 8 * 1024 * 1024


class ModelCacheError(ValueError):
    """A remote model directory that cannot be listed or copied."""


@dataclass(frozen=True, order=True)
class RemoteFile:
    name: str  # relative to the model prefix
    size: int
    mtime_ns: int


def is_remote(reference: str) -> bool:
    return reference.startswith("s3://")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip-moderate" / "models").expanduser()


def list_remote(uri: str) -> list[RemoteFile]:
    """Every object under the model prefix; empty when there is none."""
    fs, base = s3.filesystem(), s3.split_uri(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise ModelCacheError(f"cannot list model directory {uri}: {exc}") from None
    return sorted(
        RemoteFile(info.path[len(base) + 1:], info.size, info.mtime_ns or 0)
        for info in infos
        if info.type == pafs.FileType.File
    )


def read_remote(uri: str, name: str) -> bytes:
    """One file of a remote model directory (``config.json`` for checks that load no weights)."""
    try:
        with s3.filesystem().open_input_stream(f"{s3.split_uri(uri)}/{name}") as stream:
            return stream.read()
    except OSError as exc:
        raise ModelCacheError(f"cannot read {name} of {uri}: {exc}") from None


def cache_name(uri: str, files: list[RemoteFile]) -> str:
    """Readable (the prefix's last part) and unique (a digest of the URI and the listing)."""
    listing = json.dumps([uri, [(f.name, f.size, f.mtime_ns) for f in files]])
    digest = hashlib.sha256(listing.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", s3.split_uri(uri).rsplit("/", 1)[-1])[:60]
    return f"{stem}-{digest}"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(uri: str, files: list[RemoteFile], into: Path) -> None:
    fs, base = s3.filesystem(), s3.split_uri(uri)
    for remote in files:
        target = into / remote.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{base}/{remote.name}") as source, open(target, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
        if target.stat().st_size != remote.size:
            raise ModelCacheError(f"{uri}/{remote.name} changed while it was being copied; try again")
    record = {"uri": uri, "files": [asdict(f) for f in files]}
    (into / SOURCE_RECORD).write_text(json.dumps(record, indent=2))


def local_model_dir(reference: str) -> str:
    """A local directory holding the model ``reference`` names; local paths and hub ids pass through."""
    if not is_remote(reference):
        return reference
    files = list_remote(reference)
    if not files:
        raise ModelCacheError(f"model directory does not exist (no objects under it): {reference}")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    name = cache_name(reference, files)
    target = root / name
    if target.is_dir():  # complete by construction
        return str(target)
    with _exclusive(root / f"{name}.lock"):
        if target.is_dir():  # another process finished it while this one waited
            return str(target)
        for stale in root.glob(f".{name}.*"):  # left by a download that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            _download(reference, files, staging)
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelCacheError(f"cannot copy model {reference}: {exc}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return str(target)
