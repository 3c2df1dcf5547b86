"""BLIP ITC + ITM scoring from one vision pass.

``BlipForImageTextRetrieval.forward`` runs the vision encoder on every call, so asking it
for ITC and then ITM costs two ViT passes. ``BlipScorer`` calls the same submodules in the
same order as that forward, once for the image and twice for the text (unimodal for ITC,
cross-attending for ITM), so each score equals what the model returns for the pair.
``score_explained`` keeps that pass's image embeddings for Grad-CAM evidence (``blip_ops.evidence``),
so explaining a row costs no second vision pass.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import normalize

from .attention import sdpa_vision_attention
from .checkpoints import ITM, inspect_checkpoint, load_model, load_processor, resolve_device
from .precision import autocast, resolve_precision
from .preprocess import ImagePreparer, check_resize_settings


@dataclass
class ExplainedScores:
    itc: np.ndarray
    itm: np.ndarray
    truncated: np.ndarray
    evidence: list  # an ``Evidence`` per row, None where not wanted
    evidence_s: float  # seconds the evidence took


@dataclass
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: np.ndarray


class BlipScorer:
    def __init__(
        self, model, processor, device: str = "cpu", max_text_tokens: int = 35, precision: str = "auto",
        vision_attention: str = "fused",
    ):
        self.model = model
        self.tokenizer = processor.tokenizer
        self.images = ImagePreparer(processor.image_processor)
        self.device = device
        self.max_text_tokens = max_text_tokens
        # Resolved once: "auto" is fp32 on the CPU (the fidelity reference), bf16 on CUDA.
        self.precision = resolve_precision(precision, device)
        if vision_attention not in ("fused", "eager"):
            raise ValueError(f"vision_attention must be fused or eager, not {vision_attention!r}")
        # Fused is the same attention arithmetic in another order: in fp32 on the CPU it moved ITM by
        # at most 4.5e-7 (about 8 float32 steps at 0.5) and cut the vision pass's CPU time by about 30%, the
        # largest share of a CPU run. eager keeps transformers' BlipAttention, bit for bit.
        self.fused_attention = vision_attention == "fused"

    @classmethod
    def from_pretrained(
        cls, reference: str, device: str = "auto", max_text_tokens: int = 35, precision: str = "auto",
        vision_attention: str = "fused",
    ) -> "BlipScorer":
        from transformers import BlipForImageTextRetrieval

        inspect_checkpoint(reference, ITM)
        device = resolve_device(device)
        # BLIP v1 in transformers 5.23 has eager attention only (no _supports_sdpa); the
        # scorer fuses the vision attention itself in half precision (blip_ops.attention).
        model = load_model(reference, BlipForImageTextRetrieval, device)
        processor = load_processor(reference)
        check_resize_settings(reference, processor.image_processor)
        return cls(model, processor, device, max_text_tokens, precision, vision_attention)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return np.array([len(ids) for ids in encoded], dtype=np.int64)

    def tokenize(self, texts: list[str]) -> TextBatch:
        # Pad to the longest text in the batch, not to max_length: padding is masked, so
        # it does not change a row's score, but it does cost compute.
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return TextBatch(
            input_ids=encoded["input_ids"].to(self.device),
            attention_mask=encoded["attention_mask"].to(self.device),
            truncated=self.token_counts(texts) > self.max_text_tokens,
        )

    def score(self, images, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``images``: resized uint8 ``(3, h, w)`` arrays, or one ``(n, 3, h, w)`` array.
        Returns float32 ``itc``, ``itm`` and bool ``truncated``."""
        itc, itm, text, _ = self._score(images, texts)
        return itc, itm, text.truncated

    def score_explained(self, images, texts: list[str], wanted, gradcam) -> ExplainedScores:
        """``score`` plus Grad-CAM evidence (``blip_ops.evidence.GradCam``) for the rows that
        ``wanted(itc, itm)`` (a bool mask) picks, from the same vision pass."""
        itc, itm, text, image_embeds = self._score(images, texts)
        rows = np.flatnonzero(wanted(itc, itm)) if len(texts) else np.zeros(0, dtype=np.int64)
        evidence: list = [None] * len(texts)
        if not len(rows):
            return ExplainedScores(itc, itm, text.truncated, evidence, 0.0)
        started = time.perf_counter()
        index = torch.as_tensor(rows, device=self.device)
        # Only the chosen rows, cut to their own longest text (padding is masked either way).
        mask = text.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        explained = gradcam.explain(image_embeds[index], text.input_ids[index][:, :width], mask[:, :width])
        for row, item in zip(rows, explained):
            evidence[row] = item
        return ExplainedScores(itc, itm, text.truncated, evidence, time.perf_counter() - started)

    @torch.inference_mode()
    def _score(self, images, texts: list[str]):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        if not texts:
            empty = np.zeros(0, dtype=np.float32)
            return empty, empty.copy(), TextBatch(None, None, np.zeros(0, dtype=bool)), None
        pixel_values = self.images.to_device_pixel_values(images, self.device, next(self.model.parameters()).dtype)
        text = self.tokenize(texts)
        fused = sdpa_vision_attention(self.model.vision_model) if self.fused_attention else contextlib.nullcontext()
        with autocast(self.precision, self.device), fused:
            itc, itm, image_embeds = self._forward(pixel_values, text)
        return itc.cpu().numpy().astype(np.float32), itm.cpu().numpy().astype(np.float32), text, image_embeds

    def _forward(self, pixel_values: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)

        fused = model.text_encoder(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        itm = model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]

        unimodal = model.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        image_feat = normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_feat = normalize(model.text_proj(unimodal[:, 0, :]).float(), dim=-1)
        itc = (image_feat * text_feat).sum(dim=-1)
        return itc, itm, image_embeds
