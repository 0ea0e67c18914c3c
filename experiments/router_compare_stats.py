"""A closer look at a `gpu_router_compare` run: paired differences with confidence intervals, and the servers' side.

    python -m experiments.router_compare_stats paired --json results/h200x2/session4/router_compare.json
    python -m experiments.router_compare_stats servers --logs run/logs --reps 61 \
        --routers ours,ours-before,sglang-router,mini-lb

`paired`: from the run's per-round TTFTs (`rounds`), ours minus each other router, round by round (the rotation puts
every router in every position alike): median, a 95 % bootstrap interval of the median, mean, and in how many rounds
ours was faster. `--json` repeated pools several runs (rounds pair within their run). Runs of a build that reports
`router_ms` also get our router's own time on the path per phase (dispatch, relay): median and p90 (with `--out X.json`,
written to X.router_path.json).

`servers`: SGLang's per-request `Req Time Stats` lines (`--enable-request-time-stats-logging`) of the prefill and
the decode server, joined by bootstrap room. The timed requests of each length are the last `reps x routers` rooms
of that input length, in the run's rotation order (round r starts with router r mod k) or, given the run's JSON,
in the orders it drew (`--order shuffle`), which assigns each to its router; our router sends the same rid to both servers, the others do not, which checks the assignment. Per router
and length, medians of: the prefill's wait for the decode server's handshake (`bootstrap`), its queue and forward
times, the decode server's pre-allocation and its wait for the KV (`transfer`), and `skew_ms`: how much longer the
decode side took from its own arrival to the KV than the prefill side from its arrival to its end, i.e. about how
much later than the decode half the prefill half reached its server.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from experiments.gpu_logs import ReqStats, req_stats


def paired(docs: dict | list[dict], seed: int = 0, resamples: int = 2000) -> list[dict]:
    """Ours minus each other router at each length. Several runs (`docs`) are pooled: rounds pair within their run,
    and a router missing from a run (`--ours-before` in one only) is compared over the runs that have it."""
    docs = [docs] if isinstance(docs, dict) else docs
    keys = [k for doc in docs for k in doc["rounds"]]
    names = sorted({k.split("@")[0] for k in keys}, key=lambda n: (n != "ours", n))
    lengths = sorted({int(k.split("@")[1]) for k in keys})
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        for ref in names[1:]:
            diffs, runs = [], 0
            for doc in docs:
                rounds = doc["rounds"]
                if f"ours@{n}" not in rounds or f"{ref}@{n}" not in rounds:
                    continue
                runs += 1
                diffs += [
                    a - b
                    for a, b in zip(rounds[f"ours@{n}"], rounds[f"{ref}@{n}"], strict=True)
                    if a is not None and b is not None
                ]
            if not diffs:
                continue
            meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
            rows.append(
                {
                    "prompt_tokens": n,
                    "ours_minus": ref,
                    "runs": runs,
                    "rounds": len(diffs),
                    "paired_median_ms": round(statistics.median(diffs), 2),
                    "ci95_low_ms": round(meds[int(0.025 * resamples)], 2),
                    "ci95_high_ms": round(meds[int(0.975 * resamples) - 1], 2),
                    "mean_ms": round(statistics.fmean(diffs), 2),
                    "ours_faster_rounds": sum(d < 0 for d in diffs),
                }
            )
    return rows


def router_path(docs: list[dict]) -> list[dict]:
    """Our router's own time on the path (`router_ms` of its answers, pooled over the runs): median and p90 per
    phase and length, in ms."""
    pooled: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for doc in docs:
        for key, values in (doc.get("router_ms_rounds") or {}).items():
            name, n = key.split("@")
            for v in values:
                for phase, ms in (v or {}).items():
                    if ms is not None:
                        pooled[(name, int(n))][phase].append(ms)
    rows = []
    for (name, n), phases in sorted(pooled.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for phase, xs in phases.items():
            xs.sort()
            rows.append(
                {
                    "router": name,
                    "prompt_tokens": n,
                    "phase": phase,
                    "requests": len(xs),
                    "median_ms": round(statistics.median(xs), 3),
                    "p90_ms": round(xs[int(0.9 * (len(xs) - 1))], 3),
                }
            )
    return rows


def _parse(path: Path) -> dict[int, ReqStats]:
    """A server log's `Req Time Stats` by bootstrap room (`.gz` too)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return {r.room: r for r in req_stats(raw.decode(errors="replace").splitlines())}


def servers(logs: Path, reps: int, routers: list[str], orders: dict[str, list[list[str]]] | None = None) -> list[dict]:
    prefill = _parse(sorted(logs.glob("prefill-0.*.log*"))[0])
    decode = _parse(sorted(logs.glob("decode-0.*.log*"))[0])
    rooms = sorted((r for r in prefill if r in decode), key=lambda r: prefill[r].start)
    rows = []
    lengths = sorted({prefill[r].input_len for r in rooms})
    if orders:  # the run's own lengths only (the servers' logs may hold earlier runs)
        lengths = [n for n in lengths if str(n) in orders]
    for n in lengths:
        timed = [r for r in rooms if prefill[r].input_len == n][-reps * len(routers) :]
        if len(timed) < reps * len(routers):
            continue  # not a timed length (warm-up requests)
        by: dict[str, list[int]] = defaultdict(list)
        for i, room in enumerate(timed):
            rnd, pos = divmod(i, len(routers))
            if orders and str(n) in orders:  # the run's own orders (`--order shuffle`)
                by[orders[str(n)][rnd][pos]].append(room)
            else:
                k = rnd % len(routers)
                by[(routers[k:] + routers[:k])[pos]].append(room)
        for name in routers:
            xs = by[name]

            def med(f, xs=xs) -> float:
                return round(statistics.median(f(r) for r in xs), 2)

            rows.append(
                {
                    "prompt_tokens": n,
                    "router": name,
                    "requests": len(xs),
                    "same_rid_both_servers": sum(prefill[r].rid == decode[r].rid for r in xs),
                    "prefill_bootstrap_ms": med(lambda r: prefill[r].ms["bootstrap"]),
                    "prefill_queue_ms": med(lambda r: prefill[r].ms["queue_duration"]),
                    "prefill_forward_ms": med(lambda r: prefill[r].ms["forward_duration"]),
                    "decode_prealloc_ms": med(lambda r: decode[r].ms["prealloc_queue_duration"]),
                    "decode_transfer_ms": med(lambda r: decode[r].ms["transfer_duration"]),
                    "skew_ms": med(
                        lambda r: (
                            decode[r].ms["prealloc_queue_duration"]
                            + decode[r].ms["transfer_duration"]
                            - prefill[r].ms["bootstrap_queue_duration"]
                            - prefill[r].ms["queue_duration"]
                            - prefill[r].ms["forward_duration"]
                        )
                    ),
                }
            )
    return rows


def _print(rows: list[dict]) -> None:
    if not rows:
        print("nothing found")
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("paired", help="ours minus each router, round by round, with a bootstrap interval")
    a.add_argument(
        "--json", required=True, action="append", help="a gpu_router_compare output with `rounds` (repeat to pool runs)"
    )
    a.add_argument("--out", help="also write the rows here (JSON)")
    b = sub.add_parser("servers", help="the servers' per-request timings, by router")
    b.add_argument("--logs", required=True, help="the directory with prefill-0.*.log and decode-0.*.log (or .log.gz)")
    b.add_argument("--reps", type=int, required=True, help="the run's --reps")
    b.add_argument("--routers", default="ours,ours-before,sglang-router,mini-lb", help="the run's router order")
    b.add_argument("--json", help="the run's output: its per-round orders, when it shuffled them")
    b.add_argument("--out", help="also write the rows here (JSON)")
    args = p.parse_args(argv)
    if args.what == "paired":
        docs = [json.loads(Path(path).read_text()) for path in args.json]
        rows = paired(docs)
        path_rows = router_path(docs)  # builds that report router_ms
        _print(path_rows)
        if args.out and path_rows:
            Path(args.out).with_suffix(".router_path.json").write_text(json.dumps(path_rows, indent=2) + "\n")
    else:
        orders = json.loads(Path(args.json).read_text()).get("orders") if args.json else None
        rows = servers(Path(args.logs), args.reps, args.routers.split(","), orders)
    _print(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
