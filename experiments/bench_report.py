"""Markdown tables and a PNG for `ppd bench` results (experiments/bench.py's JSON document)."""

from __future__ import annotations

import math
import pathlib
from typing import Any

SYSTEM_COLORS = {"colocated": "tab:gray", "pd-prefill": "tab:blue", "pd-auto": "tab:green"}


def _f(x: Any, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}"


def _runs(doc: dict[str, Any], cell: str) -> list[dict[str, Any]]:
    return [r for r in doc["runs"] if r["cell"] == cell]


def _system_order(doc: dict[str, Any]) -> list[str]:
    return [s["label"] for s in doc["systems"]]


def pivot_table(doc: dict[str, Any]) -> list[str]:
    """One row per (cell, rate), one column per system: goodput, TTFT p50/p99, TPOT p50/p99."""
    systems = [s for s in _system_order(doc) if any(r["system"] == s for r in doc["runs"])]
    head = ["cell", "rate req/s"] + systems
    lines = [
        "Each system's cell: **goodput req/s** (SLO met) · TTFT p50/p99 ms · TPOT p50/p99 ms.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for cell in doc["settings"]["cells"]:
        for rate in doc["settings"]["rates"]:
            cells = [cell, f"{rate:g}"]
            for s in systems:
                r = next((x for x in doc["runs"] if x["cell"] == cell and x["rate"] == rate and x["system"] == s), None)
                if r is None:
                    cells.append("—")
                    continue
                att = r["slo_attainment"]
                cells.append(
                    f"**{_f(r['goodput_rps'], 2)}** ({_f(100 * att if att is not None else None)}%) · "
                    f"{_f(r['ttft_p50_ms'])}/{_f(r['ttft_p99_ms'])} · {_f(r['tpot_p50_ms'], 1)}/{_f(r['tpot_p99_ms'], 1)}"
                )
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(doc: dict[str, Any], cell: str) -> list[str]:
    lines = [
        "| rate | system | ok/total | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | decode tok/s | goodput req/s "
        "| SLO met | cache hit | routes | send lag p99 | sim: TTFT p50/p99, TPOT p50/p99, goodput |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(_system_order(doc))}
    for r in sorted(_runs(doc, cell), key=lambda x: (x["rate"], order.get(x["system"], 99))):
        routes = ", ".join(f"{k} {100 * v:.0f}%" for k, v in (r.get("route_share") or {}).items())
        att = r["slo_attainment"]
        sim = r.get("sim")
        sim_text = (
            f"{_f(sim['ttft_p50_ms'])}/{_f(sim['ttft_p99_ms'])}, {_f(sim['tpot_p50_ms'], 1)}/{_f(sim['tpot_p99_ms'], 1)}, "
            f"{_f(sim['goodput_rps'], 2)}"
            if sim
            else "—"
        )
        lines.append(
            f"| {r['rate']:g} | {r['system']} | {r['ok']}/{r['requests']} | {_f(r['ttft_p50_ms'])} "
            f"| {_f(r['ttft_p99_ms'])} | {_f(r['tpot_p50_ms'], 1)} | {_f(r['tpot_p99_ms'], 1)} "
            f"| {_f(r['decode_tokens_per_s'])} | {_f(r['goodput_rps'], 2)} | {_f(100 * att if att is not None else None)}% "
            f"| {_f(100 * (r.get('cache_hit_frac') or 0))}% | {routes} | {_f(r.get('send_lag_p99_ms'), 1)} | {sim_text} |"
        )
    return lines


def bench_markdown(doc: dict[str, Any], name: str) -> str:
    st = doc["settings"]
    mach = doc["machine"]
    backend = doc.get("backend", "emulated")
    what = (
        "simulated by `ppd simulate` (SimPy, roofline) on the same traces"
        if backend == "simulated"
        else "emulated stacks (real processes on loopback)"
    )
    lines = [
        f"# `ppd bench` — {name}",
        "",
        f"- backend: {what}",
        f"- command: `{doc['command']}`",
        f"- run: {doc['start_time']} .. {doc.get('end_time') or '(running)'} on {mach['host']} ({mach['cpus']} CPUs, "
        f"load average at the end {mach.get('loadavg')}); emulated GPUs: {doc['stacks'].get('hardware', '?')}",
        "- configs: " + ", ".join(f"{k} `{v}`" for k, v in doc["configs"].items()),
        f"- SLO: TTFT <= {st['slo_ttft_ms']:g} ms and TPOT <= {st['slo_tpot_ms']:g} ms; {st['duration_s']:g} s of "
        f"Poisson arrivals per run; time_scale {st['time_scale']:g} (every time is emulated: wall / time_scale); "
        f"seed {st['seed']}",
        "- TTFT = first token - scheduled issue time; TPOT = (last - first) / (tokens - 1) (experiments/metrics.py, "
        "the same code for every system); goodput = requests meeting both SLOs / seconds of arrivals; decode tok/s = "
        "answer tokens / makespan",
        "- cells: " + "; ".join(f"{k}: {v}" for k, v in doc["cells"].items()),
        "- systems: colocated = normal servers doing prefill and decode (same GPU count); pd-prefill = disaggregated, "
        "every request P-routed (SGLang PD); pd-auto = disaggregated, the router's cost model picks the route",
        "",
        "## Summary",
        "",
        *pivot_table(doc),
    ]
    for cell in st["cells"]:
        if not _runs(doc, cell):
            continue
        lines += ["", f"## {cell} ({doc['cells'][cell]})", "", *detail_table(doc, cell)]
    lines += ["", f"![bench]({name}.png)", ""]
    return "\n".join(lines)


def bench_plot(doc: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Rows: cells; columns: TTFT (p50 solid, p99 dashed), TPOT (same), goodput; x: request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in doc["settings"]["cells"] if _runs(doc, c)]
    systems = _system_order(doc)
    fig, axes = plt.subplots(len(cells), 3, figsize=(13, 2.8 * len(cells)), squeeze=False)
    for i, cell in enumerate(cells):
        runs = _runs(doc, cell)
        for s in systems:
            rs = sorted((r for r in runs if r["system"] == s), key=lambda r: r["rate"])
            if not rs:
                continue
            x = [r["rate"] for r in rs]
            color = SYSTEM_COLORS.get(s)

            def y(key: str, rs=rs) -> list[float]:
                return [r[key] if r[key] is not None else math.nan for r in rs]

            axes[i][0].plot(x, y("ttft_p50_ms"), "o-", color=color, label=f"{s} p50")
            axes[i][0].plot(x, y("ttft_p99_ms"), "o--", color=color, alpha=0.6, label=f"{s} p99")
            axes[i][1].plot(x, y("tpot_p50_ms"), "o-", color=color, label=f"{s} p50")
            axes[i][1].plot(x, y("tpot_p99_ms"), "o--", color=color, alpha=0.6, label=f"{s} p99")
            axes[i][2].plot(x, y("goodput_rps"), "o-", color=color, label=s)
        for ax in axes[i]:
            ax.set_ylim(bottom=0)
        st = doc["settings"]
        axes[i][0].axhline(st["slo_ttft_ms"], color="k", ls=":", lw=0.8)
        axes[i][1].axhline(st["slo_tpot_ms"], color="k", ls=":", lw=0.8)
        offered = {r["rate"]: r["offered_rps"] for r in runs if r.get("offered_rps") is not None}
        xs = sorted(offered)
        axes[i][2].plot(xs, [offered[x] for x in xs], color="k", ls=":", lw=0.8, label="offered")
        axes[i][0].set_ylabel(f"{cell}\nTTFT (emulated ms)")
        axes[i][1].set_ylabel("TPOT (emulated ms)")
        axes[i][2].set_ylabel("goodput (req/s)")
        for ax in axes[i]:
            ax.set_xlabel("request rate (req/s)")
            ax.grid(True, alpha=0.3)
        if i == 0:
            axes[i][0].legend(fontsize=7)
            axes[i][2].legend(fontsize=7)
    fig.suptitle(
        f"ppd bench ({doc.get('backend', 'emulated')}): {doc['stacks'].get('hardware', '')} (SLO dotted)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
