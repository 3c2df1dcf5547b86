"""Every crash point of the commit, for both committers, on local disk and on S3 (moto).

An attempt is staged in full first (its pieces hold the input rows and output columns of fixed
values: the scoring pipeline is not what is under test here). Then the same ``jobs.score
--overwrite`` command runs in a subprocess that ``os._exit``s at one named step of the commit
(``BLIP_MODERATE_CRASH_AT``), again and again, one step further each time. Steps inside a merge
task kill the process that runs it (a local process here: with every row staged the run starts
no Ray; a Ray task is not retried under crash injection), so the run fails there (exit 1).
After each crash a reader must see the old result or the new one, each row exactly once, from
merged files only (never a staged piece), never a mix and never nothing; the last rerun finishes
the job. A target of a few bytes per file makes every piece its own merged file, so that "half"
of the merge and of tidy are real points.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from pipelines.commit import output, reader
from pipelines.commit.delta import committer_for
from pipelines.commit.pieces import read_units, unit_items, write_pieces
from pipelines.commit.units import missing_ranges, work_key
from pipelines.config import build_config
from pipelines.preflight import preflight
from pipelines.run import run_job
from pipelines.schema import output_schema
from pipelines.storage import locate
from tests.conftest import write_catalog

deltalake = pytest.importorskip("deltalake")

ROOT = Path(__file__).resolve().parents[2]
MERGE_STEPS = ["staged", "merge_writing", "move_copied", "half_merged", "merged"]
STEPS = {
    "parquet": MERGE_STEPS + ["previous_written", "manifest_written", "success_written", "half_tidied"],
    "delta": MERGE_STEPS + ["delta_committed"],
}
IN_A_TASK = {"merge_writing", "move_copied"}  # the killed worker fails the run: exit 1
ONLY_ON_OBJECT_STORES = {"move_copied"}  # on local disk a move is one rename
TINY_FILES_MB = 1e-6
MERGED = re.compile(r"part-r-(old|new|twin)-u\d{6}-r\d{10}-to-u\d{6}-r\d{10}\.parquet$")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    records = sample_catalog(12, seed=3)
    for index, record in enumerate(records):
        record["id"] = f"row-{index:02d}"
        record.pop("expected", None)
    return write_catalog(tmp_path_factory.mktemp("catalog") / "in", records, files=3), sorted(r["id"] for r in records)


def _options(catalog: Path, out: str, fmt: str, tiny_itm: str, threshold: float) -> dict:
    return {
        "input": str(catalog), "output": out, "output_format": fmt, "itm_model": tiny_itm,
        "caption_model": "none", "itm_threshold": threshold, "device": "cpu",  # the same key on a GPU host
        "target_file_mb": TINY_FILES_MB,
    }


def stage_everything(config, run_id: str) -> None:
    """Stage every row of ``config``'s input as a run would, with fixed scores."""
    source, destination = preflight(config)
    committer = committer_for(config)
    attempt = output.open_attempt(destination, work_key(config, source.fingerprint), run_id, committer.read_committed(destination))
    schema = output_schema(source.schema, config.image_column)
    todo = {u.index: missing_ranges(u, []) for u in source.units}
    items = pa.Table.from_pylist(unit_items(source.units, todo))
    for batch in read_units(items, filesystem=source.location.filesystem, schema=source.schema, batch_rows=64):
        n = batch.num_rows
        columns = {
            "itc_score": pa.array([0.25] * n, pa.float32()), "itm_score": pa.array([0.75] * n, pa.float32()),
            "caption": pa.nulls(n, pa.string()), "flagged": pa.array([False] * n), "flag_reasons": pa.array([[]] * n, pa.list_(pa.string())),
            "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()), "text_truncated": pa.array([False] * n),
            "run_id": pa.array([attempt.run_id] * n), "scored_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
            "itm_model": pa.array([config.itm_model] * n), "caption_model": pa.nulls(n, pa.string()),
        }
        table = batch.drop_columns([config.image_column])
        for field in schema:  # every output column, in the schema's order; null where not set above
            if field.name not in table.column_names:
                table = table.append_column(field.name, columns.get(field.name, pa.nulls(n, field.type)))
        write_pieces(table, filesystem=destination.filesystem, staging=attempt.staging, schema=schema)


def read_view(out: str, fmt: str) -> tuple[list, set]:
    """What a reader sees: ids and run ids of the committed rows."""
    if fmt == "delta":
        from pipelines.commit.delta import storage_options

        handle = deltalake.DeltaTable(out, storage_options=storage_options(locate(out)))
        assert all(MERGED.search(uri) for uri in handle.file_uris()), handle.file_uris()  # merged files only
        table = handle.to_pyarrow_table(columns=["id", "run_id"])
    else:
        files = reader.committed_files(out)
        assert files, "a reader found no committed result"
        assert all(MERGED.search(f) for f in files), files  # merged files only, never a staged piece
        location = locate(out)
        table = pa.concat_tables(pq.read_table(f, columns=["id", "run_id"], filesystem=location.filesystem) for f in files)
    return sorted(table.column("id").to_pylist()), set(table.column("run_id").to_pylist())


def _command(options: dict) -> list[str]:
    command = [sys.executable, "-m", "jobs.score", "--overwrite", "--json"]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def _delta_version(out: str) -> int:
    from pipelines.commit.delta import storage_options

    return deltalake.DeltaTable(out, storage_options=storage_options(locate(out))).version()


def crash_chain(catalog, ids, out: str, fmt: str, tiny_itm: str, listing, object_store: bool) -> None:
    old_options = _options(catalog, out, fmt, tiny_itm, 0.5)
    stage_everything(build_config(old_options), "r-old")
    assert run_job(build_config(old_options)).outcome == "committed"
    assert read_view(out, fmt) == (ids, {"r-old"})
    version = _delta_version(out) if fmt == "delta" else None

    new_options = _options(catalog, out, fmt, tiny_itm, 0.4)
    stage_everything(build_config(dict(new_options, overwrite=True)), "r-new")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    seen = []
    for step in STEPS[fmt]:
        if step in ONLY_ON_OBJECT_STORES and not object_store:
            continue
        crashed = subprocess.run(_command(new_options), cwd=ROOT, env=dict(env, BLIP_MODERATE_CRASH_AT=step),
                                 capture_output=True, text=True, timeout=180)
        expected = 1 if step in IN_A_TASK else output.CRASH_EXIT
        assert crashed.returncode == expected, (step, crashed.stdout + crashed.stderr)
        if step in IN_A_TASK:
            # the merge task's process died: a local process pool's, or a Ray worker where the run has Ray
            assert "BrokenProcessPool" in crashed.stderr or "WorkerCrashedError" in crashed.stderr, (step, crashed.stderr)
        view = read_view(out, fmt)
        assert view in ((ids, {"r-old"}), (ids, {"r-new"})), (step, view)  # old or new, once each, never a mix
        seen.append(view[1])
    assert seen[0] == {"r-old"} and seen[-1] == {"r-new"}
    final = subprocess.run(_command(new_options), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "already_committed" and summary["run_id"] == "r-new"
    assert read_view(out, fmt) == (ids, {"r-new"})
    assert not [name for name in listing() if "_staging-" in name or "previous" in name or name.endswith(".tmp")]
    new_files = [name for name in listing() if "part-r-new" in name]
    assert len(new_files) == catalog_units(catalog) > 1 and all(MERGED.search(n) for n in new_files), new_files
    if fmt == "delta":
        assert _delta_version(out) == version + 1  # the whole chain made one commit
        assert reader.read_committed(locate(out))["run_id"] == "r-new"
    else:
        assert not [name for name in listing() if "part-r-old" in name]  # tidied once committed


def catalog_units(catalog: Path) -> int:
    """Row groups of the input: one staged piece each here, so one merged file each at TINY_FILES_MB."""
    return sum(pq.ParquetFile(f).metadata.num_row_groups for f in sorted(catalog.rglob("*.parquet")))


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_every_crash_point_locally(fmt, catalog, tiny_itm, tmp_path):
    path, ids = catalog
    out = tmp_path / "out"
    crash_chain(path, ids, str(out), fmt, tiny_itm, lambda: [str(p.relative_to(out)) for p in out.rglob("*")], False)


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_every_crash_point_on_s3(fmt, catalog, tiny_itm, s3_store):
    s3_store.reset()
    s3_store.create_bucket("test")
    path, ids = catalog
    crash_chain(path, ids, f"s3://test/out-{fmt}", fmt, tiny_itm, lambda: s3_store.keys("test"), True)


def test_two_concurrent_delta_runs_on_s3_make_one_commit(catalog, tiny_itm, s3_store):
    s3_store.reset()
    s3_store.create_bucket("test")
    path, ids = catalog
    out = "s3://test/twins"
    options = _options(path, out, "delta", tiny_itm, 0.5)
    stage_everything(build_config(options), "r-twin")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [c for c in _command(options) if c != "--overwrite"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    outcomes = sorted(json.loads(stdout.strip().splitlines()[-1])["outcome"] for stdout, _ in results)
    assert outcomes == ["already_committed", "committed"], results
    assert _delta_version(out) == 0 and read_view(out, "delta") == (ids, {"r-twin"})
    assert [k for k in s3_store.keys("test") if "_delta_log/" in k and k.endswith(".json")] == ["twins/_delta_log/00000000000000000000.json"]
    # The committed table is a --reuse source on S3 too: its snapshot's files and its commit's key digests.
    from pipelines.commit.delta import storage_options as delta_storage_options
    from pipelines.reuse.sources import open_source

    source = open_source(out)
    assert source.run_id == "r-twin" and source.score_digest
    assert sorted(source.files) == sorted(uri.removeprefix("s3://") for uri in deltalake.DeltaTable(
        out, storage_options=delta_storage_options(locate(out))).file_uris())
    read = pa.concat_tables(pq.read_table(f, filesystem=source.location.filesystem, columns=["id"]) for f in source.files)
    assert sorted(read.column("id").to_pylist()) == sorted(ids)


def _twins(path, out: str, tiny_itm: str, fmt: str) -> list[str]:
    """Two identical ``jobs.score`` runs of one fully staged attempt, started at once; their outcomes."""
    options = _options(path, out, fmt, tiny_itm, 0.5)
    stage_everything(build_config(options), "r-twin")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [c for c in _command(options) if c != "--overwrite"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    return sorted(json.loads(stdout.strip().splitlines()[-1])["outcome"] for stdout, _ in results)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_concurrent_parquet_runs_commit_once(store, catalog, tiny_itm, tmp_path, s3_store):
    """The Parquet committer has no conditional write: both twins may write the same manifest, but
    they merge the same pieces into the same names, so the result holds each row once, in one set of
    files, and whichever finishes second either finds the result committed or writes it unchanged."""
    path, ids = catalog
    if store == "s3":
        s3_store.reset()
        s3_store.create_bucket("test")
        out, listing = "s3://test/twins", lambda: [k.removeprefix("twins/") for k in s3_store.keys("test")]
    else:
        out = str(tmp_path / "twins")
        listing = lambda: sorted(p.name for p in Path(out).iterdir())  # noqa: E731
    outcomes = _twins(path, out, tiny_itm, "parquet")
    assert "committed" in outcomes and set(outcomes) <= {"committed", "already_committed"}, outcomes
    assert read_view(out, "parquet") == (ids, {"r-twin"})
    manifest = reader.read_committed(locate(out))
    names = listing()
    assert sorted(n for n in names if n.startswith("part-")) == sorted(manifest["files"])
    assert len(manifest["files"]) == catalog_units(path) and manifest["rows"] == len(ids)
    assert {"_SUCCESS", "_manifest.json"} <= set(names)
    assert not [n for n in names if n.startswith("_staging-") or "previous" in n or n.endswith(".tmp")], names


def test_a_delta_run_on_s3_through_faults_commits_every_row_once(catalog, tiny_itm, s3_store):
    """Every fifth request to the store fails (503 SlowDown or 500 InternalError), delta-rs's log
    reads and its conditional PUT of the commit included: one commit, each row once."""
    s3_store.reset()
    s3_store.create_bucket("test")
    path, ids = catalog
    out = "s3://test/faulty"
    options = _options(path, out, "delta", tiny_itm, 0.5)
    stage_everything(build_config(options), "r-twin")
    s3_store.proxy.log.clear()
    s3_store.proxy.inject(every=5)
    try:
        summary = run_job(build_config(options))
    finally:
        s3_store.proxy.inject()
    assert summary.outcome == "committed" and summary.rows_written == len(ids)
    assert _delta_version(out) == 0 and read_view(out, "delta") == (ids, {"r-twin"})
    faults = s3_store.proxy.faults()
    assert {e.status for e in faults} == {503, 500}
    assert any("_delta_log" in e.path for e in faults) and {e.method for e in faults} >= {"GET", "PUT"}, faults
    keys = s3_store.keys("test")
    assert [k for k in keys if "_delta_log/" in k and k.endswith(".json")] == ["faulty/_delta_log/00000000000000000000.json"]
    assert not [k for k in keys if "_staging-" in k]
    assert len([k for k in keys if MERGED.search(k)]) == catalog_units(path)
