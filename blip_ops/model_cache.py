"""Model directories on an object store (s3://, gs://, az://; blip_ops.stores), copied once per node into a local cache.

``s3://bucket/prefix`` is listed (names, sizes, modification times); the URI and that
listing name a directory under the cache root (``$BLIP_MODERATE_MODEL_CACHE``, default
``~/.cache/blip-moderate/models``), so a re-uploaded model lists differently and is fetched
again, while an unchanged one is reused across runs. On a node, the first process that needs
the model (a model actor, a decode task) downloads it into a temporary directory and renames
that into place while holding an exclusive file lock; the others wait on the lock and find
the finished copy. A directory under its final name is always complete: the rename is atomic,
and a download killed halfway leaves only a temporary directory, removed by the next one.
A copy counts only if the prefix lists the same after it as before it; a re-upload caught
halfway is discarded and the new version copied instead (up to three tries).

A re-uploaded model replaces its old copy once no live process on the node uses the old one:
every process holds a shared lock on each version it resolved (``<name>.use``) for as long as
it lives, and resolving a model deletes that URI's other versions whose lock it can take
exclusively. So a nightly job whose model is re-uploaded does not fill the disk, and a
running actor's copy is never deleted under it.
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

from . import stores

CACHE_ENV = "BLIP_MODERATE_MODEL_CACHE"
SOURCE_RECORD = ".blip-moderate-source.json"
_CHUNK = 8 * 1024 * 1024


class ModelCacheError(ValueError):
    """A remote model directory that cannot be listed or copied."""


class _ChangedWhileCopying(Exception):
    """The model's objects changed (a re-upload) between listing them and copying them."""


# A copy is checked against a second listing taken after it, since S3 has no snapshot of a
# prefix: a re-upload in between would otherwise leave old and new files under one name.
COPY_ATTEMPTS = 3


@dataclass(frozen=True, order=True)
class RemoteFile:
    name: str  # relative to the model prefix
    size: int
    mtime_ns: int


def is_remote(reference: str) -> bool:
    """A model directory on an object store (s3://, gs://, az://, ...), copied into the node's cache."""
    return stores.is_remote(reference)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip-moderate" / "models").expanduser()


def list_remote(uri: str) -> list[RemoteFile]:
    """Every object under the model prefix; empty when there is none."""
    fs, base = stores.resolve(uri)
    base = base.rstrip("/")
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
        fs, base = stores.resolve(uri)
        with fs.open_input_stream(f"{base.rstrip('/')}/{name}") as stream:
            return stream.read()
    except OSError as exc:
        raise ModelCacheError(f"cannot read {name} of {uri}: {exc}") from None


def cache_name(uri: str, files: list[RemoteFile]) -> str:
    """Readable (the prefix's last part) and unique (a digest of the URI and the listing)."""
    listing = json.dumps([uri, [(f.name, f.size, f.mtime_ns) for f in files]])
    digest = hashlib.sha256(listing.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stores.split(uri)[1].rstrip("/").rsplit("/", 1)[-1])[:60]
    return f"{stem}-{digest}"


# Shared locks on the versions this process resolved, held until it exits (the OS drops them then).
_IN_USE: dict[str, object] = {}


def _hold_in_use(root: Path, name: str) -> None:
    if name not in _IN_USE:
        handle = open(root / f"{name}.use", "a+")
        fcntl.flock(handle, fcntl.LOCK_SH)
        _IN_USE[name] = handle


def _release_in_use(name: str) -> None:
    handle = _IN_USE.pop(name, None)
    if handle is not None:
        handle.close()  # closing drops the shared lock


def _evict_replaced(root: Path, uri: str, current: str) -> None:
    """Delete the other cached versions of ``uri`` that no live process holds."""
    for record in root.glob(f"*/{SOURCE_RECORD}"):
        directory = record.parent
        if directory.name == current or directory.name in _IN_USE or directory.name.startswith("."):
            continue  # ".name.*" is a download in progress (or killed: the next download of it cleans up)
        try:
            if json.loads(record.read_text()).get("uri") != uri:
                continue
        except (OSError, ValueError):
            continue
        with open(root / f"{directory.name}.use", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process on this node still uses it
            shutil.rmtree(directory, ignore_errors=True)
            for leftover in (f"{directory.name}.use", f"{directory.name}.lock"):
                (root / leftover).unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(uri: str, files: list[RemoteFile], into: Path) -> None:
    fs, base = stores.resolve(uri)
    base = base.rstrip("/")
    for remote in files:
        target = into / remote.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{base}/{remote.name}") as source, open(target, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
        if target.stat().st_size != remote.size:
            raise _ChangedWhileCopying(remote.name)
    record = {"uri": uri, "files": [asdict(f) for f in files]}
    (into / SOURCE_RECORD).write_text(json.dumps(record, indent=2))


def local_model_dir(reference: str) -> str:
    """A local directory holding the model ``reference`` names; local paths and hub ids pass through."""
    if not is_remote(reference):
        return reference
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(COPY_ATTEMPTS):
        files = list_remote(reference)
        if not files:
            raise ModelCacheError(f"model directory does not exist (no objects under it): {reference}")
        name = cache_name(reference, files)
        target = root / name
        _hold_in_use(root, name)  # before the check: from here on no other process deletes it
        try:
            if not target.is_dir():  # a directory under its final name is complete by construction
                _fetch(reference, files, root, name)
        except _ChangedWhileCopying:
            _release_in_use(name)  # that version is gone from S3; list again and copy the new one
            continue
        _evict_replaced(root, reference, name)
        return str(target)
    raise ModelCacheError(
        f"model {reference} changed on S3 while it was being copied, {COPY_ATTEMPTS} times; try again once its upload is finished"
    )


def _fetch(reference: str, files: list[RemoteFile], root: Path, name: str) -> None:
    target = root / name
    with _exclusive(root / f"{name}.lock"):
        if target.is_dir():  # another process finished it while this one waited
            return
        for stale in root.glob(f".{name}.*"):  # left by a download that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            _download(reference, files, staging)
            if list_remote(reference) != files:
                raise _ChangedWhileCopying("listing")
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelCacheError(f"cannot copy model {reference}: {exc}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
