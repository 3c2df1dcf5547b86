"""What a committed run leaves beside its data for people and dashboards: ``_report.html`` and a
row in the run-summary table.

Layout under OUTPUT:

- ``_report.html``: the run report (``pipelines/review/report.py``), replaced by each run. The leading
  ``_`` matters: Parquet readers (``pyarrow.parquet.read_table(OUTPUT)``, Spark, Ray) skip such
  names, while a plain ``report.html`` among the part files would make them fail.
- ``_runs/run-<run_id>.parquet``: one file per run, holding that run's single summary row
  (``RUN_SUMMARY_SCHEMA``). Appending is adding a file, so no run ever rewrites another's row
  and two runs never race on one file; the table is the directory:
  ``read_parquet('OUTPUT/_runs/run-*.parquet')``. The leading ``_`` keeps it out of readers of
  the scored rows, and ``--overwrite`` (which replaces the scored rows) keeps the history.

Both are written after the commit: they describe a committed result, and failing to write them
must never undo one (``publish_run_artifacts`` logs a warning instead of raising).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import JobConfig
from ..schema import REASON_CAPTION, REASON_LANGUAGE, SCHEMA_VERSION, STATUS_IMAGE_ERROR, STATUS_OK, STATUS_TEXT_ERROR
from ..storage import Location
from . import history, report

log = logging.getLogger(__name__)

REPORT = "_report.html"
RUNS_DIR = history.RUNS_DIR  # named once, in review/history.py, which reads the table back

REUSE_COUNTS = ("rows_scores_reused", "rows_captions_reused", "pairs_scored", "images_captioned", "duplicate_rows_collapsed")

_QUANTILE_FIELDS = [
    pa.field(f"{name}_p{int(q * 100):02d}", pa.float64()) for name in ("itm", "itc") for q in report.QUANTILES
]
RUN_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("committed_at", pa.timestamp("us", tz="UTC")),
        pa.field("input", pa.string()),
        pa.field("output", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("rows_ok", pa.int64()),
        pa.field("rows_image_error", pa.int64()),
        pa.field("rows_text_error", pa.int64()),
        pa.field("flagged", pa.int64()),
        pa.field("flag_rate", pa.float64()),
        *_QUANTILE_FIELDS,
        pa.field("itm_threshold", pa.float64()),
        pa.field("itc_threshold", pa.float64()),
        pa.field("itm_model", pa.string()),
        pa.field("caption_model", pa.string()),
        pa.field("captions", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("rows_per_s", pa.float64()),
        pa.field("resumed_rows", pa.int64()),
        pa.field("schema_version", pa.int32()),
        # Rows flagged for the checks beside ITM/ITC (a row can carry several reasons).
        pa.field("flagged_text_language_unsupported", pa.int64()),
        pa.field("flagged_caption_disagrees", pa.int64()),
        pa.field("agreement_threshold", pa.float64()),
        pa.field("evidence", pa.string()),
        pa.field("evidence_rows", pa.int64()),
        pa.field("evidence_s", pa.float64()),
        # What the run reused and what it computed (manifest "reuse"; counts cover this attempt's rows).
        pa.field("rows_scores_reused", pa.int64()),
        pa.field("rows_captions_reused", pa.int64()),
        pa.field("pairs_scored", pa.int64()),
        pa.field("images_captioned", pa.int64()),
        pa.field("duplicate_rows_collapsed", pa.int64()),
    ],
    metadata={b"blip_moderate_run_summary_version": b"1"},
)


def _timestamp(value) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def summary_row(config: JobConfig, manifest: dict, summary: dict, stats: report.OutputStats) -> dict:
    by_status = stats.by_status
    return {
        "run_id": manifest.get("run_id") or summary.get("run_id"),
        "started_at": _timestamp(manifest.get("started_at")),
        "committed_at": _timestamp(manifest.get("committed_at")) or datetime.now(timezone.utc),
        "input": manifest.get("input", config.input),
        "output": summary.get("output", config.output),
        "rows": stats.rows,
        "rows_ok": by_status.get(STATUS_OK, 0),
        "rows_image_error": by_status.get(STATUS_IMAGE_ERROR, 0),
        "rows_text_error": by_status.get(STATUS_TEXT_ERROR, 0),
        "flagged": stats.flagged,
        "flag_rate": stats.flag_rate,
        **stats.quantiles(),
        "itm_threshold": config.itm_threshold,
        "itc_threshold": config.itc_threshold,
        "itm_model": config.itm_model,
        "caption_model": config.recorded_caption_model,
        "captions": config.captions,
        "duration_s": summary.get("elapsed_s"),
        "rows_per_s": summary.get("rows_per_s"),
        "resumed_rows": int(manifest.get("resumed_rows") or summary.get("resumed_rows") or 0),
        "schema_version": int(manifest.get("schema_version", SCHEMA_VERSION)),
        "flagged_text_language_unsupported": stats.by_reason.get(REASON_LANGUAGE, 0),
        "flagged_caption_disagrees": stats.by_reason.get(REASON_CAPTION, 0),
        "agreement_threshold": config.agreement_threshold,
        "evidence": config.evidence,
        "evidence_rows": int((manifest.get("evidence") or {}).get("rows", 0)),
        "evidence_s": (manifest.get("evidence") or {}).get("seconds"),
        **{name: (manifest.get("reuse") or {}).get(name) for name in REUSE_COUNTS},
    }


def _write_bytes(location: Location, name: str, data: bytes) -> None:
    fs = location.filesystem
    target = location.join(name)
    if isinstance(fs, pafs.LocalFileSystem):
        # Write aside, then rename: a reader never sees half a file.
        directory, _, base = target.rpartition("/")
        temporary = f"{directory}/.{base}.tmp"
        with fs.open_output_stream(temporary) as stream:
            stream.write(data)
        fs.move(temporary, target)
    else:  # an object store PUT replaces the object in one step
        with fs.open_output_stream(target) as stream:
            stream.write(data)


def write_run_summary(location: Location, row: dict) -> str:
    """Add this run's row to the run-summary table; returns the file's name under OUTPUT."""
    table = pa.Table.from_pylist([row], schema=RUN_SUMMARY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    location.filesystem.create_dir(location.join(RUNS_DIR), recursive=True)
    name = f"{RUNS_DIR}/run-{row['run_id']}.parquet"
    _write_bytes(location, name, sink.getvalue().to_pybytes())
    return name


def write_run_artifacts(config: JobConfig, destination: Location, manifest: dict, summary: dict, agree=None) -> None:
    """``_report.html`` and the run-summary row for a committed result.

    ``manifest``: the committed ``_manifest.json`` content; ``summary``: ``RunSummary.as_dict()``;
    ``agree``: how the report compares the texts of listings sharing a photo (``report.report_page``).
    """
    stats = report.collect_stats(destination, manifest.get("files", []), config)
    # The summary row first: dashboards depend on it, and it does not need the input's images.
    write_run_summary(destination, summary_row(config, manifest, summary, stats))
    page = report.report_page(manifest, summary, config, stats, destination, agree)
    _write_bytes(destination, REPORT, page.encode("utf-8"))


def publish_run_artifacts(config: JobConfig, destination: Location, manifest: dict, summary: dict, agree=None) -> bool:
    """``write_run_artifacts`` for ``run_job``: a failure is logged as a warning, never raised,
    because the scored result is already committed. Returns whether both were written."""
    try:
        write_run_artifacts(config, destination, manifest, summary, agree)
        return True
    except Exception as exc:  # noqa: BLE001  (any failure here must leave the committed run alone)
        log.warning("run %s is committed, but its report or summary row was not written: %s: %s",
                    manifest.get("run_id"), type(exc).__name__, exc)
        return False
