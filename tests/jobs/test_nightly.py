"""jobs.nightly over a dt=YYYY-MM-DD catalog: only uncommitted partitions, failures named, run records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from jobs.nightly import main


def _partition(root, day, records, drop_text=False):
    directory = root / f"dt={day}"
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in r.items() if k != "expected" and not (drop_text and k == "text")} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), directory / "part-0.parquet")


@pytest.fixture
def catalog(tmp_path):
    records = sample_catalog(12, seed=3)
    root = tmp_path / "catalog"
    _partition(root, "2026-11-01", records[:6])
    _partition(root, "2026-11-02", records[3:9])  # three rows carried over from the day before
    _partition(root, "2026-11-03", records[:4], drop_text=True)  # broken: no text column
    (root / "not-a-partition").mkdir()
    return root, records


def _nightly(tiny_itm, catalog_root, output, *extra):
    return main(["--catalog", str(catalog_root), "--output", str(output), "--itm-model", tiny_itm,
                 "--caption-model", "none", *extra])


def _records(output):
    return pq.read_table(output / "_nightly").to_pylist()


def test_nightly_scores_uncommitted_partitions_and_names_failures(ray_session, tiny_itm, catalog, tmp_path, capsys):
    root, records = catalog
    output = tmp_path / "scored"
    assert _nightly(tiny_itm, root, output) == 1
    err = capsys.readouterr().err
    assert "dt=2026-11-03" in err and "dt=2026-11-01" not in err.split("partitions failed:")[-1]
    for day, count in (("2026-11-01", 6), ("2026-11-02", 6)):
        assert (output / f"dt={day}" / "_SUCCESS").exists()
        assert pq.read_table(output / f"dt={day}").num_rows == count
    assert not (output / "dt=2026-11-03" / "_SUCCESS").exists()
    first = {r["date"]: r for r in _records(output)}
    assert {d: r["outcome"] for d, r in first.items()} == {
        "2026-11-01": "committed", "2026-11-02": "committed", "2026-11-03": "failed"
    }
    # The thresholds applied, defaults included, as numbers a dashboard can compare.
    assert {(r["itm_threshold"], r["itc_threshold"]) for r in first.values()} == {(0.5, 0.2)}
    assert "text" in first["2026-11-03"]["error"] and first["2026-11-01"]["rows"] == 6
    # The second day reused the first day's scores for the rows it carried over, and scored only the rest.
    carried = sum(1 for r in records[3:6] if r["expected"] in ("match", "mismatch"))
    assert first["2026-11-02"]["rows_scores_reused"] == carried > 0
    assert first["2026-11-02"]["pairs_scored"] == sum(1 for r in records[6:9] if r["expected"] in ("match", "mismatch"))
    assert first["2026-11-02"]["reuse_sources"] == str(output / "dt=2026-11-01")
    assert first["2026-11-01"]["rows_scores_reused"] == 0 and first["2026-11-01"]["reuse_sources"] is None

    # The broken partition is repaired: the next run scores only it.
    _partition(root, "2026-11-03", records[:4])
    assert _nightly(tiny_itm, root, output, "--json") == 0
    latest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    outcomes = {p["date"]: p["outcome"] for p in latest["partitions"]}
    assert outcomes == {"2026-11-01": "skipped", "2026-11-02": "skipped", "2026-11-03": "committed"}
    assert len(list((output / "_nightly").glob("run-*.parquet"))) == 2
    # The newest day's report shows the history across partitions, one point per day.
    page = (output / "dt=2026-11-03" / "_report.html").read_text()
    assert page.count('<tr class="history-run">') == 3 and "3 days (each day's latest run)" in page

    # Rescoring one named partition replaces it, and only it.
    before = json.loads((output / "dt=2026-11-01" / "_SUCCESS").read_text())["run_id"]
    assert _nightly(tiny_itm, root, output, "--date", "2026-11-02", "--overwrite", "--itm-threshold", "0.9", "--no-reuse") == 0
    assert json.loads((output / "dt=2026-11-01" / "_SUCCESS").read_text())["run_id"] == before
    rescored = pq.read_table(output / "dt=2026-11-02").to_pylist()
    assert len(rescored) == 6 and len({r["run_id"] for r in rescored}) == 1
    latest = max(_records(output), key=lambda r: r["started_at"])
    assert latest["date"] == "2026-11-02" and latest["itm_threshold"] == 0.9
    assert latest["rows_scores_reused"] == 0 and latest["reuse_sources"] is None  # --no-reuse


def test_reuse_sources_are_the_latest_committed_earlier_partition_or_a_window(tmp_path):
    from jobs.nightly import reuse_sources

    for day in ("2026-11-01", "2026-11-03", "2026-11-04", "2026-11-06"):
        (tmp_path / f"dt={day}").mkdir()
        for name in ("_manifest.json", "_SUCCESS"):
            (tmp_path / f"dt={day}" / name).write_text(json.dumps({"run_id": day, "files": []}))
    (tmp_path / "dt=2026-11-05").mkdir()  # not committed: never a source
    assert reuse_sources("2026-11-06", str(tmp_path), None) == [str(tmp_path / "dt=2026-11-04")]
    assert reuse_sources("2026-11-06", str(tmp_path), 3) == [str(tmp_path / f"dt=2026-11-0{d}") for d in (4, 3)]
    assert reuse_sources("2026-11-01", str(tmp_path), None) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--date", "2026-13-01"], "YYYY-MM-DD"),
        (["--date", "2026-10-01"], "no partition dt=2026-10-01"),
        (["--overwrite"], "--overwrite needs --date"),
        (["--itm-threshold", "7"], "itm_threshold"),
        (["--text-languages", "english"], "text_languages"),
        (["--agreement-threshold", "2"], "agreement_threshold"),
        (["--max-image-bytes", "0"], "max_image_bytes"),
        (["--reuse-days", "0"], "--reuse-days"),
    ],
)
def test_nightly_usage_errors_exit_2(tiny_itm, catalog, tmp_path, capsys, extra, message):
    root, _ = catalog
    assert _nightly(tiny_itm, root, tmp_path / "scored", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "scored").exists()


def test_nightly_into_one_delta_table_rescores_one_day_in_one_commit(ray_session, tiny_itm, tmp_path, capsys):
    deltalake = pytest.importorskip("deltalake")
    records = sample_catalog(9, seed=5)
    root = tmp_path / "catalog"
    days = ("2026-11-01", "2026-11-02", "2026-11-03")
    parts = {day: records[index * 3:(index + 1) * 3] for index, day in enumerate(days)}
    parts["2026-11-02"] = parts["2026-11-02"] + [dict(records[0], id="carried-over")]  # day 1's pair again
    for day in days:
        _partition(root, day, parts[day])
    table_root = tmp_path / "table"
    assert _nightly(tiny_itm, root, table_root, "--output-format", "delta") == 0
    table = deltalake.DeltaTable(str(table_root))
    assert table.version() == 2 and table.metadata().partition_columns == ["dt"]  # one commit per day
    rows = table.to_pyarrow_table().to_pylist()
    assert sorted((r["dt"], r["id"]) for r in rows) == sorted((day, r["id"]) for day in days for r in parts[day])
    # Each day reused the table's latest committed earlier partition: day 2 scored only its new pairs.
    record = {r["date"]: r for r in _records(table_root)}
    assert record["2026-11-01"]["reuse_sources"] is None
    assert record["2026-11-02"]["reuse_sources"] == f"{table_root}/dt=2026-11-01"
    assert (record["2026-11-02"]["rows_scores_reused"], record["2026-11-02"]["pairs_scored"]) == (1, 3)
    assert record["2026-11-03"]["reuse_sources"] == f"{table_root}/dt=2026-11-02"
    by_id = {(r["dt"], r["id"]): r for r in rows}
    carried, first = by_id[("2026-11-02", "carried-over")], by_id[("2026-11-01", "item-0000")]
    assert carried["scores_from_run"] == first["run_id"] and carried["itm_score"] == first["itm_score"]
    files_before = {day: sorted(p.name for p in (table_root / f"dt={day}").glob("part-*")) for day in days}
    assert all(len(names) == 1 for names in files_before.values()), files_before  # each day's pieces merged into one file

    # Committed partitions are recognised from the table: a rerun adds no commit.
    capsys.readouterr()
    assert _nightly(tiny_itm, root, table_root, "--output-format", "delta", "--json") == 0
    latest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p["outcome"] for p in latest["partitions"]} == {"skipped"}
    assert deltalake.DeltaTable(str(table_root)).version() == 2

    # Rescoring a day: one commit that replaces dt=2026-11-02 only.
    assert _nightly(tiny_itm, root, table_root, "--output-format", "delta", "--date", "2026-11-02",
                    "--overwrite", "--itm-threshold", "0.9") == 0
    table = deltalake.DeltaTable(str(table_root))
    assert table.version() == 3
    history = [json.loads(line)["commitInfo"] for line in (table_root / "_delta_log" / f"{3:020d}.json").read_text().splitlines()
               if line.startswith('{"commitInfo"')]
    assert history[0]["blip_moderate"]["partition"] == {"dt": "2026-11-02"}
    rows = table.to_pyarrow_table().to_pylist()
    assert len(rows) == 10
    run_ids = {day: {r["run_id"] for r in rows if r["dt"] == day} for day in days}
    before = deltalake.DeltaTable(str(table_root), version=2).to_pyarrow_table().to_pylist()
    old_ids = {day: {r["run_id"] for r in before if r["dt"] == day} for day in days}
    assert run_ids["2026-11-01"] == old_ids["2026-11-01"] and run_ids["2026-11-03"] == old_ids["2026-11-03"]
    assert run_ids["2026-11-02"] != old_ids["2026-11-02"] and len(run_ids["2026-11-02"]) == 1
    current = {Path(p).name for p in table.file_uris()}
    for day in ("2026-11-01", "2026-11-03"):
        assert set(files_before[day]) <= current  # untouched days keep their very files
    assert (table_root / "dt=2026-11-02" / "_report.html").exists()
    # A Delta table's partitions keep their run-summary rows beside them: the report's history spans the days.
    page = (table_root / "dt=2026-11-02" / "_report.html").read_text()
    assert page.count('<tr class="history-run">') == 3 and "3 days (each day's latest run)" in page
