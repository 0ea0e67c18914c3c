"""`ppd plan`: KV memory and GPU sizing guide (table, or JSON with --json).

    ppd plan --model llama-3-8b --gpu h200 --context 16384 --users 50 [--json]
    ppd plan --workload chat|rag|long-output|TRACE.jsonl --gpus 6 [--policy auto] [--rate R] [--json]

With --workload and --gpus it recommends a prefill:decode split of the GPUs (0:N = colocated) from the cluster
simulator (ppd.simulate.recommend_ratio), printing its reasoning; the search takes a few minutes.
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
    ratio = p.add_argument_group("P:D ratio recommendation (the cluster simulator)")
    ratio.add_argument("--workload", help="chat | rag | long-output | fixed | path to a JSONL trace")
    ratio.add_argument("--gpus", type=int, help="GPU budget to split between prefill and decode servers")
    ratio.add_argument("--policy", default="auto", help="routing policy of the disaggregated candidates (default auto)")
    ratio.add_argument("--rate", type=float, default=None, help="judge goodput at this req/s (default: max sustained)")
    ratio.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run_ratio(args: argparse.Namespace) -> int:
    from ppd.simulate.cluster import ClusterSpec
    from ppd.simulate.recommend import recommend_ratio

    # the simulator's physics is the cost model's own roofline: online calibration would only slow the search
    params = {"calibrate": False} if args.policy == "auto" else {}
    cluster = ClusterSpec(
        gpu=args.gpu, prefill_gpu=args.prefill_gpu, model=args.model, link=args.link, policy=args.policy,
        policy_params=params,
    )  # fmt: skip
    try:
        rec = recommend_ratio(
            args.workload, args.gpus, rate=args.rate, cluster=cluster, seed=args.seed,
            log=lambda m: print(m, file=sys.stderr),
        )  # fmt: skip
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"ppd plan: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(json.dumps(rec.to_dict(), indent=2) if args.json else rec.to_markdown())
    return 0


def run(args: argparse.Namespace) -> int:
    if (args.workload is None) != (args.gpus is None):
        print("ppd plan: --workload and --gpus go together", file=sys.stderr)
        return 2
    if args.workload is not None:
        return run_ratio(args)
    try:
        result = plan(dataclass_from_args(PlanInput, args))
    except (KeyError, ValueError) as err:
        print(f"ppd plan: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0
