"""`ppd plan`: KV memory and GPU sizing guide (table, or JSON with --json).

    ppd plan --model llama-3-8b --gpu h200 --context 16384 --users 50 [--json]

TODO(lead): `ppd plan --workload chat|rag|FILE --gpus 6` (the best prefill:decode split for a GPU budget, from the
simulator) belongs here once ppd/simulate/recommend.py exposes `recommend_ratio(...)`; it did not exist when this
module was written, so the flags are not offered rather than stubbed.
"""

from __future__ import annotations

import argparse
import json
import sys

from ppd.flags import add_dataclass_flags, dataclass_from_args
from ppd.plan import PlanInput, format_table, plan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="KV memory and GPU sizing for a model, GPU, context and user count",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_flags(p, PlanInput)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        result = plan(dataclass_from_args(PlanInput, args))
    except (KeyError, ValueError) as err:
        print(f"ppd plan: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0
