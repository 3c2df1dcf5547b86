"""Running a job end to end: preflight, resume or start an attempt, pipeline, commit, summary."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .commit import output
from .commit.delta import committer_for
from .commit.units import durable_rows, missing_ranges, work_key
from .config import JobConfig
from .dataflow import runtime
from .preflight import Checked, InputInfo, preflight
from .review import artifacts
from .schema import SCHEMA_VERSION, output_schema
from .storage import Location

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
        return (
            f"run {self.run_id}: read {self.rows_read} rows{resumed}, scored {self.scored}, flagged {self.flagged}, "
            f"errors: {errors}; {self.elapsed_s:.1f}s ({self.rows_per_s:.1f} rows/s); output: {self.output}"
        )


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _summary(manifest: dict, destination: Location, started: float, outcome: str, resumed: int) -> RunSummary:
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
    )


def _score_missing(config: JobConfig, source: InputInfo, destination: Location, attempt: output.Attempt, todo) -> dict:
    """Run the pipeline over the rows still to do; returns the resources it resolved."""
    from .dataflow.graph import build_scored_dataset  # imports Ray Data
    from .dataflow.resources import resolve_resources

    runtime.connect(config.ray_address)
    resources = resolve_resources(config, runtime.cluster_gpus(), runtime.cluster_cpus())
    dataset = build_scored_dataset(
        config, source, attempt.run_id, resources, todo, attempt.staging, destination.filesystem
    )
    for _ in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        pass  # the work is done by the write stage; its one row per piece is not needed here
    return asdict(resources)


def run_job(config: JobConfig, checked: Checked | None = None) -> RunSummary:
    """Run the whole job; ``checked`` is a ``preflight(config)`` result when the caller already ran it.

    Rerunning the same command is always safe: a committed result for the same input and
    settings is left as it is, and an interrupted attempt is resumed from its durable pieces.
    """
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat()
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
    resources = None
    if any(todo.values()):
        runtime.expect_rows(source.num_rows - resumed)
        resources = _score_missing(config, source, destination, attempt, todo)

    image_column = None if config.image_uri_column else config.image_column
    schema = output_schema(source.schema, image_column)
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
    }
    try:
        result = committer.commit(destination, attempt, source.units, schema, manifest)
    except output.AlreadyCommitted as exc:  # a concurrent run of the same attempt committed it first
        return _summary(exc.manifest, destination, started, ALREADY_COMMITTED, resumed)
    except output.IncompleteError:
        # A concurrent run of the same command may have committed this very result first.
        latest = committer.read_committed(destination)
        if latest and latest.get("key") == key:
            return _summary(latest, destination, started, ALREADY_COMMITTED, resumed)
        raise
    summary = _summary(result.manifest, destination, started, COMMITTED, resumed)
    artifacts.publish_run_artifacts(config, destination, result.manifest, summary.as_dict())  # logs, never raises
    return summary
