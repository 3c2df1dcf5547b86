"""``python -m jobs.calibrate``: pick ITM, ITC (and caption agreement) thresholds from human verdicts.

    python -m jobs.calibrate --scored scored/ --labels labels.csv --target-precision 0.9

``--labels``: a CSV or Parquet file with the id column and a verdict column holding
``mismatch`` or ``match`` (case-insensitive), or the verdicts table of ``jobs.review import``
(its directory or file). The positive class is **mismatch**: a threshold
``t`` predicts mismatch for ``score < t``, as the job flags. For each score the chosen
threshold is the one with the highest recall whose precision on the labelled rows is at least
the target. When the scored rows carry ``caption_agreement``, it is calibrated the same way, and
the report says whether adding it to the ITM/ITC rule raises precision at that rule's recall;
only then does the snippet set ``agreement_threshold``. Writes a YAML snippet for ``jobs.score --config`` and an HTML report with the
precision-recall curves; prints the table.

Exit codes: 0 a threshold met the target for at least one score; 1 none did; 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.cli import UsageParser

EXIT_OK, EXIT_UNMET, EXIT_USAGE = 0, 1, 2


def _precision(value: str) -> float:
    target = float(value)
    if not 0.0 < target <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return target


def make_parser(prog: str = "python -m jobs.calibrate") -> argparse.ArgumentParser:
    parser = UsageParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--scored", required=True, nargs="+", metavar="PATH",
                        help="One or more committed jobs.score outputs (directories or s3:// prefixes), e.g. several days.")
    parser.add_argument("--labels", required=True, help="CSV or Parquet: id column + verdict column (mismatch | match); or a jobs.review import verdicts table.")
    parser.add_argument("--target-precision", required=True, type=_precision, help="Precision each chosen threshold must reach, in (0, 1].")
    parser.add_argument("--id-column", default="id", help="Id column in both the scored output and the labels (default id).")
    parser.add_argument("--verdict-column", default="verdict", help="Verdict column in the labels (default verdict).")
    parser.add_argument("--checks", choices=["both", "itm", "itc"], default="both",
                        help="Which checks to calibrate; with one, the snippet turns the other off (default both).")
    parser.add_argument("--out-config", default="calibrated.yaml", help="YAML snippet for jobs.score --config (default calibrated.yaml).")
    parser.add_argument("--report", default="calibration.html", help="HTML report with the precision-recall curves (default calibration.html).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser


def _current_thresholds(scored: str) -> dict:
    """The thresholds the scored run used, from its manifest (a value None: that check was off);
    None when the output has no committed manifest."""
    from pipelines.commit.reader import read_committed
    from pipelines.storage import locate

    try:
        manifest = read_committed(locate(scored)) or {}
    except Exception:  # noqa: BLE001  (an output without a manifest still calibrates)
        manifest = {}
    if "config" not in manifest:
        return None
    config = manifest["config"]
    return {"itm": config.get("itm_threshold"), "itc": config.get("itc_threshold"), "agreement": config.get("agreement_threshold")}


def main(argv: list[str] | None = None, prog: str = "python -m jobs.calibrate") -> int:
    args = make_parser(prog).parse_args(argv)
    import pyarrow as pa

    from pipelines.review import calibration as cal

    try:
        scored = pa.concat_tables([cal.read_scored(path, args.id_column) for path in args.scored], promote_options="permissive")
        labels = cal.read_labels(args.labels, args.id_column, args.verdict_column)
        joined = cal.join(scored, labels, args.id_column)
    except cal.CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not joined.table.num_rows:
        print("error: no labelled row has scores (ids do not match, or every labelled row is an error)", file=sys.stderr)
        return EXIT_USAGE

    runs = [_current_thresholds(path) for path in args.scored]
    # The current thresholds are known only when every output was scored with the same ones.
    current = runs[0] if all(run == runs[0] for run in runs) else None
    names = ["itm", "itc"] if args.checks == "both" else [args.checks]
    truth = joined.table.column("is_mismatch").to_numpy(zero_copy_only=False)
    curves = {name: cal.curve(joined.table.column(cal.SCORES[name]).to_numpy(zero_copy_only=False), truth, name) for name in names}
    # Caption agreement (when the labelled rows have it) is calibrated like the others, on the rows it exists for.
    has_agreement = joined.table.column(cal.AGREEMENT).null_count < joined.table.num_rows
    if has_agreement:
        rows = joined.table.filter(joined.table.column(cal.AGREEMENT).is_valid())
        curves["agreement"] = cal.curve(rows.column(cal.AGREEMENT).to_numpy(zero_copy_only=False),
                                        rows.column("is_mismatch").to_numpy(zero_copy_only=False), "agreement")
    choices = {name: cal.choose(curves[name], args.target_precision, (current or {}).get(name)) for name in curves}
    chosen = {name: choices[name].threshold if name in choices else None for name in ("itm", "itc")}
    both = cal.combined(joined.table, chosen["itm"], chosen["itc"])
    gain = cal.agreement_gain(joined.table, chosen["itm"], chosen["itc"]) if has_agreement else None
    snippet = cal.config_snippet(choices, args.target_precision, both, gain)
    try:
        label_choices = _label_choices(args)
    except cal.CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if label_choices:
        from pipelines.review.label_calibration import snippet_lines

        snippet += snippet_lines(label_choices, args.target_precision)
    if args.checks != "both":
        other = "itc" if args.checks == "itm" else "itm"
        snippet += f"{other}_threshold: none  # calibrating {args.checks} alone turns the other check off\n"
    Path(args.out_config).write_text(snippet)
    Path(args.report).write_text(cal.render_html(curves, choices, both, joined, snippet, gain))

    result = {
        "target_precision": args.target_precision,
        "labelled_scored_rows": joined.table.num_rows,
        "mismatches": int(truth.sum()),
        "left_out": {"unscored": joined.unscored, "unmatched_labels": joined.unmatched_labels},
        "chosen": {n: {"threshold": c.threshold, "precision": c.precision, "recall": c.recall, "flagged": c.flagged,
                       "current": c.current} for n, c in choices.items()},
        "combined": both,
        "agreement_gain": gain,
        "config": args.out_config,
        "report": args.report,
        "labels": label_choices,  # --labels outputs reviewed in Label Studio: category and policy thresholds
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{joined.table.num_rows} labelled scored rows, {int(truth.sum())} mismatches (positive class); "
              f"left out: {joined.unscored} without scores, {joined.unmatched_labels} labels with no scored row")
        for name, choice in choices.items():
            now = choice.current
            if current is None:
                now_text = "current: unknown (no committed manifest, or outputs scored with different thresholds)"
            elif now.get("threshold") is None:
                now_text = "current: off"
            else:
                now_text = f"current {now['threshold']}: precision {_fmt(now['precision'])}, recall {_fmt(now['recall'])}"
            if choice.met:
                print(f"{name}: threshold {choice.threshold:.4f} -> precision {choice.precision:.3f}, recall {choice.recall:.3f}; {now_text}")
            else:
                print(f"{name}: no threshold reaches precision {args.target_precision:g}; {now_text}")
        print(f"both checks together: precision {_fmt(both['precision'])}, recall {_fmt(both['recall'])}")
        if gain is not None:
            print(cal.gain_line(gain).lstrip("# "))
        for name, choice in (label_choices or {}).items():
            if choice["threshold"] is None:
                print(f"{name}: no threshold reaches precision {args.target_precision:g} ({choice['reviewed']} reviewed rows)")
            else:
                print(f"{name}: threshold {choice['threshold']:.4f} -> precision {choice['precision']:.3f}, "
                      f"recall {choice['recall']:.3f} ({choice['reviewed']} reviewed rows)")
        print(f"wrote {args.out_config} and {args.report}")
    return EXIT_OK if any(c.met for c in choices.values()) else EXIT_UNMET


def _label_choices(args) -> dict | None:
    """Category and policy thresholds, when the labels are a verdicts table with label answers and
    the scored outputs were run with --labels (the first output's label file)."""
    import pyarrow as pa

    from pipelines.commit.reader import read_committed
    from pipelines.labels import LabelSet
    from pipelines.review import label_calibration as lc
    from pipelines.review.labelstudio import is_verdicts_table
    from pipelines.storage import locate

    if not is_verdicts_table(args.labels):
        return None
    truth = lc.read_label_verdicts(args.labels)
    manifest = read_committed(locate(args.scored[0])) or {}
    labels = (manifest.get("config") or {}).get("labels")
    if truth is None or labels is None:
        return None
    labels = LabelSet(labels)
    scored = pa.concat_tables([lc.read_label_scores(path, args.id_column, labels) for path in args.scored],
                              promote_options="permissive")
    return lc.label_choices(lc.label_curves(scored, truth, labels), args.target_precision, labels)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
