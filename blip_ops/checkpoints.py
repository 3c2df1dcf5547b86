"""Resolving and loading BLIP checkpoints: local directories, s3:// directories or Hugging Face hub ids.

``inspect_checkpoint`` reads only the config, so callers can refuse a wrong model before
any weights load (for an s3:// directory: its listing and config.json, no weights). Loading
is safetensors-only and never trusts remote code; an s3:// directory is first copied into
the node's model cache (``model_cache``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import model_cache

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that does not exist, cannot be read, or is not the expected kind."""


@dataclass(frozen=True)
class CheckpointKind:
    label: str
    model_type: str
    architecture: str


ITM = CheckpointKind("BLIP image-text retrieval", "blip", "BlipForImageTextRetrieval")
CAPTION = CheckpointKind("BLIP-2 captioning", "blip-2", "Blip2ForConditionalGeneration")


def is_local_reference(reference: str) -> bool:
    if model_cache.is_remote(reference):
        return False
    return not _HUB_ID.match(reference) or Path(reference).exists()


def local_checkpoint(reference: str) -> str:
    """What ``from_pretrained`` can load: an s3:// directory becomes its copy in the node's cache."""
    try:
        return model_cache.local_model_dir(reference)
    except model_cache.ModelCacheError as exc:
        raise CheckpointError(str(exc)) from None


def _check_layout(names: set[str], reference: str) -> None:
    """A directory's top-level file names: a config and safetensors weights."""
    if "config.json" not in names:
        raise CheckpointError(f"not a Hugging Face checkpoint (no config.json): {reference}")
    if not any(n.endswith(".safetensors") for n in names) and "model.safetensors.index.json" not in names:
        raise CheckpointError(
            f"no safetensors weights in {reference}: only safetensors checkpoints are loaded "
            "(pickle weights can execute code)"
        )


def _read_remote_config(reference: str) -> dict:
    try:
        files = model_cache.list_remote(reference)
        if not files:
            raise CheckpointError(f"model directory does not exist (no objects under it): {reference}")
        _check_layout({f.name for f in files if "/" not in f.name}, reference)
        return json.loads(model_cache.read_remote(reference, "config.json"))
    except model_cache.ModelCacheError as exc:
        raise CheckpointError(str(exc)) from None
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"unreadable config.json for {reference}: {exc}") from None


def _read_config(reference: str) -> dict:
    if model_cache.is_remote(reference):
        return _read_remote_config(reference)
    if is_local_reference(reference):
        path = Path(reference).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"model directory does not exist: {reference}")
        _check_layout({p.name for p in path.iterdir() if p.is_file()}, reference)
        config_path = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_path = Path(hf_hub_download(repo_id=reference, filename="config.json"))
        except Exception as exc:  # offline, unknown repo, gated repo: all mean "cannot use it"
            raise CheckpointError(
                f"cannot resolve hub model {reference!r} (not cached locally and not downloadable): "
                f"{type(exc).__name__}"
            ) from None
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable config.json for {reference}: {exc}") from None


def inspect_checkpoint(reference: str, kind: CheckpointKind) -> dict:
    """Check that ``reference`` names a checkpoint of ``kind``; returns its config dict."""
    config = _read_config(reference)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != kind.model_type:
        raise CheckpointError(
            f"{reference} is not a {kind.label} checkpoint (model_type={model_type!r}, expected {kind.model_type!r})"
        )
    if architectures and kind.architecture not in architectures:
        raise CheckpointError(
            f"{reference} is a {architectures[0]} checkpoint; a {kind.architecture} checkpoint is needed "
            "(other heads would be randomly initialised)"
        )
    return config


def load_model(reference: str, model_class, device: str, dtype=None):
    """Load weights (safetensors only) and refuse a checkpoint that leaves any weight uninitialised."""
    import torch

    model, info = model_class.from_pretrained(
        local_checkpoint(reference),
        use_safetensors=True,
        trust_remote_code=False,
        output_loading_info=True,
        dtype=dtype or torch.float32,
    )
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{reference} lacks weights for {missing[:5]}: refusing random initialisation")
    return model.to(device).eval()


def load_processor(reference: str):
    """The checkpoint's own processor, with the PIL image backend (the reference BLIP preprocessing)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(local_checkpoint(reference), trust_remote_code=False, backend="pil")


def load_image_processor(reference: str):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(local_checkpoint(reference), trust_remote_code=False, backend="pil")


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when this worker can see a GPU, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but this worker sees no GPU")
    return device
