"""BLIP ITC + ITM scoring from one vision pass.

``BlipForImageTextRetrieval.forward`` runs the vision encoder on every call, so asking it
for ITC and then ITM costs two ViT passes. ``BlipScorer`` calls the same submodules in the
same order as that forward, once for the image and twice for the text (unimodal for ITC,
cross-attending for ITM), so each score equals what the model returns for the pair.
``score_explained`` keeps that pass's image embeddings for Grad-CAM evidence (``blip_ops.evidence``),
so explaining a row costs no second vision pass; in fp32 it also keeps what entered the explained
layer, and records the ITM pass's graph for chunks mostly flagged by ITC, so the text encoder's
forward is not repeated either.

Each call has a host half (tokenising, staging pixels) and a device half (the forward pass);
the device half takes the scorer's ``DeviceTurn`` and the host half does not, so two threads
scoring at once (Ray's two concurrent calls per actor) overlap one batch's host work with the
other's model work (``blip_ops.overlap``). With ``shape_buckets`` the model sees only bucketed
shapes (``blip_ops.buckets``); with ``compile`` on CUDA its encoders are compiled for them.
In fp32 on an AMD x86-64 CPU the image side's projections run on oneDNN (``blip_ops.cpu_kernels``;
on Intel, where MKL measured level with it, they stay on torch's).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import normalize

from . import buckets
from .attention import sdpa_vision_attention
from .checkpoints import ITM, inspect_checkpoint, load_model, load_processor, resolve_device
from .cpu_kernels import CHOICES as CPU_KERNELS
from .cpu_kernels import pack_image_side, resolve_cpu_kernels
from .overlap import DeviceTurn, ToHost, to_device
from .precision import autocast, resolve_precision, weight_dtype
from .preprocess import ImagePreparer, check_resize_settings

log = logging.getLogger(__name__)


@dataclass
class ExplainedScores:
    itc: np.ndarray
    itm: np.ndarray
    truncated: np.ndarray
    evidence: list  # an ``Evidence`` per row, None where not wanted
    evidence_s: float  # seconds the evidence took
    # The normalised ITC projections, image then text, float32 (rows, 2 * D): ``blip_ops.embeddings``.
    features: np.ndarray | None = None
    image_embeds: object = None  # the pass's vision output, for labels (blip_ops.labels)


@dataclass
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: np.ndarray


# Rows per model call on the CPU (see BlipScorer.__init__).
CPU_CHUNK_ROWS = 8


class BlipScorer:
    def __init__(
        self, model, processor, device: str = "cpu", max_text_tokens: int = 35, precision: str = "auto",
        vision_attention: str = "fused",
        shape_buckets: bool = False, compile: bool = False, chunk_workers: int = 1, cpu_kernels: str = "auto",
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
        self.device_turn = DeviceTurn()  # one forward pass at a time; host work runs beside it
        self.tokenizer_lock = threading.Lock()  # one Rust tokenizer shared by the threads (blip_ops.overlap)
        self.compiled = compile and torch.device(device).type == "cuda"
        if compile and not self.compiled:
            log.warning("compile applies on CUDA only; scoring on %s runs eagerly", device)
        # A compiled model is specialised to its shapes: bucket them so ragged batches reuse graphs.
        self.shape_buckets = shape_buckets or self.compiled
        if cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}, not {cpu_kernels!r}")
        # The image side's projections on oneDNN: a CPU scoring call 1.63x faster on the project's
        # AVX-512 machine, the same products summed in another order (blip_ops.cpu_kernels).
        # fp32 on the CPU only: half precision has its own kernels, and a compiled model its own.
        self.cpu_kernels = "torch"
        if torch.device(device).type == "cpu" and self.precision == "fp32" and not self.compiled:
            self.cpu_kernels = resolve_cpu_kernels(cpu_kernels)
            if self.cpu_kernels == "onednn":
                pack_image_side(model)
        self.vision_model, self.text_encoder = model.vision_model, model.text_encoder
        # On the CPU the passes run 8 rows at a time: a 64-row batch's activations (577 tokens each at
        # 384 px) overflow the caches, and the vision pass took 16% less wall time per image in chunks of
        # 8 than whole, on 2 threads (BENCHMARKS.md). Rows do not interact (see _forward).
        self.chunk_rows = CPU_CHUNK_ROWS if torch.device(device).type == "cpu" else None
        # Those chunks run side by side on chunk_workers threads, each torch op on one core, rather
        # than one chunk at a time with every op split across the cores: on 2 cores a 64-row batch's
        # passes took 8-10% less wall and CPU time (BENCHMARKS.md, "Chunks side by side").
        self.chunk_workers = max(1, chunk_workers) if self.chunk_rows else 1
        self._chunk_pool = (
            ThreadPoolExecutor(self.chunk_workers, thread_name_prefix="blip-chunk") if self.chunk_workers > 1 else None
        )
        if self.compiled:
            # The SDPA swap stays installed for this actor's model: compiled code must not see the
            # forward methods change between calls.
            if self.fused_attention:
                self._fused_for_good = sdpa_vision_attention(model.vision_model)
                self._fused_for_good.__enter__()
                self.fused_attention = False  # already on
            self.vision_model = torch.compile(model.vision_model, dynamic=False)
            self.text_encoder = torch.compile(model.text_encoder, dynamic=False)

    @classmethod
    def from_pretrained(
        cls, reference: str, device: str = "auto", max_text_tokens: int = 35, precision: str = "auto",
        vision_attention: str = "fused",
        shape_buckets: bool = False, compile: bool = False, chunk_workers: int = 1, cpu_kernels: str = "auto",
    ) -> "BlipScorer":
        from transformers import BlipForImageTextRetrieval

        inspect_checkpoint(reference, ITM)
        device = resolve_device(device)
        # BLIP v1 in transformers 5.23 has eager attention only (no _supports_sdpa); the
        # scorer fuses the vision attention itself unless told eager (blip_ops.attention).
        model = load_model(reference, BlipForImageTextRetrieval, device, dtype=weight_dtype(precision))
        processor = load_processor(reference)
        check_resize_settings(reference, processor.image_processor)
        return cls(model, processor, device, max_text_tokens, precision, vision_attention, shape_buckets, compile,
                   chunk_workers, cpu_kernels)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        with self.tokenizer_lock:
            encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return np.array([len(ids) for ids in encoded], dtype=np.int64)

    def tokenize(self, texts: list[str]) -> TextBatch:
        # Pad to the longest text in the batch, not to max_length: padding is masked, so
        # it does not change a row's score, but it does cost compute.
        with self.tokenizer_lock:
            encoded = self.tokenizer(
                texts,
                padding="longest",
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
        return TextBatch(
            input_ids=to_device(encoded["input_ids"], self.device),
            attention_mask=to_device(encoded["attention_mask"], self.device),
            truncated=self.token_counts(texts) > self.max_text_tokens,
        )

    def score(self, images, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``images``: resized uint8 ``(3, h, w)`` arrays, or one ``(n, 3, h, w)`` array.
        Returns float32 ``itc``, ``itm`` and bool ``truncated``."""
        itc, itm, text, _, _, _ = self._score(images, texts)
        return itc, itm, text.truncated

    def score_with_features(self, images, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``score`` plus the normalised ITC projections its ``itc`` is the dot product of: float32
        ``(n, 2 * D)``, the image's D values then the text's (``blip_ops.embeddings`` splits them)."""
        itc, itm, text, _, _, features = self._score(images, texts)
        return itc, itm, text.truncated, features

    def score_keeping_embeds(self, images, texts: list[str]):
        """``score`` plus the pass's image embeddings (``(n, tokens, hidden)``, on the device), which
        ``blip_ops.labels`` labels the images from without a second vision pass."""
        itc, itm, text, embeds, _, _ = self._score(images, texts, keep_embeds=True)
        return itc, itm, text.truncated, embeds

    def score_keeping(self, images, texts: list[str], keep_embeds: bool) -> ExplainedScores:
        """One pass, everything a batch may want besides evidence: the projections (``features``, always:
        the pass computes them anyway) and, with ``keep_embeds``, the image embeddings labels need. For
        a batch that wants labels and embeddings together; ``evidence`` is all None."""
        itc, itm, text, embeds, _, features = self._score(images, texts, keep_embeds=keep_embeds)
        return ExplainedScores(itc, itm, text.truncated, [None] * len(texts), 0.0, features, embeds)

    def score_explained(self, images, texts: list[str], wanted, gradcam) -> ExplainedScores:
        """``score`` plus Grad-CAM evidence (``blip_ops.evidence.GradCam``) for the rows that
        ``wanted(itc, itm)`` (a bool mask) picks, from the same vision pass.

        In fp32 the scoring pass does part of the evidence's work. The ITM pass keeps what entered the
        explained layer, so a map costs only the layers from there up and a backward. And where
        ``wanted`` says from ITC alone (``blip_ops.evidence.Wanted.from_itc``) that at least half a
        chunk's rows are wanted, that chunk's ITM pass records its graph (same values: run outside
        inference mode, the same kernels), so its maps cost only the backward."""
        reuse = self.reuses_layers(gradcam)
        from_itc = getattr(wanted, "from_itc", None)
        recorder = _Recorder(gradcam, from_itc) if reuse and from_itc is not None else None
        itc, itm, text, image_embeds, entered, features = self._score(
            images, texts, keep_embeds=True, capture=gradcam if reuse else None, recorder=recorder
        )
        rows = np.flatnonzero(wanted(itc, itm)) if len(texts) else np.zeros(0, dtype=np.int64)
        evidence: list = [None] * len(texts)
        recorded = recorder.evidence if recorder is not None else {}
        for row in rows:
            evidence[row] = recorded.get(row)
        rows = np.array([row for row in rows if row not in recorded], dtype=np.int64)
        seconds = recorder.seconds if recorder is not None and len(recorded) else 0.0
        if not len(rows):
            return ExplainedScores(itc, itm, text.truncated, evidence, seconds, features, image_embeds)
        started = time.perf_counter()
        index = torch.as_tensor(rows, device=self.device)
        # Only the chosen rows, cut to their own longest text (padding is masked either way).
        mask = text.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        step = self.chunk_rows or len(rows)  # in the scoring pass's chunks on the CPU, for the same reason

        def explain(start: int) -> list:
            part = index[start : start + step]
            ids, atts = text.input_ids[part][:, :width], text.attention_mask[part][:, :width]
            if entered is not None:
                return gradcam.explain_from(entered.take(part, width), ids, atts)
            return gradcam.explain(image_embeds[part], ids, atts)

        with self.device_turn:
            explained = [item for part in self._map_chunks(explain, range(0, len(rows), step)) for item in part]
        for row, item in zip(rows, explained):
            evidence[row] = item
        return ExplainedScores(
            itc, itm, text.truncated, evidence, seconds + time.perf_counter() - started, features, image_embeds
        )

    def reuses_layers(self, gradcam) -> bool:
        """Whether evidence can start from the scoring pass's hidden state at the explained layer: only
        when that pass is the fp32 one evidence runs anyway (not autocast, not bf16 weights, whose
        evidence runs on an fp32 copy), eager (a compiled encoder is not hooked), and ``gradcam`` was not
        told to run its own pass (``GradCam(reuse_scoring_pass=False)``)."""
        return (
            gradcam.reuse_scoring_pass and self.precision == "fp32"
            and gradcam.text_encoder is self.model.text_encoder and not self.compiled
        )

    def _score(self, images, texts: list[str], keep_embeds: bool = False, capture=None, recorder=None):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        if not texts:
            empty = np.zeros(0, dtype=np.float32)
            return empty, empty.copy(), TextBatch(None, None, np.zeros(0, dtype=bool)), None, None, None
        # Host half: pixels staged and on their way to the device, texts tokenised.
        with torch.inference_mode():
            pixel_values = self.images.to_device_pixel_values(images, self.device, next(self.model.parameters()).dtype)
        text = self.tokenize(texts)
        model_pixels, model_text = self._bucketed(pixel_values, text)
        rows = len(texts)
        fused = sdpa_vision_attention(self.model.vision_model) if self.fused_attention else contextlib.nullcontext()
        with self.device_turn, torch.inference_mode(), autocast(self.precision, self.device), fused:
            itc, itm, image_embeds, entered, features = self._forward(model_pixels, model_text, capture, recorder)
            results = ToHost.start(itc[:rows].float(), itm[:rows].float(), features[:rows])
        itc, itm, features = results.numpy()  # outside the turn: the next batch's pass is already queued
        embeds = image_embeds[:rows] if keep_embeds else None
        return itc.astype(np.float32), itm.astype(np.float32), text, embeds, entered, features

    def _bucketed(self, pixel_values: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, TextBatch]:
        """The model's inputs padded to bucketed shapes (``blip_ops.buckets``), or as they are."""
        if not self.shape_buckets:
            return pixel_values, text
        rows = buckets.batch_bucket(len(pixel_values))
        length = buckets.text_bucket(text.input_ids.shape[1], self.max_text_tokens)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids, attention_mask = buckets.pad_tokens(text.input_ids, text.attention_mask, length, pad_id)
        return buckets.pad_rows(pixel_values, rows), TextBatch(
            buckets.pad_rows(input_ids, rows), buckets.pad_rows(attention_mask, rows), text.truncated
        )

    def _forward(self, pixel_values: torch.Tensor, text: TextBatch, capture=None, recorder=None):
        """The batch's passes, in chunks of ``chunk_rows`` on the CPU, so a chunk's activations stay in
        cache: ITC, ITM, the image embeddings and, with ``capture`` (a ``GradCam``), what entered its
        explained layer (a ``LayerInput``; None without). Rows do not interact; only the matrix kernels'
        blocking, which already varies with a batch's size and thread count, can round a row differently
        (at most 2e-7 on the tests' tiny checkpoint, 0 at the CPU benchmark's layout)."""
        chunk = self.chunk_rows
        if not chunk or len(pixel_values) <= chunk:
            parts = [self._forward_rows(pixel_values, text, capture, recorder, 0)]
        else:

            def rows(start: int):
                end = start + chunk
                chunk_text = TextBatch(text.input_ids[start:end], text.attention_mask[start:end], None)
                return self._forward_rows(pixel_values[start:end], chunk_text, capture, recorder, start)

            parts = self._map_chunks(rows, range(0, len(pixel_values), chunk))
        itc, itm, image_embeds, features = (
            torch.cat(outputs) if len(parts) > 1 else outputs[0] for outputs in zip(*((*p[:3], p[4]) for p in parts))
        )
        entered = None
        if capture is not None and all(p[3] for p in parts):  # else evidence runs its own full pass
            from .evidence import LayerInput

            entered = LayerInput.join([p[3][0] for p in parts], image_embeds)
        return itc, itm, image_embeds, entered, features

    def _map_chunks(self, fn, starts) -> list:
        """``fn`` over the chunks, in order: on the chunk workers when there are several, with torch's
        intra-op threads at one for the while (a process-wide setting, restored after: the device
        turn keeps any other pass of this scorer out meanwhile)."""
        if self._chunk_pool is None or len(starts) < 2:
            return [fn(start) for start in starts]
        # Grad, inference and autocast modes are per thread: each worker takes the caller's.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_callers_modes(start: int):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), autocast(self.precision, self.device):
                return fn(start)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(self._chunk_pool.map(in_callers_modes, starts))
        finally:
            torch.set_num_threads(threads)

    def _forward_rows(self, pixel_values: torch.Tensor, text: TextBatch, capture=None, recorder=None, start: int = 0):
        model = self.model
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)

        # ITC before ITM (independent passes, so the order changes no value): the rows ITC flags are
        # known before the ITM pass, which may then record its graph for their evidence.
        unimodal = self.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        image_feat = normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_feat = normalize(model.text_proj(unimodal[:, 0, :]).float(), dim=-1)
        itc = (image_feat * text_feat).sum(dim=-1)

        # The chunk's own thread keeps what enters the explained layer (GradCam's hooks act per thread).
        with capture.capturing() if capture is not None else contextlib.nullcontext() as entered:
            if recorder is not None and recorder.records(itc):
                logits = recorder.itm_logits_explained(self._itm_logits, text, image_embeds, image_atts, start)
            else:
                logits = self._itm_logits(text, image_embeds, image_atts)
        itm = logits.float().softmax(dim=-1)[:, 1]
        # The projections ITC is the dot product of, kept for --embeddings (2 * D floats a row: nothing next to a pass).
        return itc, itm, image_embeds, entered, torch.cat([image_feat, text_feat], dim=-1)

    def _itm_logits(self, text: TextBatch, image_embeds: torch.Tensor, image_atts: torch.Tensor) -> torch.Tensor:
        fused = self.text_encoder(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        return self.model.itm_head(fused[:, 0, :])


# A chunk's ITM pass records its graph when at least this share of its rows is wanted from ITC alone.
# Recording costs the backward for all the chunk's rows: at the CPU benchmark's layout (1 thread)
# 0.065 s per 8-row chunk, what the kept-input path spends on 2 rows (0.032 s a row), so half a
# chunk is on the safe side of break-even; recording itself added no measurable forward time.
RECORD_SHARE = 0.5


class _Recorder:
    """Evidence from a chunk's own ITM pass (``BlipScorer.score_explained``): ``evidence`` maps a batch
    row to its ``Evidence``, for every row of the chunks recorded; ``seconds`` is their backward's."""

    def __init__(self, gradcam, from_itc):
        self.gradcam, self.from_itc = gradcam, from_itc
        self.evidence: dict = {}
        self.seconds = 0.0
        self._adding = threading.Lock()  # chunks record on the chunk workers' threads at once

    def records(self, itc: torch.Tensor) -> bool:
        known = np.asarray(self.from_itc(itc.float().cpu().numpy().astype(np.float32)), dtype=bool)
        return bool(known.any()) and known.mean() >= RECORD_SHARE

    def itm_logits_explained(self, itm_logits, text: TextBatch, image_embeds, image_atts, start: int) -> torch.Tensor:
        # Out of inference mode, grad on: only the layers from the explained one up record anything
        # (their input is the leaf, the weights are frozen). The image embeddings stay inference
        # tensors: autograd saves only tensors computed from them here.
        with torch.inference_mode(False), torch.enable_grad(), self.gradcam.recording() as seen:
            logits = itm_logits(text, image_embeds, image_atts)
            started = time.perf_counter()
            explained = self.gradcam.explain_recorded(logits[:, 1], seen, text.input_ids, text.attention_mask)
        with self._adding:
            self.seconds += time.perf_counter() - started
            for row, item in enumerate(explained):
                self.evidence[start + row] = item
        return logits.detach()
