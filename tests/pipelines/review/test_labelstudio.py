"""Review export and import without a Label Studio server (tests/pipelines/review/test_label_studio_server.py has one)."""

import base64
import json
import xml.etree.ElementTree as ET

import pyarrow.parquet as pq
import pytest

from jobs import review
from pipelines.review import labelstudio as ls
from tests.review_outputs import scored_output


@pytest.fixture(scope="module")
def bytes_output(tmp_path_factory):
    return scored_output(tmp_path_factory.mktemp("review-bytes"))


@pytest.fixture(scope="module")
def path_output(tmp_path_factory):
    return scored_output(tmp_path_factory.mktemp("review-paths"), uri_images=True, output_format="delta")


def _export(tmp_path, output, *extra):
    tasks = tmp_path / "review" / "tasks.json"
    try:
        code = review.main(["export", "--output", output["output"], "--tasks", str(tasks), "--json", *extra])
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    return code, (json.loads(tasks.read_text()) if code == 0 else None), tasks


def test_flagged_rows_become_tasks_lowest_itm_first_with_the_job_verdict(tmp_path, bytes_output, capsys):
    code, tasks, path = _export(tmp_path, bytes_output)
    assert code == 0
    rows = bytes_output["rows"]
    flagged = [r for r in rows if r["flagged"]]
    assert [t["data"]["row_id"] for t in tasks] == [
        r["id"] for r in sorted(flagged, key=lambda r: (r["itm_score"] is None, r["itm_score"] or 0))]
    first = tasks[0]
    row = next(r for r in rows if r["id"] == first["data"]["row_id"])
    assert first["data"]["text"] == row["text"] and first["data"]["caption"] == row["caption"]
    assert first["data"]["run_id"] == "run-review" and first["data"]["image_sha256"] == row["image_sha256"]
    assert first["data"]["flag_reasons"] == "itm_below_threshold"
    assert first["data"]["itm_score"] == pytest.approx(row["itm_score"], abs=1e-6)
    assert first["predictions"] == [{"model_version": "tiny-itm", "score": first["data"]["itm_score"], "result": [
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["mismatch"]}}]}]
    # Images are bytes in the input: inline JPEGs, read back by id; the unscored row has no prediction score.
    assert first["data"]["image"].startswith("data:image/jpeg;base64,")
    base64.b64decode(first["data"]["image"].split(",", 1)[1], validate=True)
    last = tasks[-1]
    assert last["data"]["status"] in ("image_error", "text_error") and "score" not in last["predictions"][0]
    # Evidence: an overlay where the row has one, a placeholder image where it does not (Label Studio needs the key).
    assert first["data"]["evidence"].startswith("data:image/jpeg") and first["data"]["evidence_words"] == "product 0.50"
    assert last["data"]["evidence"].startswith("data:image/png") and last["data"]["evidence_words"] == "no evidence map"
    result = json.loads(capsys.readouterr().out)
    # The undecodable image of the image_error row shows as a placeholder, counted as missing.
    assert result["tasks"] == len(flagged) and result["images"] == {"inline": len(flagged) - 1, "missing": 1}
    assert result["rows"] == len(rows)


def test_the_labeling_config_names_what_the_tasks_hold(tmp_path, bytes_output):
    _, tasks, path = _export(tmp_path, bytes_output)
    config = ET.fromstring(ls.config_path_for(path).read_text())
    values = {e.get("value")[1:] for e in config.iter() if (e.get("value") or "").startswith("$")}
    assert values == {"image", "text", "caption", "scores", "evidence", "evidence_words"}
    assert all(values <= set(t["data"]) for t in [tasks[0], tasks[-1]])
    choices = next(e for e in config.iter("Choices"))
    assert choices.get("name") == "verdict" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.iter("Choice")] == ["match", "mismatch", "unsure"]
    assert next(config.iter("Image")).get("name") == "image"
    # Without evidence in the output, no evidence view (and no placeholder in the tasks).
    assert "evidence" not in ls.labeling_config(False)


def test_where_and_limit(tmp_path, bytes_output):
    code, tasks, _ = _export(tmp_path, bytes_output, "--where", "status == 'ok' and category == 'hats'", "--limit", "3")
    hats = sorted((r for r in bytes_output["rows"] if r["status"] == "ok" and r["category"] == "hats"), key=lambda r: r["itm_score"])
    assert code == 0 and [t["data"]["row_id"] for t in tasks] == [r["id"] for r in hats[:3]]
    # An unflagged row the job calls a match is predicted "match".
    code, tasks, _ = _export(tmp_path, bytes_output, "--where", "not flagged")
    assert code == 0 and tasks and {t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks} == {"match"}
    code, tasks, _ = _export(tmp_path, bytes_output, "--where", "itm_score > 2")
    assert code == 0 and tasks == []


def test_image_root_rule_on_a_delta_output(tmp_path, path_output):
    root = path_output["images_dir"]
    code, tasks, _ = _export(tmp_path, path_output, "--image-root", str(root))
    assert code == 0
    ok = [t for t in tasks if t["data"]["status"] == "ok"]
    assert ok and all(t["data"]["image"].startswith("/data/local-files/?d=shop/") for t in ok)
    row = next(r for r in path_output["rows"] if r["id"] == ok[0]["data"]["row_id"])
    assert ok[0]["data"]["image"] == "/data/local-files/?d=shop/" + row["image_path"].rsplit("/", 1)[1]
    # Without a root, local paths are read and embedded.
    code, tasks, _ = _export(tmp_path, path_output)
    assert code == 0 and all(t["data"]["image"].startswith("data:image/jpeg") for t in tasks if t["data"]["status"] == "ok")


def test_s3_uris_stay_s3_uris(tmp_path):
    import pyarrow as pa

    table = pa.table({"image_path": ["s3://bucket/a.jpg", "/data/x/b.jpg", None]})
    config = ls.JobConfig(input="in", output="out", image_uri_column="image_path")
    images = ls._Images(config, table, "/data")
    assert images.modes == ["s3", "local-files", "missing"]
    assert images.task_image(0) == "s3://bucket/a.jpg" and images.task_image(1) == "/data/local-files/?d=x/b.jpg"
    assert images.task_image(2).startswith("data:image/png")


@pytest.mark.parametrize("extra, message", [
    (["--where", "open('x')"], "unknown column"),
    (["--where", "itm_score < 'x'"], "cannot be evaluated"),
    (["--limit", "0"], "at least 1"),
    (["--image-root", "s3://bucket/"], "local directory"),
])
def test_bad_export_options_exit_2(tmp_path, bytes_output, capsys, extra, message):
    code, _, tasks = _export(tmp_path, bytes_output, *extra)
    assert code == 2 and message in capsys.readouterr().err and not tasks.exists()


def test_export_refusals_exit_2(tmp_path, bytes_output, path_output, capsys, monkeypatch):
    assert review.main(["export", "--output", str(tmp_path / "nothing"), "--tasks", str(tmp_path / "t.json")]) == 2
    assert "no committed jobs.score output" in capsys.readouterr().err
    # A path outside the document root, and a root for an output whose images are bytes.
    code, _, _ = _export(tmp_path, path_output, "--image-root", str(tmp_path))
    assert code == 2 and "is not under --image-root" in capsys.readouterr().err
    code, _, _ = _export(tmp_path, bytes_output, "--image-root", str(tmp_path))
    assert code == 2 and "--image-root applies to images named by paths" in capsys.readouterr().err
    monkeypatch.setattr(ls, "INLINE_MAX_TASKS", 2)
    code, _, _ = _export(tmp_path, bytes_output)
    assert code == 2 and "would embed their images inline (at most 2)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# import


def _annotation(annotation_id, verdict, updated, user=1, cancelled=False):
    return {"id": annotation_id, "completed_by": user, "was_cancelled": cancelled, "updated_at": updated,
            "created_at": updated, "result": [{"from_name": "verdict", "to_name": "image", "type": "choices",
                                               "value": {"choices": [verdict]}}]}


def _task(task_id, row_id, *annotations):
    return {"id": task_id, "project": 4, "data": {"row_id": row_id, "image_sha256": f"img-{row_id}", "text_sha256": None,
                                                  "run_id": "r1", "output": "scored/"},
            "annotations": list(annotations)}


def _import(tmp_path, name, tasks):
    path = tmp_path / name
    path.write_text(json.dumps(tasks))
    return review.main(["import", "--annotations", str(path), "--verdicts", str(tmp_path / "verdicts"), "--json"])


def _verdicts(tmp_path):
    rows = pq.read_table(tmp_path / "verdicts" / "verdicts.parquet").to_pylist()
    return {r["task_id"]: (r["row_id"], r["verdict"], r["annotator"]) for r in rows}


def test_import_keeps_the_latest_verdict_per_task_and_is_idempotent(tmp_path, capsys):
    first = [
        _task(1, "a", _annotation(10, "mismatch", "2026-11-01T10:00:00Z"), _annotation(11, "match", "2026-11-01T11:00:00Z", user=2)),
        _task(2, "b", _annotation(12, "unsure", "2026-11-01T10:00:00Z")),
        _task(3, "c"),                                                             # not annotated yet
        _task(4, "d", _annotation(13, "match", "2026-11-01T10:00:00Z", cancelled=True)),  # skipped
    ]
    assert _import(tmp_path, "one.json", first) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdicts"] == 2 and result["unannotated"] == 2 and result["by_verdict"] == {"match": 1, "unsure": 1}
    assert _verdicts(tmp_path) == {1: ("a", "match", "2"), 2: ("b", "unsure", "1")}
    table = pq.read_table(tmp_path / "verdicts" / "verdicts.parquet")
    assert table.schema.metadata[ls.VERDICTS_MARKER] == b"1" and table.column("image_sha256").to_pylist()[0] == "img-a"
    # The same export again: the same table.
    assert _import(tmp_path, "one.json", first) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == 0
    assert pq.read_table(tmp_path / "verdicts" / "verdicts.parquet").equals(table)
    # An overlapping later export: task 2 re-reviewed, task 3 done; an older copy of task 1 does not win.
    second = [
        _task(1, "a", _annotation(10, "mismatch", "2026-11-01T10:00:00Z")),
        _task(2, "b", _annotation(12, "mismatch", "2026-11-02T09:00:00Z")),
        _task(3, "c", _annotation(14, "match", "2026-11-02T09:30:00+00:00")),
    ]
    assert _import(tmp_path, "two.json", second) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == 1
    assert _verdicts(tmp_path) == {1: ("a", "match", "2"), 2: ("b", "mismatch", "1"), 3: ("c", "match", "1")}
    assert not [p for p in (tmp_path / "verdicts").iterdir() if p.name != "verdicts.parquet"]  # no temporary left


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"tasks": []}', "a list of tasks"),
    ('[{"image": "x"}]', "is not a Label Studio task"),
    ('[{"id": 1, "data": {"image": "x"}}]', "no data.row_id"),
    (json.dumps([_task(1, "a", _annotation(1, "maybe", "2026-11-01T10:00:00Z"))]), "is not one of match, mismatch, unsure"),
])
def test_bad_exports_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "export.json"
    path.write_text(content)
    assert review.main(["import", "--annotations", str(path), "--verdicts", str(tmp_path / "verdicts")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "verdicts").exists()


def test_import_refuses_to_replace_a_foreign_file(tmp_path, capsys):
    import pyarrow as pa

    (tmp_path / "verdicts").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "verdicts" / "verdicts.parquet")
    assert _import(tmp_path, "one.json", [_task(1, "a", _annotation(1, "match", "2026-11-01T10:00:00Z"))]) == 2
    assert "is not a verdicts table" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        review.main(["export", "--tasks", "t.json"])
    assert exit_info.value.code == 2 and "--output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        review.main([])
    assert exit_info.value.code == 2


def test_console_script_has_the_review_subcommand(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "export.json").write_text("[]")
    assert main(["review", "import", "--annotations", str(tmp_path / "export.json"), "--verdicts", str(tmp_path / "v")]) == 0
    assert "0 verdicts from 0 tasks" in capsys.readouterr().out and (tmp_path / "v" / "verdicts.parquet").exists()
