"""Threshold calibration on synthetic labelled data (no models, no Ray)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import calibrate
from pipelines.config import build_config, load_yaml
from pipelines.review import calibration as cal


def synthetic(tmp_path, n=400, seed=0):
    """A scored output and labels: mismatches score lower on both scores, with overlap."""
    rng = np.random.default_rng(seed)
    mismatch = rng.random(n) < 0.3
    itm = np.clip(np.where(mismatch, rng.normal(0.3, 0.15, n), rng.normal(0.75, 0.15, n)), 0, 1).astype(np.float32)
    itc = np.clip(np.where(mismatch, rng.normal(0.2, 0.08, n), rng.normal(0.4, 0.08, n)), -1, 1).astype(np.float32)
    ids = [f"item-{i}" for i in range(n)]
    status = ["ok"] * n
    # Two labelled rows could not be scored: they take no part.
    for i in (5, 6):
        status[i] = "image_error"
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.table({
        "id": ids,
        "itm_score": pa.array([None if s != "ok" else float(v) for s, v in zip(status, itm)], pa.float32()),
        "itc_score": pa.array([None if s != "ok" else float(v) for s, v in zip(status, itc)], pa.float32()),
        "status": status,
    }), scored / "part-0.parquet")
    labels = tmp_path / "labels.csv"
    lines = ["id,verdict"] + [f"{i},{'Mismatch' if m else 'match'}" for i, m in zip(ids, mismatch)] + ["ghost-1,match"]
    labels.write_text("\n".join(lines) + "\n")
    ok = np.array(status) == "ok"
    return scored, labels, itm[ok], itc[ok], mismatch[ok]


def brute_force(scores, truth, target):
    """Best recall with precision >= target over every distinct cut, computed directly."""
    best = None
    for t in np.unique(np.r_[scores, scores.max() + 1e-3]):
        flagged = scores < t
        if not flagged.any():
            continue
        precision = (flagged & truth).sum() / flagged.sum()
        recall = (flagged & truth).sum() / truth.sum()
        if precision >= target and (best is None or (recall, precision) > best):
            best = (recall, precision)
    return best


def test_calibrates_both_scores_and_writes_a_loadable_snippet(tmp_path, capsys):
    scored, labels, itm, itc, truth = synthetic(tmp_path)
    out, report = tmp_path / "cal.yaml", tmp_path / "cal.html"
    code = calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.9",
                           "--out-config", str(out), "--report", str(report), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labelled_scored_rows"] == len(truth) and result["mismatches"] == int(truth.sum())
    assert result["left_out"] == {"unscored": 2, "unmatched_labels": 1}
    for name, scores in (("itm", itm), ("itc", itc)):
        chosen = result["chosen"][name]
        recall, precision = brute_force(scores, truth, 0.9)
        assert (chosen["recall"], chosen["precision"]) == pytest.approx((recall, precision))
        # The threshold written reproduces those numbers with the job's own rule.
        flagged = scores < chosen["threshold"]
        assert (flagged & truth).sum() / flagged.sum() == pytest.approx(precision)
        assert chosen["flagged"] == flagged.sum()
    values = load_yaml(out)
    assert set(values) == {"itm_threshold", "itc_threshold"}
    config = build_config(dict(values, input="x", output="y"))
    assert config.itm_threshold == result["chosen"]["itm"]["threshold"]
    assert config.itc_threshold == result["chosen"]["itc"]["threshold"]
    both = result["combined"]
    flag = (itm < config.itm_threshold) | (itc < config.itc_threshold)
    assert both["precision"] == pytest.approx((flag & truth).sum() / flag.sum())
    page = report.read_text()
    assert page.count("<svg") == 2 and page.count('class="chosen"') == 2 and page.count('class="target"') == 2
    assert "Positive class: <b>mismatch</b>" in page


def test_current_thresholds_are_reported(tmp_path, capsys):
    scored, labels, itm, _, truth = synthetic(tmp_path, seed=1)
    (scored / "_manifest.json").write_text(json.dumps({"run_id": "r", "files": ["part-0.parquet"],
                                                        "config": {"itm_threshold": 0.5, "itc_threshold": None}}))
    (scored / "_SUCCESS").write_text(json.dumps({"run_id": "r"}))
    calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.8", "--json",
                    "--out-config", str(tmp_path / "c.yaml"), "--report", str(tmp_path / "c.html")])
    result = json.loads(capsys.readouterr().out)
    current = result["chosen"]["itm"]["current"]
    flagged = itm < 0.5
    assert current["threshold"] == 0.5 and current["flagged"] == flagged.sum()
    assert current["precision"] == pytest.approx((flagged & truth).sum() / flagged.sum())
    assert current["recall"] == pytest.approx((flagged & truth).sum() / truth.sum())
    assert result["chosen"]["itc"]["current"]["threshold"] is None


def test_unreachable_target_exits_1_and_leaves_thresholds_alone(tmp_path, capsys):
    scored, labels, *_ = synthetic(tmp_path, n=200, seed=2)
    # Shuffle the verdicts: scores no longer tell mismatches apart, so 0.99 precision cannot be met.
    lines = labels.read_text().splitlines()
    rng = np.random.default_rng(0)
    verdicts = [line.split(",")[1] for line in lines[1:]]
    rng.shuffle(verdicts)
    labels.write_text("\n".join([lines[0]] + [f"{line.split(',')[0]},{v}" for line, v in zip(lines[1:], verdicts)]) + "\n")
    out = tmp_path / "c.yaml"
    code = calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.99",
                           "--checks", "itm", "--out-config", str(out), "--report", str(tmp_path / "c.html")])
    assert code == 1
    assert "itm: no threshold reaches precision 0.99" in capsys.readouterr().out
    values = load_yaml(out)
    assert "itm_threshold" not in values and build_config(dict(values, input="x", output="y")).itc_threshold is None


def test_checks_itm_alone_turns_itc_off(tmp_path, capsys):
    scored, labels, *_ = synthetic(tmp_path, seed=3)
    out = tmp_path / "c.yaml"
    assert calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.9",
                           "--checks", "itm", "--out-config", str(out), "--report", str(tmp_path / "c.html")]) == 0
    config = build_config(dict(load_yaml(out), input="x", output="y"))
    assert config.itc_threshold is None and 0 < config.itm_threshold < 1
    printed = capsys.readouterr().out
    assert "itm: threshold" in printed and "current: unknown (no committed manifest" in printed


@pytest.mark.parametrize("problem, message", [
    ("verdict", "must hold 'mismatch' or 'match'"),
    ("column", "have no column 'verdict'"),
    ("conflict", "labels disagree about id"),
    ("precision", "--target-precision"),
    ("scored", "cannot read scored output"),
])
def test_input_errors_exit_2(tmp_path, capsys, problem, message):
    scored, labels, *_ = synthetic(tmp_path, n=50)
    target = "0.9"
    if problem == "verdict":
        labels.write_text("id,verdict\nitem-1,maybe\n")
    elif problem == "column":
        labels.write_text("id,label\nitem-1,match\n")
    elif problem == "conflict":
        labels.write_text("id,verdict\nitem-1,match\nitem-1,mismatch\n")
    elif problem == "precision":
        target = "1.5"
    elif problem == "scored":
        scored = tmp_path / "nope"
    with pytest.raises(SystemExit) if problem == "precision" else _nothing() as raised:
        code = calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", target,
                               "--out-config", str(tmp_path / "c.yaml"), "--report", str(tmp_path / "c.html")])
    code = raised.value.code if problem == "precision" else code
    assert code == 2 and message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_parquet_labels_and_curve_edges(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "verdict": ["MISMATCH ", "match"]}), tmp_path / "l.parquet")
    labels = cal.read_labels(str(tmp_path / "l.parquet"), "id", "verdict")
    assert labels.to_pydict() == {"id": ["a", "b"], "is_mismatch": [True, False]}
    # Ties: rows with equal scores are always flagged together.
    c = cal.curve(np.array([0.2, 0.2, 0.5, 1.0], np.float32), np.array([True, False, True, False]), "itm")
    assert c.flagged.tolist() == [2, 3] and c.precision.tolist() == [0.5, pytest.approx(2 / 3)]
    assert c.thresholds.max() <= 1.0  # a cut above 1 cannot be configured
    assert c.at(0.2) == {"threshold": 0.2, "precision": None, "recall": 0.0, "flagged": 0}
    assert c.at(0.35)["flagged"] == 2 and c.at(0.5)["flagged"] == 2 and c.at(0.51)["flagged"] == 3


def test_several_outputs_are_calibrated_together(tmp_path, capsys):
    scored, labels, itm, _, truth = synthetic(tmp_path, n=300, seed=4)
    # Split the output in two "days": the result is the same as for the whole.
    table = pq.read_table(scored / "part-0.parquet")
    for day, part in (("d1", table.slice(0, 120)), ("d2", table.slice(120))):
        (tmp_path / day).mkdir()
        pq.write_table(part, tmp_path / day / "part-0.parquet")
    common = ["--labels", str(labels), "--target-precision", "0.85", "--json", "--checks", "itm",
              "--out-config", str(tmp_path / "c.yaml"), "--report", str(tmp_path / "c.html")]
    calibrate.main(["--scored", str(scored), *common])
    whole = json.loads(capsys.readouterr().out)
    calibrate.main(["--scored", str(tmp_path / "d1"), str(tmp_path / "d2"), *common])
    split = json.loads(capsys.readouterr().out)
    assert split["chosen"] == whole["chosen"] and split["labelled_scored_rows"] == len(truth)


def _with_agreement(tmp_path, informative: bool, seed=1):
    """The synthetic output plus caption_agreement: telling mismatches apart on its own, or noise."""
    scored, labels, itm, itc, truth = synthetic(tmp_path)
    table = pq.read_table(scored / "part-0.parquet")
    rng = np.random.default_rng(seed)
    mismatch = np.array([line.split(",")[1].lower() == "mismatch" for line in labels.read_text().splitlines()[1:-1]])
    if informative:
        values = np.where(mismatch, rng.normal(0.1, 0.08, len(mismatch)), rng.normal(0.6, 0.08, len(mismatch)))
    else:
        values = rng.normal(0.4, 0.1, len(mismatch))
    values = [None if i % 10 == 3 else float(v) for i, v in enumerate(values)]  # some rows were not captioned
    pq.write_table(table.append_column("caption_agreement", pa.array(values, pa.float32())), scored / "part-0.parquet")
    return scored, labels


def _gain_brute_force(table, itm, itc):
    truth = table.column("is_mismatch").to_numpy(zero_copy_only=False)
    values = table.column("caption_agreement").to_numpy(zero_copy_only=False).astype(float)
    base = (table.column("itm_score").to_numpy(zero_copy_only=False) < itm) | (table.column("itc_score").to_numpy(zero_copy_only=False) < itc)
    best = None
    for t in np.unique(values[~np.isnan(values)]) + 1e-6:
        flag = base | (values < t)
        key = ((flag & truth).sum() / flag.sum(), (flag & truth).sum())
        best = key if best is None or key > best else best
    return best[0]


@pytest.mark.parametrize("informative", [True, False])
def test_agreement_is_calibrated_and_added_only_when_it_improves_precision(tmp_path, capsys, informative):
    scored, labels = _with_agreement(tmp_path, informative)
    out = tmp_path / "cal.yaml"
    code = calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.9",
                           "--out-config", str(out), "--report", str(tmp_path / "c.html"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    gain = result["agreement_gain"]
    assert "agreement" in result["chosen"] and gain["rows_with_agreement"] > 0
    joined = cal.join(cal.read_scored(str(scored), "id"), cal.read_labels(str(labels), "id", "verdict"), "id")
    itm, itc = result["chosen"]["itm"]["threshold"], result["chosen"]["itc"]["threshold"]
    assert gain["with"]["precision"] == pytest.approx(_gain_brute_force(joined.table, itm, itc))
    assert gain["with"]["recall"] >= gain["target_recall"]
    assert gain["improves"] is informative
    snippet = load_yaml(out)
    if informative:
        assert snippet["agreement_threshold"] == gain["with"]["agreement_threshold"]
        assert gain["with"]["precision"] > gain["without"]["precision"]
        build_config(dict(snippet, input="x", output="y"))  # the snippet is a valid config
    else:
        assert "agreement_threshold" not in snippet and "does not improve" in out.read_text()
    assert "caption_agreement" in (tmp_path / "c.html").read_text()


def test_outputs_without_agreement_calibrate_as_before(tmp_path, capsys):
    scored, labels, *_ = synthetic(tmp_path)
    assert calibrate.main(["--scored", str(scored), "--labels", str(labels), "--target-precision", "0.9",
                           "--out-config", str(tmp_path / "c.yaml"), "--report", str(tmp_path / "c.html"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["agreement_gain"] is None and "agreement" not in result["chosen"]


def test_the_verdicts_table_of_jobs_review_import_is_taken_as_labels(tmp_path, capsys):
    """jobs.review import's table as --labels: a row's latest verdict wins, a latest unsure leaves it out, ids cast."""
    from jobs import review

    scored, _, itm, _, truth = synthetic(tmp_path, n=120)
    ids = pq.read_table(scored).column("id").to_pylist()
    mismatch = {i: bool(m) for i, m in zip([i for k, i in enumerate(ids) if k not in (5, 6)], truth)}

    def task(number, row_id, verdict, when):
        return {"id": number, "project": 1, "data": {"row_id": row_id}, "annotations": [{
            "id": number, "completed_by": 1, "updated_at": when, "result": [
                {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [verdict]}}]}]}

    tasks = [task(n, row_id, "mismatch" if m else "match", "2026-11-01T10:00:00Z") for n, (row_id, m) in enumerate(mismatch.items())]
    first = next(iter(mismatch))
    # The same row in a second task, reviewed later the other way round: that later verdict is the label.
    tasks.append(task(1000, first, "match" if mismatch[first] else "mismatch", "2026-11-02T10:00:00Z"))
    tasks.append(task(1001, ids[-1], "unsure", "2026-11-02T10:00:00Z"))
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    assert review.main(["import", "--annotations", str(tmp_path / "export.json"), "--verdicts", str(tmp_path / "verdicts")]) == 0
    labels = cal.read_labels(str(tmp_path / "verdicts"), "id", "verdict")
    got = dict(zip(labels.column("id").to_pylist(), labels.column("is_mismatch").to_pylist()))
    assert got[first] == (not mismatch[first]) and ids[-1] not in got and len(got) == len(mismatch) - 1
    code = calibrate.main(["--scored", str(scored), "--labels", str(tmp_path / "verdicts"), "--target-precision", "0.8",
                           "--out-config", str(tmp_path / "cal.yaml"), "--report", str(tmp_path / "cal.html"), "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and result["labelled_scored_rows"] == len(mismatch) - 1
    # Ids are strings in the verdicts table; an output with integer ids still joins.
    joined = cal.join(pa.table({"id": [3, 4], "status": ["ok", "ok"], "itm_score": [0.1, 0.9], "itc_score": [0.1, 0.2],
                                cal.AGREEMENT: pa.nulls(2, pa.float32())}),
                      pa.table({"id": ["3"], "is_mismatch": [True]}), "id")
    assert joined.table.column("id").to_pylist() == [3]
