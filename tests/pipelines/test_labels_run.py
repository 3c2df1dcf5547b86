"""Labels end to end (Ray, tiny checkpoints, fp32 CPU): the keyed plan equals the row-by-row graph,
labels are computed once per unique (image, declared category), and reuse equals a fresh run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from blip_ops.samples import draw_shape, sample_catalog
from pipelines.config import build_config
from pipelines.run import run_job
from tests.conftest import write_catalog

LABELS = {
    "categories": {"column": "category", "names": ["red circle", "blue square", "green triangle", "dog", "sofa"],
                   "aliases": {"couch": "sofa"}, "top_k": 2, "threshold": 0.5},
    "policies": [{"name": "weapon", "prompts": ["a photo of a gun", "a knife"], "threshold": 0.3},
                 {"name": "smoke", "prompts": ["smoke"], "threshold": 0.9}],
}
LABEL_VALUES = ["category_predicted", "category_score", "category_rank", "labels", "flag_reasons", "flagged", "status"]


def _day1() -> list[dict]:
    records = sample_catalog(8, seed=7)
    categories = ["red circle", "Couch", "sofa", None, "bed", "  ", "dog", "blue square"]
    for record, category in zip(records, categories):
        record.pop("expected")
        record["category"] = category
    # The same photo under other texts: same category (one label computation), another category (two).
    records += [dict(records[0], id="same-image-same-category", text="another title"),
                dict(records[0], id="same-image-other-category", text="another title", category="dog"),
                dict(records[1], id="alias-equals-name", text="third title", category="SOFA"),
                dict(records[2], id="exact-duplicate")]
    records.append({"id": "no-image", "text": "a red circle", "image": None, "category": "dog"})
    return records


def _config(tiny_itm, catalog, output, **overrides):
    values = dict(input=str(catalog), output=str(output), itm_model=tiny_itm, caption_model=None, device="cpu",
                  score_batch_size=5, decode_batch_size=4, labels=LABELS, evidence="none", text_languages="any")
    return build_config(dict(values, **overrides))


@pytest.fixture(scope="module")
def runs(ray_session, tiny_itm, tmp_path_factory):
    root = tmp_path_factory.mktemp("labels-run")
    day1 = _day1()
    day2 = [dict(r) for r in day1 if r["id"] != "item-0005"]
    day2.append({"id": "new", "text": "a green square", "image": draw_shape("green", "square", size=(60, 70)), "category": "sofa"})
    day2[3] = dict(day2[3], category="green triangle")  # a changed category: labelled again, scores reused
    cat1, cat2 = write_catalog(root / "c1", day1, files=2), write_catalog(root / "c2", day2, files=2)
    out = {}
    out["rowwise"] = run_job(_config(tiny_itm, cat1, root / "rowwise", dedup=False))
    out["keyed"] = run_job(_config(tiny_itm, cat1, root / "keyed"))
    out["fresh2"] = run_job(_config(tiny_itm, cat2, root / "fresh2"))
    # Other thresholds: the same label key (thresholds only decide flags).
    out["reused2"] = run_job(_config(tiny_itm, cat2, root / "reused2", reuse=str(root / "keyed")))
    out["nolabels"] = run_job(_config(tiny_itm, cat2, root / "nolabels", labels=None, reuse=str(root / "keyed")))
    return root, out, day1


def _rows(path) -> dict:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def _same_labels(expected: dict, got: dict):
    assert sorted(expected) == sorted(got)
    for key, row in expected.items():
        for column in LABEL_VALUES:
            a, b = row[column], got[key][column]
            if column == "category_score" and a is not None:
                assert b == pytest.approx(a, abs=1e-5), key
            elif column == "labels" and a is not None:
                assert [(i["name"], i["kind"]) for i in a] == [(i["name"], i["kind"]) for i in b], key
                for x, y in zip(a, b):
                    assert (y["itc"], y["itm"]) == pytest.approx((x["itc"], x["itm"]), abs=1e-5), key
            else:
                assert a == b, (key, column)


def test_the_keyed_plan_equals_the_row_by_row_graph_for_the_label_columns(runs):
    root, _, _ = runs
    rowwise, keyed = _rows(root / "rowwise"), _rows(root / "keyed")
    _same_labels(rowwise, keyed)
    assert "category_unknown" in rowwise["item-0004"]["flag_reasons"]  # "bed"
    assert "category_unknown" not in rowwise["item-0005"]["flag_reasons"]  # blank: not checked
    assert rowwise["no-image"]["labels"] is None and rowwise["no-image"]["status"] == "image_error"
    assert rowwise["item-0003"]["category_score"] is None and rowwise["item-0003"]["labels"]
    # An alias and its name: the same category, the same labels.
    assert rowwise["item-0001"]["category_score"] == rowwise["alias-equals-name"]["category_score"] is not None
    assert any("policy:weapon" in r["flag_reasons"] for r in rowwise.values())  # the tiny model's weapon is everywhere


def test_labels_are_computed_once_per_unique_image_and_category(runs):
    root, out, day1 = runs
    reuse = json.loads((root / "keyed" / "_manifest.json").read_text())["reuse"]
    scorable = [r for r in day1 if r["image"] is not None]
    from pipelines.labels import LabelSet, parse_labels

    labels = LabelSet(parse_labels(LABELS))
    unique = {(r["image"], labels.key_token(r["category"])) for r in scorable}
    status = {r["id"]: r["status"] for r in _rows(root / "keyed").values()}
    decodable = {(r["image"], labels.key_token(r["category"])) for r in scorable if status[r["id"]] == "ok"}
    assert reuse["unique_labels"] == len(unique) and reuse["duplicate_labels_collapsed"] == len(scorable) - len(unique)
    # An undecodable image's key is computed too (it says image_error) but gets no labels.
    assert reuse["labels_computed"] == len(decodable) < len(scorable)
    manifest = json.loads((root / "keyed" / "_manifest.json").read_text())
    assert manifest["content_keys"]["label"] and manifest["schema_version"] == 3


def test_reuse_equals_fresh_and_labels_only_what_changed(runs):
    root, out, _ = runs
    _same_labels(_rows(root / "fresh2"), _rows(root / "reused2"))
    reuse = json.loads((root / "reused2" / "_manifest.json").read_text())["reuse"]
    # New: the new row's image, and item-0003's image under its changed category.
    assert reuse["labels_computed"] == 2
    assert reuse["rows_labels_reused"] > 0
    # Without labels the same source's scores are reused and the label columns are null.
    plain = _rows(root / "nolabels")
    assert all(r["labels"] is None and r["category_predicted"] is None for r in plain.values())
    assert json.loads((root / "nolabels" / "_manifest.json").read_text())["reuse"]["pairs_scored"] == 1
