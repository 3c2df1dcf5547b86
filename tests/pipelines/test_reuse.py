"""Reuse across runs and once per unique thing within a run, end to end on tiny checkpoints (fp32, CPU).

Day 1 is a catalog with shared images and an exact duplicate pair; day 2 changes a text, an
image, adds a row and deletes one. Day 2 with ``--reuse`` of day 1 must equal day 2 scored fresh,
while sending the models only what changed.
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import draw_shape, sample_catalog
from jobs.score import main as score_main
from pipelines.config import ConfigError, build_config
from pipelines.dataflow import dedup
from pipelines.reuse import passes
from pipelines.reuse.sources import MANIFEST_KEYS, open_source
from pipelines.run import run_job
from tests.conftest import write_catalog

MAX_NEW_TOKENS = 4
VALUES = ["itc_score", "itm_score", "caption", "flagged", "flag_reasons", "status", "error", "text_truncated",
          "image_sha256", "text_sha256", "caption_agreement", "text_language", "evidence"]
NUMBERS = ("itc_score", "itm_score", "caption_agreement")


def _day1() -> list[dict]:
    records = sample_catalog(16, seed=5)
    for record in records:
        record.pop("expected")
    # Listings sharing a photo with other texts (each image captioned once), and one exact duplicate pair.
    records += [dict(records[i], id=f"shared-{i}", text=f"listing {i} again") for i in (0, 2, 3)]
    records.append(dict(records[4], id="same-pair"))
    records.append({"id": "no-image", "text": "a red circle", "image": None})
    records.append({"id": "no-text", "text": None, "image": records[0]["image"]})
    return records


def _day2(day1: list[dict]) -> list[dict]:
    records = [dict(r) for r in day1 if r["id"] != "item-0007"]  # deleted
    by_id = {r["id"]: r for r in records}
    by_id["item-0002"]["text"] = "a changed title"
    by_id["item-0003"]["image"] = draw_shape("yellow", "circle", size=(77, 55))
    records.append({"id": "new-row", "text": "a green square", "image": draw_shape("green", "square", size=(60, 90))})
    return records


def _config(tiny_itm, tiny_caption, catalog, output, **overrides):
    values = dict(input=str(catalog), output=str(output), itm_model=tiny_itm, caption_model=tiny_caption,
                  device="cpu", max_new_tokens=MAX_NEW_TOKENS, score_batch_size=6, caption_batch_size=6,
                  decode_batch_size=5)
    return build_config(dict(values, **overrides))


@pytest.fixture(scope="module")
def days(ray_session, tiny_itm, tiny_caption, tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    day1, day2 = _day1(), None
    day2 = _day2(day1)
    cat1 = write_catalog(root / "day1", day1, files=2)
    cat2 = write_catalog(root / "day2", day2, files=2)
    run = lambda catalog, out, **kw: run_job(_config(tiny_itm, tiny_caption, catalog, root / out, **kw))  # noqa: E731
    first = run(cat1, "d1")
    # Day 1 again, committed as a Delta table, then copied: the source day 2 reuses is a Delta table
    # at another path than it was written to (the Parquet source is d1, reused by d2-tokens and audits).
    delta_first = run(cat1, "d1-delta", output_format="delta")
    shutil.copytree(root / "d1-delta", root / "moved")
    fresh = run(cat2, "d2-fresh")
    # Day 2 with titles long enough to tell their language (one German, twice: a duplicate pair),
    # through the row-by-row graph and the keyed plan, every row explained.
    photo = draw_shape("blue", "triangle", size=(70, 64))
    titles = [("de-1", "Wasserdichte Wanderschuhe für Herren aus braunem Leder"), ("de-2", "Wasserdichte Wanderschuhe für Herren aus braunem Leder"),
              ("en-1", "Red leather sofa for the living room")]
    cat3 = write_catalog(root / "day2-titles", day2 + [{"id": i, "text": t, "image": photo} for i, t in titles], files=2)
    run(cat3, "d2-rowwise", dedup=False, evidence="all")
    run(cat3, "d2-keyed-all", evidence="all")
    saved = passes.KEYS_PER_BUCKET
    passes.KEYS_PER_BUCKET = 7  # several buckets: the plan must not depend on how keys are split
    try:
        reused = run(cat2, "d2-reuse", reuse=str(root / "moved"))
    finally:
        passes.KEYS_PER_BUCKET = saved
    longer = run(cat2, "d2-tokens", reuse=[str(root / "d1")], max_new_tokens=MAX_NEW_TOKENS + 1)
    return dict(root=root, day1=day1, day2=day2, first=first, fresh=fresh, reused=reused, longer=longer,
                delta_first=delta_first)


def _rows(output) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(output).to_pylist()}


def _assert_same_rows(expected: dict, got: dict):
    assert sorted(expected) == sorted(got)
    for key, row in expected.items():
        other = got[key]
        for column in VALUES:
            if column in NUMBERS and row[column] is not None:
                # Reused values were computed in other batches: equal up to float summation order.
                assert other[column] == pytest.approx(row[column], abs=1e-5), (key, column)
            elif column == "evidence" and row[column] is not None:
                assert other[column] is not None, key
                assert (other[column]["rows"], other[column]["cols"], other[column]["layer"]) == (
                    row[column]["rows"], row[column]["cols"], row[column]["layer"])
                assert other[column]["heat"] == pytest.approx(row[column]["heat"], rel=1e-4, abs=1e-9), key
                assert [w["word"] for w in other[column]["words"]] == [w["word"] for w in row[column]["words"]], key
            else:
                assert other[column] == row[column], (key, column)


def test_a_run_with_reuse_equals_a_fresh_run_row_for_row(days):
    fresh, reused = _rows(days["root"] / "d2-fresh"), _rows(days["root"] / "d2-reuse")
    assert sorted(fresh) == sorted(r["id"] for r in days["day2"])
    _assert_same_rows(fresh, reused)


def test_the_keyed_plan_equals_the_row_by_row_graph_in_every_column(days):
    """Dedup collapses duplicates and computes language and agreement per row in its last pass: the
    result must be the row-by-row graph's, evidence maps, caption agreement and languages included."""
    rowwise, keyed = _rows(days["root"] / "d2-rowwise"), _rows(days["root"] / "d2-keyed-all")
    assert any(r["evidence"] is not None for r in rowwise.values())
    assert any(r["caption_agreement"] is not None for r in rowwise.values())
    assert rowwise["de-1"]["text_language"] == "de" and "text_language_unsupported" in rowwise["de-1"]["flag_reasons"]
    assert rowwise["en-1"]["text_language"] == "en"
    _assert_same_rows(rowwise, keyed)
    # With the default policy only rows flagged by score carry a map.
    for row in _rows(days["root"] / "d2-fresh").values():
        by_score = {"itm_below_threshold", "itc_below_threshold"} & set(row["flag_reasons"])
        assert (row["evidence"] is not None) == bool(by_score and row["status"] == "ok"), row["id"]


def test_only_what_changed_reaches_the_models(days):
    first, reused = days["first"], days["reused"]
    assert reused.reuse["pairs_scored"] == 3  # changed text, changed image, new row
    assert reused.reuse["images_captioned"] == 2  # changed image, new row
    scored_day2 = sum(1 for r in _rows(days["root"] / "d2-reuse").values() if r["status"] == "ok")
    assert reused.reuse["rows_scores_reused"] == scored_day2 - 3
    # Day 1 sent the scorer its unique pairs only (one exact duplicate) and the captioner its unique images.
    assert first.reuse["duplicate_rows_collapsed"] == 1
    ok_pairs = sum(1 for r in _rows(days["root"] / "d1").values() if r["status"] == "ok")
    assert first.reuse["pairs_scored"] == ok_pairs - 1
    manifest = json.loads((days["root"] / "d2-reuse" / "_manifest.json").read_text())
    assert manifest["reuse"]["pairs_scored"] == 3 and manifest["reuse"]["sources"] == [str(days["root"] / "moved")]
    assert manifest[MANIFEST_KEYS]["score"] and manifest[MANIFEST_KEYS]["caption"]
    summary_row = pq.read_table(days["root"] / "d2-reuse" / "_runs").to_pylist()[0]
    assert (summary_row["pairs_scored"], summary_row["rows_scores_reused"]) == (3, scored_day2 - 3)
    assert "3 pairs scored" in reused.render()


def test_a_delta_output_is_a_reuse_source_like_a_parquet_one(days):
    """Day 2's source (``moved``) is a Delta table: the run above sent the models only what changed
    (test_only_what_changed_reaches_the_models) and equals day 2 fresh (test_a_run_with_reuse_...);
    a Parquet source of the same day 1 reuses exactly as many rows."""
    assert (days["root"] / "moved" / "_delta_log").is_dir() and not (days["root"] / "moved" / "_manifest.json").exists()
    assert days["reused"].reuse["rows_scores_reused"] == days["longer"].reuse["rows_scores_reused"] > 0
    rows = _rows(days["root"] / "d2-reuse")
    assert rows["item-0000"]["scores_from_run"] == days["delta_first"].run_id != days["first"].run_id


def test_provenance_changed_text_changed_image_and_copied_source(days):
    first_id, reuse_id = days["delta_first"].run_id, days["reused"].run_id  # the source is d1-delta, copied
    rows = _rows(days["root"] / "d2-reuse")
    changed_text, changed_image = rows["item-0002"], rows["item-0003"]
    assert changed_text["scores_from_run"] == reuse_id and changed_text["caption_from_run"] == first_id
    assert changed_image["scores_from_run"] == reuse_id and changed_image["caption_from_run"] == reuse_id
    assert rows["new-row"]["scores_from_run"] == reuse_id
    day1 = _rows(days["root"] / "d1-delta")  # one commit: its directory holds exactly the committed files
    unchanged = rows["item-0000"]
    # Copied to another path, the source still reused everything unchanged, scored_at included.
    assert unchanged["scores_from_run"] == unchanged["caption_from_run"] == first_id
    assert unchanged["scored_at"] == day1["item-0000"]["scored_at"] and unchanged["run_id"] == reuse_id


def test_duplicates_are_collapsed_then_expanded_to_every_row(days):
    rows = _rows(days["root"] / "d1")
    for column in VALUES:
        assert rows["same-pair"][column] == rows["item-0004"][column], column
    for i in (0, 2, 3):
        assert rows[f"shared-{i}"]["caption"] == rows[f"item-000{i}"]["caption"] is not None
        assert rows[f"shared-{i}"]["image_sha256"] == rows[f"item-000{i}"]["image_sha256"]


def test_null_images_and_texts_never_match(days):
    rows = _rows(days["root"] / "d2-reuse")
    no_image, no_text = rows["no-image"], rows["no-text"]
    assert no_image["image_sha256"] is None and no_image["scores_from_run"] is None and no_image["status"] == "image_error"
    assert no_text["text_sha256"] is None and no_text["scores_from_run"] is None and no_text["status"] == "text_error"
    assert no_text["itc_score"] is None  # its image matched a day-1 pair, its missing text matched nothing


def test_another_generation_length_reuses_scores_but_no_caption(days):
    longer = days["longer"]
    assert longer.reuse["rows_captions_reused"] == 0 and longer.reuse["rows_scores_reused"] == days["reused"].reuse["rows_scores_reused"]


def _source(tmp_path, digests, columns=True):
    """A committed output on disk, with or without the key columns, for the plan's source pass."""
    table = pa.table({
        "image_sha256": ["a" * 64], "text_sha256": ["b" * 64], "status": ["ok"], "itc_score": pa.array([0.5], pa.float32()),
        "itm_score": pa.array([0.9], pa.float32()), "text_truncated": [False],
        "scored_at": pa.array([None], pa.timestamp("us", tz="UTC")), "scores_from_run": ["r0"], "caption": ["c"],
        "caption_from_run": ["r0"],
    })
    if not columns:
        table = table.drop_columns(["image_sha256", "text_sha256", "scores_from_run", "caption_from_run"])
    tmp_path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp_path / "part-r0-x.parquet")
    manifest = {"run_id": "r0", "key": "k", "files": ["part-r0-x.parquet"]}
    if digests:
        manifest[MANIFEST_KEYS] = digests
    (tmp_path / "_manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "_SUCCESS").write_text(json.dumps({"run_id": "r0"}))
    return open_source(str(tmp_path))


def test_sources_of_other_settings_or_the_old_schema_match_nothing(tmp_path):
    ours = {"score": "S", "caption": "C"}
    matching = _source(tmp_path / "same", ours)
    assert dedup._source_items([matching], ours)[1] == {"score": [matching.uri], "caption": [matching.uri]}
    for source in (_source(tmp_path / "other", {"score": "S2", "caption": "C2"}), _source(tmp_path / "old", None)):
        items, matched = dedup._source_items([source], ours)
        assert items == [] and matched == {"score": [], "caption": []}
    # Digests that match but files without the key columns (written before keys existed): nothing offered.
    old_files = _source(tmp_path / "old-files", ours, columns=False)
    items, _ = dedup._source_items([old_files], ours)
    offered = passes.source_file(pa.Table.from_pylist(items), digests=ours, work_fs=pa.fs.LocalFileSystem(),
                                 work=str(tmp_path / "work"), buckets=1)
    assert offered.to_pylist() == [{"offered_scores": 0, "offered_captions": 0, "files_without_embeddings": 0}]
    items, _ = dedup._source_items([matching], ours)
    offered = passes.source_file(pa.Table.from_pylist(items), digests=ours, work_fs=pa.fs.LocalFileSystem(),
                                 work=str(tmp_path / "work"), buckets=1)
    assert offered.to_pylist() == [{"offered_scores": 1, "offered_captions": 1, "files_without_embeddings": 0}]
    # A run asking for embeddings: a file without them serves its captions, never its scores.
    offered = passes.source_file(pa.Table.from_pylist(items), digests=ours, work_fs=pa.fs.LocalFileSystem(),
                                 work=str(tmp_path / "work-embeddings"), buckets=1, embeddings="image")
    assert offered.to_pylist() == [{"offered_scores": 0, "offered_captions": 1, "files_without_embeddings": 1}]


def test_a_missing_or_uncommitted_source_exits_2_before_any_model_loads(tmp_path, capsys):
    catalog = write_catalog(tmp_path / "catalog", [{"id": "a", "text": "t", "image": b"x"}], files=1)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "_manifest.json").write_text("{}")  # no _SUCCESS: not committed
    for source, words in ((tmp_path / "gone", "does not exist"), (tmp_path / "half", "no committed result")):
        # The model path is wrong too: the source is named, so it was checked before any model.
        code = score_main(["--input", str(catalog), "--output", str(tmp_path / "out"), "--itm-model", "/no/such/model",
                           "--caption-model", "none", "--reuse", f"{source}"])
        err = capsys.readouterr().err
        assert code == 2 and str(source) in err and words in err, err


def test_reuse_from_yaml_list_and_cli_string(tmp_path):
    assert build_config({"input": "i", "output": "o", "reuse": ["a", "s3://b/c"]}).reuse == ("a", "s3://b/c")
    assert build_config({"input": "i", "output": "o", "reuse": "a, b"}).reuse == ("a", "b")
    assert build_config({"input": "i", "output": "o", "reuse": "none"}).reuse == ()
    with pytest.raises(ConfigError, match="flagged"):
        build_config({"input": "i", "output": "o", "reuse": "a", "captions": "flagged"})
    with pytest.raises(ConfigError, match="dedup"):
        build_config({"input": "i", "output": "o", "reuse": "a", "dedup": False})
    from jobs.score import config_from_args, make_parser

    args = make_parser().parse_args(["--input", "i", "--output", "o", "--no-dedup"])
    assert config_from_args(args).dedup is False
    args = make_parser().parse_args(["--input", "i", "--output", "o", "--reuse", "a,s3://b/c"])
    assert config_from_args(args).reuse == ("a", "s3://b/c") and config_from_args(args).dedup


def test_audit_takes_the_same_reuse_sources(days, tiny_itm, tiny_caption):
    from jobs.audit import audit

    frame = audit(str(days["root"] / "day2"), itm_model=tiny_itm, caption_model=tiny_caption, device="cpu",
                  max_new_tokens=MAX_NEW_TOKENS, reuse=[str(days["root"] / "d1-delta"), str(days["root"] / "d1")])
    rows = {r["id"]: r for r in frame.to_dict("records")}
    batch = _rows(days["root"] / "d2-reuse")
    first_id, delta_id = days["first"].run_id, days["delta_first"].run_id
    # The Delta table is listed first, so it wins: its run computed the unchanged rows' values.
    assert rows["item-0000"]["scores_from_run"] == rows["item-0000"]["caption_from_run"] == delta_id
    assert rows["item-0002"]["scores_from_run"] not in (first_id, delta_id)  # changed text: computed by the audit
    for key, row in batch.items():
        assert rows[key]["flagged"] == row["flagged"] and list(rows[key]["flag_reasons"]) == row["flag_reasons"], key
        if row["scores_from_run"] == delta_id:
            assert rows[key]["itm_score"] == pytest.approx(row["itm_score"], abs=1e-6)
