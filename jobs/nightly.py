"""``python -m jobs.nightly``: score every catalog partition ``dt=YYYY-MM-DD/`` whose output is not committed yet.

Output is partitioned the same way (``OUTPUT/dt=YYYY-MM-DD/``, each committed on its own); with
``--output-format delta``, OUTPUT is one Delta table partitioned by ``dt``, one commit per partition
(rescoring a day replaces that partition only).
Safe to run again after a crash (interrupted partitions resume) and twice at once (a
partition is committed once). Every run appends a run record to ``OUTPUT/_nightly/``.

Exit codes: 0 every partition is committed; 1 a partition failed (named on stderr, the
others still ran); 2 usage error (bad options, no such catalog or date).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.cli import UsageParser
from jobs.score import (
    _OPTIONS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_switches,
    grouped,
)
from pipelines.commit.reader import read_committed
from pipelines.config import ConfigError, JobConfig, build_config, load_yaml
from pipelines.preflight import InputError, check_decode_device, preflight
from pipelines.review.artifacts import REUSE_COUNTS
from pipelines.storage import locate

PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
RECORDS = "_nightly"


@dataclass
class PartitionResult:
    date: str
    outcome: str  # committed | already_committed | skipped | failed
    run_id: str | None = None
    rows: int = 0
    flagged: int = 0
    ok: int = 0
    image_error: int = 0
    text_error: int = 0
    resumed_rows: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    evidence_rows: int = 0
    # Reuse from earlier partitions (the run's manifest "reuse"): what the night did not have to compute.
    reuse_sources: str | None = None
    rows_scores_reused: int = 0
    rows_captions_reused: int = 0
    pairs_scored: int = 0
    images_captioned: int = 0
    duplicate_rows_collapsed: int = 0


def make_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m jobs.nightly", usage="%(prog)s --catalog PATH --output PATH [options]",
        description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS,
    )
    add = grouped(parser)
    add("--catalog", required=True, help="Catalog root holding dt=YYYY-MM-DD/ partitions, path or store URI (required).")
    add("--output", required=True, help="Output root; partitions are written as dt=YYYY-MM-DD/ under it (required).")
    add("--date", help="Score only this partition (YYYY-MM-DD); with --overwrite, rescore it (default: every partition not yet committed).")
    add("--config", help="YAML file of jobs.score options; flags override it (default: none).")
    for flag, help_text in _OPTIONS:
        if flag not in ("--input", "--output", "--run-id"):
            add(flag, help=help_text)
    add("--overwrite", action="store_true", help="With --date: replace that partition's committed result (default off).")
    add_switches(add)
    add("--reuse-days", type=int, help="Reuse every committed partition of the N days before each one "
        "(default: the most recent committed earlier partition).")
    add("--no-reuse", action="store_true", help="Score every partition without reusing earlier ones (default off).")
    add("--json", action="store_true", help="Print the run record as JSON (default: text).")
    return parser


def list_partitions(catalog: str) -> list[str]:
    location = locate(catalog)
    selector = pafs.FileSelector(location.path, allow_not_found=True, recursive=False)
    names = [i.base_name for i in location.filesystem.get_file_info(selector) if i.type == pafs.FileType.Directory]
    return sorted(m.group(1) for m in map(PARTITION.match, names) if m and _is_date(m.group(1)))


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
        return True
    except ValueError:
        return False


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def committed_partitions(output_root: str) -> list[str]:
    """Dates whose output partition holds a committed result, in order."""
    from pipelines.commit import delta

    table = delta.table_at(locate(output_root))
    if table is not None:  # a Delta table: its log says which days are committed, in one walk
        return sorted(m.group(1) for m in map(PARTITION.match, delta.committed_partitions(table)) if m)
    return [d for d in list_partitions(output_root) if read_committed(locate(_join(output_root, f"dt={d}"))) is not None]


def reuse_sources(day: str, output_root: str, reuse_days: int | None) -> list[str]:
    """Earlier committed partitions to reuse for ``day``, most recent first: the latest one, or with
    ``reuse_days`` every one dated within that many days before it."""
    earlier = [d for d in committed_partitions(output_root) if d < day]
    if reuse_days is not None:
        first = (date.fromisoformat(day) - timedelta(days=reuse_days)).isoformat()
        earlier = [d for d in earlier if d >= first]
    else:
        earlier = earlier[-1:]
    return [_join(output_root, f"dt={d}") for d in reversed(earlier)]


def _partition_committed(output_root: str, day: str, delta: bool) -> bool:
    if delta:  # from the table itself: its log's latest commit of dt=D, still in place
        from pipelines.commit.delta import Table
        from pipelines.commit.delta import read_committed as table_committed

        return table_committed(Table(locate(output_root), {"dt": day})) is not None
    return read_committed(locate(_join(output_root, f"dt={day}"))) is not None


def score_partition(
    day: str, base: dict, catalog: str, output_root: str, overwrite: bool, reuse: str | int | None = "latest",
) -> PartitionResult:
    """``reuse``: ``"latest"`` (the default), a number of days, or None for no reuse of earlier partitions."""
    started = time.monotonic()
    delta = base.get("output_format") == "delta"
    # Parquet: one output per partition under the root. Delta: one table at the root, partitioned by dt.
    target = dict(output=output_root, output_partition=f"dt={day}") if delta else dict(output=_join(output_root, f"dt={day}"))
    if not overwrite and _partition_committed(output_root, day, delta):
        return PartitionResult(day, "skipped")
    try:
        values = dict(base, input=_join(catalog, f"dt={day}"), overwrite=overwrite, **target)
        # The flagged cascade and --no-dedup run row by row, without the keyed plan reuse needs. A
        # Delta table's earlier partitions (TABLE/dt=E) are sources like Parquet ones, read from its log.
        if reuse is not None and values.get("captions") != "flagged" and values.get("dedup", True) is not False:
            earlier = reuse_sources(day, output_root, None if reuse == "latest" else int(reuse))
            values["reuse"] = earlier + list(build_config(dict(base, input="-", output="-")).reuse)
        config = build_config(values)
        checked = preflight(config)
        from pipelines.run import run_job  # imports Ray: only once there is work

        summary = run_job(config, checked)
    except (ConfigError, InputError) as exc:
        return PartitionResult(day, "failed", error=str(exc), elapsed_s=time.monotonic() - started)
    except Exception as exc:  # one partition's failure must not stop the others
        traceback.print_exc(file=sys.stderr)
        return PartitionResult(day, "failed", error=f"{type(exc).__name__}: {exc}", elapsed_s=time.monotonic() - started)
    return PartitionResult(
        day,
        summary.outcome,
        run_id=summary.run_id,
        rows=summary.rows_written,
        flagged=summary.flagged,
        ok=summary.scored,
        image_error=summary.errors.get("image_error", 0),
        text_error=summary.errors.get("text_error", 0),
        resumed_rows=summary.resumed_rows,
        elapsed_s=time.monotonic() - started,
        evidence_rows=summary.evidence_rows,
        reuse_sources=",".join(config.reuse) or None,
        **{k: int(summary.reuse.get(k) or 0) for k in REUSE_COUNTS},
    )


def write_record(output_root: str, nightly_id: str, started_at: datetime, config: JobConfig, results: list[PartitionResult]) -> str:
    """One Parquet file per nightly run, one row per partition considered: readable by any dashboard.
    Thresholds and models are the ones applied (defaults included), from the checked ``config``."""
    location = locate(_join(output_root, RECORDS))
    location.filesystem.create_dir(location.path, recursive=True)
    rows = [
        dict(
            vars(r),
            nightly_run_id=nightly_id,
            started_at=started_at,
            itm_threshold=config.itm_threshold,
            itc_threshold=config.itc_threshold,
            itm_model=config.itm_model,
            caption_model=config.recorded_caption_model,
        )
        for r in results
    ]
    schema = pa.schema([
        ("nightly_run_id", pa.string()), ("started_at", pa.timestamp("us", tz="UTC")), ("date", pa.string()),
        ("outcome", pa.string()), ("run_id", pa.string()), ("rows", pa.int64()), ("flagged", pa.int64()),
        ("ok", pa.int64()), ("image_error", pa.int64()), ("text_error", pa.int64()), ("resumed_rows", pa.int64()),
        ("elapsed_s", pa.float64()), ("error", pa.string()), ("itm_threshold", pa.float64()),
        ("itc_threshold", pa.float64()), ("itm_model", pa.string()), ("caption_model", pa.string()),
        ("evidence_rows", pa.int64()),
        ("reuse_sources", pa.string()), *[(name, pa.int64()) for name in REUSE_COUNTS],
    ])
    path = location.join(f"run-{nightly_id}.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, filesystem=location.filesystem)
    return path


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    catalog, output_root = args.pop("catalog"), args.pop("output")
    day, overwrite, as_json = args.pop("date", None), args.pop("overwrite", False), args.pop("json", False)
    reuse_days, no_reuse = args.pop("reuse_days", None), args.pop("no_reuse", False)
    reuse = None if no_reuse else ("latest" if reuse_days is None else reuse_days)
    config_file = args.pop("config", None)
    try:
        base = dict(load_yaml(config_file) if config_file else {}, **args)
        for key in ("input", "output", "run_id", "overwrite", "output_partition"):
            base.pop(key, None)
        config = build_config(dict(base, input=catalog, output=output_root))  # every option checked before any work
        check_decode_device(config)  # a missing decoder fails the night at once, not each partition
        if reuse_days is not None and reuse_days < 1:
            raise ConfigError(f"--reuse-days must be at least 1, got {reuse_days}")
        if day is not None and not (re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) and _is_date(day)):
            raise ConfigError(f"--date must be YYYY-MM-DD, got {day!r}")
        available = list_partitions(catalog)
    except (ConfigError, InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if overwrite and day is None:
        print("error: --overwrite needs --date (a nightly run never rescores every partition)", file=sys.stderr)
        return EXIT_USAGE
    if day is not None and day not in available:
        print(f"error: the catalog has no partition dt={day} under {catalog}", file=sys.stderr)
        return EXIT_USAGE

    nightly_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    started_at = datetime.now(timezone.utc)
    results = [score_partition(d, base, catalog, output_root, overwrite, reuse) for d in ([day] if day else available)]
    record = write_record(output_root, nightly_id, started_at, config, results)

    if as_json:
        print(json.dumps({"nightly_run_id": nightly_id, "record": record, "partitions": [vars(r) for r in results]}, default=str))
    else:
        for r in results:
            detail = f": {r.error}" if r.error else (f": {r.rows} rows, {r.flagged} flagged" if r.rows else "")
            print(f"dt={r.date} {r.outcome}{detail}")
        print(f"nightly run {nightly_id}: {len(results)} partitions; record: {record}")
    failed = [r.date for r in results if r.outcome == "failed"]
    if failed:
        print(f"error: partitions failed: {', '.join('dt=' + d for d in failed)}; rerun to resume them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
