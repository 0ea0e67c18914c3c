"""PNG plots of sweep and replay results (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from experiments.report import FORCED, ordered, point_means  # noqa: E402

COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "auto": "tab:green", "threshold": "tab:red"}
ROUTE_VALUE = {"prefill": 1.0, "decode": 0.0}


def _levels(pm: dict) -> list[int]:
    return sorted({k[0] for k in pm})


def _axes(n: int, width: float = 5.0, height: float = 4.0, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False)
    return fig, axes


def ttft_vs_cache_rate(pm: dict, path: pathlib.Path, weight: float) -> pathlib.Path:
    """One panel per (load level, L): TTFT against r = L/(L+m) as m varies, a line per policy."""
    levels = _levels(pm)
    ls = sorted({k[1] for k in pm})
    fig, axes = plt.subplots(
        len(levels), len(ls), figsize=(3.2 * len(ls), 2.8 * len(levels)), squeeze=False, sharey=True
    )
    for i, n in enumerate(levels):
        for j, L in enumerate(ls):
            ax = axes[i][j]
            pts = {k: v for k, v in pm.items() if k[0] == n and k[1] == L}
            for p in ordered({p for v in pts.values() for p in v}):
                xs = sorted((k[1] / (k[1] + k[2]), v[p]["ttft"]) for k, v in pts.items() if p in v)
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", ms=3, lw=1, label=p, color=COLORS.get(p))
            ax.set_xscale("logit")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"N={n}, L={L}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(levels) - 1:
                ax.set_xlabel("cache rate r = L/(L+m)", fontsize=8)
            if j == 0:
                ax.set_ylabel("append TTFT (emulated ms)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Append TTFT vs cache rate per policy (m varies along each line)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _matrix(pts: dict, ls: list[int], ms: list[int], fn) -> np.ndarray:
    a = np.full((len(ls), len(ms)), np.nan)
    for (_, L, m), v in pts.items():
        val = fn(v)
        if val is not None:
            a[ls.index(L), ms.index(m)] = val
    return a


def heatmap_tp_td(pm: dict, path: pathlib.Path, weight: float) -> pathlib.Path | None:
    levels = [n for n in _levels(pm) if any(all(f in v for f in FORCED) for k, v in pm.items() if k[0] == n)]
    if not levels:
        return None
    fig, axes = _axes(len(levels), width=6.5, height=4.2)
    for ax, n in zip(axes[0], levels, strict=True):
        pts = {k: v for k, v in pm.items() if k[0] == n}
        ls = sorted({k[1] for k in pts})
        ms = sorted({k[2] for k in pts})
        a = _matrix(
            pts, ls, ms, lambda v: v["prefill"]["cost"] / v["decode"]["cost"] if all(f in v for f in FORCED) else None
        )
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.5, 2.0)
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01))
        im = ax.imshow(a, cmap="coolwarm", norm=norm, aspect="auto", origin="lower")
        for i in range(len(ls)):
            for j in range(len(ms)):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(ms)), [str(m) for m in ms], rotation=90, fontsize=7)
        ax.set_yticks(range(len(ls)), [str(L) for L in ls], fontsize=7)
        ax.set_xlabel("append m (tokens)")
        ax.set_ylabel("cached context L (tokens)")
        what = "TTFT" if n == 0 else f"cost (w={weight:g})"
        ax.set_title(f"T_P / T_D ({what}), N={n}\n>1 (red): D-route cheaper")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _route_value(v: dict, who: str) -> float | None:
    """1 = P-route, 0 = D-route: the oracle's cheaper forced route, or the route a policy took."""
    if who == "oracle":
        return ROUTE_VALUE[min(FORCED, key=lambda f: v[f]["cost"])] if all(f in v for f in FORCED) else None
    return ROUTE_VALUE.get(v[who]["route"]) if who in v else None


def route_maps(pm: dict, path: pathlib.Path, weight: float) -> pathlib.Path | None:
    levels = _levels(pm)
    rows = ["oracle"] + [p for p in ("auto", "threshold") if any(p in v for v in pm.values())]
    if len(rows) == 1 and not any(all(f in v for f in FORCED) for v in pm.values()):
        return None
    fig, axes = _axes(len(levels), width=4.6, height=3.4, rows=len(rows))
    cmap = ListedColormap(["tab:orange", "tab:blue"])
    for c, n in enumerate(levels):
        pts = {k: v for k, v in pm.items() if k[0] == n}
        ls = sorted({k[1] for k in pts})
        ms = sorted({k[2] for k in pts})
        for r, who in enumerate(rows):
            ax = axes[r][c]
            a = _matrix(pts, ls, ms, lambda v, who=who: _route_value(v, who))
            ax.imshow(a, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
            ax.set_xticks(range(len(ms)), [str(m) for m in ms], rotation=90, fontsize=6)
            ax.set_yticks(range(len(ls)), [str(L) for L in ls], fontsize=6)
            label = f"oracle (w={weight:g})" if who == "oracle" else f"{who}: route taken"
            ax.set_title(f"{label}, N={n}", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("append m")
            if c == 0:
                ax.set_ylabel("context L")
    fig.suptitle("Route maps (blue = P-route, orange = D-route)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decision_boundary(pm: dict, path: pathlib.Path, weight: float) -> pathlib.Path | None:
    """Per load level: for each L the smallest m at which the P-route is cheaper (oracle, solid) and at which auto
    takes the P-route (dashed). A point at the top edge means 'never' within the grid."""
    levels = _levels(pm)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drew = False
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(levels):
        pts = {k: v for k, v in pm.items() if k[0] == n}
        ls = sorted({k[1] for k in pts})
        ms = sorted({k[2] for k in pts})
        if not ms:
            continue
        top = ms[-1] * 2
        color = cmap(i / max(1, len(levels) - 1))
        for who, style in (("oracle", "-"), ("auto", "--")):
            xs, ys = [], []
            for L in ls:
                row = [(m, pts[(n, L, m)]) for m in ms if (n, L, m) in pts]
                if who == "oracle":
                    p_wins = [
                        m for m, v in row if all(f in v for f in FORCED) and v["prefill"]["cost"] < v["decode"]["cost"]
                    ]
                    known = any(all(f in v for f in FORCED) for _, v in row)
                else:
                    p_wins = [m for m, v in row if who in v and v[who]["route"] == "prefill"]
                    known = any(who in v for _, v in row)
                if known:
                    xs.append(L)
                    ys.append(min(p_wins) if p_wins else top)
            if xs:
                drew = True
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{who}, N={n}")
    if not drew:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("cached context L (tokens)")
    ax.set_ylabel("smallest m where the P-route is taken / cheaper")
    ax.set_title(f"Decision boundary by load level (cost weight {weight:g}); above the line: P-route")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plots(
    results: Sequence[dict[str, Any]], out_dir: pathlib.Path, name: str, weight: float
) -> list[pathlib.Path]:
    pm = point_means(results, weight)
    if not pm:
        return []
    made = [
        ttft_vs_cache_rate(pm, out_dir / f"{name}_ttft_vs_cache_rate.png", weight),
        heatmap_tp_td(pm, out_dir / f"{name}_heatmap_tp_td.png", weight),
        route_maps(pm, out_dir / f"{name}_route_map.png", weight),
        decision_boundary(pm, out_dir / f"{name}_decision_boundary.png", weight),
    ]
    return [p for p in made if p is not None]


# --- replay ---


def replay_plots(
    summary: dict[str, Any], samples: dict[str, dict[str, list[float]]], path: pathlib.Path
) -> pathlib.Path:
    """CDFs of TTFT and TPOT per policy, and goodput bars, for one replay scenario."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for p in ordered(samples):
        for ax, key in zip(axes[:2], ("ttft_ms", "tpot_ms"), strict=True):
            vals = np.sort([v for v in samples[p].get(key, []) if v is not None and not math.isnan(v)])
            if vals.size:
                ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=p, color=COLORS.get(p))
    for ax, key, slo in zip(axes[:2], ("TTFT", "TPOT"), ("slo_ttft_ms", "slo_tpot_ms"), strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{key} (emulated ms)")
        ax.set_ylabel("fraction of requests")
        if summary.get(slo):
            ax.axvline(summary[slo], color="k", ls=":", label="SLO")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    pols = ordered(summary["policies"])
    axes[2].bar(pols, [summary["policies"][p]["goodput_rps"] or 0 for p in pols], color=[COLORS.get(p) for p in pols])
    axes[2].set_ylabel("goodput (requests/s meeting both SLOs)")
    axes[2].set_title(summary.get("scenario", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
