"""The run report and the run-summary table, written beside every committed run."""

import html
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from pipelines.config import build_config
from pipelines.review import artifacts, report
from pipelines.run import run_job
from pipelines.schema import SCHEMA_VERSION
from pipelines.storage import locate
from tests import docs
from tests.conftest import require_or_skip, write_catalog

MARKUP = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'


def catalog_records(n=18):
    records = sample_catalog(n, seed=11)
    for index, record in enumerate(records):
        record["category"] = ["shoes", "hats", "<b>bags</b>"][index % 3]
        del record["expected"]
    # Catalog text with markup lands in the examples (flagged rows) and in the category table.
    for record in records:
        record["text"] = MARKUP + " " + record["text"] if record["text"].strip() else record["text"]
    # A title BLIP cannot read: flagged text_language_unsupported (see test_flags_are_counted_by_reason).
    records[1]["text"] = GERMAN
    return records


GERMAN = "Wasserdichte Wanderschuhe für Herren aus braunem Leder"


@pytest.fixture(scope="module")
def records():
    return catalog_records()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, records):
    return write_catalog(tmp_path_factory.mktemp("report-catalog"), records, files=2)


def job_config(catalog, output, tiny_itm, tiny_caption, **overrides):
    values = dict(
        input=str(catalog), output=str(output), itm_model=tiny_itm, caption_model=tiny_caption, captions="flagged",
        device="cpu", max_new_tokens=3, itm_threshold=0.9, report_category_column="category",
        score_batch_size=8, caption_batch_size=8, decode_batch_size=8,
    )
    values.update(overrides)
    return build_config(values)


@pytest.fixture(scope="module")
def scored(ray_session, catalog, tiny_itm, tiny_caption, tmp_path_factory):
    """One real run; returns (config, output dir, summary)."""
    output = tmp_path_factory.mktemp("report-out")
    # No random caption agrees with its text this well: every captioned, scored row also disagrees.
    config = job_config(catalog, output, tiny_itm, tiny_caption, run_id="run-one", agreement_threshold=0.99)
    summary = run_job(config)
    # Later tests rewrite the report in place; the browser test reads this run's own.
    snapshot = tmp_path_factory.mktemp("report-snapshot")
    for name in ("_report.html", "_manifest.json"):
        (snapshot / name).write_bytes((output / name).read_bytes())
    SNAPSHOT["dir"] = snapshot
    return config, output, summary


SNAPSHOT = {}


def test_report_and_summary_row_are_written_beside_the_output(scored, records):
    config, output, summary = scored
    page = (output / "_report.html").read_text()
    rows = pq.read_table(output / "_runs").to_pylist()
    # Neither the report nor the summary table gets in the way of reading the scored rows.
    assert pq.read_table(output).num_rows == len(records)
    assert len(rows) == 1 and (output / "_runs" / "run-run-one.parquet").exists()
    row = rows[0]
    manifest = json.loads((output / "_manifest.json").read_text())
    assert row["run_id"] == "run-one" == manifest["run_id"]
    assert row["rows"] == len(records) == summary.rows_read
    assert row["rows_ok"] + row["rows_image_error"] + row["rows_text_error"] == len(records)
    assert row["rows_ok"] == summary.scored and row["flagged"] == summary.flagged
    assert row["rows_image_error"] == summary.errors.get("image_error", 0) > 0
    assert row["flag_rate"] == pytest.approx(summary.flagged / len(records))
    assert (row["itm_threshold"], row["itc_threshold"], row["itm_model"]) == (0.9, 0.2, config.itm_model)
    assert row["schema_version"] == manifest["schema_version"] and row["duration_s"] > 0
    assert row["committed_at"] is not None and row["started_at"] <= row["committed_at"]
    assert f'data-count="rows">{len(records)}<' in page and f'data-count="flagged">{summary.flagged}<' in page


def test_flags_are_counted_by_reason(scored):
    from collections import Counter

    config, output, summary = scored
    rows = pq.read_table(output).to_pylist()
    expected = Counter(reason for row in rows for reason in row["flag_reasons"])
    assert expected["text_language_unsupported"] == 1 and expected["caption_disagrees"] > 0
    german = next(row for row in rows if row["text"] == GERMAN)
    assert german["text_language"] == "de" and "text_language_unsupported" in german["flag_reasons"]
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["flagged_by_reason"] == dict(expected) == summary.flagged_by_reason
    assert "text_language_unsupported=1" in summary.render()
    page = (output / "_report.html").read_text()
    for reason, count in expected.items():
        assert f'data-count="reason-{reason}">{count}<' in page
    row = pq.read_table(output / "_runs").to_pylist()[0]
    assert row["flagged_text_language_unsupported"] == 1
    assert row["flagged_caption_disagrees"] == expected["caption_disagrees"] and row["agreement_threshold"] == 0.99


def test_quantiles_match_the_scored_rows(scored):
    # Quantiles read from the 0.001-wide histograms are within half a bin (plus rounding) of the exact ones.
    config, output, _ = scored
    manifest = json.loads((output / "_manifest.json").read_text())
    table = pq.ParquetDataset([str(output / name) for name in manifest["files"]]).read(columns=["itm_score", "itc_score"])
    row = pq.read_table(output / "_runs").to_pylist()[0]
    for name in ("itm", "itc"):
        values = table.column(f"{name}_score").drop_null().to_numpy()
        for q in report.QUANTILES:
            exact = np.quantile(values, q, method="inverted_cdf")
            assert row[f"{name}_p{int(q * 100):02d}"] == pytest.approx(exact, abs=0.0011), (name, q)


def test_report_escapes_catalog_text_and_is_self_contained(scored):
    _, output, summary = scored
    page = (output / "_report.html").read_text()
    assert "<script>" not in page and "onerror=alert" not in page.replace(html.escape("onerror=alert(1)"), "")
    assert html.escape(MARKUP, quote=True) in page
    assert "&lt;b&gt;bags&lt;/b&gt;" in page and "<b>bags</b>" not in page
    # Nothing is fetched: every src is an inline image, no stylesheet or script is linked.
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/jpeg;base64,") for src in sources)
    assert "<link" not in page and "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 2 + 3 and page.count('class="threshold"') == 2  # histograms, then history's three
    assert page.count('<tr class="category">') == 3


def test_errors_section_lists_the_most_frequent_messages_with_example_ids(scored, monkeypatch):
    config, output, _ = scored
    manifest = json.loads((output / "_manifest.json").read_text())
    table = pq.ParquetDataset([str(output / name) for name in manifest["files"]]).read().to_pandas()
    failed = table[table.error.notna()]
    stats = report.collect_stats(locate(str(output)), manifest["files"], config)
    expected = failed.groupby(["status", "error"]).id.apply(list).to_dict()
    top = stats.top_errors()
    assert sorted((s, m, n) for s, m, n, _ in top) == sorted((s, m, len(ids)) for (s, m), ids in expected.items())
    for status, message, _, ids in top:
        assert ids == expected[(status, message)][:report.ERROR_EXAMPLE_IDS]
    assert [n for _, _, n, _ in top] == sorted((n for _, _, n, _ in top), reverse=True)
    page = (output / "_report.html").read_text()
    assert page.count('<tr class="error-message">') == len(expected) > 0
    # Hostile messages (an image URI's error names the URI, which the catalog controls) are text.
    hostile = pa.table({"id": [MARKUP, "b", "c", "d", "e"], "status": ["image_error"] * 5,
                        "error": [f"cannot read image URI {MARKUP}"] * 4 + ["other"]})
    monkeypatch.setattr(report, "MAX_ERROR_MESSAGES", len(stats.errors) + 1)
    stats.add_errors(hostile, "id")
    assert stats.errors[("image_error", f"cannot read image URI {MARKUP}")] == [4, [MARKUP, "b", "c"]]
    assert stats.errors_untracked == 1  # "other" came past the bound: counted, not listed
    page = report.render_report(manifest, {}, config, stats, {})
    assert "<script>" not in page and html.escape(f"cannot read image URI {MARKUP}", quote=True) in page
    assert "1 rows have messages past the first" in page


def test_examples_are_the_most_confident_mismatches(scored):
    config, output, _ = scored
    manifest = json.loads((output / "_manifest.json").read_text())
    stats = report.collect_stats(locate(str(output)), manifest["files"], config, examples=4)
    table = pq.ParquetDataset([str(output / name) for name in manifest["files"]]).read().to_pandas()
    candidates = table[(table.status == "ok") & table.flagged].sort_values("itm_score")
    assert [row["id"] for row in stats.examples] == candidates["id"].head(4).tolist()
    assert stats.categories == {
        value: [len(group), int(group.flagged.sum())] for value, group in table.groupby("category")
    }
    images = report.fetch_images(config, [row["id"] for row in stats.examples] + ["no-such-id"])
    assert set(images) == {row["id"] for row in stats.examples} and all(images.values())


def test_each_run_appends_a_summary_row(scored, catalog, tiny_itm, tiny_caption):
    config, output, summary = scored
    # What run_job does after a second commit to the same output (a second pipeline run would
    # only cost time: run-one already shows run_job calling this).
    manifest = dict(json.loads((output / "_manifest.json").read_text()), run_id="run-two")
    again = job_config(catalog, output, tiny_itm, None, captions="none", run_id="run-two", overwrite=True,
                       itm_threshold=0.95, report_category_column="no_such_column")
    artifacts.write_run_artifacts(again, locate(str(output)), manifest, dict(summary.as_dict(), run_id="run-two"))
    rows = {row["run_id"]: row for row in pq.read_table(output / "_runs").to_pylist()}
    assert set(rows) == {"run-one", "run-two"} and rows["run-two"]["itm_threshold"] == 0.95
    page = (output / "_report.html").read_text()
    assert "run-two" in page and "column &#x27;no_such_column&#x27; is not in the output" in page


def test_a_failing_report_is_a_warning_not_a_failed_run(scored, caplog):
    config, output, _ = scored
    with caplog.at_level(logging.WARNING):
        ok = artifacts.publish_run_artifacts(config, locate(str(output)), {"run_id": "r", "files": ["missing.parquet"]}, {})
    assert not ok and "committed, but its report or summary row was not written" in caplog.text


def test_histogram_quantiles_and_display():
    hist = report.Histogram.empty(report.ITM_RANGE, report.ITM_BINS)
    values = np.random.default_rng(0).uniform(0.3, 0.6, 5000)
    hist.add(values)
    assert hist.total == 5000
    for q in report.QUANTILES:
        assert hist.quantile(q) == pytest.approx(np.quantile(values, q), abs=0.002)
    shown = hist.display(threshold=0.9)
    assert shown.low == pytest.approx(0.3) and shown.high >= 0.9 - 1e-9 and shown.counts.sum() == 5000
    assert len(shown.counts) <= report.DISPLAY_BINS
    assert report.Histogram.empty(report.ITC_RANGE, report.ITC_BINS).quantile(0.5) is None
    svg = report.histogram_svg(shown, 0.9, "t")
    assert svg.count("<rect") == np.count_nonzero(shown.counts) and 'class="threshold"' in svg


def readme_queries() -> dict[str, str]:
    """The documented DuckDB queries (docs/output.md), by their leading comment."""
    return docs.queries("### DuckDB queries")


def test_readme_duckdb_queries(scored):
    duckdb = pytest.importorskip("duckdb")  # in the test extra; skipped only outside it
    _, output, _ = scored
    queries = {name: sql.replace("'scored/", f"'{output}/") for name, sql in readme_queries().items()}
    assert set(queries) == {
        "flag rate per day (one row per run in the run-summary table)",
        "flag rate per category of the committed result",
        "top flagged items: the most confident mismatches",
        "schema version of the scored files",
        "evidence of the flagged rows: the hottest patch and the top words",  # tests/pipelines/test_evidence_run.py
    }
    runs = pq.read_table(output / "_runs").to_pandas()
    table = pq.read_table(output).to_pandas()
    connection = duckdb.connect()

    per_day = connection.sql(queries["flag rate per day (one row per run in the run-summary table)"]).fetchall()
    days = runs.groupby(runs.committed_at.dt.date)
    assert per_day == [
        (day, len(group), int(group.rows.sum()), int(group.flagged.sum()), pytest.approx(group.flagged.sum() / group.rows.sum()))
        for day, group in days
    ]
    per_category = connection.sql(queries["flag rate per category of the committed result"]).fetchall()
    assert {row[0]: row[1:3] for row in per_category} == {
        value: (len(group), int(group.flagged.sum())) for value, group in table.groupby("category")
    }
    assert [row[3] for row in per_category] == sorted((row[3] for row in per_category), reverse=True)
    top = connection.sql(queries["top flagged items: the most confident mismatches"]).fetchall()
    expected = table[table.flagged & (table.status == "ok")].sort_values(["itm_score", "id"]).head(20)
    assert [row[0] for row in top] == expected["id"].tolist() and top
    assert all(MARKUP in row[1] or row[1] == GERMAN for row in top)
    version = connection.sql(queries["schema version of the scored files"]).fetchall()
    assert version == [(str(SCHEMA_VERSION),)]



def test_readme_duckdb_queries_on_a_delta_table(scored, tmp_path):
    """The same queries on a Delta table, as the README says: ``read_parquet('scored/part-*.parquet')``
    replaced by ``scored``, DuckDB's Arrow scan of ``DeltaTable(...).to_pyarrow_dataset()``."""
    duckdb = pytest.importorskip("duckdb")
    deltalake = pytest.importorskip("deltalake")
    _, output, _ = scored
    deltalake.write_deltalake(str(tmp_path / "table"), pq.read_table(output))
    connection = duckdb.connect()
    for name, sql in readme_queries().items():
        if "read_parquet('scored/part-*.parquet')" not in sql:
            continue
        from_parquet = connection.sql(sql.replace("'scored/", f"'{output}/")).fetchall()
        scored_table = deltalake.DeltaTable(str(tmp_path / "table")).to_pyarrow_dataset()  # noqa: F841  (DuckDB scans it by name)
        on_delta = connection.sql(sql.replace("read_parquet('scored/part-*.parquet')", "scored_table")).fetchall()
        assert on_delta == from_parquet and on_delta, name


def test_report_renders_in_headless_chromium(scored, tmp_path):
    from tests import browser

    require_or_skip(browser.find_chromium() is not None, "no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    committed = (SNAPSHOT["dir"] / "_report.html").read_text()  # run-one's report and manifest, as committed
    manifest = json.loads((SNAPSHOT["dir"] / "_manifest.json").read_text())
    # The same page, re-rendered as run_job does, with a hostile run id in its history and a hostile
    # error message (one browser start covers both): they must show as text, run nothing.
    config, output, summary = scored
    stats = report.collect_stats(locate(str(output)), manifest["files"], config)
    assert 'class="history-run"' in committed and 'id="errors"' in committed  # run_job's page has both sections
    stats.add_errors(pa.table({"id": [MARKUP], "status": ["image_error"], "error": [f"cannot read image URI {MARKUP}"]}), "id")
    runs = tmp_path / "history"
    runs.mkdir()
    (runs / "_runs").mkdir()
    (runs / "_runs" / "run-run-one.parquet").write_bytes((output / "_runs" / "run-run-one.parquet").read_bytes())
    earlier = dict(pq.read_table(output / "_runs" / "run-run-one.parquet").to_pylist()[0], run_id=MARKUP, rows=0, flagged=0)
    earlier["committed_at"] = earlier["committed_at"].replace(year=2020)
    pq.write_table(pa.Table.from_pylist([earlier], schema=artifacts.RUN_SUMMARY_SCHEMA), runs / "_runs" / "run-hostile.parquet")
    page = tmp_path / "_report.html"
    page.write_text(report.report_page(manifest, summary.as_dict(), config, stats, locate(str(runs))))
    result = browser.open_page(page, {
        "rows": "document.querySelector('[data-count=rows]').textContent",
        "flagged": "document.querySelector('[data-count=flagged]').textContent",
        "statuses": "Object.fromEntries([...document.querySelectorAll('[data-count^=status-]')]"
                    ".map(e => [e.dataset.count.slice(7), Number(e.textContent)]))",
        "title": "document.title",
        "scripts": "document.scripts.length",
        "injected": "document.querySelectorAll('#examples script, #examples img:not([src^=\"data:image/jpeg\"]), b').length",
        "texts": "[...document.querySelectorAll('#examples td.text')].map(e => e.textContent)",
        "categories": "[...document.querySelectorAll('tr.category th')].map(e => e.textContent)",
        "images": "[...document.images].map(i => i.complete && i.naturalWidth > 0)",
        "charts": "document.querySelectorAll('svg line.threshold').length",
        "overlays": "[...document.querySelectorAll('#examples img.overlay')].map(i => [i.complete && i.naturalWidth > 0, i.naturalWidth >= 120])",  # 120: with its legend
        "words": "[...document.querySelectorAll('#examples tr.bm-row')].map(r => [...r.querySelectorAll('.word')].map(w => w.textContent))",
        "history_points": "[...document.querySelectorAll('#history circle')].map(c => [c.getAttribute('class'), c.textContent])",
        "history_runs": "[...document.querySelectorAll('tr.history-run code')].map(e => e.textContent)",
        "history_charts": "[...document.querySelectorAll('#history svg')].map(s => s.getBoundingClientRect().width > 100)",
        # Each chart's labels as the browser laid them out: text, and whether the glyphs' box lies inside the drawing.
        "history_labels": "[...document.querySelectorAll('#history svg')].map(s => [...s.querySelectorAll('text')].map(t => {"
                          " const b = t.getBBox(); return [t.textContent, b.x >= 0 && b.x + b.width <= s.width.baseVal.value]; }))",
        "errors": "[...document.querySelectorAll('tr.error-message')].map(r => [r.cells[1].textContent, Number(r.cells[2].textContent), r.cells[3].textContent])",
        "hostile": "document.querySelectorAll('script, b, img:not([src^=\"data:image/jpeg\"])').length",
    }, screenshot=tmp_path / "report-examples.png", screenshot_selector="#examples")
    assert result.errors == [] and result.dialogs == []
    assert result.values["rows"] == str(manifest["rows"]) and result.values["flagged"] == str(manifest["flagged"])
    assert result.values["statuses"] == manifest["rows_by_status"]
    # Catalog markup is text on the page, never markup: nothing ran, nothing was injected.
    assert result.values["title"].startswith("blip-moderate run") and result.values["scripts"] == 0
    assert result.values["injected"] == 0
    assert result.values["texts"] and all(text.startswith(MARKUP) or text == GERMAN for text in result.values["texts"])
    assert "<b>bags</b>" in result.values["categories"]
    assert result.values["images"] and all(result.values["images"]) and result.values["charts"] == 2
    # Every example (scored and flagged, so explained by default) shows its heat map and top words.
    assert len(result.values["overlays"]) == len(result.values["texts"]) and all(all(o) for o in result.values["overlays"])
    assert all(0 < len(words) <= 5 for words in result.values["words"])
    # History: the hostile earlier run (zero rows: a hollow dot) then run-one, three charts drawn.
    assert [c for c, _ in result.values["history_points"]] == ["dot empty", "dot"]
    assert MARKUP in result.values["history_points"][0][1] and result.values["history_runs"] == ["run-one", MARKUP]
    assert result.values["history_charts"] == [True, True, True] and result.values["hostile"] == 0
    # No axis label is clipped, and the flag-rate axis ends at a round rate of at most 100%.
    labels = result.values["history_labels"]
    assert len(labels) == 3 and all(fits for chart in labels for _, fits in chart), labels
    top = labels[0][0][0]
    assert top.endswith("%") and float(top[:-1]) <= 100 and float(top[:-1]) == round(float(top[:-1])), top
    errors = {message: (rows, ids) for message, rows, ids in result.values["errors"]}
    assert errors[f"cannot read image URI {MARKUP}"] == (1, MARKUP)
    assert sum(rows for rows, _ in errors.values()) == manifest["rows"] - manifest["rows_by_status"]["ok"] + 1
    # The screenshot in the test's artefacts shows the overlays as a person sees them.
    from PIL import Image

    shot = Image.open(tmp_path / "report-examples.png")
    assert shot.width > 400 and shot.height > 100 * len(result.values["texts"])
    # Self-contained: the page asked the network for nothing but itself and its inline images.
    assert [url for url in result.requests if not url.startswith(("file://", "data:"))] == []


def test_without_a_category_column_the_report_says_how_to_get_one(scored):
    config, output, summary = scored
    plain = config.model_copy(update={"report_category_column": None})
    manifest = json.loads((output / "_manifest.json").read_text())
    stats = report.collect_stats(locate(str(output)), manifest["files"], plain, examples=2)
    assert stats.categories == {} and stats.category_problem is None and len(stats.examples) == 2
    page = report.render_report(manifest, summary.as_dict(), plain, stats, {})
    assert "No category column chosen" in page and '<tr class="category">' not in page
    assert page.count('<span class="noimg">no image</span>') == 2  # no thumbnails given
    assert "evidence (ITM Grad-CAM)" not in page and 'class="words"' in page  # no overlays given; words still shown


def test_fetch_images_reads_only_the_wanted_rows(tmp_path):
    import pyarrow as pa

    part = tmp_path / "catalog" / "dt=2026-11-25"
    part.mkdir(parents=True)
    ids = [f"i{n}" for n in range(60)] + ["i7"]  # a duplicated id: the first row wins
    images = [bytes([n]) for n in range(61)]
    pq.write_table(pa.table({"id": ids, "text": ["t"] * 61, "image": images}), part / "p.parquet", row_group_size=8)
    config = build_config({"input": str(tmp_path / "catalog"), "output": "unused"})
    assert report.fetch_images(config, ["i7", "i59", "missing", None, "i7"]) == {"i7": bytes([7]), "i59": bytes([59])}
    uris = tmp_path / "uris.parquet"
    (tmp_path / "a.bin").write_bytes(b"abc")
    pq.write_table(pa.table({"id": [1, 2], "text": ["t", "t"], "uri": [str(tmp_path / "a.bin"), str(tmp_path / "gone")]}), uris)
    config = build_config({"input": str(uris), "output": "unused", "image_uri_column": "uri"})
    assert report.fetch_images(config, [2, 1]) == {1: b"abc", 2: None}


def test_empty_output_with_a_check_off(tmp_path):
    """Zero rows (a valid run) and itc_threshold none: no quantiles, no threshold line for ITC."""
    import pyarrow as pa

    from pipelines.schema import output_schema

    schema = output_schema(pa.schema([("id", pa.string()), ("text", pa.string()), ("category", pa.string())]), None)
    pq.write_table(schema.empty_table(), tmp_path / "part-x-empty.parquet")
    config = build_config({"input": str(tmp_path), "output": str(tmp_path), "report_category_column": "category",
                           "itc_threshold": "none"})
    manifest = {"run_id": "empty", "files": ["part-x-empty.parquet"], "schema_version": 1}
    artifacts.write_run_artifacts(config, locate(str(tmp_path)), manifest, {"elapsed_s": 1.0})
    (row,) = pq.read_table(tmp_path / "_runs").to_pylist()
    assert (row["rows"], row["flagged"], row["flag_rate"], row["itm_p50"], row["itc_threshold"]) == (0, 0, 0.0, None, None)
    page = (tmp_path / "_report.html").read_text()
    assert 'data-count="rows">0<' in page and page.count('class="threshold"') == 1
