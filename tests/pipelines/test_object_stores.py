"""Whole runs on GCS (gcp-storage-emulator) and Azure Blob (Azurite), as test_s3.py does on S3.

Per store, few and cheap: the catalog, its image URIs and the ITM model directory live on the
store; one run writes Parquet there; a second run reuses it (every row's scores taken, none
computed) and writes Parquet on GCS, a Delta table on Azure (delta-rs lists GCS through the XML
API, which gcp-storage-emulator does not serve, so Delta on GCS is not tested); a review export
reads the first output and an import writes verdicts to the store. Scores equal the same images
scored in process from local bytes. Azure runs on the native backend, GCS on fsspec (see gcs_runs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import draw_shape
from pipelines.config import build_config
from pipelines.storage import locate

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle")]


def _upload_dir(put, local: Path, uri: str) -> str:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            put(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return uri


def _catalog(put, root: str) -> list[dict]:
    images = [put(f"{root}/images/{c}-{s}.jpg", draw_shape(c, s)) for c, s in SHAPES]
    records = [{"id": i, "text": f"a {SHAPES[i % 3][0]} {SHAPES[i % 3][1]}", "uri": images[i % 3]} for i in range(6)]
    records.append({"id": 6, "text": "gone", "uri": f"{root}/images/missing.jpg"})
    for part in range(2):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records[part * 4:(part + 1) * 4]), buffer)
        put(f"{root}/catalog/part-{part}.parquet", buffer.getvalue())
    return records


def _runs(put, root: str, tiny_itm: str, tmp_path: Path, second_format: str, backend: str) -> dict:
    from pipelines.review import labelstudio as ls
    from pipelines.run import run_job

    records = _catalog(put, root)
    model = _upload_dir(put, Path(tiny_itm), f"{root}/models/itm")
    common = dict(input=f"{root}/catalog", itm_model=model, caption_model="none", device="cpu", image_uri_column="uri",
                  decode_batch_size=4, score_batch_size=4, evidence="none", text_languages="any", storage_backend=backend)
    first = run_job(build_config(dict(common, output=f"{root}/scored")))
    second_output = f"{root}/again"
    second = run_job(build_config(dict(common, output=second_output, output_format=second_format, reuse=f"{root}/scored")))
    # Review: tasks from the store's output, verdicts back onto the store.
    exported = ls.export_tasks(ls.ExportOptions(f"{root}/scored", str(tmp_path / "tasks.json")))
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    for number, task in enumerate(tasks, 1):
        task["id"] = number
        task["annotations"] = [{"id": number, "completed_by": 1, "was_cancelled": False, "updated_at": "2026-12-06T10:00:00Z",
                                "created_at": "2026-12-06T10:00:00Z", "result": [{"from_name": "verdict", "to_name": "image",
                                "type": "choices", "value": {"choices": ["mismatch"]}}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    imported = ls.import_verdicts(str(tmp_path / "export.json"), f"{root}/verdicts")
    verdicts = locate(f"{root}/verdicts/verdicts.parquet")
    return dict(records=records, first=first, second=second, second_output=second_output, root=root, exported=exported,
                imported=imported, verdicts=pq.read_table(verdicts.path, filesystem=verdicts.filesystem).to_pylist())


def _rows(uri: str, fmt: str = "parquet") -> dict:
    if fmt == "delta":
        from deltalake import DeltaTable

        from blip_ops.stores import storage_options

        table = DeltaTable(uri, storage_options=storage_options(uri)).to_pyarrow_table()
    else:
        location = locate(uri)
        from pipelines.commit.reader import committed_files

        table = pa.concat_tables(pq.read_table(f, filesystem=location.filesystem) for f in committed_files(uri))
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def local_scores(tiny_itm):
    from pipelines.dataflow.stages import ScoreStage, decode_batch

    batch = pa.table({"text": [f"a {c} {s}" for c, s in SHAPES], "image": pa.array([draw_shape(c, s) for c, s in SHAPES], pa.binary())})
    decoded = decode_batch(batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)
    out = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")(decoded)
    return out.column("itm_score").to_pylist(), out.column("itc_score").to_pylist()


@pytest.fixture(scope="module")
def gcs_runs(gcs_store, ray_session, tiny_itm, tmp_path_factory):
    gcs_store.reset()
    gcs_store.create_bucket("bkt")
    # fsspec (gcsfs): pyarrow's native GCS client hung reading back the Parquet pieces the workers
    # had written to gcp-storage-emulator (a ranged read answered in a way it keeps retrying); the
    # native client is tested against the emulator in process (test_stores.py).
    return _runs(gcs_store.put, "gs://bkt", tiny_itm, tmp_path_factory.mktemp("gcs"), "parquet", "fsspec") | {"format": "parquet"}


@pytest.fixture(scope="module")
def azure_runs(azure_store, ray_session, tiny_itm, tmp_path_factory):
    azure_store.create_container("cnt")
    return _runs(azure_store.put, "az://cnt", tiny_itm, tmp_path_factory.mktemp("azure"), "delta", "native") | {"format": "delta"}


# One test function per store and check (not a parametrized fixture): the stores' fixtures must
# be named statically, so that ray_session starts every store a session uses before Ray, and the
# workers inherit their variables.
def test_gcs_every_row_once_with_local_scores(gcs_runs, local_scores):
    _every_row_once_with_local_scores(gcs_runs, local_scores)


def test_azure_every_row_once_with_local_scores(azure_runs, local_scores):
    _every_row_once_with_local_scores(azure_runs, local_scores)


def test_gcs_second_run_reuses_every_score(gcs_runs):
    _second_run_reuses_every_score(gcs_runs)


def test_azure_second_run_reuses_every_score(azure_runs):
    _second_run_reuses_every_score(azure_runs)


def test_gcs_review_round_trip(gcs_runs):
    _review_round_trip(gcs_runs)


def test_azure_review_round_trip(azure_runs):
    _review_round_trip(azure_runs)


def _every_row_once_with_local_scores(runs, local_scores):
    itm, itc = local_scores
    rows = _rows(f"{runs['root']}/scored")
    assert sorted(rows) == [r["id"] for r in runs["records"]]
    for i in range(6):
        assert rows[i]["status"] == "ok", rows[i]["error"]
        np.testing.assert_allclose([rows[i]["itm_score"], rows[i]["itc_score"]], [itm[i % 3], itc[i % 3]], rtol=0, atol=1e-6)
    assert rows[6]["status"] == "image_error" and "cannot read image URI" in rows[6]["error"]
    assert runs["first"].rows_written == 7


def _second_run_reuses_every_score(runs):
    first, again = _rows(f"{runs['root']}/scored"), _rows(runs["second_output"], runs["format"])
    assert sorted(again) == sorted(first)
    assert runs["second"].reuse["rows_scores_reused"] == 6 and runs["second"].reuse["pairs_scored"] == 0
    for i in range(6):
        assert again[i]["itm_score"] == first[i]["itm_score"] and again[i]["scores_from_run"] == first[i]["run_id"]


def _review_round_trip(runs):
    assert runs["exported"].tasks >= 1  # the image_error row is flagged (fail closed), at least
    assert runs["imported"].verdicts == runs["exported"].tasks
    assert {v["verdict"] for v in runs["verdicts"]} == {"mismatch"}
