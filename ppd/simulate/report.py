"""Markdown tables, JSON and a PNG for simulation results (one row per P:D ratio)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ppd.simulate.recommend import Recommendation


def _f(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _kv(summary: dict[str, Any]) -> str:
    kv = summary["kv"]
    short = {"prefill": "P", "decode": "D", "colocated": "C"}
    order = [r for r in ("prefill", "decode", "colocated") if r in kv]
    return " · ".join(f"{short[r]} {kv[r]['peak_active_frac_max']:.0%}/{kv[r]['mean_active_frac']:.0%}" for r in order)


def sweep_table(rows: Sequence[dict[str, Any]], max_rates: dict[str, float] | None = None) -> str:
    """One row per simulated point. KV = peak / mean share of a server's KV pool held by requests (P prefill, D decode,
    C colocated servers; peak over servers, mean over time and servers); the radix cache fills the rest."""
    head = [
        "P:D",
        "policy",
        "rate req/s",
        "goodput req/s",
        "SLO met",
        "TTFT p50 / p99 ms",
        "TPOT p50 / p99 ms",
        "queue p99 ms",
        "KV peak/mean",
        "link util / GB/s",
        "bottleneck",
    ]
    if max_rates:
        head.append("max rate under SLO")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        tr = s["transfer"]
        cells = [
            s["ratio"],
            s["policy"],
            _f(s.get("rate"), 2),
            _f(s["goodput_rps"], 2),
            f"{s['slo_attainment']:.1%}",
            f"{_f(s['ttft_ms']['p50'])} / {_f(s['ttft_ms']['p99'])}",
            f"{_f(s['tpot_ms']['p50'], 1)} / {_f(s['tpot_ms']['p99'], 1)}",
            _f(s["queue_ms"].get("p99")),
            _kv(s),
            f"{tr['link_util_max']:.0%} / {tr['gbytes_per_s']:.2f}" if tr["count"] else "-",
            s["bottleneck"],
        ]
        if max_rates:
            cells.append(_f(max_rates.get(s["ratio"]), 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommendation_table(rec: Recommendation) -> str:
    rows = [c.summary for c in rec.candidates if c.summary is not None]
    max_rates = {c.ratio: c.max_rate_rps for c in rec.candidates if c.max_rate_rps is not None}
    what = "at the highest rate each sustains" if rec.rate is None else f"at {rec.rate:g} req/s"
    parts = [
        f"**Recommended P:D = {rec.ratio}** for `{rec.workload}` on {rec.gpus} GPUs "
        f"(SLO TTFT <= {rec.slo.ttft_ms:g} ms, TPOT <= {rec.slo.tpot_ms:g} ms; rows {what}).",
        "",
        sweep_table(rows, max_rates or None),
        "",
        *[f"- {line}" for line in rec.reasoning],
    ]
    return "\n".join(parts)


def write_json(path: str | pathlib.Path, payload: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_nan(payload), indent=2, default=_jsonable, allow_nan=False) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(x)
    if isinstance(x, tuple | set):
        return list(x)
    return str(x)


def clean_nan(x: Any) -> Any:
    """NaN -> None everywhere (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: clean_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_nan(v) for v in x]
    return x


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Goodput per ratio (bars) with TTFT p99 and TPOT p99 (lines, right axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [s["ratio"] for s in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(x, [s["goodput_rps"] for s in rows], color="#4C72B0", label="goodput (req/s)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("P:D (0:N = colocated)")
    ax.set_ylabel("goodput under SLO (req/s)")
    ax2 = ax.twinx()
    ax2.plot(x, [s["ttft_ms"]["p99"] or 0 for s in rows], "o-", color="#DD8452", label="TTFT p99 (ms)")
    ax2.plot(x, [(s["tpot_ms"]["p99"] or 0) * 10 for s in rows], "s--", color="#55A868", label="TPOT p99 x10 (ms)")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms, log)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower center", ncol=3, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
