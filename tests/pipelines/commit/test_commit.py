"""The commit protocol without Ray: pieces, coverage, resume state, manifest and _SUCCESS."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.commit import output, reader
from pipelines.commit.pieces import ROW, UNIT, read_units, unit_items, write_pieces
from pipelines.commit.units import OverlapError, Unit, covered_ranges, missing_ranges, parse_piece, piece_name, plan_units

SCHEMA = pa.schema([("id", pa.int64()), ("status", pa.string()), ("flagged", pa.bool_())])
FS = pafs.LocalFileSystem()


def _rows(unit: int, first: int, count: int, status: str = "ok") -> pa.Table:
    return pa.table({
        "id": pa.array(range(unit * 1000 + first, unit * 1000 + first + count), pa.int64()),
        "status": [status] * count,
        "flagged": [status != "ok"] * count,
        UNIT: pa.array([unit] * count, pa.int64()),
        ROW: pa.array(range(first, first + count), pa.int64()),
    })


def _attempt(tmp_path, key="k1", run_id="r1", committed=None):
    location = output.prepare_output(str(tmp_path / "out"), overwrite=True, key=key)
    return location, output.open_attempt(location, key, run_id, committed)


def test_pieces_are_named_by_unit_and_contiguous_rows(tmp_path):
    (tmp_path / "s").mkdir()
    batch = pa.concat_tables([_rows(0, 0, 3), _rows(1, 5, 2), _rows(0, 3, 2), _rows(0, 7, 1)])
    written = write_pieces(batch, filesystem=FS, staging=str(tmp_path / "s"), schema=SCHEMA)
    assert written.column("piece").to_pylist() == [
        piece_name(0, 0, 3), piece_name(1, 5, 2), piece_name(0, 3, 2), piece_name(0, 7, 1)
    ]
    assert covered_ranges(written.column("piece").to_pylist()) == {0: [(0, 5), (7, 8)], 1: [(5, 7)]}
    table = pq.read_table(tmp_path / "s" / piece_name(1, 5, 2))
    assert table.schema.names == SCHEMA.names and table.column("id").to_pylist() == [1005, 1006]
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_overlapping_pieces_are_refused():
    with pytest.raises(OverlapError):
        covered_ranges([piece_name(0, 0, 10), piece_name(0, 5, 10)])
    # The same piece seen twice (staged and already moved) is one piece.
    assert covered_ranges([piece_name(0, 0, 10), "part-r1-" + piece_name(0, 0, 10)]) == {0: [(0, 10)]}


def test_missing_ranges():
    unit = Unit(0, "f", 0, 10)
    assert missing_ranges(unit, []) == [(0, 10)]
    assert missing_ranges(unit, [(0, 3), (5, 8)]) == [(3, 5), (8, 10)]
    assert missing_ranges(unit, [(0, 10)]) == []
    assert parse_piece("part-x-" + piece_name(3, 40, 7)) == (3, 40, 7) and parse_piece("other.parquet") is None


def test_units_are_row_groups_and_reads_honour_ranges_and_partitions(tmp_path):
    part = tmp_path / "in" / "dt=2026-11-01"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(7)), "text": list("abcdefg")}), part / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"id": [7], "text": pa.nulls(1, pa.string())}), part / "b.parquet")
    dataset = pads.dataset(str(tmp_path / "in"), format="parquet", partitioning="hive")
    units = plan_units(dataset)
    assert [(u.row_group, u.rows) for u in units] == [(0, 4), (1, 3), (0, 1)]
    todo = {0: [(1, 3)], 1: [], 2: [(0, 1)]}
    items = pa.Table.from_pylist(unit_items(units, todo))
    tables = list(read_units(items, filesystem=FS, schema=dataset.schema, batch_rows=2))
    rows = pa.concat_tables(tables).to_pylist()
    assert [(r["id"], r[UNIT], r[ROW], r["dt"]) for r in rows] == [(1, 0, 1, "2026-11-01"), (2, 0, 2, "2026-11-01"), (7, 2, 0, "2026-11-01")]


def test_files_that_disagree_on_a_column_type_are_named(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": [2], "text": [b"b"]}), tmp_path / "in" / "b.parquet")
    from pipelines.commit.units import UnitError

    with pytest.raises(UnitError, match="b.parquet"):
        plan_units(pads.dataset(str(tmp_path / "in"), format="parquet"))


def _stage(attempt, *tables):
    for table in tables:
        write_pieces(table, filesystem=FS, staging=attempt.staging, schema=SCHEMA)


UNITS = [Unit(0, "a", 0, 4), Unit(1, "a", 1, 2)]


def test_commit_writes_parts_manifest_then_success(tmp_path):
    location, attempt = _attempt(tmp_path)
    _stage(attempt, _rows(0, 0, 4, "ok"), _rows(1, 0, 2, "image_error"))
    result = output.commit(location, attempt, UNITS, SCHEMA, {"schema_version": 1})
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(result.files)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 6 and manifest["rows_by_status"] == {"image_error": 2, "ok": 4} and manifest["flagged"] == 2
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "r1" == manifest["run_id"]
    assert not list(out.glob("_staging-*"))
    assert reader.committed_files(str(out)) == [str(out / f) for f in result.files]
    assert pq.read_table(out).num_rows == 6


def test_incomplete_staging_commits_nothing(tmp_path):
    location, attempt = _attempt(tmp_path)
    _stage(attempt, _rows(0, 0, 3))
    with pytest.raises(output.IncompleteError, match="3 input rows have no output"):
        output.commit(location, attempt, UNITS, SCHEMA, {})
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists() and not list(out.glob("part-*"))
    assert reader.committed_files(str(out)) == []


def test_resume_sees_durable_rows_and_an_interrupted_commit_finishes_without_duplicates(tmp_path):
    location, attempt = _attempt(tmp_path)
    _stage(attempt, _rows(0, 0, 2), _rows(1, 0, 2))
    # Reopening the same key resumes the same attempt and run id.
    again = output.open_attempt(location, "k1", "another-id", None)
    assert again.resumed and again.run_id == "r1"
    assert output.durable(location, again) == {0: [(0, 2)], 1: [(0, 2)]}
    _stage(again, _rows(0, 2, 2))
    # A commit of the job's earlier version (which moved pieces in) killed after moving one piece:
    # the piece is in place, the rest still staged. This commit merges them all into one file.
    first = sorted((tmp_path / "out").glob("_staging-k1/u*.parquet"))[0]
    first.rename(tmp_path / "out" / f"part-r1-{first.name}")
    result = output.commit(location, again, UNITS, SCHEMA, {})
    assert result.rows == 6 and result.files == ["part-r1-u000000-r0000000000-to-u000001-r0000000002.parquet"]
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == [0, 1, 2, 3, 1000, 1001]  # row order
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_SUCCESS", "_manifest.json", result.files[0]]


def test_overwrite_keeps_the_old_result_readable_until_the_new_one_is_committed(tmp_path):
    location, attempt = _attempt(tmp_path, key="old", run_id="r-old")
    _stage(attempt, _rows(0, 0, 4), _rows(1, 0, 2))
    old = output.commit(location, attempt, UNITS, SCHEMA, {})
    committed = reader.read_committed(location)

    location = output.prepare_output(str(tmp_path / "out"), overwrite=True, key="new")
    attempt = output.open_attempt(location, "new", "r-new", committed)
    _stage(attempt, _rows(0, 0, 4, "text_error"), _rows(1, 0, 2, "text_error"))
    # Until the commit, readers still get exactly the old result.
    assert reader.committed_files(str(tmp_path / "out")) == [str(tmp_path / "out" / f) for f in old.files]
    output.commit(location, attempt, UNITS, SCHEMA, {})
    files = reader.committed_files(str(tmp_path / "out"))
    assert all("r-new" in f for f in files)
    assert set(pq.read_table(tmp_path / "out").column("status").to_pylist()) == {"text_error"}


def test_prepare_output_refuses_foreign_files_and_other_results(tmp_path):
    location, attempt = _attempt(tmp_path, key="k1")
    _stage(attempt, _rows(0, 0, 4), _rows(1, 0, 2))
    output.commit(location, attempt, UNITS, SCHEMA, {})
    output.prepare_output(str(tmp_path / "out"), overwrite=False, key="k1")  # same result: fine
    with pytest.raises(output.OutputError, match="--overwrite"):
        output.prepare_output(str(tmp_path / "out"), overwrite=False, key="k2")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(output.OutputError, match="did not write"):
        output.prepare_output(str(tmp_path / "out"), overwrite=True, key="k2")



def test_run_key_follows_settings_that_change_numbers_only():
    from pipelines.commit.units import work_key
    from pipelines.config import build_config

    base = {"input": "in", "output": "out", "itm_model": "m", "caption_model": "none"}
    key = work_key(build_config(base), "fingerprint")
    changes = (
        {"precision": "bf16"}, {"jpeg_draft": True}, {"itm_threshold": 0.4}, {"max_text_tokens": 20}, {"decode_device": "gpu"},
        {"caption_model": "c", "caption_prompt": "a photo of"},
    )
    for changed in changes:
        assert work_key(build_config(dict(base, **changed)), "fingerprint") != key, changed
    for same in ({"score_batch_size": 8}, {"decode_batch_size": 8}, {"score_actors": "1,4"}, {"run_id": "r"}, {"output": "o2"}):
        assert work_key(build_config(dict(base, **same)), "fingerprint") == key, same
    assert work_key(build_config(base), "other input") != key
    captioned = dict(base, caption_model="c")
    with_prompt = work_key(build_config(dict(captioned, caption_prompt="a photo of")), "fingerprint")
    assert with_prompt != work_key(build_config(captioned), "fingerprint")
    assert with_prompt != work_key(build_config(dict(captioned, caption_prompt="an image of")), "fingerprint")
