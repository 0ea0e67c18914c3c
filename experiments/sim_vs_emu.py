"""The simulator checked against the emulated stack (issue 12): the same trace through real processes on loopback and
through `ppd.simulate`, side by side.

    python -m experiments.sim_vs_emu         # default rows: 1P1D, 2P2D (and 0:2) x chat, RAG; ~20 min on 2 cores
    python -m experiments.sim_vs_emu --rows 1p1d:chat:4,2p2d:rag:6 --duration-s 20 --time-scale 4

Each row is (stack, workload preset of ppd/simulate/workload.py, request rate). Its trace (fixed seed: arrivals,
prompt and answer lengths, turns, think times, shared prefixes) is sent to the emulated stack by experiments.bench
(token-exact chat messages, the trace's issue-time rule) and simulated by ppd.simulate with the same hardware, chunk
size, KV pool and routing policy as the stack's config, and `link_sharing="none"` (each emulated KV move takes its
own link time). Both sides are summarised by the same code (experiments.bench.summarize over experiments.metrics)
with the same denominator (the seconds of arrivals), so goodput and p50 TTFT are compared like for like; the table gives the % difference (sim - emu) / emu and
flags rows outside the target (15 %). Output: <out-dir>/sim_vs_emu.json (.md, .png).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import pathlib
import random
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from experiments import bench as B
from experiments import metrics as M
from experiments import stack as S
from experiments.client import make_client, model_id
from launch.supervisor import LaunchError
from ppd.config import REPO_ROOT, StackConfig, load_config
from ppd.simulate.cluster import simulate
from ppd.simulate.summary import summarize as sim_summarize
from ppd.simulate.trace import TraceRequest, write_trace
from ppd.simulate.workload import generate, workload
from ppd.tokenizer import ChatTokenizer

STACKS = {
    "1p1d": "configs/local.yaml",
    "2p2d": "configs/local-2p2d.yaml",
    "colocated2": "configs/local-colocated.yaml",
}
DEFAULT_ROWS = "1p1d:chat:8,1p1d:rag:3,1p1d:rag:4,2p2d:chat:16,2p2d:rag:6,2p2d:rag:8,colocated2:chat:8,colocated2:rag:3"
TARGET = 0.15
DEFAULT_OUT = REPO_ROOT / "results" / "sim-vs-emu"


@dataclass(frozen=True)
class Row:
    stack: str  # a STACKS key
    workload: str  # ppd.simulate.workload preset
    rate: float

    @property
    def label(self) -> str:
        return f"{self.stack}:{self.workload}:{self.rate:g}"


def parse_rows(text: str) -> list[Row]:
    rows = []
    for part in text.split(","):
        if not part.strip():
            continue
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"row {part!r}: expected STACK:WORKLOAD:RATE, e.g. 1p1d:chat:4")
        stack, wl, rate = bits
        if stack not in STACKS:
            raise ValueError(f"row {part!r}: unknown stack {stack!r}; known: {', '.join(STACKS)}")
        workload(wl)  # KeyError names the known presets
        rows.append(Row(stack, wl, float(rate)))
    return rows


def as_sent(trace: list[TraceRequest], records: list[B.RequestRecord]) -> list[TraceRequest]:
    """The trace with each prompt length as the router counted it (identical unless a message had to be clamped)."""
    seen = {(r.conversation_id, r.turn): r.prompt_tokens for r in records if r.ok and r.prompt_tokens}
    return [dataclasses.replace(t, prompt_tokens=seen.get((t.conversation_id, t.turn), t.prompt_tokens)) for t in trace]


def pct(sim: float | None, emu: float | None) -> float:
    if sim is None or emu is None or math.isnan(sim) or math.isnan(emu) or emu == 0:
        return math.nan
    return (sim - emu) / emu


KEYS = (
    "goodput_rps",
    "slo_attainment",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "errors",
    "route_share",
)


def compare(row: Row, emu: dict[str, Any], sim: dict[str, Any], sim_detail: dict[str, Any]) -> dict[str, Any]:
    """`emu` and `sim`: experiments.bench.summarize of the two runs (the same code and window); `sim_detail`:
    ppd.simulate's own summary (ratio, bottleneck, busy fractions) for the explanation."""
    out = {
        "row": row.label,
        "stack": row.stack,
        "ratio": sim_detail["ratio"],
        "workload": row.workload,
        "rate": row.rate,
        "requests": emu["requests"],
        "emu": {k: emu[k] for k in KEYS},
        "sim": {
            **{k: sim[k] for k in KEYS},
            "bottleneck": sim_detail["bottleneck"],
            "busy_frac": sim_detail["busy_frac"],
            "ttft_breakdown_ms": sim_detail["ttft_breakdown_ms"],
        },
    }
    out["diff"] = {k: pct(out["sim"][k], out["emu"][k]) for k in ("goodput_rps", "ttft_p50_ms", "tpot_p50_ms")}
    out["within_target"] = all(
        not math.isnan(out["diff"][k]) and abs(out["diff"][k]) <= TARGET for k in ("goodput_rps", "ttft_p50_ms")
    )
    return out


async def run_rows(
    url: str, rows: list[Row], cfg: StackConfig, policy: str, args: argparse.Namespace, texts: B.ChatTexts, echo
) -> list[dict[str, Any]]:
    out = []
    async with make_client() as client:
        model = await model_id(client, url)
        sys_ = B.System(policy or "colocated", cfg.mode, policy if cfg.mode == "disaggregated" else None)
        await B.warm_up(client, url, model, texts, [sys_], args.time_scale)
        for row in rows:
            spec = workload(row.workload)
            trace = generate(spec, row.rate, args.duration_s, args.seed)
            slo = M.Slo(args.slo_ttft_ms or spec.slo_ttft_ms, args.slo_tpot_ms or spec.slo_tpot_ms)
            nonce = f"sve-{row.label}-{args.seed}-{random.getrandbits(32):08x}"
            t = time.perf_counter()
            recs = await B.send_trace(client, url, model, trace, texts, nonce, sys_.policy, args.time_scale)
            wall = time.perf_counter() - t
            emu = B.summarize(recs, slo, args.duration_s)
            sent = as_sent(trace, recs)
            t = time.perf_counter()
            result = simulate(sent, B.cluster_spec(cfg, policy), drain_s=600.0)
            sim = B.summarize(B.sim_records(result), slo, args.duration_s)
            cmp_ = compare(row, emu, sim, sim_summarize(result, slo, row.workload))
            cmp_.update(
                {
                    "slo": dataclasses.asdict(slo),
                    "policy": sys_.label,
                    "window_s": args.duration_s,
                    "wall_s": {"emulated": round(wall, 1), "simulated": round(time.perf_counter() - t, 2)},
                    "send_lag_p99_ms": emu["send_lag_p99_ms"],
                    "prompt_length_mismatches": emu["prompt_length_mismatches"],
                }
            )
            out.append(cmp_)
            d = cmp_["diff"]
            echo(
                f"{row.label:20s} goodput emu {emu['goodput_rps']:.2f} sim {sim['goodput_rps']:.2f} "
                f"({100 * d['goodput_rps']:+.0f}%)  TTFT p50 emu {emu['ttft_p50_ms']:.0f} sim "
                f"{sim['ttft_p50_ms']:.0f} ({100 * d['ttft_p50_ms']:+.0f}%)  [{wall:.0f} s wall]"
            )
            if args.keep_traces:
                stem = f"trace_{row.stack}_{row.workload}_{row.rate:g}" + (
                    f"_{policy}" if policy not in (None, "prefill") else ""
                )
                write_trace(sent, pathlib.Path(args.out_dir) / f"{stem}.jsonl")
    return out


def _f(x: Any, nd: int = 0, pct_: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:+.{nd}f}%" if pct_ else f"{x:.{nd}f}"


def _share(side: dict[str, Any]) -> str:
    shares = side.get("route_share")
    if not shares or "colocated" in shares:  # not recorded (older runs), or no route to choose
        return "—"
    return f"{100 * shares.get('prefill', 0.0):.0f}%"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Simulator vs emulator",
        "",
        f"- command: `{doc['command']}`",
        f"- run: {doc['start_time']} .. {doc['end_time']} on {doc['machine']['host']} ({doc['machine']['cpus']} CPUs, "
        f"load average {doc['machine']['loadavg']}); emulated H200s + Llama-3-8B, time_scale {doc['time_scale']:g} "
        "(emulated = wall / time_scale)",
        f"- {doc['duration_s']:g} s of arrivals per row, seed {doc['seed']}, policy {doc['policy'] or 'colocated'}"
        + (f", overrides {' '.join(doc['overrides'])}" if doc.get("overrides") else "")
        + "; "
        "goodput = requests meeting the SLO / seconds of arrivals (both sides, experiments.bench.summarize); target |diff| <= "
        f"{100 * TARGET:.0f}% on goodput and p50 TTFT",
        "",
        "| row | P:D, routing | requests | SLO ms (TTFT/TPOT) | goodput emu | goodput sim | diff | TTFT p50 emu | TTFT p50 sim "
        "| diff | TPOT p50 emu / sim | SLO met emu / sim | P-route share emu / sim | sim bottleneck | within 15% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        e, s, d = r["emu"], r["sim"], r["diff"]
        lines.append(
            f"| {r['row']} | {r['ratio']} {r['policy']} | {r['requests']} | {r['slo']['ttft_ms']:g}/{r['slo']['tpot_ms']:g} "
            f"| {_f(e['goodput_rps'], 2)} | {_f(s['goodput_rps'], 2)} | {_f(d['goodput_rps'], 0, True)} "
            f"| {_f(e['ttft_p50_ms'])} | {_f(s['ttft_p50_ms'])} | {_f(d['ttft_p50_ms'], 0, True)} "
            f"| {_f(e['tpot_p50_ms'], 1)} / {_f(s['tpot_p50_ms'], 1)} "
            f"| {_f(100 * (e['slo_attainment'] or 0))}% / {_f(100 * (s['slo_attainment'] or 0))}% "
            f"| {_share(e)} / {_share(s)} | {s['bottleneck']} | {'yes' if r['within_target'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key, title in ((axes[0], "goodput_rps", "goodput (req/s)"), (axes[1], "ttft_p50_ms", "TTFT p50 (ms)")):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["emu"][key] or 0 for r in rows], 0.4, label="emulated stack")
        ax.bar([i + 0.2 for i in x], [r["sim"][key] or 0 for r in rows], 0.4, label="ppd simulate")
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"STACK:WORKLOAD:RATE,... (default {DEFAULT_ROWS})")
    p.add_argument("--policy", default="prefill", help="routing policy of the disaggregated stacks (default prefill)")
    p.add_argument("--duration-s", type=float, default=15.0, help="seconds of arrivals per row (emulated)")
    p.add_argument("--time-scale", type=float, default=8.0, help="emulator.time_scale (default %(default)s)")
    p.add_argument("--slo-ttft-ms", type=float, help="default: the workload preset's")
    p.add_argument("--slo-tpot-ms", type=float, help="default: the workload preset's")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every stack and its simulated twin, e.g. router.policy_params.calibrate=false",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    p.add_argument("--name", default="sim_vs_emu", help="file name stem of the outputs (default %(default)s)")
    p.add_argument("--keep-traces", action="store_true", help="write each row's trace (JSONL) to the out dir")
    args = p.parse_args(argv)
    command = "python -m experiments.sim_vs_emu " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        rows = parse_rows(args.rows)
    except (ValueError, KeyError) as err:
        print(f"sim_vs_emu: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "command": command,
        "start_time": datetime.datetime.now().isoformat(timespec="seconds"),
        "time_scale": args.time_scale,
        "duration_s": args.duration_s,
        "seed": args.seed,
        "policy": args.policy,
        "overrides": args.set,
        "target": TARGET,
        "rows": [],
    }
    texts = B.ChatTexts(ChatTokenizer.load("builtin"))
    by_stack: dict[str, list[Row]] = {}
    for r in rows:
        by_stack.setdefault(r.stack, []).append(r)
    try:
        for stack, its_rows in by_stack.items():
            cfg_path = STACKS[stack]
            with S.open_target(None, cfg_path, args.set, time_scale=args.time_scale) as target:
                cfg = load_config(cfg_path, target.overrides)
                policy = args.policy if cfg.mode == "disaggregated" else None
                doc["rows"] += asyncio.run(run_rows(target.router_url, its_rows, cfg, policy, args, texts, print))
    except (ValueError, LaunchError, RuntimeError) as err:
        print(f"sim_vs_emu: {err}", file=sys.stderr)
        return 2
    doc["end_time"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc["machine"] = B.machine()
    doc = B._clean(doc)
    (out_dir / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / f"{args.name}.md").write_text(markdown(doc))
    plot(doc, out_dir / f"{args.name}.png")
    print(markdown(doc))
    print(f"wrote {out_dir}/{args.name}.json (.md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
