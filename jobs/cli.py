"""``blip-moderate``: one console script, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class UsageParser(argparse.ArgumentParser):
    """Every job's parser: bad usage exits 2 (as argparse does) with one message format."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# Subcommand -> (module, the one line `blip-moderate --help` shows for it).
COMMANDS = {
    "score": ("jobs.score", "score a Parquet catalog: ITC/ITM scores, captions, evidence, flags, written exactly once"),
    "demo": ("jobs.demo", "score a generated sample catalog end to end on a local Ray"),
    "review": ("jobs.review", "Label Studio tasks for flagged rows (export), and reviewers' verdicts back (import)"),
}


def _usage() -> str:
    lines = [f"usage: blip-moderate {{{','.join(COMMANDS)}}} [options]", "", "subcommands (each takes --help):"]
    lines += [f"  {name:<8} {line}" for name, (_, line) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr)
        return 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:], prog=f"blip-moderate {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
