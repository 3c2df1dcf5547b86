"""Label thresholds from reviewers' answers, on hand-made scores (no run, no Ray)."""

import pyarrow as pa
import pytest

from pipelines import schema as S
from pipelines.labels import LabelSet, parse_labels
from pipelines.review import label_calibration as lc

LABELS = LabelSet(parse_labels({
    "categories": {"column": "category", "names": ["sofa", "bed"], "aliases": {"couch": "sofa"}, "threshold": 0.5},
    "policies": [{"name": "weapon", "prompts": ["a gun"], "threshold": 0.8}],
}))


def _scored(rows):
    return pa.table({
        "id": pa.array([r[0] for r in rows], pa.int64()), "status": ["ok"] * len(rows),
        "category_score": pa.array([r[2] for r in rows], pa.float32()),
        "labels": pa.array([[{"name": "weapon", "kind": "policy", "itc": 0.1, "itm": r[3]}] for r in rows], S.LABELS_TYPE),
        "__declared": pa.array([r[1] for r in rows], pa.string()),
    })


def test_thresholds_separate_what_reviewers_said():
    # id, declared, category_score, weapon itm; reviewed category, checked policies
    rows = [(1, "sofa", 0.10, 0.95), (2, "Couch", 0.20, 0.90), (3, "sofa", 0.70, 0.30), (4, "bed", 0.90, 0.20),
            (5, "bed", 0.60, 0.85), (6, None, None, 0.10)]
    truth = pa.table({
        "id": ["1", "2", "3", "4", "5", "6"],
        "reviewed_category": ["bed", "bed", "SOFA", "bed", "bed", "sofa"],  # rows 1, 2 are in the wrong category
        "reviewed_policies": pa.array([["weapon"], ["weapon"], [], [], ["weapon"], []], pa.list_(pa.string())),
    })
    curves = lc.label_curves(_scored(rows), truth, LABELS)
    assert curves["category"].rows == 5 and curves["category"].positives == 2  # row 6 declares nothing
    choices = lc.label_choices(curves, 1.0, LABELS)
    category, weapon = choices["category"], choices["policy:weapon"]
    assert 0.20 < category["threshold"] <= 0.60 and category["recall"] == 1.0  # flags rows 1 and 2 only
    assert 0.30 < weapon["threshold"] <= 0.85 and weapon["recall"] == 1.0 and weapon["precision"] == 1.0
    assert weapon["current"]["threshold"] == 0.8  # in the label file's terms, not the curve's -itm
    text = lc.snippet_lines(choices, 1.0)
    assert "categories.threshold" in text and "policies[weapon].threshold" in text


def test_no_threshold_when_the_target_cannot_be_met():
    rows = [(1, "sofa", 0.5, 0.5), (2, "sofa", 0.5, 0.5)]
    truth = pa.table({"id": ["1", "2"], "reviewed_category": ["bed", "sofa"],
                      "reviewed_policies": pa.array([["weapon"], []], pa.list_(pa.string()))})
    choices = lc.label_choices(lc.label_curves(_scored(rows), truth, LABELS), 1.0, LABELS)
    assert choices["category"]["threshold"] is None and choices["policy:weapon"]["threshold"] is None
    assert "no threshold reaches" in lc.snippet_lines(choices, 1.0)
