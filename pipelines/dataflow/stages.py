"""Ray Data stages. Each takes a pyarrow batch and returns the same rows, in order, plus its columns.

Model stages are callable classes: Ray builds one per actor, so a model loads once per
actor in ``__init__`` and never on the driver. Per-row problems become values; nothing
here raises for a bad record.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blip_ops.checkpoints import local_checkpoint
from blip_ops.images import ImageError, decode_rgb
from blip_ops.jpeg_device import sniff_jpeg
from blip_ops.oom import HalvingBatches
from blip_ops.preprocess import Resize, resize_for
from blip_ops.texts import text_problem

from .. import keys as K
from .. import schema as S
from ..storage import FetchCache, FetchError, HttpSettings, TooLarge, is_http, read_uris
from .device_decode import decode_jpeg_rows, drop_jpeg_columns


@functools.lru_cache(maxsize=4)
def _resizer(reference: str) -> Resize:
    # Cached per worker process: decode tasks reuse Ray's long-lived workers.
    # An s3:// model is copied once per node (blip_ops.model_cache), then read from local disk.
    return resize_for(local_checkpoint(reference))


# Where model stages append "stage<TAB>rows<TAB>seconds" per batch (benchmarks/nightly_reuse.py); unset: nothing.
STAGE_TIMES_ENV = "BLIP_MODERATE_STAGE_TIMES"


def _record_time(stage: str, rows: int, started: float) -> None:
    directory = os.environ.get(STAGE_TIMES_ENV)
    if directory:
        with open(os.path.join(directory, f"{stage}-{os.getpid()}.tsv"), "a") as log:
            log.write(f"{stage}\t{rows}\t{time.perf_counter() - started:.6f}\n")


def _checked_bytes(value, max_image_bytes: int | None):
    if max_image_bytes is not None and value is not None and len(value) > max_image_bytes:
        raise ImageError(str(TooLarge(len(value), max_image_bytes)))
    return value


def _uri_bytes(uri, loaded):
    """The bytes ``read_uris`` gave for ``uri``, or the row's ``ImageError`` for what it raised."""
    if loaded is None:
        raise ImageError("missing image URI")
    if isinstance(loaded, bytes):
        return loaded
    if isinstance(loaded, TooLarge):
        raise ImageError(str(loaded))
    if isinstance(loaded, FetchError) and is_http(str(uri)):
        raise ImageError(f"cannot fetch image URL {str(uri).strip()}: {loaded}")
    if isinstance(loaded, (OSError, ValueError)):
        raise ImageError(f"cannot read image URI {uri}: {loaded}")
    raise loaded  # anything else: the row's "could not be decoded", as a decoder bug would be


def decode_batch(
    batch: pa.Table,
    *,
    text_column: str,
    image_column: str,
    from_uri: bool,
    score_model: str,
    caption_model: str | None,
    jpeg_draft: bool = False,
    max_image_bytes: int | None = None,
    detect_language: bool = False,
    decode_device: str = "cpu",
    http: HttpSettings | None = None,
    fetch_cache: FetchCache | None = None,
) -> pa.Table:
    """Decode images and check texts; adds pixels at each model's resolution and per-row errors.
    URIs are read first, each distinct one once (``storage.read_uris``: HTTP(S) URLs side by side
    with ``http``'s settings, and from ``fetch_cache`` where an earlier pass of this run fetched them).
    An image larger than ``max_image_bytes`` is an error without being read (URIs) or decoded;
    with ``detect_language``, usable texts get their ISO 639-1 ``text_language`` (or null).
    With ``decode_device="gpu"``, a JPEG the device decoder may take (``sniff_jpeg``) is not decoded
    here: its bytes and EXIF orientation travel to the model actors (``S.JPEG_*``), its pixels stay null."""
    score_prep = _resizer(score_model)
    caption_prep = _resizer(caption_model) if caption_model else None
    # A draft decode must still cover the largest model input, so every resize stays a downscale.
    draft_size = max(max(r.height, r.width) for r in (score_prep, caption_prep) if r) if jpeg_draft else None
    texts = batch.column(text_column).to_pylist()
    sources = batch.column(image_column).to_pylist()
    image_errors, text_errors, score_pixels, caption_pixels, image_hashes = [], [], [], [], []
    jpegs, orientations = [], []
    loaded = read_uris(sources, max_image_bytes, http, fetch_cache) if from_uri else [None] * len(sources)
    for text, source, got in zip(texts, sources, loaded):
        text_errors.append(text_problem(text))
        image_hashes.append(K.sha256_hex(source) if not from_uri else None)
        jpegs.append(None)
        orientations.append(None)
        try:
            data = _uri_bytes(source, got) if from_uri else _checked_bytes(source, max_image_bytes)
            if from_uri:
                image_hashes[-1] = K.sha256_hex(data)  # the key is the bytes read, not the URI
            orientation = sniff_jpeg(data) if decode_device == "gpu" else None
            if orientation is not None:  # decoded in the model actors
                jpegs[-1], orientations[-1] = data, orientation
                score_pixels.append(None)
                caption_pixels.append(None)
                image_errors.append(None)
                continue
            rgb = decode_rgb(data, draft_size)
            score_pixels.append(score_prep.resize(rgb).tobytes())
            caption_pixels.append(caption_prep.resize(rgb).tobytes() if caption_prep else None)
            image_errors.append(None)
        except ImageError as exc:
            image_errors.append(str(exc))
            score_pixels.append(None)
            caption_pixels.append(None)
        except Exception as exc:  # a decoder bug must cost one row, not the block
            image_errors.append(f"image could not be decoded: {type(exc).__name__}: {exc}")
            score_pixels.append(None)
            caption_pixels.append(None)
    if not from_uri:
        batch = batch.drop_columns([image_column])
    languages = [None] * len(texts)
    if detect_language:
        from blip_ops.language import detect_languages  # loads the model once per worker process

        languages = detect_languages([t if e is None else None for t, e in zip(texts, text_errors)])
    if K.IMAGE_SHA256 not in batch.column_names:  # the keyed plan computed them already
        batch = batch.append_column(K.IMAGE_SHA256, pa.array(image_hashes, pa.string())).append_column(
            K.TEXT_SHA256, pa.array([K.text_sha256(t) for t in texts], pa.string())
        )
    batch = (
        batch.append_column(S.TEXT_LANGUAGE, pa.array(languages, pa.string()))
        .append_column(S.IMAGE_ERROR, pa.array(image_errors, pa.string()))
        .append_column(S.TEXT_ERROR, pa.array(text_errors, pa.string()))
        .append_column(S.PIXELS_SCORE, pa.array(score_pixels, pa.binary()))
        .append_column(S.PIXELS_CAPTION, pa.array(caption_pixels, pa.binary()))
    )
    if decode_device != "gpu":
        return batch
    return (
        batch.append_column(S.JPEG_SCORE, pa.array(jpegs, pa.binary()))
        .append_column(S.JPEG_CAPTION, pa.array(jpegs if caption_prep else [None] * len(jpegs), pa.binary()))
        .append_column(S.JPEG_ORIENTATION, pa.array(orientations, pa.int8()))
    )


def _scorable(batch: pa.Table) -> np.ndarray:
    has_pixels = batch.column(S.PIXELS_SCORE).is_valid().to_numpy(zero_copy_only=False)
    text_ok = batch.column(S.TEXT_ERROR).is_null().to_numpy(zero_copy_only=False)
    return has_pixels & text_ok


def _spread(values: np.ndarray, mask: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Place ``values`` at the rows where ``mask`` is set; null elsewhere."""
    full = np.zeros(len(mask), dtype=values.dtype if len(values) else np.float32)
    full[mask] = values
    return pa.array(full, type=type_, mask=~mask)


def _pixel_batch(column: pa.ChunkedArray, rows: np.ndarray, size: Resize) -> np.ndarray:
    """The chosen rows' uint8 pixels as one ``(n, 3, h, w)`` array read straight from the Arrow
    buffers (at most one copy, in C++): every value is exactly one image at model resolution, so the hot
    loop creates no per-row Python objects."""
    shape = (len(rows), 3, size.height, size.width)
    if not len(rows):
        return np.zeros(shape, dtype=np.uint8)
    if column.num_chunks == 1 and len(rows) == len(column) and np.array_equal(rows, np.arange(len(rows))):
        # Every row, one chunk (the usual batch): a view of the Arrow buffer, no copy. On a GPU
        # the pinned staging copy then reads straight from it.
        values = column.chunk(0)
    else:
        values = column.take(pa.array(rows, pa.int64())).combine_chunks()
    offset_type = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    offsets = np.frombuffer(values.buffers()[1], dtype=offset_type, count=len(values) + 1, offset=values.offset * np.dtype(offset_type).itemsize)
    if not np.all(np.diff(offsets) == size.num_bytes):
        raise ValueError(f"pixel values are not all {size.num_bytes} bytes ({size.height}x{size.width} RGB)")
    return np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(shape)


def set_torch_threads(threads: int | None) -> int:
    """torch's intra-op threads for this actor (``Resources.score_threads``), at most the cores this
    process may run on: Ray set ``OMP_NUM_THREADS`` from the actor's CPU reservation, which for a
    fractional reservation is one thread. Returns the threads torch runs with."""
    import torch

    if threads:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, min(threads, cores)))
    return torch.get_num_threads()


def quiet_model_loading() -> None:
    """No "Loading weights" progress bar from every actor: Ray forwards each actor's stderr to
    the driver's terminal, where a bar per actor reads as noise. transformers' warnings stay."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# The keyed plan's working column naming the rows whose labels a batch computes (pipelines.reuse.passes.DO_LABEL).
LABEL_ROWS = "__do_label"


def torch_index(rows: np.ndarray, like):
    import torch

    return torch.as_tensor(rows, device=like.device)


def score_reasons(itc: float, itm: float, itm_threshold: float | None, itc_threshold: float | None) -> list[str]:
    """The flag rule for a scored row: which checks its scores fail."""
    reasons = []
    if itm_threshold is not None and itm < itm_threshold:
        reasons.append(S.REASON_ITM)
    if itc_threshold is not None and itc < itc_threshold:
        reasons.append(S.REASON_ITC)
    return reasons


def evidence_array(items: list) -> pa.Array:
    """``blip_ops.evidence.Evidence`` objects (None: not computed) as the output's ``evidence`` column."""
    return pa.array([None if item is None else item.as_dict() for item in items], S.EVIDENCE_TYPE)


class ScoreStage:
    """ITC and ITM for every row with a decoded image and a usable text, and Grad-CAM evidence for
    the scored rows the policy picks (``flagged``: those below a threshold; ``all``; ``none``).

    Evidence is computed here, not in a stage of its own: it reuses the scoring pass's image
    embeddings, which are far too large to ship between stages (577 x 768 floats per row at
    384 px), and a later stage would have to run the vision encoder again.
    """

    def __init__(
        self, *, model: str, device: str, max_text_tokens: int, text_column: str, precision: str = "auto",
        threads: int | None = None, evidence: str = "none", evidence_layer: int | None = None,
        vision_attention: str = "fused", cpu_kernels: str = "auto",
        decode_device: str = "cpu", jpeg_backend: str = "torchvision",
        shape_buckets: bool = False, compile: bool = False, labels: str | None = None,
        embeddings: str = "none",
    ):
        """``labels``: the parsed label file as JSON (``pipelines.labels``); its prompts are embedded
        here, once per actor, and every batch is labelled from its own scoring pass. ``embeddings``:
        none, image or both: which normalised ITC projections the batch gains (``pipelines.vectors``;
        from the scoring pass itself, no second one)."""
        # Imported here, not at the top: the decode, flag and write tasks import this module too,
        # and must not pay for torch and transformers.
        from blip_ops.scorer import BlipScorer

        cores = set_torch_threads(threads)
        workers = 1
        # Only with the cores given (as a model actor is, from Resources): torch's threads are
        # process-wide, and a stage built in a notebook or a test must not change its caller's.
        if threads and device == "cpu" and cores > 1:
            # The actor's cores each run a chunk of the batch, every torch op on one thread, rather
            # than every op split across the cores: no OpenMP barrier to wait at while a decode task
            # holds a core (BlipScorer's chunk_workers; BENCHMARKS.md, "Chunks side by side").
            import torch

            torch.set_num_threads(1)
            workers = cores
        quiet_model_loading()

        # Resolved once here: an s3:// model comes from the node's model cache.
        self.scorer = BlipScorer.from_pretrained(
            local_checkpoint(model), device=device, max_text_tokens=max_text_tokens, precision=precision,
            vision_attention=vision_attention, cpu_kernels=cpu_kernels,
            shape_buckets=shape_buckets, compile=compile, chunk_workers=workers,
        )
        self.text_column = text_column
        self.parts = HalvingBatches("scoring")
        self.evidence = evidence
        self.gradcam = None
        if evidence != "none":
            from blip_ops.evidence import GradCam

            self.gradcam = GradCam(self.scorer.model, self.scorer.tokenizer, layer=evidence_layer)
        self.jpegs = _device_decoder(decode_device, self.scorer, jpeg_backend)
        self.embeddings = embeddings
        self.labels = self.labeller = None
        if labels is not None:
            from .labelling import label_set, make_labeller

            self.labels = label_set(labels)
            self.labeller = make_labeller(self.scorer, self.labels)

    def label_setup_s(self) -> float | None:
        """Seconds this actor spent embedding the label prompts (None without labels)."""
        return None if self.labeller is None else self.labeller.setup_s

    def torch_threads(self) -> int:
        """The intra-op threads torch really runs with in this actor (asked by tests and audits)."""
        import torch

        return torch.get_num_threads()

    def chunk_workers(self) -> int:
        """Threads the scorer runs its CPU chunks on, side by side (1: one chunk at a time)."""
        return self.scorer.chunk_workers

    def cpu_kernels(self) -> str:
        """The kernels the image side really runs on here: onednn or torch (blip_ops.cpu_kernels)."""
        return self.scorer.cpu_kernels

    def _wanted(self, itm_threshold: float | None, itc_threshold: float | None):
        from blip_ops.evidence import Wanted

        if self.evidence == "all":
            return Wanted(lambda itc, itm: np.ones(len(itc), dtype=bool), from_itc=lambda itc: np.ones(len(itc), dtype=bool))
        # The rows ITC flags are flagged whatever their ITM: the scorer may know them before ITM.
        flagged_by_itc = None if itc_threshold is None else lambda itc: np.array(
            [bool(score_reasons(c, 1.0, None, itc_threshold)) for c in itc], dtype=bool
        )
        return Wanted(lambda itc, itm: np.array(
            [bool(score_reasons(c, m, itm_threshold, itc_threshold)) for c, m in zip(itc, itm)], dtype=bool
        ), from_itc=flagged_by_itc)

    def _score(self, images, texts, wanted, declared=None, label_mask=None):
        """The part's scores, evidence and seconds, the ITC projections with --embeddings (else None),
        and with labels each row's ``RowLabels`` (from the same pass's image embeddings; ``declared``:
        the rows' declared name indices; else None). One pass whatever the combination."""
        embeddings = self.embeddings != "none"
        if self.gradcam is None and self.labeller is None and not embeddings:
            itc, itm, truncated = self.scorer.score(images, texts)
            return itc, itm, truncated, [None] * len(texts), 0.0, None, None
        if self.gradcam is None:
            result = self.scorer.score_keeping(images, texts, keep_embeds=self.labeller is not None)
        else:
            result = self.scorer.score_explained(images, texts, wanted, self.gradcam)
        labels = self._label(result.image_embeds, declared, label_mask) if self.labeller is not None else None
        features = result.features if embeddings else None
        return result.itc, result.itm, result.truncated, result.evidence, result.evidence_s, features, labels

    def _embedding_columns(self, batch: pa.Table, parts, rows: np.ndarray, n: int) -> pa.Table:
        """``image_embedding`` (and ``text_embedding`` for ``both``) at the scored rows, null elsewhere."""
        if self.embeddings == "none":
            return batch
        from ..vectors import spread

        dim = self.scorer.model.config.image_text_hidden_size
        found = [part[5] for part in parts if part[5] is not None and len(part[5])]
        features = np.concatenate(found) if found else np.zeros((0, 2 * dim), dtype=np.float32)
        batch = batch.append_column(S.IMAGE_EMBEDDING, spread(features[:, :dim], rows, n, dim))
        if self.embeddings == "both":
            batch = batch.append_column(S.TEXT_EMBEDDING, spread(features[:, dim:], rows, n, dim))
        return batch

    def _label(self, embeds, declared, mask):
        """Labels for the part's rows that ``mask`` picks (the keyed plan labels each (image, category)
        once: a row scored for its pair only gets none); None for the others."""
        chosen = np.flatnonzero(mask)
        out = [None] * len(declared)
        if len(chosen):
            index = torch_index(chosen, embeds)
            for row, result in zip(chosen, self.labeller.label(embeds[index], [declared[i] for i in chosen])):
                out[row] = result
        return out

    def __call__(self, batch: pa.Table, *, itm_threshold: float | None = None, itc_threshold: float | None = None) -> pa.Table:
        """The thresholds pick the rows ``flagged`` evidence explains (call arguments, so warm actors
        serve audits with other thresholds without reloading)."""
        started = time.perf_counter()
        device_rows = None
        if self.jpegs is not None:  # --decode-device gpu: this batch's JPEGs, decoded here
            batch, device_rows = decode_jpeg_rows(batch, self.jpegs, S.JPEG_SCORE, others=(S.JPEG_CAPTION,))
        mask = _scorable(batch)
        if device_rows is not None:
            mask |= device_rows.decoded & batch.column(S.TEXT_ERROR).is_null().to_numpy(zero_copy_only=False)
        texts = batch.column(self.text_column).to_pylist()
        rows = np.flatnonzero(mask)
        if device_rows is None:
            images = _pixel_batch(batch.column(S.PIXELS_SCORE), rows, self.scorer.images.resizer)
        else:
            images = device_rows.gather(batch.column(S.PIXELS_SCORE), rows, self.scorer.images.resizer, _pixel_batch)
        scored_texts = [texts[i] for i in rows]
        wanted = self._wanted(itm_threshold, itc_threshold)
        declared, label_mask = [], np.zeros(0, dtype=bool)
        if self.labels is not None:
            from .labelling import declared_indices

            column = self.labels.column
            values = batch.column(column).to_pylist() if column else [None] * batch.num_rows
            declared = declared_indices(self.labels, [values[i] for i in rows])
            label_mask = np.ones(len(rows), dtype=bool)
            if LABEL_ROWS in batch.column_names:  # the keyed plan: only rows whose label key it computes here
                label_mask = batch.column(LABEL_ROWS).to_numpy(zero_copy_only=False)[rows]
        parts = self.parts.run(
            lambda a, b: self._score(images[a:b], scored_texts[a:b], wanted, declared[a:b], label_mask[a:b]), len(rows)
        )
        itc, itm, scored_truncated = (np.concatenate(column) for column in list(zip(*parts))[:3])
        evidence = [None] * len(mask)
        for row, item in zip(rows, (item for part in parts for item in part[3])):
            evidence[row] = item
        explained = np.array([item is not None for item in evidence], dtype=bool)
        seconds = np.zeros(len(mask))
        if explained.any():
            seconds[explained] = sum(part[4] for part in parts) / explained.sum()

        truncated = np.zeros(len(mask), dtype=bool)
        truncated[rows] = scored_truncated
        # Rows with a usable text but a broken image still report truncation.
        usable_text = batch.column(S.TEXT_ERROR).is_null().to_numpy(zero_copy_only=False)
        unscored = np.flatnonzero(usable_text & ~mask)
        if len(unscored):
            counts = self.scorer.token_counts([texts[i] for i in unscored])
            truncated[unscored] = counts > self.scorer.max_text_tokens
        _record_time("score", len(rows), started)
        out = (
            batch.drop_columns([S.PIXELS_SCORE])
            .append_column("itc_score", _spread(itc, mask, pa.float32()))
            .append_column("itm_score", _spread(itm, mask, pa.float32()))
            .append_column("text_truncated", pa.array(truncated, pa.bool_()))
            .append_column("evidence", evidence_array(evidence))
            .append_column(S.EVIDENCE_SECONDS, pa.array(seconds, pa.float64()))
        )
        out = self._embedding_columns(out, parts, rows, len(mask))
        if self.labels is None:
            return out
        from .labelling import label_columns

        results = [item for part in parts for item in (part[6] or [])]
        for name, values in label_columns(results, rows, len(mask)).items():
            out = out.append_column(name, values)
        return out


def _row_verdict(image_error, text_error, itc, itm, itm_threshold, itc_threshold, language=None, languages=None,
                 label_reasons=()):
    reasons = []
    if image_error is not None:
        reasons.append(S.STATUS_IMAGE_ERROR)
    if text_error is not None:
        reasons.append(S.STATUS_TEXT_ERROR)
    if reasons:
        # A row that could not be checked fails closed: flagged for review.
        status = reasons[0]
        error = "; ".join(e for e in (image_error, text_error) if e is not None)
        return status, error, reasons
    reasons = score_reasons(itc, itm, itm_threshold, itc_threshold)
    if languages is not None and language is not None and language not in languages:
        # The scores stand, but BLIP reads only the listed languages: a human decides (fail closed).
        reasons.append(S.REASON_LANGUAGE)
    return S.STATUS_OK, None, reasons + list(label_reasons)


def flag_batch(
    batch: pa.Table, *, itm_threshold: float | None, itc_threshold: float | None, text_languages=None, labels=None
) -> pa.Table:
    """Status, error and flags from the decode errors, the scores, (``text_languages``) the text's
    language and (``labels``, the label file as JSON) the label columns (``labelling.label_reasons``)."""
    n = batch.num_rows
    label_reasons = [()] * n
    if labels is not None and "labels" in batch.column_names:
        from .labelling import label_reasons as reasons_of
        from .labelling import label_set

        spec = label_set(labels)
        declared = batch.column(spec.column).to_pylist() if spec.column else [None] * n
        label_reasons = [
            reasons_of(spec, *row) for row in zip(
                declared, batch.column("category_predicted").to_pylist(), batch.column("category_score").to_pylist(),
                batch.column("labels").to_pylist(),
            )
        ]
    language = batch.column(S.TEXT_LANGUAGE).to_pylist() if S.TEXT_LANGUAGE in batch.column_names else [None] * n
    languages = frozenset(text_languages) if text_languages is not None else None
    columns = zip(
        batch.column(S.IMAGE_ERROR).to_pylist(),
        batch.column(S.TEXT_ERROR).to_pylist(),
        batch.column("itc_score").to_pylist(),
        batch.column("itm_score").to_pylist(),
    )
    verdicts = [
        _row_verdict(*row, itm_threshold, itc_threshold, code, languages, extra)
        for row, code, extra in zip(columns, language, label_reasons)
    ]
    statuses = [v[0] for v in verdicts]
    errors = [v[1] for v in verdicts]
    reasons = [v[2] for v in verdicts]
    return (
        batch.drop_columns([S.IMAGE_ERROR, S.TEXT_ERROR])
        .append_column("flagged", pa.array([bool(r) for r in reasons], pa.bool_()))
        .append_column("flag_reasons", pa.array(reasons, pa.list_(pa.string())))
        .append_column("status", pa.array(statuses, pa.string()))
        .append_column("error", pa.array(errors, pa.string()))
    )


class CaptionStage:
    """BLIP-2 captions for decodable rows: all of them, or only the flagged ones."""

    def __init__(
        self,
        *,
        model: str,
        device: str,
        max_new_tokens: int,
        prompt: str | None,
        policy: str,
        precision: str = "auto",
        text_column: str = "text",
        agreement_model: str | None = None,
        agreement_threshold: float | None = None,
        threads: int | None = None,
        decode_device: str = "cpu",
        jpeg_backend: str = "torchvision",
        rows_from_memory: int | None = None,
    ):
        """``rows_from_memory``: on CUDA, call the model with as many of a batch's rows (at most this
        many) as the card's free memory holds (the caption batch size ``auto``)."""
        from blip_ops.captioner import Blip2Captioner  # not at the top: see ScoreStage

        set_torch_threads(threads)
        quiet_model_loading()

        self.captioner = Blip2Captioner.from_pretrained(
            local_checkpoint(model), device=device, max_new_tokens=max_new_tokens, prompt=prompt, precision=precision
        )
        self.policy = policy
        self.parts = HalvingBatches("captioning")
        # The agreement encoder (22M parameters) rides along in the caption actor: it needs the
        # caption just made, and its pass costs about 1% of the caption's (BENCHMARKS.md).
        self.encoder = None
        if agreement_model:
            from blip_ops.agreement import SentenceEncoder

            self.encoder = SentenceEncoder.from_pretrained(agreement_model, device=str(self.captioner.device))
        self.text_column = text_column
        self.agreement_threshold = agreement_threshold
        self.jpegs = _device_decoder(decode_device, self.captioner, jpeg_backend)
        if rows_from_memory:  # asked last, once every model of this actor holds its memory
            self.parts.rows_per_call = self.captioner.rows_for_memory(rows_from_memory)

    def torch_threads(self) -> int:
        """The intra-op threads torch really runs with in this actor (asked by tests and audits)."""
        import torch

        return torch.get_num_threads()

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        device_rows = None
        if self.jpegs is not None:  # --decode-device gpu: decoded again here, on this actor's card
            if self.policy == "flagged" and S.JPEG_CAPTION in batch.column_names:
                batch = _only_flagged_jpegs(batch)  # unflagged rows get no caption: not worth decoding
            batch, device_rows = decode_jpeg_rows(batch, self.jpegs, S.JPEG_CAPTION)
        mask = batch.column(S.PIXELS_CAPTION).is_valid().to_numpy(zero_copy_only=False)
        if device_rows is not None:
            mask |= device_rows.decoded
        if self.policy == "flagged":
            mask &= batch.column("flagged").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(mask)
        if device_rows is None:
            images = _pixel_batch(batch.column(S.PIXELS_CAPTION), rows, self.captioner.images.resizer)
        else:
            images = device_rows.gather(batch.column(S.PIXELS_CAPTION), rows, self.captioner.images.resizer, _pixel_batch)
        captions = [c for part in self.parts.run(lambda a, b: self.captioner.caption(images[a:b]), len(rows)) for c in part]
        column = [None] * len(mask)
        for row, caption in zip(rows, captions):
            column[row] = caption
        _record_time("caption", len(rows), started)
        batch = batch.drop_columns([S.PIXELS_CAPTION]).append_column("caption", pa.array(column, pa.string()))
        if self.encoder is None:
            return batch
        return add_agreement(batch, self.encoder, self.text_column, self.agreement_threshold)


def _device_decoder(decode_device: str, model, backend: str):
    """The actor's JPEG decoder for ``--decode-device gpu`` (None for cpu), on the model's device at its input size."""
    if decode_device != "gpu":
        return None
    from blip_ops.jpeg_device import DeviceJpegDecoder

    return DeviceJpegDecoder(model.images.resizer, str(model.device), backend)


def _only_flagged_jpegs(batch: pa.Table) -> pa.Table:
    flagged = batch.column("flagged").to_numpy(zero_copy_only=False)
    values = batch.column(S.JPEG_CAPTION)
    kept = pc.if_else(pa.array(flagged), values, pa.nulls(len(values), values.type))
    return batch.set_column(batch.schema.get_field_index(S.JPEG_CAPTION), S.JPEG_CAPTION, kept)


def add_agreement(batch: pa.Table, encoder, text_column: str, threshold: float | None) -> pa.Table:
    """``caption_agreement`` for captioned rows with a usable text, and ``caption_disagrees`` below ``threshold``."""
    from blip_ops.agreement import agreement

    usable = pc.not_equal(batch.column("status"), S.STATUS_TEXT_ERROR).to_pylist()
    texts = [t if ok else None for t, ok in zip(batch.column(text_column).to_pylist(), usable)]
    values = agreement(encoder, texts, batch.column("caption").to_pylist())
    batch = batch.append_column(S.CAPTION_AGREEMENT, pa.array(values, pa.float32(), mask=np.isnan(values)))
    if threshold is None:
        return batch
    below = ~np.isnan(values) & (values < threshold)
    if not below.any():
        return batch
    reasons = batch.column("flag_reasons").to_pylist()
    for row in np.flatnonzero(below):
        reasons[row] = reasons[row] + [S.REASON_CAPTION]
    flagged = batch.column("flagged").to_numpy(zero_copy_only=False) | below
    return (
        batch.set_column(batch.schema.get_field_index("flagged"), "flagged", pa.array(flagged, pa.bool_()))
        .set_column(batch.schema.get_field_index("flag_reasons"), "flag_reasons", pa.array(reasons, pa.list_(pa.string())))
    )


def _extra_column(batch: pa.Table, field: pa.Field) -> pa.Table:
    """An optional output column as ``field`` types it: present already, from the keyed plan's bytes, or null."""
    if field.name in batch.column_names:
        return batch
    carried = {S.IMAGE_EMBEDDING: S.IMAGE_EMBEDDING_BYTES, S.TEXT_EMBEDDING: S.TEXT_EMBEDDING_BYTES}.get(field.name)
    if carried in batch.column_names:
        from ..vectors import from_bytes

        return batch.append_column(field.name, from_bytes(batch.column(carried), field.type.list_size))
    return batch.append_column(field.name, pa.nulls(batch.num_rows, field.type))


def _where_valid(column, value: str) -> pa.Array:
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return pa.array([value if v else None for v in valid], pa.string())


def finalize_batch(
    batch: pa.Table,
    *,
    passthrough: list[str],
    run_id: str,
    itm_model: str,
    caption_model: str | None,
    keep: list[str] = (),
    extra: list = (),
) -> pa.Table:
    """Run metadata, then the output schema and column order, so every file agrees;
    ``keep`` names working columns carried after them (for the writer); ``extra`` the optional
    output fields (``schema.extra_fields``), null where a batch has no value for them (the groups
    are filled in by ``neardup`` once every row is written)."""
    n = batch.num_rows
    batch = batch.drop_columns([c for c in (S.PIXELS_CAPTION, S.PIXELS_SCORE) if c in batch.column_names])
    batch = drop_jpeg_columns(batch)
    if "caption" not in batch.column_names:
        batch = batch.append_column("caption", pa.nulls(n, pa.string()))
    if S.CAPTION_AGREEMENT not in batch.column_names:
        batch = batch.append_column(S.CAPTION_AGREEMENT, pa.nulls(n, pa.float32()))
    if S.TEXT_LANGUAGE not in batch.column_names:
        batch = batch.append_column(S.TEXT_LANGUAGE, pa.nulls(n, pa.string()))
    if "evidence" not in batch.column_names:
        batch = batch.append_column("evidence", pa.nulls(n, S.EVIDENCE_TYPE))
    for field in S.LABEL_FIELDS:  # null without --labels
        if field.name not in batch.column_names:
            batch = batch.append_column(field.name, pa.nulls(n, field.type))
    for name in (K.IMAGE_SHA256, K.TEXT_SHA256):  # decode and the keyed plan set the hashes
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(n, pa.string()))
    scored_at = datetime.now(timezone.utc)
    added = {
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
        "itm_model": pa.array([itm_model] * n, pa.string()),
        "caption_model": pa.array([caption_model] * n, pa.string()),
        # Computed now (this run) where there is a value; the keyed plan sets them for reused rows.
        "scores_from_run": _where_valid(batch.column("itc_score"), run_id),
        "caption_from_run": _where_valid(batch.column("caption"), run_id),
    }
    for name, values in added.items():
        if name not in batch.column_names:  # reused rows bring their own time and provenance
            batch = batch.append_column(name, values)
    for field in extra:
        batch = _extra_column(batch, field)
    target = S.output_schema(batch.select(passthrough).schema, image_column=None, extra=extra)
    result = batch.select(target.names).cast(target)
    for name in keep:
        result = result.append_column(name, batch.column(name))
    return result
