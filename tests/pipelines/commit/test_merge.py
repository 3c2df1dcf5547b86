"""The commit's merge without Ray: files of the target size, in row order, named by their row range,
row groups of the configured bounds, counts from the merged data, and a merge that resumes."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.commit import delta, merge, output, reader
from pipelines.commit.pieces import ROW, UNIT, write_pieces
from pipelines.commit.units import Unit
from tests.pipelines.commit.test_commit import FS

SCHEMA = pa.schema([
    ("id", pa.int64()), ("status", pa.string()), ("flagged", pa.bool_()),
    ("flag_reasons", pa.list_(pa.string())), ("evidence", pa.struct([("layer", pa.int32())])), ("text", pa.string()),
], metadata={b"blip_moderate_schema_version": b"2"})  # the schema's metadata survives the merge (README's DuckDB query reads it)
PIECE_ROWS = 50
UNITS = [Unit(0, "a", 0, 400), Unit(1, "a", 1, 300), Unit(2, "b", 0, 300)]  # 20 pieces of 50 rows


def _rows(unit: int, first: int, count: int) -> pa.Table:
    ids = list(range(unit * 1000 + first, unit * 1000 + first + count))
    flagged = [i % 7 == 0 for i in ids]
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "status": ["ok" if i % 5 else "image_error" for i in ids],
        "flagged": flagged,
        "flag_reasons": [["itm_below_threshold"] + (["caption_disagrees"] if i % 2 else []) if f else [] for i, f in zip(ids, flagged)],
        "evidence": [{"layer": 6} if f else None for f in flagged],
        "text": [f"text {i:06d} " * 20 for i in ids],  # the same bytes in every row, so sizes mean something
        UNIT: pa.array([unit] * count, pa.int64()),
        ROW: pa.array(range(first, first + count), pa.int64()),
    })


def _staged(tmp_path, run_id="r1", key="k1"):
    location = output.prepare_output(str(tmp_path / "out"), overwrite=True, key=key)
    attempt = output.open_attempt(location, key, run_id, None)
    batches = [_rows(u.index, first, PIECE_ROWS) for u in UNITS for first in range(0, u.rows, PIECE_ROWS)]
    random.Random(0).shuffle(batches)  # staged in any order, as parallel writers finish
    for batch in batches:
        write_pieces(batch, filesystem=FS, staging=attempt.staging, schema=SCHEMA)
    return location, attempt


def _piece_bytes(attempt) -> int:
    sizes = [os.path.getsize(os.path.join(attempt.staging, n)) for n in os.listdir(attempt.staging) if n.startswith("u")]
    return max(sizes)


def _all_ids() -> list[int]:
    return [u.index * 1000 + r for u in UNITS for r in range(u.rows)]


def test_pieces_merge_into_files_of_the_target_size_in_row_order(tmp_path):
    location, attempt = _staged(tmp_path)
    piece = _piece_bytes(attempt)
    target_mb = 4.5 * piece / merge.MB / merge.STAGED_PER_MERGED  # four whole pieces fit, five do not
    result = output.commit(location, attempt, UNITS, SCHEMA, {"config": {"target_file_mb": target_mb}}, merge.Merger(target_mb))
    assert len(result.files) == 5  # 20 pieces, 4 per file
    # Each file is named by the (unit, row) range it holds, the ranges follow each other, and the rows
    # inside are in input order.
    assert result.files[0] == "part-r1-u000000-r0000000000-to-u000000-r0000000200.parquet"
    assert result.files[3] == "part-r1-u000001-r0000000200-to-u000002-r0000000100.parquet"  # across units
    read = [pq.read_table(location.join(name)).column("id").to_pylist() for name in result.files]
    assert [len(ids) for ids in read] == [200] * 5
    assert sum(read, []) == _all_ids()
    assert pq.read_schema(location.join(result.files[0])).metadata[b"blip_moderate_schema_version"] == b"2"
    assert reader.committed_files(location.uri) == [location.join(name) for name in result.files]
    assert all(os.path.getsize(location.join(name)) <= 4.5 * piece for name in result.files)
    # Counts come from the merged data, as a reader would count them.
    table = pq.read_table(location.path, columns=["status", "flagged", "flag_reasons"])
    manifest = result.manifest
    assert manifest["rows"] == 1000 and manifest["flagged"] == sum(table.column("flagged").to_pylist())
    assert manifest["rows_by_status"] == {"image_error": 200, "ok": 800}
    reasons = [r for rs in table.column("flag_reasons").to_pylist() for r in rs]
    assert manifest["flagged_by_reason"] == {"caption_disagrees": reasons.count("caption_disagrees"),
                                            "itm_below_threshold": reasons.count("itm_below_threshold")}
    assert manifest["evidence"]["rows"] == manifest["flagged"] > 0
    assert manifest["output_files"] == {"count": 5, "bytes": sum(os.path.getsize(f) for f in reader.committed_files(location.uri)),
                                        "target_file_mb": target_mb}
    # Nothing but the result is left: no pieces, no staging, no temporaries.
    assert sorted(os.listdir(location.path)) == sorted(["_SUCCESS", "_manifest.json"] + result.files)


def test_the_default_target_makes_one_file_of_a_small_result(tmp_path):
    location, attempt = _staged(tmp_path)
    result = output.commit(location, attempt, UNITS, SCHEMA, {})
    assert result.files == ["part-r1-u000000-r0000000000-to-u000002-r0000000300.parquet"]
    assert pq.read_table(location.join(result.files[0])).column("id").to_pylist() == _all_ids()


def test_row_groups_are_bounded_by_rows_and_by_bytes(tmp_path, monkeypatch):
    location, attempt = _staged(tmp_path)
    monkeypatch.setattr(merge, "ROW_GROUP_ROWS", 120)
    result = output.commit(location, attempt, UNITS, SCHEMA, {})
    metadata = pq.ParquetFile(location.join(result.files[0])).metadata
    # 1,000 rows staged as 20 pieces of 50: row groups of 120 (not one per piece), the rest in the last.
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [120] * 8 + [40]

    location, attempt = _staged(tmp_path / "bytes")
    monkeypatch.setattr(merge, "ROW_GROUP_ROWS", 1_000_000)
    batch_bytes = _rows(0, 0, PIECE_ROWS).drop_columns([UNIT, ROW]).cast(SCHEMA).to_batches()[0].nbytes
    monkeypatch.setattr(merge, "ROW_GROUP_BYTES", int(3.5 * batch_bytes))  # three pieces' rows fit, four do not
    result = output.commit(location, attempt, UNITS, SCHEMA, {})
    metadata = pq.ParquetFile(location.join(result.files[0])).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [150] * 6 + [100]


def test_a_merge_killed_partway_resumes_to_the_same_files_and_keeps_the_finished_ones(tmp_path):
    location, attempt = _staged(tmp_path)
    target_mb = 4.5 * _piece_bytes(attempt) / merge.MB / merge.STAGED_PER_MERGED
    pieces = output.check_pieces(location, attempt, UNITS)
    tasks = [dict(f, output=location.uri, staging=attempt.staging)
             for f in merge.plan(attempt.run_id, list(pieces.values()), merge.Merger(target_mb).staged_budget)]
    # Killed after two files were written and while a third was half written under its final name
    # (as a store without atomic publishing could leave it): no footer.
    finished = [merge.merge_file(task)["name"] for task in tasks[:2]]
    mtimes = {name: os.stat(location.join(name)).st_mtime_ns for name in finished}
    with open(location.join(tasks[2]["name"]), "wb") as half:
        half.write(b"PAR1" + b"\0" * 100)
    assert reader.committed_files(location.uri) == []  # nothing is visible before the manifest

    result = output.commit(location, attempt, UNITS, SCHEMA, {}, merge.Merger(target_mb))
    assert result.files == [task["name"] for task in tasks]
    assert {name: os.stat(location.join(name)).st_mtime_ns for name in finished} == mtimes  # kept, not rewritten
    ids = [i for f in reader.committed_files(location.uri) for i in pq.read_table(f).column("id").to_pylist()]
    assert ids == _all_ids()


def test_a_rerun_with_another_target_leaves_one_copy_of_each_row(tmp_path):
    location, attempt = _staged(tmp_path)
    small = 1.5 * _piece_bytes(attempt) / merge.MB / merge.STAGED_PER_MERGED
    pieces = output.check_pieces(location, attempt, UNITS)
    for task in merge.plan(attempt.run_id, list(pieces.values()), merge.Merger(small).staged_budget)[:3]:
        merge.merge_file(dict(task, output=location.uri, staging=attempt.staging))  # an interrupted commit at another size
    result = output.commit(location, attempt, UNITS, SCHEMA, {})
    assert len(result.files) == 1
    assert sorted(os.listdir(location.path)) == sorted(["_SUCCESS", "_manifest.json"] + result.files)
    assert pq.read_table(location.path).column("id").to_pylist() == _all_ids()


def test_a_write_that_fails_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    location, attempt = _staged(tmp_path)
    real = merge._RowGroups.flush

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(merge._RowGroups, "flush", fail)
    with pytest.raises(OSError, match="disk full"):
        output.commit(location, attempt, UNITS, SCHEMA, {})
    assert [n for n in os.listdir(location.path) if not n.startswith("_staging-")] == []
    assert not [n for n in os.listdir(attempt.staging) if n.endswith(".tmp")]
    monkeypatch.setattr(merge._RowGroups, "flush", real)
    assert output.commit(location, attempt, UNITS, SCHEMA, {}).rows == 1000


def test_a_piece_whose_rows_disagree_with_its_name_commits_nothing(tmp_path):
    location, attempt = _staged(tmp_path)
    name = sorted(n for n in os.listdir(attempt.staging) if n.startswith("u"))[0]
    pq.write_table(_rows(0, 0, 10).drop_columns([UNIT, ROW]).cast(SCHEMA), os.path.join(attempt.staging, name))  # 10 rows, not 50
    with pytest.raises(output.IncompleteError, match="1000 input rows, 960 staged"):
        output.commit(location, attempt, UNITS, SCHEMA, {})
    assert not os.path.exists(location.join(output.MANIFEST)) and reader.committed_files(location.uri) == []


def test_a_delta_commit_adds_the_merged_files(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    root = tmp_path / "table"
    committer = delta.DeltaCommitter(str(root), "dt=2026-01-01")
    location = committer.prepare(str(root), False, "k1")
    attempt = output.open_attempt(location, "k1", "r1", None)
    for u in UNITS:
        for first in range(0, u.rows, PIECE_ROWS):
            write_pieces(_rows(u.index, first, PIECE_ROWS), filesystem=FS, staging=attempt.staging, schema=SCHEMA)
    target_mb = 4.5 * _piece_bytes(attempt) / merge.MB / merge.STAGED_PER_MERGED
    result = committer.commit(location, attempt, UNITS, SCHEMA, {}, merge.Merger(target_mb))
    table = deltalake.DeltaTable(str(root))
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert sorted(a["path"] for a in actions) == [f"dt=2026-01-01/{name}" for name in result.files] and len(actions) == 5
    assert all(a["num_records"] == 200 and a["size_bytes"] == os.path.getsize(root / a["path"]) for a in actions)
    assert table.to_pyarrow_table().sort_by("id").column("id").to_pylist() == _all_ids()
    assert sorted(os.listdir(root / "dt=2026-01-01")) == sorted(result.files)
    assert json.loads(json.dumps(result.manifest))["files"] == result.files
