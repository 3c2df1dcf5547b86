"""The review loop against a real Label Studio server on loopback (tests/label_studio.py): export,
project with the exported labeling config, import, annotate through the HTTP API, export, import the
verdicts, calibrate on them; and the task as a reviewer sees it in headless Chromium.

One server for the module. Skips, saying why, only where ``label-studio`` is not installed in its
own venv (``.ci/run`` installs it into ``.venv-labelstudio``); under CI=true that fails instead.
"""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import calibrate, review
from tests import label_studio
from tests.browser import find_chromium
from tests.conftest import require_or_skip
from tests.review_outputs import scored_output


@pytest.fixture(scope="module", autouse=True)
def _label_studio_installed():
    """Skips the module, saying why, where label-studio is missing; fails it under CI=true."""
    require_or_skip(label_studio.binary() is not None,
                    f"label-studio is not installed in {label_studio.venv()} (.ci/run installs label-studio==1.23.2 "
                    "there; its pins clash with this project's)")


VERDICT = {"from_name": "verdict", "to_name": "image", "type": "choices"}


def _result(verdict: str) -> list:
    return [dict(VERDICT, value={"choices": [verdict]})]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("label-studio")
    documents = base / "documents"
    documents.mkdir()
    running = label_studio.start(base, documents)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def project(server, tmp_path_factory):
    """A committed output whose images are files under the server's document root, exported and imported."""
    out = scored_output(server.document_root, uri_images=True)
    tasks_file = tmp_path_factory.mktemp("review") / "tasks.json"
    code = review.main(["export", "--output", out["output"], "--tasks", str(tasks_file), "--where", "status == 'ok'",
                        "--image-root", str(server.document_root)])
    assert code == 0
    config = tasks_file.with_name("tasks.label-config.xml").read_text()
    created = server.call("POST", "/api/projects", {"title": "blip-moderate review", "label_config": config})
    server.call("POST", "/api/storages/localfiles", {"project": created["id"], "path": str(out["images_dir"]),
                                                       "use_blob_urls": False, "title": "catalog images"})
    imported = server.call("POST", f"/api/projects/{created['id']}/import", raw=tasks_file.read_bytes())
    exported = json.loads(tasks_file.read_text())
    assert imported["task_count"] == len(exported) and imported["prediction_count"] == len(exported)
    tasks = server.call("GET", f"/api/tasks?project={created['id']}&page_size=100")["tasks"]
    return dict(out, project=created["id"], tasks=tasks, exported=exported)


def test_a_task_shows_its_image_text_caption_and_verdicts_in_the_ui(server, project, tmp_path):
    """Before any verdict (this test runs first): the job's prediction is what a reviewer starts from."""
    require_or_skip(find_chromium() is not None, "no chromium binary (Debian's chromium; .ci/run installs it when apt is usable)")
    task = project["tasks"][0]
    shot = tmp_path / "label-studio-task.png"
    seen = label_studio.view_task(server, f"/projects/{project['project']}/data?task={task['id']}", "/data/local-files/",
                                  screenshot=shot)
    assert seen.get("ok"), seen.get("text")
    assert task["data"]["text"] in seen["text"] and task["data"]["caption"] in seen["text"]
    assert "ITM" in seen["text"] and shot.stat().st_size > 10_000
    if os.environ.get("BLIP_MODERATE_LABEL_STUDIO_SCREENSHOT"):  # how docs/label-studio-task.png is made
        shutil.copy(shot, os.environ["BLIP_MODERATE_LABEL_STUDIO_SCREENSHOT"])


def test_round_trip_through_label_studio_and_calibrate(server, project, tmp_path, capsys):
    tasks, expected = project["tasks"], project["expected"]
    assert sorted(t["data"]["row_id"] for t in tasks) == sorted(t["data"]["row_id"] for t in project["exported"])
    # Label Studio serves the local-files image URL the export wrote.
    first = tasks[0]
    image = server.call("GET", first["data"]["image"])
    row = next(r for r in project["rows"] if r["id"] == first["data"]["row_id"])
    assert image == Path(row["image_path"]).read_bytes()

    # A reviewer's verdicts: the truth for every task but one left unsure; one first answered wrongly, then corrected.
    unsure, corrected = tasks[1]["id"], tasks[2]["id"]
    for task in tasks:
        truth = expected[task["data"]["row_id"]]
        first_answer = ("match" if truth == "mismatch" else "mismatch") if task["id"] == corrected else truth
        annotation = server.call("POST", f"/api/tasks/{task['id']}/annotations",
                                 {"result": _result("unsure" if task["id"] == unsure else first_answer)})
        if task["id"] == corrected:
            server.call("PATCH", f"/api/annotations/{annotation['id']}", {"result": _result(truth)})
    export = server.call("GET", f"/api/projects/{project['project']}/export?exportType=JSON")
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(export))

    verdicts = tmp_path / "verdicts"
    assert review.main(["import", "--annotations", str(export_file), "--verdicts", str(verdicts), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdicts"] == len(tasks) and result["by_verdict"]["unsure"] == 1
    table = pq.read_table(verdicts / "verdicts.parquet").to_pylist()
    by_task = {r["task_id"]: r for r in table}
    assert by_task[corrected]["verdict"] == expected[by_task[corrected]["row_id"]]
    assert {r["annotator"] for r in table} == {"1"} and all(r["annotated_at"] is not None for r in table)
    assert all(r["image_sha256"] == next(x for x in project["rows"] if x["id"] == r["row_id"])["image_sha256"] for r in table)
    # Importing the same export again changes nothing.
    before = pq.read_table(verdicts / "verdicts.parquet")
    assert review.main(["import", "--annotations", str(export_file), "--verdicts", str(verdicts)]) == 0
    assert pq.read_table(verdicts / "verdicts.parquet").equals(before)
    capsys.readouterr()

    code = calibrate.main(["--scored", project["output"], "--labels", str(verdicts), "--target-precision", "0.75",
                           "--out-config", str(tmp_path / "calibrated.yaml"), "--report", str(tmp_path / "cal.html"), "--json"])
    calibrated = json.loads(capsys.readouterr().out.splitlines()[-1])
    decided = [t for t in tasks if t["id"] != unsure]
    assert calibrated["labelled_scored_rows"] == len(decided)
    assert calibrated["mismatches"] == sum(expected[t["data"]["row_id"]] == "mismatch" for t in decided)
    assert code == 0 and "itm_threshold:" in (tmp_path / "calibrated.yaml").read_text()
