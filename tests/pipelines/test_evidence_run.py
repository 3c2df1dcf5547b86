"""Evidence end to end: the CLI option, the output column, its counts, DuckDB, and every config branch."""

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from jobs import nightly, score
from pipelines import schema as S
from pipelines.commit.units import work_key
from pipelines.config import build_config
from tests.conftest import write_catalog
from tests.reference import gradcam_reference


@pytest.fixture(scope="module")
def records():
    records = sample_catalog(16, seed=5)
    for record in records:
        del record["expected"]
    return records


@pytest.fixture(scope="module")
def evidence_run(ray_session, tiny_itm, records, tmp_path_factory):
    """One CLI run with the default --evidence (flagged); returns the output directory, the argv and the summary."""
    catalog = write_catalog(tmp_path_factory.mktemp("evidence-catalog"), records, files=2)
    output = tmp_path_factory.mktemp("evidence-out")
    argv = ["--input", str(catalog), "--output", str(output), "--itm-model", tiny_itm, "--caption-model", "none",
            "--device", "cpu", "--itm-threshold", "0.6", "--evidence-layer", "0", "--score-batch-size", "5", "--json"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert score.main(argv) == 0
    return output, argv, json.loads(printed.getvalue().strip().splitlines()[-1])


def test_flagged_rows_get_evidence_and_the_run_counts_it(evidence_run, records):
    output, argv, summary = evidence_run
    table = pq.read_table(output)
    assert table.schema.field("evidence").type == S.EVIDENCE_TYPE
    rows = table.to_pylist()
    by_score = [r["status"] == "ok" and bool({S.REASON_ITM, S.REASON_ITC} & set(r["flag_reasons"])) for r in rows]
    assert [r["evidence"] is not None for r in rows] == by_score
    assert 0 < sum(by_score) < len(rows)
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["evidence"]["rows"] == sum(by_score) == summary["evidence_rows"]
    assert manifest["evidence"]["policy"] == "flagged" and manifest["evidence"]["seconds"] > 0
    assert summary["evidence_s"] == manifest["evidence"]["seconds"]
    (run,) = pq.read_table(output / "_runs").to_pylist()
    assert (run["evidence"], run["evidence_rows"]) == ("flagged", sum(by_score)) and run["evidence_s"] > 0


def test_the_written_evidence_equals_the_reference(evidence_run, records, tiny_itm):
    output, _, _ = evidence_run
    reference = gradcam_reference(tiny_itm, 0)
    images = {r["id"]: r["image"] for r in records}
    explained = [r for r in pq.read_table(output).to_pylist() if r["evidence"] is not None]
    for row in explained[:3]:
        maps, _ = reference(images[row["id"]], row["text"])
        evidence = row["evidence"]
        assert (evidence["rows"], evidence["cols"], evidence["layer"]) == (4, 4, 0)
        np.testing.assert_allclose(evidence["heat"], maps[1], rtol=1e-5, atol=1e-5 * np.abs(maps[1]).max())


def test_duckdb_reads_evidence_heat_with_the_readme_query(evidence_run):
    duckdb = pytest.importorskip("duckdb")
    from tests.pipelines.review.test_report import readme_queries

    output, _, _ = evidence_run
    sql = readme_queries()["evidence of the flagged rows: the hottest patch and the top words"].replace("'scored/", f"'{output}/")
    got = duckdb.connect().sql(sql).fetchall()
    table = pq.read_table(output).to_pylist()
    expected = sorted(
        ((r["id"], r["itm_score"], r["evidence"]) for r in table if r["evidence"] is not None), key=lambda item: (item[1], item[0])
    )
    assert [row[0] for row in got] == [item[0] for item in expected][:20]
    for (_, _, patches, hottest, peak, words), (_, _, evidence) in zip(got, expected):
        heat = np.array(evidence["heat"], dtype=np.float32)
        assert patches == len(heat) == evidence["rows"] * evidence["cols"]
        assert peak == pytest.approx(float(heat.max())) and hottest == int(heat.argmax()) + 1  # 1-based, as SQL lists
        assert words == [w["word"] for w in evidence["words"]]


def test_evidence_is_part_of_the_run_key():
    base = {"input": "in", "output": "out", "itm_model": "m", "caption_model": "none"}
    key = work_key(build_config(base), "fingerprint")
    for changed in ({"evidence": "all"}, {"evidence": "none"}, {"evidence_layer": 3}):
        assert work_key(build_config(dict(base, **changed)), "fingerprint") != key, changed
    assert work_key(build_config(dict(base, evidence="flagged", evidence_layer="auto")), "fingerprint") == key


def test_cli_and_yaml_options(tmp_path):
    config_file = tmp_path / "nightly.yaml"
    config_file.write_text("evidence: all\nevidence-layer: 4\n")
    args = score.make_parser().parse_args(["--input", "i", "--output", "o", "--config", str(config_file)])
    config = score.config_from_args(args)
    assert (config.evidence, config.evidence_layer) == ("all", 4)
    args = score.make_parser().parse_args(["--input", "i", "--output", "o", "--config", str(config_file), "--evidence", "none",
                                           "--evidence-layer", "auto"])
    assert (score.config_from_args(args).evidence, score.config_from_args(args).evidence_layer) == ("none", None)
    assert build_config({"input": "i", "output": "o"}).evidence == "flagged"


@pytest.mark.parametrize("extra, message", [
    (["--evidence", "sometimes"], "evidence: Input should be 'none', 'flagged' or 'all'"),
    (["--evidence-layer", "-1"], "evidence_layer"),
])
def test_cli_rejects_bad_evidence_options_with_exit_2(tiny_itm, tmp_path, capsys, extra, message):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--itm-model", tiny_itm, *extra]
    assert score.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_layer_the_model_lacks_exits_2_before_anything_loads(evidence_run, tiny_itm, tmp_path, capsys):
    output, argv, _ = evidence_run
    catalog = argv[argv.index("--input") + 1]
    assert score.main(["--input", catalog, "--output", str(tmp_path / "o"), "--itm-model", tiny_itm, "--caption-model", "none",
                       "--evidence-layer", "1"]) == 2
    assert "--evidence-layer: evidence layer 1 cannot be explained" in capsys.readouterr().err
    # With evidence off the layer is never used, so it is not checked.
    from pipelines.preflight import check_models

    check_models(build_config({"input": catalog, "output": "o", "itm_model": tiny_itm, "caption_model": "none",
                               "evidence": "none", "evidence_layer": 1}))


def test_nightly_takes_the_evidence_options(tiny_itm, tmp_path, capsys):
    day = tmp_path / "catalog" / "dt=2026-11-30"
    write_catalog(day, [{k: v for k, v in r.items() if k != "expected"} for r in sample_catalog(3)], files=1)
    base = ["--catalog", str(tmp_path / "catalog"), "--output", str(tmp_path / "out"), "--itm-model", tiny_itm,
            "--caption-model", "none"]
    assert nightly.main(base + ["--evidence", "sometimes"]) == 2
    assert "evidence" in capsys.readouterr().err
    # A layer the model lacks fails the partition in preflight (no Ray, no model load) and names the option.
    assert nightly.main(base + ["--evidence", "all", "--evidence-layer", "7"]) == 1
    assert "--evidence-layer: evidence layer 7" in capsys.readouterr().out
    (record,) = pq.read_table(tmp_path / "out" / "_nightly").to_pylist()
    assert record["outcome"] == "failed" and record["evidence_rows"] == 0
