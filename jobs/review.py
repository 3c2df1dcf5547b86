"""``python -m jobs.review``: the review queue round trip with Label Studio.

    python -m jobs.review export --output scored/ --tasks review/tasks.json [--where EXPR] [--limit N] [--image-root DIR]
    python -m jobs.review import --annotations export.json --verdicts verdicts/

``export`` writes Label Studio tasks for the rows ``--where`` selects (default: the flagged rows)
of a committed output (Parquet or Delta), lowest ITM first, and the labeling config beside the
tasks file (``tasks.label-config.xml``). ``import`` merges a Label Studio JSON export into a
verdicts table (``verdicts/verdicts.parquet``) that ``jobs.calibrate --labels`` takes as it is.
The logic lives in ``pipelines.review.labelstudio``.

Exit codes: 0 done; 1 failed (nothing was replaced); 2 usage or input error (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import UsageParser

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def make_parser(prog: str = "python -m jobs.review") -> argparse.ArgumentParser:
    parser = UsageParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=UsageParser)
    export = commands.add_parser("export", help="Label Studio tasks for the flagged rows of a committed output.")
    export.add_argument("--output", required=True, help="A committed jobs.score output: directory, s3:// prefix or Delta table (TABLE/dt=D for one day).")
    export.add_argument("--tasks", required=True, help="The tasks file to write (JSON); the labeling config goes beside it.")
    export.add_argument("--where", help="Which rows, instead of the default 'flagged': a condition over the output's columns, "
                        "e.g. \"flagged and category == 'shoes'\" or \"itm_score < 0.7\" (comparisons, in [..], "
                        "'reason' in flag_reasons, is None, and/or/not; nothing else is evaluated).")
    export.add_argument("--limit", type=_positive, help="At most N tasks, lowest ITM first.")
    export.add_argument("--image-root", metavar="DIR", help="Label Studio's local-files document root: local image paths "
                        "under it become /data/local-files/?d= URLs (otherwise they are embedded inline).")
    export.add_argument("--json", action="store_true", help="Print the result as JSON.")
    imported = commands.add_parser("import", help="A Label Studio JSON export into the verdicts table.")
    imported.add_argument("--annotations", required=True, help="Label Studio JSON export (Export > JSON) of the project.")
    imported.add_argument("--verdicts", required=True, help="Verdicts table: a directory (verdicts.parquet inside) or a .parquet path, local or s3://.")
    imported.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m jobs.review") -> int:
    args = make_parser(prog).parse_args(argv)
    from pipelines.review import labelstudio as ls

    try:
        if args.command == "export":
            result = ls.export_tasks(ls.ExportOptions(args.output, args.tasks, args.where, args.limit, args.image_root))
            line = (f"wrote {result.tasks} tasks ({result.rows} rows in the output; images: "
                    f"{', '.join(f'{k} {v}' for k, v in sorted(result.images.items())) or 'none'}; "
                    f"{result.evidence} with evidence) to {result.tasks_path}, labeling config {result.config_path}")
        else:
            result = ls.import_verdicts(args.annotations, args.verdicts)
            line = (f"{result.verdicts} verdicts from {result.tasks} tasks ({result.unannotated} without a verdict; "
                    f"{', '.join(f'{k} {v}' for k, v in sorted(result.by_verdict.items())) or 'none'}); "
                    f"{result.replaced} replaced an earlier verdict; {result.path} holds {result.table_rows}")
    except ls.ReviewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001  (storage or write failures: nothing was replaced)
        print(f"error: review {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result.as_dict(), sort_keys=True) if args.json else line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
