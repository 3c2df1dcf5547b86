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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"score": "jobs.score", "demo": "jobs.demo", "review": "jobs.review"}
    if not argv or argv[0] not in commands:
        print(f"usage: blip-moderate {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(commands[argv[0]], fromlist=["main"])
    return module.main(argv[1:], prog=f"blip-moderate {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
