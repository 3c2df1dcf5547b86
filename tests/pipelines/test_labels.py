"""The label file contract (pipelines.labels), the label flags, and labels through the score stage."""

import json

import numpy as np
import pyarrow as pa
import pytest

from blip_ops.samples import sample_catalog
from jobs import score
from pipelines import schema as S
from pipelines.config import ConfigError, build_config
from pipelines.dataflow import stages
from pipelines.dataflow.labelling import as_json
from pipelines.labels import LabelError, LabelSet, content_digest, parse_labels
from tests.conftest import write_catalog

GOOD = {
    "categories": {"column": "category", "names": ["sofa", "Running Shoes", "phone case"], "aliases": {"couch": "sofa"},
                   "top_k": 2, "threshold": 0.5},
    "policies": [{"name": "weapon", "prompts": ["a photo of a gun", "a photo of a knife"], "threshold": 0.8}],
}


def _with(path: str, value):
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is _DROP:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


_DROP = object()


def test_a_good_file_parses_with_defaults(tmp_path):
    parsed = parse_labels(GOOD)
    assert parsed["prompt"] == "a picture of {}"
    assert parsed["categories"]["names"] == ["sofa", "Running Shoes", "phone case"]
    assert parsed["categories"]["aliases"] == {"couch": "sofa"}
    assert parse_labels(parsed) == parsed  # idempotent: a parsed file travels through config and back
    path = tmp_path / "labels.yaml"
    path.write_text(json.dumps(GOOD))
    assert parse_labels(str(path)) == parsed


@pytest.mark.parametrize("path, value, key", [
    ("colour", "red", "colour: unknown key"),
    ("categories.colour", "red", "categories.colour: unknown key"),
    ("policies.0.colour", "red", "policies[0].colour: unknown key"),
    ("categories.names", ["sofa", " "], "categories.names[1]: empty name"),
    ("categories.names", [], "categories.names: no names"),
    ("categories.names", ["sofa", "SOFA "], "categories.names[1]: duplicate name"),
    ("categories.column", _DROP, "categories.column: missing"),
    ("categories.threshold", 1.5, "categories.threshold: must be in [0, 1]"),
    ("categories.threshold", -0.1, "categories.threshold: must be in [0, 1]"),
    ("policies.0.threshold", 2, "policies[0].threshold: must be in [0, 1]"),
    ("categories.top_k", 0, "categories.top_k: must be an integer of at least 1"),
    ("categories.aliases", {"couch": "bed"}, "categories.aliases.couch: 'bed' is not one of the names"),
    ("categories.aliases", {"Sofa": "phone case"}, "categories.aliases.Sofa: 'Sofa' is already a name"),
    ("policies.0.name", " ", "policies[0].name: empty name"),
    ("policies.0.prompts", [], "policies[0].prompts: must be a non-empty list"),
    ("prompt", "a {} of {}", "prompt: must be a text with at most one {}"),
    ("policies.0.itc_gate", 1.5, "policies[0].itc_gate: must be a cosine in [-1, 1]"),
])
def test_every_bad_file_names_its_key(path, value, key):
    with pytest.raises(LabelError, match=None) as info:
        parse_labels(_with(path, value))
    assert str(info.value).startswith(key), str(info.value)


def test_duplicate_policies_and_file_names(tmp_path):
    bad = dict(GOOD, policies=GOOD["policies"] * 2)
    with pytest.raises(LabelError, match=r"^policies\[1\]\.name: duplicate policy"):
        parse_labels(bad)
    (tmp_path / "taxonomy.txt").write_text("# comment\nsofa\n\nbed\n Bed\n")
    with pytest.raises(LabelError, match=r"^categories\.file\[2\]: duplicate name 'Bed'"):
        parse_labels({"categories": {"column": "c", "file": str(tmp_path / "taxonomy.txt")}})


def test_a_ten_thousand_name_file_relative_to_the_label_file(tmp_path):
    names = [f"item {i:05d}" for i in range(10_000)]
    (tmp_path / "taxonomy.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "labels.yaml").write_text("categories:\n  column: category\n  file: taxonomy.txt\n  top_k: 3\n")
    parsed = parse_labels(str(tmp_path / "labels.yaml"))
    labels = LabelSet(parsed)
    assert len(labels.names) == 10_000 and labels.declared_index("  ITEM 09999 ") == 9_999
    assert len(labels.category_prompts()) == 10_000


def test_names_match_after_strip_and_casefold():
    labels = LabelSet(parse_labels(GOOD))
    assert labels.declared_index(" RUNNING shoes ") == 1
    assert labels.declared_index("Couch") == 0  # an alias
    assert labels.declared_index("STRASSE") == -1
    assert labels.declared_index("") is None and labels.declared_index(None) is None and labels.declared_index("  ") is None
    assert labels.key_token("couch") == labels.key_token("SOFA") == "sofa"
    assert labels.key_token("bed") == labels.key_token(None) == "-"


def test_the_content_digest_leaves_out_thresholds_only():
    base = content_digest(parse_labels(GOOD))
    assert content_digest(parse_labels(_with("categories.threshold", 0.9))) == base
    assert content_digest(parse_labels(_with("policies.0.threshold", 0.1))) == base
    assert content_digest(parse_labels(_with("categories.column", "cat"))) == base
    for path, value in [("categories.names", ["sofa", "running shoes", "phone case", "bed"]),
                        ("categories.aliases", {"settee": "sofa"}), ("categories.top_k", 3),
                        ("policies.0.prompts", ["a gun"]), ("prompt", "a photo of {}"), ("policies.0.itc_gate", 0.2)]:
        assert content_digest(parse_labels(_with(path, value))) != base, path


def test_config_cli_and_yaml_block(tmp_path):
    config = build_config({"input": "x", "output": "y", "labels": GOOD})
    assert config.labels["categories"]["top_k"] == 2
    assert build_config({"input": "x", "output": "y", "labels": "none"}).labels is None
    with pytest.raises(ConfigError, match=r"labels: categories\.top_k: must be an integer"):
        build_config({"input": "x", "output": "y", "labels": _with("categories.top_k", 0)})


def test_a_bad_label_file_exits_2_before_any_model_loads(tmp_path, capsys):
    catalog = write_catalog(tmp_path / "in", sample_catalog(2, seed=1), files=1)
    (tmp_path / "labels.yaml").write_text("categories:\n  column: category\n  names: [sofa, sofa]\n")
    code = score.main(["--input", str(catalog), "--output", str(tmp_path / "o"), "--itm-model", str(tmp_path / "none"),
                       "--labels", str(tmp_path / "labels.yaml")])
    assert code == 2
    assert "labels: categories.names[1]: duplicate name" in capsys.readouterr().err
    # A good file whose column the input lacks: exit 2, naming the key.
    (tmp_path / "labels.yaml").write_text("categories:\n  column: category\n  names: [sofa]\n")
    code = score.main(["--input", str(catalog), "--output", str(tmp_path / "o"), "--itm-model", str(tmp_path / "none"),
                       "--labels", str(tmp_path / "labels.yaml")])
    assert code == 2
    assert "no column 'category' (set by --labels (categories.column))" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _flag_batch(declared, predicted, score, labels, labels_file=GOOD):
    n = len(declared)
    batch = pa.table({
        "category": pa.array(declared, pa.string()),
        S.IMAGE_ERROR: pa.nulls(n, pa.string()), S.TEXT_ERROR: pa.nulls(n, pa.string()),
        "itc_score": pa.array([0.5] * n, pa.float32()), "itm_score": pa.array([0.9] * n, pa.float32()),
        "category_predicted": pa.array(predicted, pa.string()),
        "category_score": pa.array(score, pa.float32()),
        "labels": pa.array(labels, S.LABELS_TYPE),
    })
    out = stages.flag_batch(batch, itm_threshold=0.5, itc_threshold=0.2, labels=as_json(parse_labels(labels_file)))
    return out.column("flag_reasons").to_pylist()


def _weapon(itm):
    return [{"name": "weapon", "kind": "policy", "itc": 0.1, "itm": itm}]


def test_label_flags_follow_the_definitions():
    reasons = _flag_batch(
        declared=["sofa", "Couch", "sofa", "sofa", "bed", None, "  ", "phone case", "sofa"],
        predicted=["phone case", "phone case", "phone case", "sofa", "sofa", "sofa", "sofa", "phone case", "phone case"],
        score=[0.2, 0.2, 0.5, 0.1, None, None, None, 0.9, 0.49],
        labels=[_weapon(0.1), _weapon(0.1), _weapon(0.1), _weapon(0.1), _weapon(0.1), _weapon(0.8), _weapon(0.79),
                _weapon(0.95), _weapon(0.1)],
    )
    assert reasons == [
        ["category_mismatch"],  # known, another predicted, below the threshold
        ["category_mismatch"],  # the alias means sofa
        [],  # at the threshold: not below it
        [],  # predicted is the declared one, however low
        ["category_unknown"],  # neither a name nor an alias
        ["policy:weapon"],  # null category: not checked; a policy at its threshold
        [],  # a blank category is not checked; 0.79 < 0.8
        ["policy:weapon"],  # the declared one predicted
        ["category_mismatch"],
    ]


def test_label_flags_join_the_score_reasons_and_skip_error_rows():
    batch = pa.table({
        "category": pa.array(["sofa", "bed"]), S.IMAGE_ERROR: pa.array([None, "broken"]), S.TEXT_ERROR: pa.nulls(2, pa.string()),
        "itc_score": pa.array([0.1, None], pa.float32()), "itm_score": pa.array([0.9, None], pa.float32()),
        "category_predicted": pa.array(["bed", None]), "category_score": pa.array([0.1, None], pa.float32()),
        "labels": pa.nulls(2, S.LABELS_TYPE),
    })
    out = stages.flag_batch(batch, itm_threshold=0.5, itc_threshold=0.2, labels=as_json(parse_labels(
        {"categories": {"column": "category", "names": ["sofa", "bed"]}})))
    assert out.column("flag_reasons").to_pylist() == [[S.REASON_ITC, "category_mismatch"], ["image_error"]]


def test_without_labels_the_columns_are_null_and_typed():
    batch = pa.table({"id": ["a"], "text": ["x"], "itc_score": pa.array([0.1], pa.float32()), "caption": pa.nulls(1, pa.string()),
                      "flagged": [False], "flag_reasons": pa.array([[]], pa.list_(pa.string())), "status": ["ok"],
                      "error": pa.nulls(1, pa.string()), "itm_score": pa.array([0.5], pa.float32()),
                      "text_truncated": [False]})
    out = stages.finalize_batch(batch, passthrough=["id", "text"], run_id="r", itm_model="m", caption_model=None)
    for field in S.LABEL_FIELDS:
        assert out.schema.field(field.name).type == field.type
        assert out.column(field.name).null_count == 1


def test_score_stage_labels_scored_rows_only(tiny_itm):
    """In process: the stage's label columns for a batch with a broken image, a null and an alias category."""
    records = sample_catalog(4, seed=3)
    records[1]["image"] = b"not an image"
    table = pa.table({
        "id": [r["id"] for r in records], "text": [r["text"] for r in records],
        "image": pa.array([r["image"] for r in records], pa.binary()),
        "category": pa.array(["Couch", "sofa", None, "bed"]),
    })
    labels = as_json(parse_labels({
        "categories": {"column": "category", "names": ["sofa", "dog", "red circle"], "aliases": {"couch": "sofa"}, "top_k": 1},
        "policies": [{"name": "weapon", "prompts": ["a gun", "a knife"]}],
    }))
    decoded = stages.decode_batch(table, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm,
                                  caption_model=None)
    stage = stages.ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text", labels=labels)
    assert stage.label_setup_s() > 0
    out = stage(decoded)
    rows = out.select(S.LABEL_COLUMNS).to_pylist()
    assert rows[1] == {"category_predicted": None, "category_score": None, "category_rank": None, "labels": None}
    assert rows[0]["category_score"] is not None and 1 <= rows[0]["category_rank"] <= 3  # the alias is sofa
    assert {item["name"] for item in rows[0]["labels"] if item["kind"] == "category"} >= {"sofa"}
    assert rows[2]["category_score"] is None and rows[2]["category_predicted"] is not None  # no category: no score
    assert rows[3]["category_score"] is None and rows[3]["category_rank"] is None  # unknown: no score
    assert [item["kind"] for item in rows[3]["labels"]].count("policy") == 1
    assert len([i for i in rows[3]["labels"] if i["kind"] == "category"]) == 1  # top_k 1, nothing declared known
    flagged = stages.flag_batch(out, itm_threshold=None, itc_threshold=None, labels=labels).column("flag_reasons").to_pylist()
    assert "category_unknown" in flagged[3] and flagged[1] == ["image_error"]


def test_score_stage_with_labels_embeddings_and_evidence_fills_every_column(tiny_itm):
    """In process: labels, --embeddings both and evidence all in one stage (one scoring pass serves the three):
    every label and embedding column filled for the scored rows, null for the broken image, and the same
    values as a stage asked for labels alone and one asked for embeddings alone."""
    from pipelines.vectors import to_numpy

    records = sample_catalog(4, seed=5)
    records[2]["image"] = b"not an image"
    table = pa.table({
        "id": [r["id"] for r in records], "text": [r["text"] for r in records],
        "image": pa.array([r["image"] for r in records], pa.binary()),
        "category": pa.array(["sofa", "dog", "sofa", "red circle"]),
    })
    labels = as_json(parse_labels({
        "categories": {"column": "category", "names": ["sofa", "dog", "red circle"], "top_k": 2},
        "policies": [{"name": "weapon", "prompts": ["a gun", "a knife"]}],
    }))
    common = dict(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")

    def run(**kwargs):
        decoded = stages.decode_batch(table, text_column="text", image_column="image", from_uri=False,
                                      score_model=tiny_itm, caption_model=None)
        return stages.ScoreStage(**common, **kwargs)(decoded)

    out = run(labels=labels, embeddings="both", evidence="all")
    scored = [0, 1, 3]
    rows = out.select(S.LABEL_COLUMNS).to_pylist()
    for i in scored:
        assert all(rows[i][name] is not None for name in S.LABEL_COLUMNS), rows[i]
    assert all(value is None for value in rows[2].values())
    evidence = out.column("evidence").to_pylist()
    assert all(evidence[i] is not None for i in scored) and evidence[2] is None
    vectors = {}
    for name in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        values, valid = to_numpy(out.column(name))
        assert valid.tolist() == [True, True, False, True], name
        assert np.all(np.abs(values[scored]).sum(axis=1) > 0), name
        vectors[name] = values
    # The products are the scores (float16 rounding), and nothing differs from the single-feature stages.
    dots = (vectors[S.IMAGE_EMBEDDING][scored].astype(np.float32) * vectors[S.TEXT_EMBEDDING][scored]).sum(axis=1)
    np.testing.assert_allclose(dots, out.column("itc_score").to_numpy(zero_copy_only=False)[scored], atol=1e-2)
    alone = run(labels=labels)
    assert [r["category_predicted"] for r in alone.select(S.LABEL_COLUMNS).to_pylist()] == [
        r["category_predicted"] for r in rows]
    np.testing.assert_allclose(
        [rows[i]["category_score"] for i in scored],
        [alone.column("category_score")[i].as_py() for i in scored], atol=1e-5,
    )
    embedded = run(embeddings="both")
    for name in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        np.testing.assert_allclose(to_numpy(embedded.column(name))[0][scored].astype(np.float32),
                                   vectors[name][scored].astype(np.float32), atol=2e-3)


def test_nightly_and_audit_take_labels_and_refuse_bad_ones(tmp_path, capsys):
    import pandas as pd

    from jobs import nightly
    from jobs.audit import audit

    (tmp_path / "labels.yaml").write_text("categories:\n  column: category\n  names: [sofa]\n  top_k: 0\n")
    code = nightly.main(["--catalog", str(tmp_path), "--output", str(tmp_path / "out"), "--labels", str(tmp_path / "labels.yaml")])
    assert code == 2 and "labels: categories.top_k: must be an integer of at least 1" in capsys.readouterr().err
    frame = pd.DataFrame({"id": ["a"], "text": ["x"], "image": [b"x"], "category": ["sofa"]})
    with pytest.raises(ConfigError, match=r"labels: policies\[0\]\.threshold: must be in \[0, 1\]"):
        audit(frame, labels={"policies": [{"name": "weapon", "prompts": ["a gun"], "threshold": 1.5}]})


def test_a_gated_out_policy_is_never_flagged():
    gated = [{"name": "weapon", "kind": "policy", "itc": 0.1, "itm": None}]
    assert _flag_batch(declared=[None], predicted=["sofa"], score=[None], labels=[gated],
                       labels_file=_with("policies.0.threshold", 0.0)) == [[]]
