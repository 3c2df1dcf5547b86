"""Running a job end to end: preflight, resume or start an attempt, pipeline, commit, summary."""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .commit import output
from .commit.delta import committer_for
from .commit.merge import TASK_RETRIES, Merger
from .commit.units import durable_rows, missing_ranges, work_key
from .config import JobConfig
from .dataflow import runtime
from .dataflow.dedup import group_text_agreement
from .dataflow.local import map_processes
from .preflight import Checked, InputInfo, preflight
from .reuse.sources import MANIFEST_KEYS as CONTENT_KEYS
from .review import artifacts
from .review.artifacts import REUSE_COUNTS
from .schema import SCHEMA_VERSION, output_schema
from .storage import Location, use_backend
from .vectors import extra_fields

log = logging.getLogger(__name__)

COMMITTED = "committed"
ALREADY_COMMITTED = "already_committed"


@dataclass
class RunSummary:
    run_id: str
    output: str
    rows_read: int
    rows_written: int
    scored: int
    flagged: int
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    outcome: str = COMMITTED
    # Rows an interrupted earlier attempt had already made durable; not scored again.
    resumed_rows: int = 0
    # Flagged rows by reason (itm_below_threshold, text_language_unsupported, caption_disagrees, ...).
    flagged_by_reason: dict[str, int] = field(default_factory=dict)
    # Rows of the result with a Grad-CAM evidence map, and the seconds this attempt spent on them.
    evidence_rows: int = 0
    evidence_s: float = 0.0
    # Where the night went (pipelines.dataflow.dedup): reused rows, model calls, duplicates collapsed.
    reuse: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return (self.rows_read - self.resumed_rows) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), rows_per_s=round(self.rows_per_s, 2))

    def render(self) -> str:
        if self.outcome == ALREADY_COMMITTED:
            return (
                f"run {self.run_id}: {self.output} already holds the committed result for this input and "
                f"configuration ({self.rows_written} rows, {self.flagged} flagged); nothing to do "
                "(pass --overwrite to score it again)"
            )
        errors = ", ".join(f"{k}={v}" for k, v in self.errors.items()) or "none"
        resumed = f" ({self.resumed_rows} resumed from an interrupted attempt)" if self.resumed_rows else ""
        reasons = ", ".join(f"{k}={v}" for k, v in self.flagged_by_reason.items())
        evidence = f", evidence for {self.evidence_rows} ({self.evidence_s:.1f}s)" if self.evidence_rows else ""
        return (
            f"run {self.run_id}: read {self.rows_read} rows{resumed}, scored {self.scored}, flagged {self.flagged}"
            f"{f' ({reasons})' if reasons else ''}{evidence}, "
            f"errors: {errors}{_render_reuse(self.reuse)}; {self.elapsed_s:.1f}s ({self.rows_per_s:.1f} rows/s); "
            f"output: {self.output}"
        )


def _render_reuse(reuse: dict) -> str:
    if not reuse:
        return ""
    return (
        f"; scores reused for {reuse.get('rows_scores_reused', 0)} rows, captions for {reuse.get('rows_captions_reused', 0)}; "
        f"{reuse.get('pairs_scored', 0)} pairs scored, {reuse.get('images_captioned', 0)} images captioned, "
        f"{reuse.get('duplicate_rows_collapsed', 0)} duplicate rows collapsed"
        + (f"; {reuse['source_files_without_embeddings']} reuse source file(s) held no embeddings (those rows were "
           "scored again)" if reuse.get("source_files_without_embeddings") else "")
        + (f"; {reuse['near_duplicates'].get('groups_shared', 0)} image groups shared by several rows"
           if isinstance(reuse.get("near_duplicates"), dict) else "")
    )


# Counts of --embeddings and --near-duplicates the summary shows beside REUSE_COUNTS, where present.
SUMMARY_EXTRAS = ("source_files_without_embeddings", "near_duplicates")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _summary(manifest: dict, destination: Location, started: float, outcome: str, resumed: int) -> RunSummary:
    reuse = manifest.get("reuse") or {}
    by_status = manifest.get("rows_by_status", {})
    return RunSummary(
        run_id=manifest["run_id"],
        output=destination.uri,
        rows_read=manifest["rows"],
        rows_written=manifest["rows"],
        scored=by_status.get("ok", 0),
        flagged=manifest.get("flagged", 0),
        errors={status: n for status, n in by_status.items() if status != "ok"},
        elapsed_s=time.monotonic() - started,
        outcome=outcome,
        resumed_rows=resumed,
        flagged_by_reason=manifest.get("flagged_by_reason", {}),
        evidence_rows=int((manifest.get("evidence") or {}).get("rows", 0)),
        evidence_s=float((manifest.get("evidence") or {}).get("seconds", 0.0)),
        reuse={k: reuse[k] for k in (*REUSE_COUNTS, *SUMMARY_EXTRAS) if k in reuse},
    )


def _score_missing(config: JobConfig, source: InputInfo, destination: Location, attempt: output.Attempt, todo):
    """Run the pipeline over the rows still to do; returns the resources it resolved, this run's
    content-key digests, the counts of what was reused and computed, and the seconds its score
    actors spent on evidence. With nothing left to do on a local run, Ray is not started."""
    if not any(todo.values()) and _local(config):
        return None, _digests_without_starting_ray(config), {}, 0.0
    from .dataflow import dedup  # imports Ray Data
    from .dataflow.graph import build_scored_dataset
    from .dataflow.resources import check_fits, resolve_resources

    runtime.connect(config.ray_address)
    gpus, cpus = runtime.cluster_gpus(), runtime.cluster_cpus()
    resources = resolve_resources(config, gpus, cpus)
    digests = dedup.content_digests(config, resources)
    if not any(todo.values()):
        return None, digests, {}, 0.0
    check_fits(config, resources, gpus, cpus)  # before any actor starts: a plan that cannot run exits 2
    work = dedup.new_work_dir(attempt.staging) if dedup.uses_keyed_plan(config) else None
    evidence_s = 0.0
    try:
        if work:
            counts = dedup.plan_and_compute(
                config, source, attempt.run_id, resources, todo, work, destination.filesystem, source.reuse, digests
            )
            evidence_s = float(counts.pop("evidence_s", 0.0))
            started = time.perf_counter()
            dedup.assemble_and_write(config, source, attempt.run_id, todo, attempt.staging, work, destination.filesystem)
            counts["pass_seconds"]["assemble"] = round(time.perf_counter() - started, 3)
        else:
            counts = None
            dataset = build_scored_dataset(
                config, source, attempt.run_id, resources, todo, attempt.staging, destination.filesystem
            )
            for written in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                # The work is done by the write stage; its rows (one per piece) carry the evidence time.
                evidence_s += float(pa.compute.sum(written.column("evidence_s")).as_py() or 0.0)
    finally:
        if work:
            dedup.discard_work(work, destination.filesystem)
    if counts is None:
        counts = _row_by_row_counts(destination, attempt)
    return asdict(resources), digests, counts, evidence_s


def _local(config: JobConfig) -> bool:
    """Whether Ray would start on this machine (no cluster address given, none in RAY_ADDRESS)."""
    return not config.ray_address and not os.environ.get("RAY_ADDRESS")


def _local_gpus() -> float:
    """The GPUs a local Ray would find, counted as Ray 2.60 counts them (its accelerator manager,
    within CUDA_VISIBLE_DEVICES), without starting it."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return float(count if visible is None else min(count, len(visible)))


def _digests_without_starting_ray(config: JobConfig) -> dict:
    """The manifest's content-key digests when every row is already staged, on a run whose Ray
    would be local: the same identities and devices the Ray path resolves, computed here, so a
    resumed-and-done run commits in a second instead of starting Ray (10-20 s) for nothing. The
    models are this machine's, as the local Ray's workers would read them; none is loaded. (A Ray
    this process already runs is asked for its GPUs: it may have been started with fewer.)"""
    from blip_ops.identity import checkpoint_identity

    from . import keys
    from .dataflow.resources import resolve_resources

    gpus = runtime.cluster_gpus() if runtime.ray.is_initialized() else _local_gpus()
    resources = resolve_resources(config, gpus, float(os.cpu_count() or 1))
    itm = checkpoint_identity(config.itm_model)
    caption = checkpoint_identity(config.caption_model if config.captioning else None)
    return keys.content_digests(config, resources.score_device, resources.caption_device, itm, caption)


def _row_by_row_counts(destination: Location, attempt: output.Attempt) -> dict:
    """Without the keyed plan every scored row was a model call: counted from the staged pieces."""
    import pyarrow.parquet as pq

    scored = captioned = 0
    for path in output.staged_paths(destination, attempt):
        table = pq.read_table(path, columns=["itc_score", "caption"], filesystem=destination.filesystem)
        scored += table.num_rows - table.column("itc_score").null_count
        captioned += table.num_rows - table.column("caption").null_count
    return {"pairs_scored": scored, "images_captioned": captioned}


def _group_images(config: JobConfig, source: InputInfo, destination: Location, attempt: output.Attempt) -> dict:
    """``image_group`` and ``image_group_size`` written into every staged piece (``dataflow.neardup``)."""
    from .dataflow import neardup
    from .vectors import embedding_dim

    runtime.connect(config.ray_address)  # the passes are Ray tasks, even when every row was resumed
    work = f"{attempt.staging}/_groups-{uuid.uuid4().hex[:12]}"
    paths = output.staged_paths(destination, attempt)
    try:
        return neardup.group_near_duplicates(
            paths, destination.filesystem, work, rows=max(1, source.num_rows),
            dim=embedding_dim(config.itm_model), threshold=config.near_duplicate_cosine,
        )
    finally:
        try:
            destination.filesystem.delete_dir(work)
        except (FileNotFoundError, OSError):
            pass


def _reuse_record(config: JobConfig, source: InputInfo, counts: dict) -> dict:
    record = {k: counts.get(k, 0) for k in REUSE_COUNTS if k != "duplicate_rows_collapsed"}
    record["duplicate_rows_collapsed"] = counts.get("duplicate_pairs_collapsed", 0)
    record["duplicate_images_collapsed"] = counts.get("duplicate_images_collapsed", 0)
    record["sources"] = [s.uri for s in source.reuse]
    record["sources_matched"] = counts.get("sources_matched", {})
    for name in ("labels_computed", "rows_labels_reused", "duplicate_labels_collapsed", "unique_labels"):
        if name in counts:  # --labels in the keyed plan
            record[name] = counts[name]
    record["keyed_plan"] = "buckets" in counts
    record["buckets"] = counts.get("buckets")
    record["pass_seconds"] = counts.get("pass_seconds")
    if "near_duplicates" in counts:
        record["near_duplicates"] = counts["near_duplicates"]
    if config.embeddings != "none":  # a source without embeddings cannot serve this run: its rows were scored again
        record["source_files_without_embeddings"] = counts.get("source_files_without_embeddings", 0)
    return record


def _merger(config: JobConfig) -> Merger:
    """The commit's merge, one task per output file (``commit.merge``), never on the driver: Ray tasks
    where the run has Ray (it scored rows, or joined a cluster); spawned local processes where a
    local run had nothing left to compute and so started no Ray (``_score_missing``)."""
    if not runtime.ray.is_initialized():
        return Merger(config.target_file_mb, map_processes)
    retries = 0 if os.environ.get(output.CRASH_ENV) else TASK_RETRIES  # injected crashes stop the run (merge.TASK_RETRIES)
    return Merger(config.target_file_mb, functools.partial(runtime.map_tasks, max_retries=retries))


def run_job(config: JobConfig, checked: Checked | None = None) -> RunSummary:
    """Run the whole job; ``checked`` is a ``preflight(config)`` result when the caller already ran it.

    Rerunning the same command is always safe: a committed result for the same input and
    settings is left as it is, and an interrupted attempt is resumed from its durable pieces.
    """
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat()
    use_backend(config.storage_backend)
    source, destination = checked or preflight(config)
    key = work_key(config, source.fingerprint)
    committer = committer_for(config)
    committed = committer.read_committed(destination)
    # With --overwrite too: a committed result that is this key's staged attempt is a rerun of a
    # run stopped after its commit, before it tidied; that run's overwrite is done.
    if committed and committed.get("key") == key and (
        not config.overwrite or output.attempt_committed(destination, committed)
    ):
        committer.tidy(destination, committed)
        return _summary(committed, destination, started, ALREADY_COMMITTED, 0)

    attempt = output.open_attempt(destination, key, config.run_id or new_run_id(), committed)
    covered = output.durable(destination, attempt)
    resumed = durable_rows(source.units, covered)
    todo = {u.index: missing_ranges(u, covered.get(u.index, [])) for u in source.units}
    if attempt.resumed:
        log.warning("resuming run %s: %d of %d rows are already durable", attempt.run_id, resumed, source.num_rows)
    if any(todo.values()):
        runtime.expect_rows(source.num_rows - resumed)
    # Digests are computed even when every row was durable: the manifest records them for later reuse.
    resources, digests, counts, evidence_s = _score_missing(config, source, destination, attempt, todo)

    if config.near_duplicates:  # over every row of the run, resumed ones too, once all are written
        counts = dict(counts or {}, near_duplicates=_group_images(config, source, destination, attempt))
    image_column = None if config.image_uri_column else config.image_column
    schema = output_schema(source.schema, image_column, extra_fields(config))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "input": config.input,
        "itm_model": config.itm_model,
        "caption_model": config.recorded_caption_model,
        "config": config.model_dump(mode="json"),
        "started_at": started_at,
        "resumed_rows": resumed,
        "resources": resources,  # per-stage GPUs, CPUs, devices, actor pool bounds and batch sizes; None if all was resumed
        # The commit adds the result's evidence rows; seconds are this attempt's (resumed rows' are not known).
        # (The layer explained is in each row's evidence.)
        "evidence": {"policy": config.evidence, "seconds": round(evidence_s, 3)},
        CONTENT_KEYS: digests,  # what a later --reuse of this output matches against (pipelines.keys)
        "reuse": _reuse_record(config, source, counts),  # counts cover this attempt's rows (not resumed ones)
    }
    try:
        result = committer.commit(destination, attempt, source.units, schema, manifest, _merger(config))
    except output.AlreadyCommitted as exc:  # a concurrent run of the same attempt committed it first
        return _summary(exc.manifest, destination, started, ALREADY_COMMITTED, resumed)
    except output.IncompleteError:
        # A concurrent run of the same command may have committed this very result first.
        latest = committer.read_committed(destination)
        if latest and latest.get("key") == key:
            return _summary(latest, destination, started, ALREADY_COMMITTED, resumed)
        raise
    summary = _summary(result.manifest, destination, started, COMMITTED, resumed)
    agree = None
    if config.near_duplicates and config.agreement_model is not None and runtime.ray.is_initialized():
        agree = functools.partial(group_text_agreement, model=config.agreement_model)
    artifacts.publish_run_artifacts(config, destination, result.manifest, summary.as_dict(), agree)  # logs, never raises
    return summary
