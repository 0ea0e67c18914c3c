"""Summaries, oracle regret, CSV and Markdown for sweep results (pure functions over the results list, plus writers).

Cost of one measurement at weight w: `ttft_ms + w x bg_extra_sum_ms` (the append's own wait plus the extra time it
made the background streams wait; at N = 0 it is the TTFT). The per-point oracle is the cheaper of the forced routes
(`prefill`, `decode`: mean cost over repetitions); a policy's regret at a point is its mean cost over the oracle's.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from experiments import metrics as M

BANDS = ("low", "mid", "high")
FORCED = ("prefill", "decode")
POLICY_ORDER = ("prefill", "decode", "threshold", "auto")


def band(cache_rate: float) -> str:
    """low < 0.3 <= mid <= 0.8 < high."""
    if cache_rate < 0.3:
        return "low"
    return "mid" if cache_rate <= 0.8 else "high"


def ordered(policies: Iterable[str]) -> list[str]:
    ps = set(policies)
    return [p for p in POLICY_ORDER if p in ps] + sorted(ps - set(POLICY_ORDER))


def ok_results(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("ok") and r.get("metrics")]


def cost(r: dict[str, Any], weight: float) -> float:
    m = r["metrics"]
    return m["ttft_ms"] + weight * (m.get("bg_extra_sum_ms") or 0.0)


def _stats(rs: list[dict[str, Any]]) -> dict[str, float]:
    ttft = [r["metrics"]["ttft_ms"] for r in rs]
    e2e = [r["metrics"]["e2e_latency_ms"] for r in rs]
    out = {
        "count": len(rs),
        "mean_ttft": M.mean(ttft),
        "p50_ttft": M.percentile(ttft, 50),
        "p95_ttft": M.percentile(ttft, 95),
        "mean_e2e": M.mean(e2e),
        "p50_e2e": M.percentile(e2e, 50),
        "p95_e2e": M.percentile(e2e, 95),
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _by_band(rs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for b in BANDS:
        in_band = [r for r in rs if band(r["test_case"]["cache_rate"]) == b]
        if in_band:
            pols = ordered(r["policy"] for r in in_band)
            out[b] = {p: _stats([r for r in in_band if r["policy"] == p]) for p in pols}
    return out


def summarize(results: Sequence[dict[str, Any]], weight: float = 1.0) -> dict[str, Any]:
    ok = ok_results(results)
    levels = sorted({r["test_case"].get("background_streams", 0) for r in ok})
    return {
        "total_tests": len(results),
        "ok_tests": len(ok),
        "failed_tests": len(results) - len(ok),
        "by_cache_rate": _by_band(ok),
        "by_background": {
            str(n): _by_band([r for r in ok if r["test_case"].get("background_streams", 0) == n]) for n in levels
        },
        "regret": {f"weight_{w:g}": regret_table(ok, w) for w in sorted({weight, 0.0}, reverse=True)},
        "regret_by_route": {
            f"weight_{w:g}": regret_table(ok, w, by="route") for w in sorted({weight, 0.0}, reverse=True)
        },
    }


def point_means(
    results: Iterable[dict[str, Any]], weight: float, by: str = "measured"
) -> dict[tuple[int, int, int], dict[str, dict]]:
    """(N, L, m) -> policy -> {cost, ttft, bg_extra, route (most frequent), reps}.

    by="measured": a policy's cost is the mean of its own measurements. by="route": each measurement is charged the
    mean cost of *all* measurements at that point that took the same route (whatever the policy), so a policy is
    judged by its decisions, not by the run-to-run noise of its own few measurements.
    """
    ok = ok_results(results)
    route_cost: dict[tuple, list[float]] = defaultdict(list)
    for r in ok:
        tc = r["test_case"]
        route_cost[(tc.get("background_streams", 0), tc["context_length"], tc["append_length"], r.get("route"))].append(
            cost(r, weight)
        )
    route_mean = {k: M.mean(v) for k, v in route_cost.items()}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        tc = r["test_case"]
        groups[(tc.get("background_streams", 0), tc["context_length"], tc["append_length"], r["policy"])].append(r)
    out: dict[tuple[int, int, int], dict[str, dict]] = defaultdict(dict)
    for (n, L, m, p), rs in groups.items():
        routes = Counter(r.get("route") for r in rs)
        if by == "route":
            c = M.mean(route_mean[(n, L, m, r.get("route"))] for r in rs)
        else:
            c = M.mean(cost(r, weight) for r in rs)
        out[(n, L, m)][p] = {
            "cost": c,
            "ttft": M.mean(r["metrics"]["ttft_ms"] for r in rs),
            "bg_extra": M.mean(r["metrics"].get("bg_extra_sum_ms") or 0.0 for r in rs),
            "route": routes.most_common(1)[0][0],
            "reps": len(rs),
        }
    return dict(out)


def regret_table(results: Iterable[dict[str, Any]], weight: float, by: str = "measured") -> dict[str, dict[str, Any]]:
    """Per background level N: per policy, regret against the per-point best forced route.

    mean_pct / p95_pct: over points of (cost - oracle) / max(oracle, oracle's TTFT) x 100; mean_ms / p95_ms: cost - oracle; mean_cost_ms:
    the policy's mean cost; total_pct: its mean cost over the oracle's mean cost - 1 (x 100); points: grid points
    where both forced routes exist. `by`: see point_means.
    """
    pm = point_means(results, weight, by)
    levels = sorted({k[0] for k in pm})
    table: dict[str, dict[str, Any]] = {}
    for n in levels:
        pts = {k: v for k, v in pm.items() if k[0] == n and all(f in v for f in FORCED)}
        if not pts:
            continue
        oracle = {k: min(v[f]["cost"] for f in FORCED) for k, v in pts.items()}
        # denominator of the per-point ratio: the oracle's cost, but never below its own TTFT (the others' extra wait
        # cannot be negative; a noisy near-zero or negative estimate must not blow the ratio up)
        floor = {
            k: max(oracle[k], min(v[f]["ttft"] for f in FORCED if v[f]["cost"] == oracle[k])) for k, v in pts.items()
        }
        best_route = Counter(min(FORCED, key=lambda f, v=v: v[f]["cost"]) for v in pts.values())
        row: dict[str, Any] = {
            "_oracle": {
                "points": len(pts),
                "mean_cost_ms": M.mean(oracle.values()),
                "prefill_best_points": best_route.get("prefill", 0),
                "decode_best_points": best_route.get("decode", 0),
            }
        }
        for p in ordered({p for v in pts.values() for p in v}):
            ks = [k for k in pts if p in pts[k]]
            pct = [(pts[k][p]["cost"] - oracle[k]) / floor[k] * 100 for k in ks]
            ms = [pts[k][p]["cost"] - oracle[k] for k in ks]
            oracle_mean = M.mean(oracle[k] for k in ks)
            policy_mean = M.mean(pts[k][p]["cost"] for k in ks)
            row[p] = {
                "points": len(ks),
                "total_pct": (policy_mean / oracle_mean - 1.0) * 100 if oracle_mean > 0 else None,
                "mean_pct": M.mean(pct),
                "p95_pct": M.percentile(pct, 95),
                "mean_ms": M.mean(ms),
                "p95_ms": M.percentile(ms, 95),
                "mean_cost_ms": policy_mean,
            }
        table[str(n)] = row
    return table


# --- writers ---

CSV_FIELDS = (
    "background_streams",
    "context_length",
    "append_length",
    "cache_rate",
    "policy",
    "repetition",
    "ok",
    "route",
    "ttft_ms",
    "tpot_ms",
    "e2e_latency_ms",
    "output_tokens",
    "kv_bytes",
    "bg_tpot_before_p50_ms",
    "bg_tpot_before_p99_ms",
    "bg_max_gap_before_ms",
    "bg_tpot_p50_ms",
    "bg_tpot_p99_ms",
    "bg_max_gap_ms",
    "bg_extra_sum_ms",
    "cost_ms",
    "cost_w0_ms",
    "router_reason",
    "decode_cached_tokens",
    "append_tokens",
    "error",
)


def csv_rows(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        tc, m, rt = r["test_case"], r.get("metrics") or {}, r.get("router") or {}
        row = {k: tc.get(k) for k in ("background_streams", "context_length", "append_length", "cache_rate")}
        row.update({k: r.get(k) for k in ("policy", "repetition", "ok", "route", "error")})
        row.update({k: m.get(k) for k in CSV_FIELDS if k in m})
        row.update(
            {
                "router_reason": rt.get("reason"),
                "decode_cached_tokens": rt.get("decode_cached_tokens"),
                "append_tokens": rt.get("append_tokens"),
            }
        )
        rows.append(row)
    return rows


def write_csv(results: Iterable[dict[str, Any]], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(results))


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def regret_markdown(regret: dict[str, dict[str, Any]], weight: float) -> list[str]:
    lines = [
        f"Cost = append TTFT + {weight:g} x (extra wait imposed on the background streams), emulated ms. "
        "Oracle = the per-point cheaper forced route (prefill, decode). *total vs oracle* = the policy's mean cost over "
        "the oracle's mean cost; per-point regret % = (cost - oracle) / max(oracle, oracle's TTFT).",
        "",
        "| N (background streams) | policy | points | mean cost ms | total vs oracle % | mean regret % | p95 regret % | mean regret ms | p95 regret ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in regret.items():
        o = row["_oracle"]
        lines.append(
            f"| {n} | *oracle* (P best at {o['prefill_best_points']}, D at {o['decode_best_points']}) | {o['points']} "
            f"| {_fmt(o['mean_cost_ms'])} | 0 | 0 | 0 | 0 | 0 |"
        )
        for p, v in row.items():
            if p.startswith("_"):
                continue
            lines.append(
                f"| {n} | {p} | {v['points']} | {_fmt(v['mean_cost_ms'])} | {_fmt(v.get('total_pct'))} "
                f"| {_fmt(v['mean_pct'])} | {_fmt(v['p95_pct'])} | {_fmt(v['mean_ms'])} | {_fmt(v['p95_ms'])} |"
            )
    return lines


def sweep_markdown(doc: dict[str, Any], name: str, weight: float, plots: Sequence[str]) -> str:
    cfg = doc.get("config", {})
    s = doc["summary"]
    lines = [
        f"# Sweep `{name}`",
        "",
        f"- run: {doc.get('start_time')} .. {doc.get('end_time')}; {s['ok_tests']} measurements ok, "
        f"{s['failed_tests']} failed",
    ]
    runs = cfg.get("runs") or ([{"command": cfg["command"]}] if cfg.get("command") else [])
    for k, run in enumerate(runs):
        label = "command" if len(runs) == 1 else f"command {k + 1}/{len(runs)}"
        extra = f" ({run['measurements']} measurements)" if run.get("measurements") is not None else ""
        lines.append(f"- {label}: `{run['command']}`{extra}")
    st = cfg.get("settings", {})
    if st:
        lines.append(
            f"- policies measured: {', '.join(cfg.get('policies_measured', []))}"
            + (
                f"; skipped (router refused): {', '.join(cfg['policies_skipped'])}"
                if cfg.get("policies_skipped")
                else ""
            )
        )
        levels = sorted(int(n) for n in s.get("by_background", {})) or st.get("background_streams")
        scales = sorted({r["time_scale"] for r in doc["results"] if r.get("time_scale")}) or [st.get("time_scale")]
        lines.append(
            f"- max_new_tokens {st.get('max_new_tokens')}, repetitions {st.get('repetitions')}, seed {st.get('seed')}, "
            f"background streams {levels} ({st.get('bg_prompt_tokens')} prompt / "
            f"{st.get('bg_output_tokens')} output tokens), time_scale {', '.join(f'{x:g}' for x in scales)} "
            "(times are emulated ms = wall ms / time_scale)"
        )
    if cfg.get("hardware"):
        lines.append(f"- hardware: {cfg['hardware']}")
    idle_only = all(set(t) <= {"0"} for t in s["regret"].values())
    views = (
        ("regret", "Oracle regret (each policy's own measurements)", ""),
        (
            "regret_by_route",
            "Oracle regret by route taken",
            "Each measurement is charged the mean cost of all measurements at its point that took the same route "
            "(any policy): the quality of each policy's decisions without the run-to-run noise of its own samples.",
        ),
    )
    for key_view, title, note in views:
        lines += ["", f"## {title}"] + (["", note] if note else [])
        for key, table in s[key_view].items():
            w = float(key.split("_", 1)[1])
            if idle_only and w != weight:
                lines += ["", "(No background streams: the cost is the append TTFT whatever the weight.)"]
                continue
            lines += ["", f"### weight {w:g}", ""] + regret_markdown(table, w)
    lines += ["", "## TTFT by cache-rate band (all load levels)", ""]
    lines += [
        "| band | policy | n | mean TTFT | p50 TTFT | p95 TTFT | mean E2E | p95 E2E |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, pols in s["by_cache_rate"].items():
        for p, v in pols.items():
            lines.append(
                f"| {b} | {p} | {v['count']} | {_fmt(v['mean_ttft'])} | {_fmt(v['p50_ttft'])} | {_fmt(v['p95_ttft'])} "
                f"| {_fmt(v['mean_e2e'])} | {_fmt(v['p95_e2e'])} |"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _clean(x: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_sweep_outputs(doc: dict[str, Any], out_dir: pathlib.Path, name: str, weight: float) -> list[pathlib.Path]:
    doc["summary"] = summarize(doc["results"], weight)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1))
    tmp.replace(json_path)  # atomic: the JSON is also the resume point
    csv_path = out_dir / f"{name}.csv"
    write_csv(doc["results"], csv_path)
    try:
        from experiments.plots import sweep_plots
    except ImportError:  # a bare measurement machine: rebuild the plots later with `ppd sweep --report-only`
        plots = []
    else:
        plots = sweep_plots(doc["results"], out_dir, name, weight)
    md_path = out_dir / f"{name}.md"
    md_path.write_text(sweep_markdown(_clean(doc), name, weight, [p.name for p in plots]))
    return [json_path, csv_path, md_path, *plots]
