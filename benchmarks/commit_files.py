"""What the commit leaves for a lakehouse: file count, bytes, DuckDB query times, commit and run time.

A catalog of ``--rows`` rows (id, text, image URI) is staged in full as 64-row pieces, as a run at
the CPU defaults stages it (score batches of 64), with output columns of realistic shape and
spread: random scores, a caption, ``--flag-rate`` of rows flagged with a 24x24 Grad-CAM map and five
words (BLIP base's patch grid), the rest without. The model is not run: what is measured is the
commit, which reads only the staged pieces. Then ``pipelines.run.run_job`` runs on the fully staged
attempt (it goes straight to the commit): its wall time, and the time inside the committer's
``commit`` (the rest is preflight and starting Ray). Then DuckDB runs the three dashboard queries of
issue 29 over the committed files (best of 3, each from a fresh connection).

The same script measures the code before the merge: run it with that checkout first on
``PYTHONPATH`` (``--target-file-mb`` is then left out, as that code has no such option). With
``--sorted`` it also writes the committed rows sorted by (flagged, itm_score) into one file and times
the queries there, to decide the sort order inside a file.

``python -m benchmarks.commit_files --rows 100000``; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


WORDS = "a red blue green circle square triangle photo of the on with shirt shoe bag lamp chair".split()


def write_catalog(directory: Path, rows: int, per_file: int) -> None:
    directory.mkdir(parents=True)
    rng = random.Random(0)
    for start in range(0, rows, per_file):
        ids = range(start, min(rows, start + per_file))
        pq.write_table(pa.table({
            "id": [f"item-{i:07d}" for i in ids],
            "text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in ids],
            "image_uri": [f"/nonexistent/catalog-images/{i % 997:03d}/{i:07d}.jpg" for i in ids],  # the report finds none, at once
        }), directory / f"part-{start // per_file:05d}.parquet", row_group_size=per_file)


def stage(config, run_id: str, piece_rows: int, flag_rate: float) -> int:
    """Stage every row as pieces of ``piece_rows``; returns the number of pieces."""
    from pipelines.commit import output
    from pipelines.commit.delta import committer_for
    from pipelines.commit.pieces import read_units, unit_items, write_pieces
    from pipelines.commit.units import missing_ranges, work_key
    from pipelines.preflight import preflight
    from pipelines.schema import output_schema

    source, destination = preflight(config)
    attempt = output.open_attempt(destination, work_key(config, source.fingerprint), run_id,
                                  committer_for(config).read_committed(destination))
    schema = output_schema(source.schema, None)
    items = pa.Table.from_pylist(unit_items(source.units, {u.index: missing_ranges(u, []) for u in source.units}))
    rng = np.random.default_rng(0)
    pieces = 0
    now = datetime.now(timezone.utc)
    for batch in read_units(items, filesystem=source.location.filesystem, schema=source.schema, batch_rows=piece_rows):
        n = batch.num_rows
        itm = rng.random(n, dtype=np.float32)
        flagged = rng.random(n) < flag_rate
        status = np.where(rng.random(n) < 0.01, "image_error", "ok")
        evidence = [
            {"rows": 24, "cols": 24, "heat": rng.random(576, dtype=np.float32).tolist(),
             "words": [{"word": w, "weight": float(rng.random())} for w in rng.choice(WORDS, 5)], "layer": 6}
            if f else None for f in flagged
        ]
        columns = {
            "itc_score": pa.array(rng.random(n, dtype=np.float32) * 0.6 - 0.1), "itm_score": pa.array(itm),
            "caption": pa.array([" ".join(rng.choice(WORDS, 8)) for _ in range(n)]),
            "caption_agreement": pa.array(rng.random(n, dtype=np.float32)),
            "flagged": pa.array(flagged), "flag_reasons": pa.array([["itm_below_threshold"] if f else [] for f in flagged], pa.list_(pa.string())),
            "status": pa.array(status), "error": pa.array([None if s == "ok" else "image: not found" for s in status], pa.string()),
            "text_truncated": pa.array(rng.random(n) < 0.02), "text_language": pa.array(["en"] * n),
            "run_id": pa.array([attempt.run_id] * n), "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "itm_model": pa.array([config.itm_model] * n), "caption_model": pa.array(["Salesforce/blip2-opt-2.7b"] * n),
            "image_sha256": pa.array([f"{x:064x}" for x in rng.integers(0, 2**62, n)]),
            "text_sha256": pa.array([f"{x:064x}" for x in rng.integers(0, 2**62, n)]),
            "scores_from_run": pa.nulls(n, pa.string()), "caption_from_run": pa.nulls(n, pa.string()),
        }
        table = batch
        for field in schema:
            if field.name not in table.column_names:
                value = pa.array(evidence, field.type) if field.name == "evidence" else columns.get(field.name, pa.nulls(n, field.type))
                table = table.append_column(field.name, value.cast(field.type))
        pieces += write_pieces(table, filesystem=destination.filesystem, staging=attempt.staging, schema=schema).num_rows
    return pieces


def queries(files: list[str], probe: str, repeats: int = 3) -> dict:
    listing = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    sql = {
        "count": f"select count(*) from read_parquet({listing})",
        "status_breakdown": f"select status, count(*), avg(itm_score) from read_parquet({listing}) group by status",
        "one_id": f"select * from read_parquet({listing}) where id = '{probe}'",
    }
    return {name: _best_of(text, repeats) for name, text in sql.items()}


def _best_of(text: str, repeats: int) -> float:
    """Seconds of a DuckDB query, best of ``repeats``, each on a fresh connection."""
    import duckdb

    times = []
    for _ in range(repeats):
        connection = duckdb.connect()
        started = time.perf_counter()
        connection.execute(text).fetchall()
        times.append(time.perf_counter() - started)
        connection.close()
    return round(min(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--piece-rows", type=int, default=64)
    parser.add_argument("--rows-per-input-file", type=int, default=50_000)
    parser.add_argument("--flag-rate", type=float, default=0.05)
    parser.add_argument("--target-file-mb", type=float, default=None, help="default: the job's default (left out before the merge)")
    parser.add_argument("--sorted", action="store_true", help="also time the queries on the rows sorted by (flagged, itm_score)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--label", default="")
    parser.add_argument("--output-format", default="parquet", choices=["parquet", "delta"])
    args = parser.parse_args()

    import pipelines.run as run
    from pipelines.commit import output, reader
    from pipelines.config import build_config

    load_before = _load()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="commit-bench-"))
    write_catalog(work / "catalog", args.rows, args.rows_per_input_file)
    from blip_ops.tiny import build_tiny_itm

    itm = str(build_tiny_itm(work / "itm"))  # preflight checks the checkpoint; it never scores here
    options = {"input": str(work / "catalog"), "output": str(work / "out"), "itm_model": itm, "caption_model": "none",
               "image_uri_column": "image_uri", "device": "cpu"}
    if args.output_format != "parquet":
        options["output_format"] = args.output_format
    if args.target_file_mb is not None:
        options["target_file_mb"] = args.target_file_mb
    config = build_config(options)
    started = time.perf_counter()
    pieces = stage(config, "bench", args.piece_rows, args.flag_rate)
    stage_s = time.perf_counter() - started
    staged_bytes = sum(p.stat().st_size for p in (work / "out").rglob("u*.parquet"))

    commit_s = []
    real = run.committer_for

    def timed_committer(cfg):
        committer = real(cfg)
        inner = committer.commit

        def commit(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                commit_s.append(time.perf_counter() - t0)

        committer.commit = commit
        return committer

    run.committer_for = timed_committer
    started = time.perf_counter()
    summary = run.run_job(config)
    wall_s = time.perf_counter() - started
    files = reader.committed_files(str(work / "out"))
    row_groups = [pq.ParquetFile(f).metadata.num_row_groups for f in files]
    probe = f"item-{args.rows // 2 + 321:07d}"
    result = {
        "label": args.label, "rows": args.rows, "output_format": args.output_format, "pieces_staged": pieces, "staged_bytes": staged_bytes, "stage_s": round(stage_s, 2),
        "outcome": summary.outcome, "rows_written": summary.rows_written,
        "run_wall_s": round(wall_s, 2), "commit_s": round(commit_s[0], 2) if commit_s else None,
        "files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
        "row_groups": sum(row_groups), "rows_per_row_group_min": min(
            pq.ParquetFile(f).metadata.row_group(i).num_rows for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups)),
        "target_file_mb": getattr(config, "target_file_mb", None),
        "duckdb_best_of_3_s": queries(files, probe),
    }
    if args.sorted:
        table = pq.read_table(files).sort_by([("flagged", "ascending"), ("itm_score", "ascending")])
        sorted_file = str(work / "sorted.parquet")
        pq.write_table(table, sorted_file, row_group_size=1_000_000)
        one = str(work / "one.parquet")
        pq.write_table(pq.read_table(files), one, row_group_size=1_000_000)
        result["duckdb_one_file_input_order_s"] = queries([one], probe)
        result["duckdb_one_file_sorted_flagged_itm_s"] = queries([sorted_file], probe)
        result["flagged_low_itm"] = {
            name: queries_flagged([path]) for name, path in (("input_order", one), ("sorted", sorted_file))
        }
    result["load_before"], result["load_after"] = load_before, _load()
    print(json.dumps(result, indent=1))


def queries_flagged(files: list[str], repeats: int = 3) -> float:
    """A review queue's query: the flagged rows of lowest ITM first (what sorting by (flagged, itm) serves)."""
    return _best_of(f"select id, itm_score from read_parquet({files!r}) where flagged order by itm_score limit 100", repeats)


if __name__ == "__main__":
    main()
