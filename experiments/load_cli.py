"""`ppd load`: bounded open-loop load test (experiments/load.py) against a running router or an embedded stack.

    ppd load --config configs/local.yaml --requests 200 --rate 5
    ppd load --config configs/local.yaml --requests 300 --rate 30 --set router.max_inflight_total=8 --name overload
    ppd load --router-url http://127.0.0.1:8000 --requests 100 --rate 2 --policy decode

Writes results/load/<name>.json (every sample) and <name>.md (the table and the command), and rebuilds
results/load/README.md from every run's JSON there. Exit code 1 if any request was LOST.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shlex
import sys

from experiments import load as L
from experiments import stack as S
from launch.supervisor import LaunchError
from ppd.config import REPO_ROOT

DEFAULT_OUTPUT = REPO_ROOT / "results" / "load"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "load",
        help="bounded open-loop load test: N requests at Poisson rate R; rejected, errors, lost; router overhead",
        description=__doc__.split("\n")[0],
    )
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--router-url", help="a running AppendRouter, e.g. http://127.0.0.1:8000")
    g.add_argument("--config", help="start this stack config (embedded: configs/local.yaml) and stop it after")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --config)")
    p.add_argument("--time-scale", type=float, help="emulator.time_scale (with --config)")
    p.add_argument("--requests", type=int, default=200, help="N: requests of the load phase")
    p.add_argument("--rate", type=float, default=5.0, help="R: Poisson arrival rate, requests per second")
    p.add_argument("--policy", help="x-ppd-policy for the load phase (default: the router's configured policy)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--timeout-s", type=float, default=180.0, help="client deadline per request (after it: LOST)")
    p.add_argument("--overhead-pairs", type=int, default=50, help="router-vs-direct pairs (0 = skip)")
    p.add_argument("--overhead-rate", type=float, default=4.0, help="arrival rate of the overhead phase")
    p.add_argument("--decode-url", help="decode server for the direct calls (default: from the router's /ppd/backends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="file stem of the outputs (default load-r<rate>-n<requests>)")
    p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT))
    p.set_defaults(func=main)
    return p


def _name(args: argparse.Namespace) -> str:
    return args.name or f"load-r{args.rate:g}-n{args.requests}"


def main(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.rate <= 0:
        print("ppd load: --requests must be >= 1 and --rate > 0", file=sys.stderr)
        return 2
    spec = L.LoadSpec(
        requests=args.requests,
        rate_rps=args.rate,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        policy=args.policy,
        seed=args.seed,
        timeout_s=args.timeout_s,
        overhead_pairs=args.overhead_pairs,
        overhead_rate_rps=args.overhead_rate,
    )
    command = "ppd " + shlex.join(sys.argv[1:] if sys.argv[1:2] == ["load"] else ["load", *sys.argv[1:]])
    try:
        with S.open_target(args.router_url, args.config, args.set, time_scale=args.time_scale) as target:
            decode_url = args.decode_url or (target.decode_urls[0] if target.decode_urls else None)
            load, wall_s, over, decode_url = asyncio.run(L.run_load(spec, target.router_url, decode_url))
            report = L.LoadReport(
                spec=spec,
                command=command,
                router_url=target.router_url,
                decode_url=decode_url,
                time_scale=target.time_scale,
                service_rate_rps=L.service_rate_rps(target.config, spec.prompt_tokens),
                load=L.summarize(load, wall_s),
                overhead=L.overhead(over) if over else None,
                config=target.config,
                samples=load + (over or []),
            )
    except (ValueError, LaunchError) as err:
        print(f"ppd load: {err}", file=sys.stderr)
        return 2
    out = write(report, _name(args), pathlib.Path(args.output_dir))
    s = report.load
    print(
        f"ok {s['ok']}  rejected {s['rejected']}  errors {s['error']}  LOST {s['lost']}  "
        f"TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms  "
        f"E2E p50/p99 {s['e2e_ms']['p50']:.0f}/{s['e2e_ms']['p99']:.0f} ms"
    )
    if report.overhead:
        o = report.overhead
        print(
            f"router overhead TTFT p50/p99 {o['ttft_ms_added']['p50']:+.1f}/{o['ttft_ms_added']['p99']:+.1f} ms  "
            f"E2E p50/p99 {o['e2e_ms_added']['p50']:+.1f}/{o['e2e_ms_added']['p99']:+.1f} ms"
        )
    print(f"wrote {out}")
    lost = s["lost"] + (report.overhead["router"]["lost"] + report.overhead["direct"]["lost"] if report.overhead else 0)
    return 1 if lost else 0


def write(report: L.LoadReport, name: str, out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(L.markdown(name, data))
    reports = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            reports[p.stem] = json.loads(p.read_text())
        except ValueError:
            continue
    (out_dir / "README.md").write_text(L.index_markdown(reports))
    return path
