"""A checkpoint's identity is its content, not its path or modification time.

Reuse across runs matches scores by the checkpoint that computed them, so two copies of the
same weights (another path, another node, a re-download) must be one identity and
re-trained weights another. A hub model is named by the commit its cached snapshot resolves
to (the hub's own content address); a directory by a SHA-256 over its files' names and
bytes (config, tokenizer, processor and weight files; dot-files, such as the model cache's
source record, are left out). Hashing BLIP-2 OPT-2.7B's 15 GB takes tens of seconds, so a
directory's digest is cached on the node by path and every file's size and mtime: computed
once per node and version, recomputed when a file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import model_cache
from .checkpoints import CheckpointError, is_local_reference, local_checkpoint

_CHUNK = 8 * 1024 * 1024
CACHE_ENV = "BLIP_MODERATE_IDENTITY_CACHE"


def cache_root() -> Path:
    """Beside the model cache, not in it: that directory holds model copies only."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip-moderate" / "identities").expanduser()


def _files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _listing(directory: Path, files: list[Path]) -> list:
    return [[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def directory_digest(directory: str | Path) -> str:
    """SHA-256 over the relative names and contents of a checkpoint directory's files."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in _files(directory):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_file(directory: Path) -> Path:
    name = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:24]
    return cache_root() / f"{name}.json"


def cached_directory_digest(directory: str | Path) -> str:
    """``directory_digest``, cached on this node by the path and every file's size and mtime."""
    directory = Path(directory).expanduser()
    listing = _listing(directory, _files(directory))
    cache = _cache_file(directory)
    try:
        record = json.loads(cache.read_text())
        if record.get("path") == str(directory.resolve()) and record.get("listing") == listing:
            return record["digest"]
    except (OSError, ValueError, KeyError):
        pass
    digest = directory_digest(directory)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"path": str(directory.resolve()), "listing": listing, "digest": digest}))
        os.replace(temporary, cache)
    except OSError:
        pass  # an unwritable cache costs a recomputation next time, never a wrong identity
    return digest


def hub_commit(reference: str) -> str:
    """The commit hash the locally cached snapshot of a hub model resolves to."""
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id=reference, filename="config.json"))
    except Exception as exc:  # offline and not cached, unknown repo: no identity
        raise CheckpointError(f"cannot resolve hub model {reference!r} to a commit: {type(exc).__name__}") from None
    return config.parent.name  # .../snapshots/<commit>/config.json


def checkpoint_identity(reference: str | None) -> str | None:
    """``hub:<repo>@<commit>`` for a hub id, ``sha256:<digest>`` for a local or s3:// directory."""
    if reference is None:
        return None
    if model_cache.is_remote(reference):
        return "sha256:" + cached_directory_digest(local_checkpoint(reference))
    if is_local_reference(reference):
        return "sha256:" + cached_directory_digest(reference)
    return f"hub:{reference}@{hub_commit(reference)}"
