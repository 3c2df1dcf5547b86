"""``--where``: a parsed filter over output columns, never Python's eval."""

import pyarrow as pa
import pytest

from pipelines.review.where import WhereError, parse

TABLE = pa.table({
    "id": ["a", "b", "c", "d"],
    "itm_score": pa.array([0.1, 0.6, None, 0.4], pa.float32()),
    "flagged": [True, False, True, True],
    "category": ["shoes", "hats", "shoes", None],
    "flag_reasons": [["itm_below_threshold"], [], ["image_error"], ["itm_below_threshold", "caption_disagrees"]],
    "status": ["ok", "ok", "image_error", "ok"],
})


def kept(text):
    return [i for i, keep in zip(TABLE.column("id").to_pylist(), parse(text, TABLE.schema)(TABLE).to_pylist()) if keep]


@pytest.mark.parametrize("text, ids", [
    ("flagged", ["a", "c", "d"]),
    ("not flagged", ["b"]),
    ("flagged and category == 'shoes'", ["a", "c"]),
    ("itm_score < 0.5", ["a", "d"]),          # a null score is not below anything
    ("0.2 < itm_score <= 0.6", ["b", "d"]),
    ("category in ['hats', 'shoes']", ["a", "b", "c"]),
    ("category not in ('hats',)", ["a", "c"]),   # null is neither in nor out: not kept
    ("category is None", ["d"]),
    ("itm_score is not None and status == 'ok'", ["a", "b", "d"]),
    ("'caption_disagrees' in flag_reasons", ["d"]),
    ("'image_error' in flag_reasons or itm_score > 0.5", ["b", "c"]),
    ("itm_score >= -1", ["a", "b", "d"]),
    ("True", ["a", "b", "c", "d"]),
])
def test_conditions(text, ids):
    assert kept(text) == ids


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("itm_score <", "not a valid expression"),
    ("__import__('os').system('true')", "unknown column"),
    ("len(id) > 2", "unknown column"),                       # names are columns, calls are refused
    ("id.upper() == 'A'", "is not allowed"),
    ("itm_score + 1 > 2", "is not allowed"),
    ("flag_reasons[0] == 'x'", "is not allowed"),
    ("nope == 1", r"unknown column\(s\) nope"),
    ("itm_score < 'high'", "cannot be evaluated"),
    ("category in ['a', 1]", "cannot be evaluated"),
    ("'x' in category", "is not a list"),
    ("itm_score", "is not a condition"),
    ("category is 'shoes'", "compares with None only"),
    ("1 < 2", "compares two literals"),
    ("x" * 3000, "longer than"),
])
def test_bad_expressions_are_refused_with_the_reason(text, message):
    with pytest.raises(WhereError, match=message):
        parse(text, TABLE.schema)
