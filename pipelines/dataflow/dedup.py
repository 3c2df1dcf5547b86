"""The keyed plan on Ray: the passes of ``pipelines.reuse.passes`` as Ray tasks, and the model
stages run only on the rows a key needs (each unique pair scored once, each unique image
captioned once, nothing computed that a ``--reuse`` source already holds).

The hash, plan, distribute and assemble-and-write passes are plain Ray tasks (one per unit or
bucket, at most ``TASKS_IN_FLIGHT`` at once): a Ray Data execution costs seconds of start-up on a
small machine, which four of them would add to every run. The model pass is the one Ray Data
execution, for its autoscaling actor pools. What passes between them are small files in the
attempt's work directory (``_staging-<key>/_work-<id>/``), never rows on the driver, whose only
results are one row of counts per task.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
import warnings

import numpy as np
import pyarrow as pa
import ray

from blip_ops.identity import checkpoint_identity

from .. import keys as K
from .. import schema as S
from ..commit import pieces
from ..config import JobConfig
from ..reuse import passes as P
from ..schema import output_schema, passthrough_schema
from ..vectors import extra_fields
from . import stages
from .graph import (
    TASK_RETRIES,
    _unfused,
    decode_kwargs,
    finalize_kwargs,
    labels_json,
    flag_kwargs,
    task_retries,
    with_caption_stage,
    with_score_stage,
)
from .resources import Resources

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_retries=3)
def _identities(itm_model: str, caption_model: str | None) -> tuple[str, str | None]:
    # On a worker, not the driver: an s3:// model is read from that node's model cache.
    return checkpoint_identity(itm_model), checkpoint_identity(caption_model)


def content_digests(config: JobConfig, resources: Resources) -> dict:
    """This run's score and caption key digests (``pipelines.keys``); caption None without captions."""
    itm, caption = ray.get(_identities.remote(config.itm_model, config.caption_model if config.captioning else None))
    return K.content_digests(config, resources.score_device, resources.caption_device, itm, caption)


def uses_keyed_plan(config: JobConfig) -> bool:
    """Dedup and reuse plan per key; the flagged-only caption cascade keeps the row-by-row graph
    (which images need a caption depends on this run's flags, known only after scoring)."""
    return (config.dedup or bool(config.reuse)) and config.captions != "flagged"


# Plan tasks in flight at once: enough to fill the cluster's CPUs, few enough that the driver
# holds only this many one-row results and references.
TASKS_IN_FLIGHT = 64


def _run_one(fn, item: dict, kwargs: dict) -> pa.Table:
    return fn(pa.Table.from_pylist([item]), **kwargs)


def _tasks(items: list[dict], fn, kwargs: dict) -> pa.Table:
    """Run ``fn`` once per item as plain Ray tasks (no Ray Data execution to start, a second or two
    each on small machines); their one-row count tables, concatenated."""
    remote = ray.remote(_run_one).options(max_retries=TASK_RETRIES, retry_exceptions=False)
    shared = ray.put(kwargs)
    pending, results = [], []
    for item in items:
        if len(pending) >= TASKS_IN_FLIGHT:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        pending.append(remote.remote(fn, item, shared))
    results += ray.get(pending)
    tables = [t for t in results if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _sum(table: pa.Table) -> dict[str, int | float]:
    return {name: pa.compute.sum(table.column(name)).as_py() or 0 for name in table.column_names}


def _source_items(sources, digests: dict) -> tuple[list[dict], dict]:
    items, matched = [], {"score": [], "caption": []}
    if digests.get("label"):  # --labels: which sources' labels match
        matched["label"] = []
    for priority, src in enumerate(sources):
        sides = [s for s in ("score", "caption", "label") if digests.get(s) and src.digest(s) == digests[s]]
        for side in sides:
            matched[side].append(src.uri)
        if sides:
            items += [
                {"uri": src.uri, "path": path, "priority": priority, "index": index, "sides": __import__("json").dumps(sides)}
                for index, path in enumerate(src.files)
            ]
    return items, matched


def new_work_dir(staging: str) -> str:
    """This attempt's plan files: never shared, so two identical runs at once (which converge on one
    commit) cannot overwrite each other's; an interrupted attempt's go with its staging at commit."""
    return f"{staging}/{P.WORK}-{uuid.uuid4().hex[:12]}"


def discard_work(work: str, filesystem) -> None:
    try:
        filesystem.delete_dir(work)
    except (FileNotFoundError, OSError):
        pass


def plan_and_compute(
    config: JobConfig, source, run_id: str, resources: Resources, todo, work: str, filesystem, sources, digests: dict,
) -> dict:
    """Passes 1-4 into ``work`` (``new_work_dir``): keys, plan, model calls on what the plan needs,
    values per unit. Returns counts."""
    items = pieces.unit_items(source.units, todo)
    rows = sum(end - start for ranges in todo.values() for start, end in ranges)
    buckets = P.bucket_count(rows)
    common = {"work_fs": filesystem, "work": work}
    read = {"filesystem": source.location.filesystem, "schema": source.schema, "batch_rows": config.decode_batch_size}
    caption_digest = digests["caption"] if config.captioning else None
    label_digest = digests.get("label")
    labels = labels_json(config)
    clock = _PassClock()
    urls = {}
    if config.image_uri_column:  # image URLs: each fetched once, by one task, before the hash pass
        listed = _sum(_tasks(items, P.url_unit, dict(read, **common, buckets=buckets, image_column=config.image_uri_column)))
        if listed.get("urls"):
            urls = _sum(_tasks([{"bucket": b} for b in range(buckets)], P.fetch_urls, dict(
                common, max_image_bytes=config.max_image_bytes, http=config.http_settings())))
            clock.lap("fetch")
    hashed = _sum(_tasks(items, P.hash_unit, dict(
        read, **common, buckets=buckets, text_column=config.text_column,
        image_column=config.image_uri_column or config.image_column, from_uri=bool(config.image_uri_column),
        score_digest=digests["score"], caption_digest=caption_digest, max_image_bytes=config.max_image_bytes,
        label_digest=label_digest, labels=labels,
        http=config.http_settings(),
    )))
    clock.lap("hash")
    source_items, matched = _source_items(sources, {"score": digests["score"], "caption": caption_digest, "label": label_digest})
    offered = _sum(_tasks(source_items, P.source_file, dict(
        common, buckets=buckets, digests=digests, labels=labels, embeddings=config.embeddings
    )))
    lacking = int(offered.pop("files_without_embeddings", 0))
    if lacking:
        log.warning("--embeddings %s: %d file(s) of the --reuse sources hold no embeddings; their rows' scores are "
                    "computed again, with embeddings", config.embeddings, lacking)
    clock.lap("sources")
    sides = ["score"] + (["caption"] if caption_digest else []) + (["label"] if label_digest else [])
    bucket_items = [{"side": side, "bucket": b} for side in sides for b in range(buckets)]
    planned = _sum(_tasks(bucket_items, P.plan_bucket, common))
    clock.lap("plan")
    # A model stage runs only if the plan left it something: a night with nothing new loads no model.
    # Key-less rows (a missing image or a blank text) still go through the scorer for truncation.
    stages_needed = {
        "score": planned.get("todo_scores", 0) + planned.get("todo_labels", 0) + hashed.get("keyless", 0) > 0,
        "caption": planned.get("todo_captions", 0) > 0,
    }
    computed = {}
    if any(stages_needed.values()):
        computed = _sum(_compute(config, source, run_id, resources, items, read, common, buckets, sides, stages_needed))
    clock.lap("compute")
    distributed = _sum(_tasks(bucket_items, P.distribute_bucket, common))
    clock.lap("distribute")
    return {
        "sources_matched": matched,
        "pairs_scored": computed.get("pairs_scored", 0),
        "images_captioned": computed.get("images_captioned", 0),
        "rows_scores_reused": distributed.get("rows_scores_reused", 0),
        "rows_captions_reused": distributed.get("rows_captions_reused", 0),
        "duplicate_pairs_collapsed": distributed.get("duplicate_pairs", 0),
        "duplicate_images_collapsed": distributed.get("duplicate_images", 0),
        # --labels: (image, declared category) keys labelled by this run, and rows whose labels came from a source
        "labels_computed": computed.get("labels_computed", 0),
        "rows_labels_reused": distributed.get("rows_labels_reused", 0),
        "duplicate_labels_collapsed": distributed.get("duplicate_labels", 0),
        "unique_labels": planned.get("unique_labels", 0),
        "unique_pairs": planned.get("unique_scores", 0),
        "unique_images": planned.get("unique_captions", 0),
        "offered_by_sources": offered,
        "source_files_without_embeddings": lacking,
        "buckets": buckets,
        "model_stages_run": [name for name, run in stages_needed.items() if run],
        "evidence_s": float(computed.get("evidence_s", 0.0)),
        "image_urls_fetched": int(urls.get("image_urls_fetched", 0)),
        "image_url_errors": int(urls.get("image_url_errors", 0)),
        "pass_seconds": clock.seconds,
    }


class _PassClock:
    """Wall seconds per pass, for the manifest: where a keyed run's time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def decode_needed(batch: pa.Table, **decode) -> pa.Table:
    """Decode, then keep only the pixels each row is to be computed by, in the same task.

    As a stage of its own this was a task-pool operator between decode and the model actors: Ray
    Data's resource budget held it back until decoding had nearly finished (the first model batch
    of a 1,000-row run waited 1.9 s with the actor ready), and every batch's pixels went through
    the object store twice."""
    return P.only_needed_pixels(stages.decode_batch(batch, **decode))


def _compute(config, source, run_id, resources, items, read, common, buckets, sides, needed) -> pa.Table:
    """Pass 3: read only the rows to compute, decode, run the model stages, store values by key."""
    if not items:
        return pa.table({})
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        P.compute_rows, batch_format="pyarrow", batch_size=1,
        fn_kwargs=dict(read, **common, buckets=buckets, sides=sides), **task_retries(),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = ds.map_batches(
            decode_needed, batch_format="pyarrow", batch_size=config.decode_batch_size,
            ray_remote_args_fn=_unfused, udf_modifying_row_count=False,
            fn_kwargs=dict(
                decode_kwargs(config), **({} if needed["caption"] else {"caption_model": None}),
                # the image URLs pass 1 fetched: once per run, and the bytes their keys were made of
                fetch_cache=P.fetch_cache(common["work_fs"], common["work"]) if config.image_uri_column else None,
            ),
            **task_retries(),
        )
    if needed["score"]:
        ds = with_score_stage(ds, config, resources)
    if needed["caption"]:
        # Agreement compares a caption with a row's own text, so it runs per row in pass 5, not here
        # (one caption serves every row of its image, whatever their texts).
        ds = with_caption_stage(ds, config, resources, policy="all", agreement_model=None)
    ds = ds.map_batches(
        P.store_results, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(common, run_id=run_id, buckets=buckets), **task_retries(),
    )
    tables = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def group_text_agreement(texts: dict[str, list[str]], model: str) -> dict[str, float]:
    """For the report's "Images shared across listings": each group's texts compared by the sentence
    model, as the mean pairwise cosine (``review.shared_images``), in one Ray task (the model never
    loads on the driver). Groups of fewer than two texts are left out."""
    return ray.get(ray.remote(_group_agreement).options(num_cpus=0.5).remote(texts, model))


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """The mean cosine over every pair of rows of ``vectors`` (at least two)."""
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return float((vectors @ vectors.T)[np.triu_indices(len(vectors), k=1)].mean())


def _group_agreement(texts: dict[str, list[str]], model: str) -> dict[str, float]:
    encoder = _sentence_encoder(model)  # cached per worker process
    return {group: mean_pairwise_cosine(np.asarray(encoder.encode(items), dtype=np.float32))
            for group, items in texts.items() if len(items) >= 2}


@functools.lru_cache(maxsize=2)
def _sentence_encoder(reference: str):
    # Once per worker process (Ray reuses them across tasks), never on the driver.
    from blip_ops.agreement import SentenceEncoder

    stages.quiet_model_loading()
    return SentenceEncoder.from_pretrained(reference, device="cpu")


def _evidence_as_policy(batch: pa.Table, policy: str, layer: int | None) -> pa.Table:
    """A value keyed with the scores may come from a duplicate or a source: keep it only where this
    run's policy asks for evidence (every scored row, or the rows its thresholds flag by score) and,
    with ``--evidence-layer``, only a map of that layer."""
    column = batch.column("evidence")
    keep = np.ones(batch.num_rows, dtype=bool)
    if policy == "none":
        keep[:] = False
    elif policy == "flagged":
        reasons = batch.column("flag_reasons").to_pylist()
        keep = np.array([S.REASON_ITM in r or S.REASON_ITC in r for r in reasons], dtype=bool)
    if layer is not None:
        layers = pa.compute.struct_field(column, "layer").to_numpy(zero_copy_only=False)
        keep &= np.array([v == layer for v in layers], dtype=bool)
    if keep.all():
        return batch
    index = batch.schema.get_field_index("evidence")
    return batch.set_column(index, "evidence", pa.compute.if_else(pa.array(keep), column, pa.nulls(len(column), column.type)))


def _assemble_and_write(
    items: pa.Table, *, assemble: dict, flags: dict, finalize: dict, write: dict, evidence: dict, agreement: dict | None,
) -> pa.Table:
    """Pass 5 in one task per unit: its rows with their values, flags, agreement, the output schema, pieces."""
    pieces_written = rows = 0
    for batch in P.assemble_unit(items, **assemble):
        batch = _evidence_as_policy(stages.flag_batch(batch, **flags), **evidence)
        if agreement:
            batch = stages.add_agreement(
                batch, _sentence_encoder(agreement["model"]), assemble["text_column"], agreement["threshold"]
            )
        out = stages.finalize_batch(batch, **finalize)
        written = pieces.write_pieces(out, **write)
        pieces_written += written.num_rows
        rows += int(pa.compute.sum(written.column("rows")).as_py() or 0)
    return pa.table({"pieces": [pieces_written], "rows": [rows]})


def assemble_and_write(config: JobConfig, source, run_id: str, todo, staging: str, work: str, filesystem) -> dict:
    """Pass 5 and the write, as plain tasks (one per unit): rows in input order with their values (no
    image bytes read), flags at this run's thresholds, the output schema, pieces named by their row
    ranges. Returns the pieces and rows written."""
    image_column = None if config.image_uri_column else config.image_column
    passthrough = passthrough_schema(source.schema, image_column)
    items = pieces.unit_items(source.units, todo)
    kwargs = {
        "assemble": {
            "filesystem": source.location.filesystem, "schema": passthrough, "batch_rows": config.decode_batch_size,
            "text_column": config.text_column, "captioning": config.captioning, "work_fs": filesystem, "work": work,
            "detect_language": config.text_languages is not None, "labelling": config.labels is not None,
        },
        "flags": flag_kwargs(config),
        "evidence": {"policy": config.evidence, "layer": config.evidence_layer},
        "agreement": {"model": config.agreement_model, "threshold": config.agreement_threshold} if config.agreeing else None,
        "finalize": finalize_kwargs(config, run_id, passthrough.names, [pieces.UNIT, pieces.ROW]),
        "write": {"filesystem": filesystem, "staging": staging, "schema": output_schema(source.schema, image_column, extra_fields(config))},
    }
    return _sum(_tasks(items, _assemble_and_write, kwargs))
