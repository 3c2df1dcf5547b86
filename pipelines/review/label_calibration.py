"""Label thresholds from reviewers' choices (``jobs.calibrate`` with a ``jobs.review import`` verdicts table).

The Label Studio tasks of a ``--labels`` output ask for the listing's category and the policies its
image breaks (``labelstudio.labels_view``); their answers are the truth here:

- **category**: a reviewed row is in the wrong category when the reviewer's category is not its
  declared one (after the label file's strip/casefold and aliases). ``category_mismatch`` predicts
  that for ``category_score < t``, so ``calibration.curve`` applies as for ITM, on the scored rows
  that declare a known category;
- **each policy**: positive where the reviewer checked it; the job flags ``itm >= t``, so the curve
  runs on ``-itm`` and the threshold is negated back (the one boundary value, a score exactly at a
  suggested threshold, is the only place ``>=`` and ``>`` differ).

Plain numpy and pyarrow, like ``calibration``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..labels import LabelSet
from ..storage import locate
from . import calibration as cal


def read_label_verdicts(path: str) -> pa.Table | None:
    """Per reviewed row its latest category and policies (``id``, ``category``, ``policies``); None
    when the verdicts table holds no label answers."""
    from . import labelstudio

    table = labelstudio.read_verdicts(path)
    table = table.filter(table.column("policies").is_valid())
    if not table.num_rows:
        return None
    order = pc.sort_indices(table, sort_keys=[("annotated_at", "ascending", "at_start"), ("task_id", "ascending", "at_start")])
    latest = {}
    for row in table.take(order).select(["row_id", "category", "policies"]).to_pylist():
        latest[row["row_id"]] = row
    rows = list(latest.values())
    return pa.table({
        "id": pa.array([r["row_id"] for r in rows], pa.string()),
        "reviewed_category": pa.array([r["category"] for r in rows], pa.string()),
        "reviewed_policies": pa.array([r["policies"] for r in rows], pa.list_(pa.string())),
    })


def read_label_scores(path: str, id_column: str, labels: LabelSet) -> pa.Table:
    from ..commit.reader import committed_files

    try:
        files = committed_files(path)
    except Exception:  # noqa: BLE001  (as calibration.read_scored)
        files = []
    location = locate(path)
    dataset = pads.dataset(files or location.path, filesystem=location.filesystem, format="parquet")
    columns = [id_column, "status", "category_score", "labels"] + ([labels.column] if labels.column else [])
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise cal.CalibrationError(f"scored output {path} has no column(s) {missing} (not scored with --labels?)")
    table = dataset.to_table(columns=columns)
    table = table.rename_columns(["id" if c == id_column else c for c in table.column_names])
    if labels.column:
        table = table.rename_columns(["__declared" if c == labels.column else c for c in table.column_names])
    else:
        table = table.append_column("__declared", pa.nulls(table.num_rows, pa.string()))
    return table


def label_curves(scored: pa.Table, truth: pa.Table, labels: LabelSet) -> dict[str, cal.Curve]:
    """``category`` and ``policy:<name>`` curves over the reviewed, scored rows (the policy curves on -itm)."""
    # By id in Python: Acero joins no list columns (labels, reviewed_policies); ids are strings in verdicts.
    reviewed = {str(row["id"]): row for row in truth.to_pylist()}
    ok = scored.filter(pc.fill_null(pc.equal(scored.column("status"), "ok"), False))
    rows = [dict(row, **reviewed[str(row["id"])]) for row in ok.to_pylist() if str(row["id"]) in reviewed]
    curves = {}
    if labels.names:
        scores, wrong = [], []
        for row in rows:
            declared = labels.declared_index(row["__declared"])
            reviewed = labels.declared_index(row["reviewed_category"])
            if declared is None or declared < 0 or row["category_score"] is None or row["reviewed_category"] is None:
                continue
            scores.append(row["category_score"])
            wrong.append(reviewed != declared)
        curves["category"] = cal.curve(np.array(scores, dtype=np.float64), np.array(wrong, dtype=bool), "category")
    for policy in labels.policies:
        name = policy["name"]
        scores, hit = [], []
        for row in rows:
            value = next((i["itm"] for i in row["labels"] or [] if i["kind"] == "policy" and i["name"] == name), None)
            if value is None:
                continue
            scores.append(-value)
            hit.append(name in (row["reviewed_policies"] or []))
        curves[f"policy:{name}"] = cal.curve(np.array(scores, dtype=np.float64), np.array(hit, dtype=bool), f"policy:{name}")
    return curves


def label_choices(curves: dict[str, cal.Curve], target: float, labels: LabelSet) -> dict[str, dict]:
    """The threshold per label check with the highest recall at ``target`` precision, in the label
    file's terms (a policy's threshold on its ITM, not on the curve's -itm); None where none reaches it."""
    current = {"category": labels.category_threshold, **{f"policy:{p['name']}": p["threshold"] for p in labels.policies}}
    out = {}
    for name, c in curves.items():
        negated = name.startswith("policy:")
        now = current.get(name)
        choice = cal.choose(c, target, -now if negated and now is not None else now)
        threshold = choice.threshold
        if negated and threshold is not None:
            threshold = -threshold
        out[name] = {"threshold": threshold, "precision": choice.precision, "recall": choice.recall,
                     "flagged": choice.flagged, "reviewed": c.rows, "positives": c.positives,
                     "current": dict(choice.current, threshold=now)}
    return out


def snippet_lines(choices: dict[str, dict], target: float) -> str:
    """Comment lines for the calibrated YAML: where each label threshold goes in the label file."""
    lines = [f"# --labels thresholds at precision >= {target:g} (set them in the label file):"]
    for name, choice in choices.items():
        key = "categories.threshold" if name == "category" else f"policies[{name[len('policy:'):]}].threshold"
        if choice["threshold"] is None:
            lines.append(f"#   {key}: no threshold reaches the target ({choice['reviewed']} reviewed rows)")
        else:
            lines.append(f"#   {key}: {min(1.0, max(0.0, choice['threshold'])):.4f}  "
                         f"(precision {choice['precision']:.3f}, recall {choice['recall']:.3f})")
    return "\n".join(lines) + "\n"
