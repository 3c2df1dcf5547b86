"""End-to-end runs on a local Ray with tiny checkpoints: the output contract and fidelity."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import draw_shape, sample_catalog
from pipelines.config import build_config
from pipelines.preflight import InputError
from pipelines.run import run_job
from pipelines.schema import OUTPUT_COLUMNS
from tests.conftest import write_catalog
from tests.reference import agreement_reference, caption_reference, itm_reference

MAX_NEW_TOKENS = 6


def _records():
    records = sample_catalog(22, seed=3)
    for index, record in enumerate(records):
        record["row_key"] = index
        record["price"] = float(index) * 1.5
    # Duplicate ids are separate records and stay separate rows.
    records.append(dict(records[0], row_key=len(records)))
    records.append({"id": "item-null", "text": None, "image": None, "expected": "image_error", "row_key": len(records), "price": None})
    return records


@pytest.fixture(scope="module")
def records():
    return _records()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, records):
    return write_catalog(tmp_path_factory.mktemp("catalog"), records, files=3)


def _config(tiny_itm, tiny_caption, catalog, output, **overrides):
    values = dict(
        input=str(catalog),
        output=str(output),
        itm_model=tiny_itm,
        caption_model=tiny_caption,
        device="cpu",
        max_new_tokens=MAX_NEW_TOKENS,
        score_batch_size=5,
        caption_batch_size=4,
        decode_batch_size=7,
    )
    values.update(overrides)
    return build_config(values)


@pytest.fixture(scope="module")
def all_captions_run(ray_session, tiny_itm, tiny_caption, catalog, tmp_path_factory):
    output = tmp_path_factory.mktemp("out-all")
    summary = run_job(_config(tiny_itm, tiny_caption, catalog, output, run_id="run-all"))
    return summary, output


def _by_key(output):
    rows = pq.read_table(output).to_pylist()
    return {row["row_key"]: row for row in rows}, rows


def test_one_output_row_per_input_row(all_captions_run, records):
    summary, output = all_captions_run
    by_key, rows = _by_key(output)
    assert len(rows) == len(records)
    assert Counter(r["row_key"] for r in rows) == Counter(r["row_key"] for r in records)
    assert sum(1 for r in rows if r["id"] == records[0]["id"]) == 2
    assert summary.rows_read == summary.rows_written == len(records)


def test_status_matches_each_records_defect(all_captions_run, records):
    by_key, _ = _by_key(all_captions_run[1])
    for record in records:
        row = by_key[record["row_key"]]
        expected = record["expected"] if record["expected"] in ("image_error", "text_error") else "ok"
        assert row["status"] == expected, record
        if expected == "ok":
            assert row["error"] is None and row["itc_score"] is not None and row["itm_score"] is not None
        else:
            assert row["error"] and row["itc_score"] is None and row["itm_score"] is None
            assert row["flagged"] and expected in row["flag_reasons"]


def test_schema_and_passthrough(all_captions_run, records, tiny_itm, tiny_caption):
    table = pq.read_table(all_captions_run[1])
    assert "image" not in table.column_names
    assert table.column_names[-len(OUTPUT_COLUMNS):] == OUTPUT_COLUMNS
    for name, type_ in [("itc_score", pa.float32()), ("itm_score", pa.float32()), ("flagged", pa.bool_()),
                        ("flag_reasons", pa.list_(pa.string())), ("scored_at", pa.timestamp("us", tz="UTC")),
                        ("row_key", pa.int64()), ("price", pa.float64())]:
        assert table.schema.field(name).type == type_, name
    assert table.column("flagged").null_count == 0 and table.column("flag_reasons").null_count == 0
    by_key, _ = _by_key(all_captions_run[1])
    for record in records:
        row = by_key[record["row_key"]]
        assert (row["id"], row["text"], row["price"]) == (record["id"], record["text"], record["price"])
        assert (row["run_id"], row["itm_model"], row["caption_model"]) == ("run-all", tiny_itm, tiny_caption)


def test_scores_equal_single_pair_reference(all_captions_run, records, tiny_itm):
    reference = itm_reference(tiny_itm)
    by_key, _ = _by_key(all_captions_run[1])
    checked = 0
    for record in records:
        row = by_key[record["row_key"]]
        if row["status"] != "ok":
            continue
        itc, itm = reference(record["image"], record["text"])
        assert row["itc_score"] == pytest.approx(itc, abs=1e-3)
        assert row["itm_score"] == pytest.approx(itm, abs=1e-3)
        assert row["flagged"] == (itm < 0.5 or itc < 0.2)
        checked += 1
    assert checked >= 15


def test_captions_equal_single_image_reference(all_captions_run, records, tiny_caption):
    reference = caption_reference(tiny_caption, MAX_NEW_TOKENS)
    by_key, _ = _by_key(all_captions_run[1])
    for record in records:
        row = by_key[record["row_key"]]
        if row["status"] == "image_error":
            assert row["caption"] is None
        else:  # text_error rows still have an image worth describing
            assert row["caption"] == reference(record["image"])


def test_caption_agreement_equals_sentence_transformers(all_captions_run, records):
    # The default agreement model (the packaged all-MiniLM-L6-v2) ran in the caption actors.
    from blip_ops.agreement import DEFAULT_AGREEMENT_MODEL, clean_caption, resolve_agreement_model

    reference = agreement_reference(resolve_agreement_model(DEFAULT_AGREEMENT_MODEL))
    by_key, _ = _by_key(all_captions_run[1])
    checked = 0
    for record in records:
        row = by_key[record["row_key"]]
        if row["status"] == "ok" and clean_caption(row["caption"]):
            assert row["caption_agreement"] == pytest.approx(reference(row["text"], clean_caption(row["caption"])), abs=1e-5)
            checked += 1
        elif row["status"] != "ok":
            assert row["caption_agreement"] is None  # no caption, or no text to compare it with
    assert checked >= 15


def test_manifest_describes_the_result(all_captions_run, records):
    summary, output = all_captions_run
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["run_id"] == "run-all" and manifest["rows"] == len(records)
    assert sum(manifest["rows_by_status"].values()) == len(records)
    assert manifest["config"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert [f["name"] for f in manifest["schema"]] == pq.read_schema(output / manifest["files"][0]).names
    assert json.loads((output / "_SUCCESS").read_text())["run_id"] == "run-all"
    assert manifest["resources"]["score_device"] == "cpu" and len(manifest["resources"]["score_actors"]) == 2
    # The batch sizes that ran, as resolved (set here; auto would record 64 and 16 on the CPU).
    assert (manifest["resources"]["score_batch_size"], manifest["resources"]["caption_batch_size"]) == (5, 4)
    assert sorted(p.name for p in output.glob("*.parquet")) == sorted(manifest["files"])
    assert not list(output.glob("_staging-*"))
    # Batches of 5 rows were staged as pieces; the commit merged them, in input order, into one file.
    assert len(manifest["files"]) == 1 and manifest["files"][0].startswith("part-run-all-u000000-r0000000000-to-u000002-")
    assert manifest["output_files"]["count"] == 1 and manifest["output_files"]["target_file_mb"] == 128.0
    assert summary.flagged == manifest["flagged"] == sum(r["flagged"] for r in pq.read_table(output).to_pylist())


def test_captions_flagged_policy(ray_session, tiny_itm, tiny_caption, catalog, tmp_path):
    # A high ITM threshold flags some rows and not others, so the cascade is really exercised.
    # An agreement threshold no random caption reaches: every captioned, scored row also disagrees.
    config = _config(tiny_itm, tiny_caption, catalog, tmp_path / "out", captions="flagged", itm_threshold=0.85,
                     itc_threshold="none", agreement_threshold=0.99)
    run_job(config)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert any(r["flagged"] for r in rows if r["status"] == "ok") and any(not r["flagged"] for r in rows)
    for row in rows:
        if row["flagged"] and row["status"] != "image_error":
            assert row["caption"] is not None
        else:
            assert row["caption"] is None and row["caption_agreement"] is None
        if row["caption_agreement"] is not None:  # agreement exists only where a caption does (flagged rows here)
            assert row["caption_agreement"] < 0.99 and row["flag_reasons"][-1] == "caption_disagrees"
        else:
            assert "caption_disagrees" not in row["flag_reasons"]
    assert any(r["caption_agreement"] is not None for r in rows)


def test_caption_prompt_reaches_the_captions_and_the_run_key(ray_session, tiny_itm, tiny_caption, catalog, tmp_path, records):
    prompt = "a photo of"
    config = _config(tiny_itm, tiny_caption, catalog, tmp_path / "out", captions="flagged", itm_threshold=0.85,
                     itc_threshold="none", caption_prompt=prompt)
    run_job(config)
    reference = caption_reference(tiny_caption, MAX_NEW_TOKENS, prompt)
    plain = caption_reference(tiny_caption, MAX_NEW_TOKENS)
    by_key, rows = _by_key(tmp_path / "out")
    captioned = [r for r in rows if r["caption"] is not None]
    assert captioned
    images = {record["row_key"]: record["image"] for record in records}
    assert [r["caption"] for r in captioned] == [reference(images[r["row_key"]]) for r in captioned]
    assert any(r["caption"] != plain(images[r["row_key"]]) for r in captioned), "the prompt must change captions"
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["config"]["caption_prompt"] == prompt
    # Another prompt is another result: the committed one is not taken for it.
    with pytest.raises(InputError, match="overwrite"):
        run_job(config.model_copy(update={"caption_prompt": "an image of"}))


def test_captions_none_skips_the_caption_model(ray_session, tiny_itm, catalog, tmp_path, records):
    config = _config(tiny_itm, "/does/not/matter", catalog, tmp_path / "out", captions="none")
    summary = run_job(config)
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == len(records) == summary.rows_read
    assert table.column("caption").null_count == table.num_rows
    assert table.column("caption_agreement").null_count == table.num_rows
    assert set(table.column("caption_model").to_pylist()) == {None}


def test_hive_partitions_and_image_uris(ray_session, tiny_itm, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for index, (color, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        path = images / f"{index}.jpg"
        path.write_bytes(draw_shape(color, shape))
        records.append({"sku": index, "title": f"a {color} {shape}", "uri": str(path)})
    records.append({"sku": 3, "title": "a missing file", "uri": str(images / "gone.jpg")})
    for day, chunk in (("2026-11-01", records[:2]), ("2026-11-02", records[2:])):
        write_catalog(tmp_path / "catalog" / f"dt={day}", chunk, files=1)
    config = build_config(dict(
        input=str(tmp_path / "catalog"), output=str(tmp_path / "out"), itm_model=tiny_itm, caption_model="none",
        device="cpu", id_column="sku", text_column="title", image_uri_column="uri",
    ))
    run_job(config)
    rows = {r["sku"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == {0, 1, 2, 3}
    assert [rows[i]["status"] for i in range(4)] == ["ok", "ok", "ok", "image_error"]
    assert "cannot read image URI" in rows[3]["error"]
    assert rows[0]["uri"] == records[0]["uri"] and str(rows[3]["dt"]) == "2026-11-02"


def test_zero_rows_is_a_successful_empty_run(ray_session, tiny_itm, tmp_path):
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary())])
    write_catalog(tmp_path / "catalog", [], files=1, schema=schema)
    config = build_config(dict(input=str(tmp_path / "catalog"), output=str(tmp_path / "out"), itm_model=tiny_itm,
                               caption_model="none", device="cpu"))
    summary = run_job(config)
    table = pq.read_table(tmp_path / "out")
    assert summary.rows_read == 0 and table.num_rows == 0
    assert table.column_names == ["id", "text"] + OUTPUT_COLUMNS


def test_rerun_keeps_the_committed_result_and_other_settings_need_overwrite(ray_session, tiny_itm, catalog, tmp_path, records):
    first = _config(tiny_itm, None, catalog, tmp_path / "out", caption_model="none", run_id="first")
    run_job(first)
    again = run_job(_config(tiny_itm, None, catalog, tmp_path / "out", caption_model="none", run_id="again"))
    assert again.outcome == "already_committed" and again.run_id == "first" and again.rows_written == len(records)

    stricter = dict(caption_model="none", run_id="second", itm_threshold=0.9)
    with pytest.raises(InputError, match="--overwrite"):
        run_job(_config(tiny_itm, None, catalog, tmp_path / "out", **stricter))
    run_job(_config(tiny_itm, None, catalog, tmp_path / "out", overwrite=True, **stricter))
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == len(records) and set(table.column("run_id").to_pylist()) == {"second"}
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["run_id"] == "second"


def test_overwrite_never_deletes_foreign_files(tiny_itm, catalog, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        run_job(_config(tiny_itm, None, catalog, tmp_path / "out", caption_model="none", overwrite=True))
    assert (tmp_path / "out" / "precious.txt").exists()


def test_a_plan_that_starves_decoding_is_refused_before_any_actor_starts(ray_session, tiny_itm, catalog, tmp_path):
    from pipelines.dataflow.resources import ResourceError

    # Two 1-CPU actors on the 2-CPU ray_session: no read or decode task could ever run.
    config = _config(tiny_itm, None, catalog, tmp_path / "out", caption_model="none", score_actors="2,2", score_cpus=1)
    with pytest.raises(ResourceError, match=r"reserve 2 scoring actors x 1 = 2 CPUs of the cluster's 2.*--score-actors MIN \(now 2\)"):
        run_job(config)
    assert not list((tmp_path / "out").glob("**/*.parquet"))
