"""Running a job end to end: preflight, pipeline, commit, summary."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from . import output, runtime
from .build import build_scored_dataset, resolve_resources
from .config import JobConfig
from .preflight import Checked, preflight
from .schema import SCHEMA_VERSION, output_schema


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

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), rows_per_s=round(self.rows_per_s, 2))

    def render(self) -> str:
        errors = ", ".join(f"{k}={v}" for k, v in self.errors.items()) or "none"
        return (
            f"run {self.run_id}: read {self.rows_read} rows, scored {self.scored}, flagged {self.flagged}, "
            f"errors: {errors}; {self.elapsed_s:.1f}s ({self.rows_per_s:.1f} rows/s); output: {self.output}"
        )


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def run_job(config: JobConfig, checked: Checked | None = None) -> RunSummary:
    """Run the whole job; ``checked`` is a ``preflight(config)`` result when the caller already ran it."""
    started = time.monotonic()
    run_id = config.run_id or new_run_id()
    source, destination = checked or preflight(config)
    runtime.connect(config.ray_address)
    resources = resolve_resources(config, runtime.cluster_gpus(), runtime.cluster_cpus())

    dataset = build_scored_dataset(config, source, run_id, resources)
    image_column = None if config.image_uri_column else config.image_column
    manifest = {
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "input": config.input,
        "itm_model": config.itm_model,
        "caption_model": config.recorded_caption_model,
        "config": config.model_dump(mode="json"),
        "resources": asdict(resources),
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    try:
        dataset.write_parquet(output.staging_path(destination, run_id), filesystem=destination.filesystem)
        result = output.commit(
            destination, run_id, source.num_rows, output_schema(source.schema, image_column), manifest
        )
    except BaseException:
        output.discard_staging(destination, run_id)
        raise
    errors = {status: n for status, n in result.by_status.items() if status != "ok"}
    return RunSummary(
        run_id=run_id,
        output=destination.uri,
        rows_read=source.num_rows,
        rows_written=result.rows,
        scored=result.by_status.get("ok", 0),
        flagged=result.flagged,
        errors=errors,
        elapsed_s=time.monotonic() - started,
    )
