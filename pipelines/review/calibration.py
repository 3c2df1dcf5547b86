"""Threshold calibration against human verdicts. Plain numpy and pyarrow: no Ray, no models.

The positive class is **mismatch** (the image and text do not belong together): a threshold
``t`` predicts "mismatch" for ``score < t``, exactly as the job flags. Precision is the share
of flagged rows that humans called mismatches; recall the share of human mismatches flagged.
Only rows with scores (``status == "ok"``) take part: rows that could not be scored are flagged
whatever the thresholds are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..storage import locate
from . import views

MISMATCH, MATCH = "mismatch", "match"
SCORES = {"itm": "itm_score", "itc": "itc_score", "agreement": "caption_agreement"}
AGREEMENT = "caption_agreement"  # optional: outputs scored before it, or without captions, lack values


class CalibrationError(ValueError):
    """Unusable scored output or labels; the message names the problem."""


@dataclass
class Curve:
    """Precision and recall for every useful threshold of one score (ascending thresholds)."""

    score: str
    values: np.ndarray  # the distinct scores, ascending
    thresholds: np.ndarray  # thresholds[k] flags exactly the rows scoring <= values[k]
    precision: np.ndarray
    recall: np.ndarray
    flagged: np.ndarray
    positives: int
    rows: int

    def at(self, threshold: float | None) -> dict:
        """Metrics of an arbitrary threshold (e.g. the one currently configured)."""
        if threshold is None:
            return {"threshold": None, "precision": None, "recall": 0.0, "flagged": 0}
        index = int(np.searchsorted(self.values, threshold, side="left")) - 1  # last distinct value < threshold
        if index < 0:
            return {"threshold": threshold, "precision": None, "recall": 0.0, "flagged": 0}
        return {"threshold": threshold, "precision": float(self.precision[index]),
                "recall": float(self.recall[index]), "flagged": int(self.flagged[index])}


@dataclass
class Choice:
    score: str
    target: float
    threshold: float | None
    precision: float | None
    recall: float | None
    flagged: int = 0
    current: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.threshold is not None


def read_scored(path: str, id_column: str) -> pa.Table:
    """The committed rows of a scored output (the manifest's files when there is one)."""
    from ..commit.reader import committed_files  # the output contract lives there

    try:
        files = committed_files(path)
    except Exception:  # noqa: BLE001  (no manifest, or an older layout: read the directory)
        files = []
    location = locate(path)
    columns = [id_column, "status", "itm_score", "itc_score"]
    try:
        source = files or location.path
        dataset = pads.dataset(source, filesystem=location.filesystem, format="parquet")
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise CalibrationError(f"scored output {path} has no column(s) {missing}")
        if AGREEMENT not in dataset.schema.names:
            table = dataset.to_table(columns=columns)
            return table.append_column(AGREEMENT, pa.nulls(table.num_rows, pa.float32()))
        return dataset.to_table(columns=columns + [AGREEMENT])
    except (OSError, pa.ArrowInvalid) as exc:
        raise CalibrationError(f"cannot read scored output {path}: {exc}") from None


def read_labels(path: str, id_column: str, verdict_column: str) -> pa.Table:
    """Labels as (id, is_mismatch); a Parquet file/directory, a ``.csv`` file, or the verdicts table
    ``jobs.review import`` writes (``read_verdict_labels``)."""
    from . import labelstudio  # the verdicts table's contract lives there

    if not path.lower().endswith(".csv") and labelstudio.is_verdicts_table(path):
        return read_verdict_labels(path)
    location = locate(path)
    try:
        if path.lower().endswith(".csv"):
            with location.filesystem.open_input_stream(location.path) as stream:
                table = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        else:
            table = pq.read_table(location.path, filesystem=location.filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CalibrationError(f"cannot read labels {path}: {exc}") from None
    for name in (id_column, verdict_column):
        if name not in table.column_names:
            raise CalibrationError(f"labels {path} have no column {name!r}; columns: {', '.join(table.column_names)}")
    verdicts = [str(v).strip().lower() if v is not None else None for v in table.column(verdict_column).to_pylist()]
    bad = sorted({repr(v) for v in verdicts if v not in (MISMATCH, MATCH)})
    if bad:
        raise CalibrationError(
            f"labels column {verdict_column!r} must hold '{MISMATCH}' or '{MATCH}'; found {', '.join(bad[:5])}"
        )
    ids = table.column(id_column)
    labels = pa.table({"id": ids, "is_mismatch": pa.array([v == MISMATCH for v in verdicts], pa.bool_())})
    by_id: dict = {}
    for key, value in zip(labels.column("id").to_pylist(), labels.column("is_mismatch").to_pylist()):
        if by_id.setdefault(key, value) != value:
            raise CalibrationError(f"labels disagree about id {key!r}")
    return pa.table({"id": pa.array(list(by_id), ids.type), "is_mismatch": pa.array(list(by_id.values()), pa.bool_())})


def read_verdict_labels(path: str) -> pa.Table:
    """Labels from a verdicts table: a row reviewed in more than one task (two projects, a duplicated
    id) takes its latest verdict, and a row whose latest verdict is ``unsure`` takes no part. Ids are
    strings there; ``join`` casts them to the scored output's id type."""
    from . import labelstudio

    table = labelstudio.read_verdicts(path)
    order = pc.sort_indices(table, sort_keys=[("annotated_at", "ascending", "at_start"), ("task_id", "ascending", "at_start")])
    latest: dict = {}
    for key, verdict in zip(table.column("row_id").take(order).to_pylist(), table.column("verdict").take(order).to_pylist()):
        latest[key] = verdict
    decided = {key: verdict == MISMATCH for key, verdict in latest.items() if verdict in (MISMATCH, MATCH)}
    return pa.table({"id": pa.array(list(decided), pa.string()), "is_mismatch": pa.array(list(decided.values()), pa.bool_())})


@dataclass
class Joined:
    table: pa.Table  # id, itm_score, itc_score, caption_agreement (null where none), is_mismatch (scored rows only)
    labelled: int
    unmatched_labels: int
    unscored: int


def join(scored: pa.Table, labels: pa.Table, id_column: str) -> Joined:
    scored = scored.rename_columns(["id" if c == id_column else c for c in scored.column_names])
    id_type = scored.schema.field("id").type
    if labels.schema.field("id").type != id_type:  # verdicts hold ids as strings
        try:
            labels = labels.set_column(0, "id", pc.cast(labels.column("id"), id_type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise CalibrationError(f"label ids are not {id_type} like the scored ids: {exc}") from None
    try:
        joined = scored.join(labels, "id", join_type="inner")
    except pa.ArrowInvalid as exc:
        raise CalibrationError(f"cannot match label ids to scored ids: {exc}") from None
    ok = pc.equal(joined.column("status"), "ok")
    found = set(joined.column("id").to_pylist())
    return Joined(
        table=joined.filter(ok).select(["id", "itm_score", "itc_score", AGREEMENT, "is_mismatch"]),
        labelled=joined.num_rows,
        unmatched_labels=sum(1 for key in labels.column("id").to_pylist() if key not in found),
        unscored=joined.num_rows - int(pc.sum(ok).as_py() or 0),
    )


def curve(scores: np.ndarray, is_mismatch: np.ndarray, name: str) -> Curve:
    """Every distinct outcome of ``score < t``: thresholds placed just above each distinct score."""
    order = np.argsort(scores, kind="stable")
    scores, positives = scores[order].astype(np.float64), is_mismatch[order].astype(np.int64)
    if not len(scores):
        empty = np.array([], dtype=np.float64)
        return Curve(name, empty, empty, empty, empty, empty.astype(np.int64), 0, 0)
    last_of_value = np.r_[np.flatnonzero(np.diff(scores) > 0), len(scores) - 1]
    true_pos = np.cumsum(positives)[last_of_value]
    flagged = last_of_value + 1
    values = scores[last_of_value]
    # t between this distinct value and the next flags exactly the rows up to this one.
    upper = np.r_[values[1:], values[-1] + 1e-3]
    thresholds = (values + upper) / 2
    total_pos = int(positives.sum())
    recall = true_pos / total_pos if total_pos else np.zeros(len(true_pos))
    # Both scores are at most 1 and the job's thresholds are too: a cut above 1 cannot be configured.
    keep = thresholds <= 1.0
    return Curve(name, values[keep], thresholds[keep], (true_pos / flagged)[keep], recall[keep], flagged[keep],
                 total_pos, len(scores))


def choose(c: Curve, target: float, current: float | None) -> Choice:
    """The threshold with the highest recall whose precision is at least ``target`` (then the highest precision)."""
    meets = np.flatnonzero(c.precision >= target)
    if not len(meets) or not c.positives:
        return Choice(c.score, target, None, None, None, current=c.at(current))
    best = meets[np.lexsort((-c.precision[meets], -c.recall[meets]))[0]]
    return Choice(c.score, target, float(c.thresholds[best]), float(c.precision[best]), float(c.recall[best]),
                  int(c.flagged[best]), current=c.at(current))


def _scores(table: pa.Table, column: str) -> np.ndarray:
    """A score column as float64, NaN where null (a NaN is never below a threshold: that check cannot fire)."""
    return table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)


def _rule(table: pa.Table, itm: float | None, itc: float | None, agreement: float | None = None) -> np.ndarray:
    flag = np.zeros(table.num_rows, dtype=bool)
    for name, threshold in (("itm_score", itm), ("itc_score", itc), (AGREEMENT, agreement)):
        if threshold is not None:
            flag |= _scores(table, name) < threshold
    return flag


def combined(table: pa.Table, itm: float | None, itc: float | None, agreement: float | None = None) -> dict:
    """Precision/recall of the job's actual rule: flagged when any check fires."""
    truth = table.column("is_mismatch").to_numpy(zero_copy_only=False)
    flag = _rule(table, itm, itc, agreement)
    tp = int((flag & truth).sum())
    return {"precision": tp / flag.sum() if flag.sum() else None,
            "recall": tp / truth.sum() if truth.sum() else None, "flagged": int(flag.sum())}


def agreement_gain(table: pa.Table, itm: float | None, itc: float | None) -> dict:
    """Does adding ``caption_agreement < t`` to the ITM/ITC rule raise its precision?

    The ITM/ITC rule (the chosen thresholds) sets the target recall. Adding a check only adds
    flags, so every extended rule keeps at least that recall; the best ``t`` is the one with the
    highest precision (then the higher recall). ``improves`` says whether it beats the rule
    alone. Rows without an agreement value (not captioned) are never flagged by it."""
    truth = table.column("is_mismatch").to_numpy(zero_copy_only=False).astype(bool)
    base_flag = _rule(table, itm, itc)
    without = combined(table, itm, itc)
    values = _scores(table, AGREEMENT)
    candidates = ~base_flag & ~np.isnan(values)
    result = {"target_recall": without["recall"], "without": without, "with": None, "improves": False,
              "rows_with_agreement": int((~np.isnan(values)).sum())}
    if not candidates.any() or not truth.any():
        return result
    c = curve(values[candidates], truth[candidates], "agreement")  # rows the rule does not flag yet
    base_tp, base_flagged = int((base_flag & truth).sum()), int(base_flag.sum())
    tp = base_tp + (np.rint(c.recall * c.positives).astype(np.int64) if c.positives else np.zeros(len(c.flagged), np.int64))
    precision = tp / (base_flagged + c.flagged)
    best = int(np.lexsort((-tp, -precision))[0]) if len(precision) else None
    if best is None:
        return result
    result["with"] = {"agreement_threshold": float(c.thresholds[best]), "precision": float(precision[best]),
                      "recall": float(tp[best] / truth.sum()), "flagged": int(base_flagged + c.flagged[best])}
    result["improves"] = bool(without["precision"] is None or precision[best] > without["precision"] + 1e-12)
    return result


def config_snippet(choices: dict[str, Choice], target: float, both: dict, gain: dict | None = None) -> str:
    """YAML for ``jobs.score --config``; a check whose target cannot be met is left as configured.
    The agreement threshold is written only when adding it improves the ITM/ITC rule (``gain``)."""
    lines = [f"# thresholds calibrated by jobs.calibrate for precision >= {target:g} (mismatch = positive class)"]
    for name, choice in choices.items():
        if name == "agreement":
            continue
        key = f"{name}_threshold"
        if choice.met:
            lines.append(f"# {name}: precision {choice.precision:.3f}, recall {choice.recall:.3f} on the labelled rows")
            lines.append(f"{key}: {choice.threshold!r}")  # full precision: scores are compared exactly
        else:
            lines.append(f"# {key}: no threshold reaches precision {target:g} on the labelled rows; left unchanged")
    if both.get("precision") is not None:
        lines.append(f"# both checks together (flag if either fires): precision {both['precision']:.3f}, recall {both['recall']:.3f}")
    if gain is not None:
        lines.append(gain_line(gain))
        if gain["improves"]:
            lines.append(f"agreement_threshold: {gain['with']['agreement_threshold']!r}")
    return "\n".join(lines) + "\n"


def gain_line(gain: dict) -> str:
    base, added = gain["without"], gain["with"]
    if added is None:
        return "# caption agreement: no labelled row has a value the rule could add; agreement_threshold left off"
    head = f"# adding caption_agreement < {added['agreement_threshold']:.4g}: precision {added['precision']:.3f}, " \
           f"recall {added['recall']:.3f} (without: precision {_num(base['precision'])}, recall {_num(base['recall'])})"
    return head + ("" if gain["improves"] else "; it does not improve precision, so agreement_threshold is left off")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pr_curve_svg(c: Curve, choice: Choice, width: int = 420, height: int = 300) -> str:
    left, right, top, bottom = 44, 12, 12, 36
    w, h = width - left - right, height - top - bottom

    def xy(recall, precision):
        return left + w * recall, top + h * (1 - precision)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="precision-recall curve, {views.esc(c.score)}">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>']
    for value in (0, 0.5, 1):
        x, y = xy(value, value)
        parts.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="middle">{value:g}</text>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">recall</text>')
    parts.append(f'<text x="12" y="{top + h / 2}" transform="rotate(-90 12 {top + h / 2})" text-anchor="middle">precision</text>')
    if len(c.thresholds):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(r, p) for r, p in zip(c.recall, c.precision)))
        parts.append(f'<polyline class="pr" fill="none" stroke="#3f6fd8" stroke-width="2" points="{points}"/>')
    _, ty = xy(0, choice.target)
    parts.append(f'<line class="target" x1="{left}" y1="{ty:.1f}" x2="{left + w}" y2="{ty:.1f}" stroke="#c62828" stroke-dasharray="5 3"/>')
    if choice.met:
        x, y = xy(choice.recall, choice.precision)
        parts.append(f'<circle class="chosen" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#c62828">'
                     f'<title>threshold {choice.threshold:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(curves: dict[str, Curve], choices: dict[str, Choice], both: dict, joined: Joined, snippet: str,
                gain: dict | None = None) -> str:
    def pct(value):
        return "&ndash;" if value is None else f"{value:.3f}"

    rows = []
    for name, choice in choices.items():
        current = choice.current
        rows.append(
            f'<tr data-score="{name}"><th>{name.upper()}</th><td>{pct(choice.threshold)}</td><td>{pct(choice.precision)}</td>'
            f"<td>{pct(choice.recall)}</td><td>{pct(current.get('threshold'))}</td><td>{pct(current.get('precision'))}</td>"
            f"<td>{pct(current.get('recall'))}</td></tr>"
        )
    figures = "".join(
        f'<figure><figcaption>{name.upper()}: flag when {SCORES[name]} &lt; t</figcaption>{pr_curve_svg(curves[name], choices[name])}</figure>'
        for name in choices
    )
    target = next(iter(choices.values())).target
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>blip-moderate threshold calibration</title>"
        "<style>body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:24px auto;padding:0 16px}"
        "table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}"
        "figure{display:inline-block;margin:8px}svg text{font:11px system-ui,sans-serif;fill:#444}"
        "pre{background:#f5f5f5;padding:8px}</style></head><body>"
        "<h1>Threshold calibration</h1>"
        f"<p>Positive class: <b>mismatch</b>. Target precision {target:g}. {joined.table.num_rows} labelled scored rows "
        f"({int(pc.sum(joined.table.column('is_mismatch')).as_py() or 0)} mismatches); {joined.unscored} labelled rows "
        f"without scores (errors, always flagged) and {joined.unmatched_labels} labels with no scored row were left out.</p>"
        "<table><tr><th></th><th>chosen t</th><th>precision</th><th>recall</th><th>current t</th><th>precision</th><th>recall</th></tr>"
        f"{''.join(rows)}</table>"
        f"<p>Both checks together (flag if either fires): precision {pct(both.get('precision'))}, recall {pct(both.get('recall'))}.</p>"
        + (f'<p class="agreement-gain">{views.esc(gain_line(gain).lstrip("# "))}.</p>' if gain is not None else "")
        + f"{figures}<h2>Config snippet</h2><pre>{views.esc(snippet)}</pre></body></html>\n"
    )
