"""`ppd` command line. Each subcommand lives in its own module exposing `add_parser(subparsers)`; that function
registers the subparser and sets `func` (called with the parsed args, returns an exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

# module paths, each with add_parser(subparsers); a module that fails to import is reported, not hidden
SUBCOMMANDS = [
    "launch.cli",  # ppd launch
    "ppd.plan_cli",  # ppd plan
    "ppd.simulate_cli",  # ppd simulate
    "experiments.sweep_cli",  # ppd sweep
    "experiments.replay_cli",  # ppd replay
    "experiments.load_cli",  # ppd load
    "experiments.bench_cli",  # ppd bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppd", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
