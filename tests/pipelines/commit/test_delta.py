"""The Delta committer without Ray: one commit per run, app transactions, twins, partitions, schema merge."""

from __future__ import annotations


import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

deltalake = pytest.importorskip("deltalake")

from pipelines.commit import delta, output, reader  # noqa: E402
from pipelines.commit.pieces import ROW, UNIT, write_pieces  # noqa: E402
from pipelines.commit.units import Unit  # noqa: E402

SCHEMA = pa.schema([("id", pa.int64()), ("status", pa.string()), ("flagged", pa.bool_())])
FS = pafs.LocalFileSystem()
UNITS = [Unit(0, "a", 0, 4), Unit(1, "a", 1, 2)]


def _rows(unit: int, first: int, count: int, status: str = "ok", schema: pa.Schema = SCHEMA) -> pa.Table:
    columns = {
        "id": pa.array(range(unit * 1000 + first, unit * 1000 + first + count), pa.int64()),
        "status": [status] * count,
        "flagged": [status != "ok"] * count,
    }
    for field in schema:
        if field.name not in columns:
            columns[field.name] = pa.array([1.5] * count, field.type)
    columns[UNIT] = pa.array([unit] * count, pa.int64())
    columns[ROW] = pa.array(range(first, first + count), pa.int64())
    return pa.table(columns)


def _staged(root, key="k1", run_id="r1", partition=None, status="ok", schema=SCHEMA, overwrite=True):
    committer = delta.DeltaCommitter(str(root), partition)
    location = committer.prepare(str(root), overwrite, key)
    attempt = output.open_attempt(location, key, run_id, committer.read_committed(location))
    for table in (_rows(0, 0, 4, status, schema), _rows(1, 0, 2, status, schema)):
        write_pieces(table, filesystem=FS, staging=attempt.staging, schema=schema)
    return committer, location, attempt


def _table(root, **kwargs):
    return deltalake.DeltaTable(str(root), **kwargs)


def test_one_commit_holds_every_row_the_manifest_and_an_app_transaction(tmp_path):
    root = tmp_path / "table"
    committer, location, attempt = _staged(root)
    result = committer.commit(location, attempt, UNITS, SCHEMA, {"schema_version": 1, "config": {"itm_threshold": 0.5}})
    table = _table(root)
    assert table.version() == 0
    assert sorted(table.to_pyarrow_table().column("id").to_pylist()) == [0, 1, 2, 3, 1000, 1001]
    info = table.history(1)[0]
    body = info[delta.METADATA_KEY]
    assert body["run_id"] == "r1" and body["rows"] == 6 and body["rows_by_status"] == {"ok": 6}
    assert body["config"] == {"itm_threshold": 0.5} and sorted(body["files"]) == sorted(result.files)
    assert table.transaction_version(delta.app_id("k1")) == 0
    assert committer.read_committed(location)["run_id"] == "r1"
    assert reader.read_committed(output.locate(str(root)))["run_id"] == "r1"  # readers dispatch on _delta_log
    assert sorted(reader.committed_files(str(root))) == sorted(str(root / f) for f in result.files)
    assert not list(root.glob("_staging-*"))


@pytest.mark.parametrize("partition", [None, "dt=2026-01-02"])
def test_a_twin_that_committed_first_makes_the_other_report_already_committed(tmp_path, monkeypatch, partition):
    """Two runs of one attempt: the second one's commit is attempted against the snapshot in which
    the first had not committed yet (the race), and must not land as a second commit. Against a
    table that exists: over an earlier result, or a new partition beside another."""
    root = tmp_path / "table"
    other = "dt=2026-01-01" if partition else None
    committer, location, attempt = _staged(root, key="old", run_id="r-old", partition=other)
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    committer, location, attempt = _staged(root, partition=partition)
    real = delta._commit_once
    calls = []

    def twin_commits_first(*args, **kwargs):
        if not calls:
            calls.append(1)
            monkeypatch.setattr(delta, "_commit_once", real)
            committer.commit(location, attempt, UNITS, SCHEMA, {})  # the twin wins the race
            monkeypatch.setattr(delta, "_commit_once", twin_commits_first)
        return real(*args, **kwargs)

    monkeypatch.setattr(delta, "_commit_once", twin_commits_first)
    with pytest.raises(output.AlreadyCommitted) as raised:
        committer.commit(location, attempt, UNITS, SCHEMA, {})
    assert raised.value.manifest["run_id"] == "r1"
    table = _table(root)
    assert table.version() == 1 and table.to_pyarrow_table().num_rows == (12 if partition else 6)


def _commit_when_told(root: str, go: str, ready, outcomes) -> None:
    """One of two processes committing the same attempt at once (processes, as two runs would be)."""
    import os
    import time

    committer = delta.DeltaCommitter(root)
    location = committer.table.data
    attempt = output.open_attempt(location, "k1", "unused", committer.read_committed(location))
    ready.put(attempt.run_id)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        committer.commit(location, attempt, UNITS, SCHEMA, {})
        outcomes.put("committed")
    except output.AlreadyCommitted:
        outcomes.put("already_committed")


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-table", "creating-it"])
def test_two_processes_committing_at_once_make_one_commit(tmp_path, existing):
    import multiprocessing

    root = tmp_path / "table"
    if existing:
        committer, location, attempt = _staged(root, key="old", run_id="r-old")
        committer.commit(location, attempt, UNITS, SCHEMA, {})
    _staged(root)
    context = multiprocessing.get_context("spawn")
    ready, outcomes, go = context.Queue(), context.Queue(), str(tmp_path / "go")
    workers = [context.Process(target=_commit_when_told, args=(str(root), go, ready, outcomes)) for _ in range(2)]
    for worker in workers:
        worker.start()
    # Generous bounds, reached only when something is broken: a spawned process imports pyarrow and
    # deltalake before it answers, seconds when quiet, far longer on a loaded 2-core machine.
    assert [ready.get(timeout=300) for _ in workers] == ["r1", "r1"]  # both resumed the staged attempt
    (tmp_path / "go").write_text("")
    results = sorted(outcomes.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=120)
    assert results == ["already_committed", "committed"]
    assert _table(root).version() == (1 if existing else 0) and _table(root).to_pyarrow_table().num_rows == 6


def test_overwrite_is_one_commit_and_time_travel_keeps_the_old_result(tmp_path):
    root = tmp_path / "table"
    committer, location, attempt = _staged(root, key="old", run_id="r-old")
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    with pytest.raises(output.OutputError, match="--overwrite"):
        delta.DeltaCommitter(str(root)).prepare(str(root), False, "new")
    committer, location, attempt = _staged(root, key="new", run_id="r-new", status="text_error")
    assert set(_table(root).to_pyarrow_table().column("status").to_pylist()) == {"ok"}  # staged: not visible
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    table = _table(root)
    assert table.version() == 1
    assert set(table.to_pyarrow_table().column("status").to_pylist()) == {"text_error"}
    assert table.to_pyarrow_table().num_rows == 6
    assert set(_table(root, version=0).to_pyarrow_table().column("status").to_pylist()) == {"ok"}


def test_partitions_commit_apart_and_a_rescored_partition_replaces_only_itself(tmp_path):
    root = tmp_path / "table"
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        committer, location, attempt = _staged(root, key=f"k{day}", run_id=f"r{day}", partition=f"dt={day}")
        assert location.path == str(root / f"dt={day}")
        committer.commit(location, attempt, UNITS, SCHEMA, {})
    assert _table(root).version() == 2
    committer, location, attempt = _staged(root, key="k-re", run_id="r-re", partition="dt=2026-01-02", status="text_error")
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    table = _table(root)
    assert table.version() == 3 and table.metadata().partition_columns == ["dt"]
    rows = table.to_pyarrow_table().to_pylist()
    assert len(rows) == 18
    assert {(r["dt"], r["status"]) for r in rows} == {
        ("2026-01-01", "ok"), ("2026-01-02", "text_error"), ("2026-01-03", "ok")
    }
    assert delta.read_committed(delta.Table(output.locate(str(root)), {"dt": "2026-01-01"}))["run_id"] == "r2026-01-01"
    assert delta.read_committed(delta.Table(output.locate(str(root)), {"dt": "2026-01-02"}))["run_id"] == "r-re"
    assert len(reader.committed_files(str(root / "dt=2026-01-02"))) == 1  # a partition path reads that partition
    assert len(reader.committed_files(str(root))) == 3  # one merged file per partition


def test_a_new_output_column_merges_into_the_table_schema(tmp_path):
    root = tmp_path / "table"
    committer, location, attempt = _staged(root, key="k1", run_id="r1", partition="dt=2026-01-01")
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    newer = SCHEMA.append(pa.field("agreement", pa.float32()))  # a later version of the job adds a column
    committer, location, attempt = _staged(root, key="k2", run_id="r2", partition="dt=2026-01-02", schema=newer)
    committer.commit(location, attempt, UNITS, newer, {})
    table = _table(root)
    assert table.version() == 1  # the schema change rides on the run's own commit
    assert "agreement" in pa.schema(table.schema().to_arrow()).names
    rows = table.to_pyarrow_table().to_pylist()
    assert {r["agreement"] for r in rows if r["dt"] == "2026-01-01"} == {None}
    assert {r["agreement"] for r in rows if r["dt"] == "2026-01-02"} == {1.5}


def test_prepare_refuses_a_parquet_output_foreign_files_and_another_partitioning(tmp_path):
    parquet_out = tmp_path / "parquet"
    parquet_out.mkdir()
    (parquet_out / "_manifest.json").write_text("{}")
    with pytest.raises(output.OutputError, match="Parquet output"):
        delta.DeltaCommitter(str(parquet_out)).prepare(str(parquet_out), True, "k")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    with pytest.raises(output.OutputError, match="did not write"):
        delta.DeltaCommitter(str(foreign)).prepare(str(foreign), True, "k")
    root = tmp_path / "table"
    committer, location, attempt = _staged(root)
    committer.commit(location, attempt, UNITS, SCHEMA, {})
    with pytest.raises(output.OutputError, match="partitioned"):
        delta.DeltaCommitter(str(root), "dt=2026-01-01").prepare(str(root), True, "k")
    with pytest.raises(output.OutputError, match="Delta table"):
        output.prepare_output(str(root), True, "k")  # the Parquet committer refuses a table
    # Rows another writer put in the table are not ours: replacing them needs --overwrite.
    deltalake.write_deltalake(str(root), pq.read_table(reader.committed_files(str(root))[0]), mode="overwrite")
    with pytest.raises(output.OutputError, match="did not commit"):
        delta.DeltaCommitter(str(root)).prepare(str(root), False, "k1")


def _readme_python_block() -> str:
    from tests import docs

    return docs.block("## Delta Lake output", "python")  # docs/output.md


SCORED = SCHEMA.append(pa.field("itm_score", pa.float32())).append(pa.field("itc_score", pa.float32()))


def test_the_readme_delta_reads_and_time_travel_run(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    root = tmp_path / "scored"
    committer, location, attempt = _staged(root, key="old", run_id="r-old", schema=SCORED)
    committer.commit(location, attempt, UNITS, SCORED, {})
    yesterday = datetime.now(timezone.utc)
    time.sleep(0.05)
    committer, location, attempt = _staged(root, key="new", run_id="r-new", status="text_error", schema=SCORED)
    committer.commit(location, attempt, UNITS, SCORED, {})
    monkeypatch.chdir(tmp_path)
    code = _readme_python_block()
    assert "datetime.now(timezone.utc) - timedelta(days=1)" in code
    namespace = {"YESTERDAY": yesterday}
    exec(code.replace("datetime.now(timezone.utc) - timedelta(days=1)", "YESTERDAY"), namespace)
    assert namespace["rows"].num_rows == 6 and namespace["by_status"] == [("text_error", 6)]
    # Every row's flag moved (ok -> text_error), none is new.
    assert [row[:3] for row in namespace["changed"]] == [(i, False, True) for i in (0, 1, 2, 3, 1000, 1001)]


def test_calibration_reads_a_delta_output(tmp_path):
    from pipelines.review import calibration

    root = tmp_path / "table"
    committer, location, attempt = _staged(root, partition="dt=2026-01-01", schema=SCORED)
    committer.commit(location, attempt, UNITS, SCORED, {})
    old_file = next((root / "dt=2026-01-01").glob("part-*"))
    committer, location, attempt = _staged(root, key="k2", run_id="r2", partition="dt=2026-01-01", schema=SCORED)
    committer.commit(location, attempt, UNITS, SCORED, {})
    assert old_file.exists()  # replaced, kept for time travel: a directory read would count it twice
    table = calibration.read_scored(str(root), "id")
    assert sorted(table.column("id").to_pylist()) == [0, 1, 2, 3, 1000, 1001]
    assert calibration.read_scored(str(root / "dt=2026-01-01"), "id").num_rows == 6


def test_a_delta_table_as_input_is_its_current_version(tmp_path):
    from pipelines.config import build_config
    from pipelines.preflight import inspect_input

    root = tmp_path / "catalog"
    first = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "image": pa.array([b"1", b"2", b"3"]), "dt": ["d1"] * 3})
    deltalake.write_deltalake(str(root), first, partition_by=["dt"])
    deltalake.write_deltalake(str(root), first.slice(0, 2), partition_by=["dt"], mode="overwrite")  # the old file stays on disk
    assert len(list(root.rglob("*.parquet"))) == 2
    source = inspect_input(build_config({"input": str(root), "output": str(tmp_path / "out"), "caption_model": "none"}))
    assert source.num_rows == 2 and len(source.files) == 1
    assert source.units[0].partition == {"dt": "d1"}


def test_a_delta_output_as_reuse_source_is_its_committed_snapshot(tmp_path):
    """``--reuse`` reads a table's current files (not the replaced ones still on disk) and its commit's
    key digests; a nightly table named whole is one source per committed day, newest first."""
    from pipelines.reuse.sources import MANIFEST_KEYS, ReuseSourceError, open_source, open_sources

    digests = {MANIFEST_KEYS: {"score": "S", "caption": "C"}}
    root = tmp_path / "plain"
    for key, run_id in (("k1", "r1"), ("k2", "r2")):  # r2 replaces r1; r1's file stays for time travel
        committer, location, attempt = _staged(root, key=key, run_id=run_id)
        committer.commit(location, attempt, UNITS, SCHEMA, digests)
    assert len(list(root.glob("part-*"))) == 2  # one merged file per run
    source = open_source(str(root))
    assert (source.run_id, source.key, source.score_digest, source.caption_digest) == ("r2", "k2", "S", "C")
    assert sorted(source.files) == sorted(str(root / Path(p).name) for p in _table(root).file_uris())
    assert [Path(p).name.startswith("part-r2-") for p in source.files] == [True]

    nightly = tmp_path / "nightly"
    for day, run_id in (("2026-01-01", "d1"), ("2026-01-02", "d2"), ("2026-01-01", "d1-again")):
        committer, location, attempt = _staged(nightly, key=run_id, run_id=run_id, partition=f"dt={day}")
        committer.commit(location, attempt, UNITS, SCHEMA, digests)
    assert set(delta.committed_partitions(delta.Table(output.locate(str(nightly)), {}))) == {"dt=2026-01-01", "dt=2026-01-02"}
    whole = open_sources([str(nightly)])
    assert [(s.uri, s.run_id) for s in whole] == [(f"{nightly}/dt=2026-01-02", "d2"), (f"{nightly}/dt=2026-01-01", "d1-again")]
    assert all(len(s.files) == 1 and all(f"/{s.uri.rpartition('/')[2]}/part-{s.run_id}-" in f for f in s.files) for s in whole)
    day = open_source(str(nightly / "dt=2026-01-01"))
    assert day.run_id == "d1-again" and day.files == whole[1].files
    with pytest.raises(ReuseSourceError, match="name one partition"):
        open_source(str(nightly))
    foreign = tmp_path / "foreign"
    deltalake.write_deltalake(str(foreign), pa.table({"id": [1]}))
    with pytest.raises(ReuseSourceError, match="no committed result of this job"):
        open_sources([str(foreign)])
