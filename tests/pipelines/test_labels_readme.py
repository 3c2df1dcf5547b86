"""The README's labels section runs: its label file in a real run, its DuckDB queries against pandas,
the report's Categories and Policies sections, and show_flagged's labels."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from blip_ops.samples import sample_catalog
from jobs.audit import show_flagged
from pipelines.config import build_config
from pipelines.run import run_job
from tests import docs
from tests.conftest import write_catalog

MARKUP = "<b>x</b>"


def _section() -> str:
    return docs.section("## Category and policy labels (`--labels`)")  # wherever the page holding it is


def readme_labels() -> dict:
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", _section(), re.S).group(1))


def readme_queries() -> dict[str, str]:
    return docs.queries("## Category and policy labels (`--labels`)")


@pytest.fixture(scope="module")
def labelled(ray_session, tiny_itm, tmp_path_factory):
    root = tmp_path_factory.mktemp("labels-readme")
    records = sample_catalog(12, seed=11)
    declared = ["red circle", "circle", "blue square", "Blue Square", "green triangle", MARKUP, None, "yellow shirt",
                "black phone", "red circle", "sofa", "green triangle"]
    for record, category in zip(records, declared):
        record.pop("expected")
        record["category"] = category
    catalog = write_catalog(root / "catalog", records, files=1)
    labels = readme_labels()
    # The tiny random model's ITM means nothing: at 0.0 every scored row hits the policy, so the
    # "policy hits" query has rows to count (thresholds are not in the label key: same labels).
    labels["policies"][0]["threshold"] = 0.0
    config = build_config(dict(input=str(catalog), output=str(root / "scored"), itm_model=tiny_itm, caption_model=None,
                               device="cpu", labels=labels, evidence="none", text_languages="any",
                               report_category_column="category"))
    run_job(config)
    return root / "scored", config


def test_the_readme_label_file_parses_as_written():
    labels = build_config({"input": "x", "output": "y", "labels": readme_labels()}).labels
    assert labels["categories"]["aliases"] == {"circle": "red circle"} and labels["policies"][0]["threshold"] == 0.8


def test_readme_label_queries(labelled):
    duckdb = pytest.importorskip("duckdb")
    output, _ = labelled
    queries = {name: sql.replace("'scored/", f"'{output}/") for name, sql in readme_queries().items()}
    assert set(queries) == {"mismatch rate by declared category", "policy hits by day",
                            "declared vs predicted: the most frequent confusions"}
    table = pq.read_table(output).to_pandas()
    connection = duckdb.connect()
    mismatch = connection.sql(queries["mismatch rate by declared category"]).fetchall()
    known = table[(table.status == "ok") & table.category_score.notna()]
    mismatched = known.flag_reasons.map(lambda r: "category_mismatch" in list(r))
    expected = {c: (len(g), int(mismatched[g.index].sum())) for c, g in known.groupby("category")}
    assert {row[0]: row[1:3] for row in mismatch} == expected and expected
    assert "sofa" not in expected and MARKUP not in expected  # unknown categories have no score
    hits = connection.sql(queries["policy hits by day"]).fetchall()
    ok = table[table.status == "ok"]
    assert [(row[1], row[2]) for row in hits] == [("weapon", len(ok))]
    confusions = connection.sql(queries["declared vs predicted: the most frequent confusions"]).fetchall()
    assert sum(row[2] for row in confusions) == int(mismatched.sum())


def test_report_has_categories_and_policies_sections_with_thumbnails(labelled):
    output, config = labelled
    page = (output / "_report.html").read_text()
    categories = page.split("<h2>Categories</h2>", 1)[1].split("<h2>", 1)[0]
    policies = page.split("<h2>Policies</h2>", 1)[1].split("<h2>", 1)[0]
    assert "category_unknown" in categories and "weapon" in policies
    assert "data:image/jpeg;base64," in policies  # thumbnails of the hits
    table = pq.read_table(output).to_pandas()
    known = table[(table.status == "ok") & table.category_score.notna()]
    mismatched = int(sum("category_mismatch" in list(r) for r in known.flag_reasons))
    assert f"{mismatched} of {len(known)} scored rows declaring a known category" in categories
    assert ("data:image/jpeg;base64," in categories) == (mismatched > 0)
    assert MARKUP not in page  # a catalog category is shown as text
    assert "&lt;b&gt;x&lt;/b&gt;" in page


def test_show_flagged_shows_the_labels(labelled):
    output, _ = labelled
    frame = pq.read_table(output).to_pandas()
    frame.attrs["blip_moderate"] = {"id_column": "id", "text_column": "text", "image_column": None,
                                    "image_is_uri": False, "category_column": "category"}
    view = show_flagged(frame, n=5)
    assert "<th>labels</th>" in str(view) and "predicted <b>" in str(view)
    assert all("labels" in row for row in view.rows)


# ---------------------------------------------------------------------------------------------
# The review loop on the same output: Label Studio tasks with a category choice and a policy
# checklist, reviewers' answers imported, and jobs.calibrate suggesting the label thresholds.


def _ls_export(tmp_path, output):
    import json

    from jobs import review

    tasks = tmp_path / "tasks.json"
    assert review.main(["export", "--output", str(output), "--tasks", str(tasks), "--json"]) == 0
    return json.loads(tasks.read_text()), (tmp_path / "tasks.label-config.xml").read_text()


def test_label_studio_tasks_ask_for_the_category_and_the_policies(labelled, tmp_path, capsys):
    import xml.etree.ElementTree as ET

    output, _ = labelled
    tasks, config = _ls_export(tmp_path, output)
    root = ET.fromstring(config)
    choices = {c.get("name"): c for c in root.iter("Choices")}
    assert choices["category"].get("value") == "$category_options" and choices["category"].get("choice") == "single"
    assert [c.get("value") for c in choices["policies"].iter("Choice")] == ["weapon"]
    assert choices["policies"].get("choice") == "multiple"
    rows = {r["id"]: r for r in pq.read_table(output).to_pylist()}
    for task in tasks:
        row = rows[task["data"]["row_id"]]
        if row["status"] != "ok":
            continue
        options = [o["value"] for o in task["data"]["category_options"]]
        assert row["category_predicted"] in options and options[-1] == "other"
        result = {r["from_name"]: r["value"]["choices"] for r in task["predictions"][0]["result"]}
        assert result["category"] == [row["category_predicted"]] and result["policies"] == ["weapon"]


def test_reviewed_labels_calibrate_the_label_thresholds(labelled, tmp_path, capsys):
    import json

    from jobs import calibrate, review

    output, _ = labelled
    tasks, _ = _ls_export(tmp_path, output)
    rows = {r["id"]: r for r in pq.read_table(output).to_pylist()}
    scored = [t for t in tasks if rows[t["data"]["row_id"]]["status"] == "ok"]
    weapon = {t["data"]["row_id"]: next(i["itm"] for i in rows[t["data"]["row_id"]]["labels"] if i["kind"] == "policy")
              for t in scored}
    cut = sorted(weapon.values())[len(weapon) // 2]
    known = sorted((rows[i]["category_score"], i) for i in weapon if rows[i]["category_score"] is not None)
    wrong = {i for _, i in known[: len(known) // 2]}  # the lowest category scores: reviewers say "other"
    exported = []
    for number, task in enumerate(scored):
        row_id = task["data"]["row_id"]
        row = rows[row_id]
        declared = row["category"] if row["category_score"] is not None else row["category_predicted"]
        result = [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["match"]}},
                  {"from_name": "category", "to_name": "image", "type": "choices",
                   "value": {"choices": ["other" if row_id in wrong else declared]}}]
        if weapon[row_id] >= cut:
            result.append({"from_name": "policies", "to_name": "image", "type": "choices", "value": {"choices": ["weapon"]}})
        exported.append(dict(task, id=number + 1, project=1, annotations=[
            {"id": 100 + number, "completed_by": 1, "updated_at": "2026-12-06T10:00:00Z", "result": result}]))
    (tmp_path / "export.json").write_text(json.dumps(exported))
    assert review.main(["import", "--annotations", str(tmp_path / "export.json"), "--verdicts", str(tmp_path / "v")]) == 0
    verdicts = pq.read_table(tmp_path / "v" / "verdicts.parquet").to_pylist()
    assert {v["row_id"]: v["policies"] for v in verdicts} == {i: (["weapon"] if weapon[i] >= cut else []) for i in weapon}
    capsys.readouterr()
    calibrate.main(["--scored", str(output), "--labels", str(tmp_path / "v"), "--target-precision", "1.0",
                    "--out-config", str(tmp_path / "c.yaml"), "--report", str(tmp_path / "c.html"), "--json"])
    result = json.loads(capsys.readouterr().out)["labels"]
    threshold = result["policy:weapon"]["threshold"]
    assert max(v for v in weapon.values() if v < cut) < threshold <= cut  # exactly the checked rows at ITM >= it
    assert result["policy:weapon"]["precision"] == 1.0 and result["policy:weapon"]["recall"] == 1.0
    category = result["category"]
    assert category["reviewed"] == len(known) and category["positives"] == len(wrong)
    if wrong:
        highest_wrong = max(s for s, i in known if i in wrong)
        lowest_right = min(s for s, i in known if i not in wrong)
        assert highest_wrong < category["threshold"] <= lowest_right and category["recall"] == 1.0
    assert "categories.threshold" in (tmp_path / "c.yaml").read_text()
