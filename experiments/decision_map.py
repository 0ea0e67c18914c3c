"""Decision maps of the cost model: for each append (m new tokens over L cached) which route is cheaper, and by how
much (T_P / T_D heat map), per hardware pair, link class and number N of background streams decoding on D.

    python -m experiments.decision_map [--out results/decision-maps] [--pairs h200-h200,h200-h20]
        [--links nvlink,rdma-100g,tcp-25g] [--streams 0,8,32,128] [--weight 1.0]

Writes one PNG per (pair, link) with a panel per N, and README.md with the command, the assumptions and the maps as
text tables (powers of two). Pure model output: no servers, no clocks; measured maps come from `ppd sweep`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from ppd.costmodel import CostParams, route_costs, synthetic_input  # noqa: E402
from ppd.specs import gpu, link, model  # noqa: E402

M_TABLE = [2**i for i in range(12)]  # 1 .. 2048
L_TABLE = [2**i for i in range(9, 15)]  # 512 .. 16384
BACKGROUND_CONTEXT = 2560  # a 2k-prompt stream halfway through a 1k answer (issue 11's defaults)


def params_for(pair: str, link_name: str, model_name: str, weight: float) -> CostParams:
    prefill_gpu, decode_gpu = pair.split("-")
    return CostParams.from_specs(
        model(model_name), gpu(prefill_gpu), gpu(decode_gpu), link(link_name), interference_weight=weight
    )


def ratio(params: CostParams, L: int, m: int, streams: int) -> float:
    """T_P / T_D (costs incl. weighted interference); < 1 means the P-route is cheaper."""
    p, d = route_costs(synthetic_input(L, m, background_streams=streams, background_context=BACKGROUND_CONTEXT), params)
    return p.cost_ms / d.cost_ms


def grid(params: CostParams, ms: list[int], ls: list[int], streams: int) -> np.ndarray:
    return np.array([[ratio(params, L, m, streams) for m in ms] for L in ls])


def text_table(params: CostParams, streams: int) -> str:
    g = grid(params, M_TABLE, L_TABLE, streams)
    head = "| L \\ m | " + " | ".join(str(m) for m in M_TABLE) + " |"
    sep = "|---" * (len(M_TABLE) + 1) + "|"
    rows = [f"| {L} | " + " | ".join(("P" if r < 1 else "D") for r in g[i]) + " |" for i, L in enumerate(L_TABLE)]
    return "\n".join([head, sep, *rows])


def crossover_m(params: CostParams, L: int, streams: int) -> int | None:
    """Smallest power-of-two m in 1..2048 where the P-route is cheaper at this L (None: D everywhere)."""
    for m in M_TABLE:
        if ratio(params, L, m, streams) < 1:
            return m
    return None


def _crossovers(params: CostParams, streams: int) -> str:
    return ", ".join(f"{L}: {c if c is not None else '-'}" for L in L_TABLE for c in [crossover_m(params, L, streams)])


def plot(pair: str, link_name: str, model_name: str, streams: list[int], weight: float, path: pathlib.Path) -> None:
    params = params_for(pair, link_name, model_name, weight)
    ms = np.unique(np.round(np.logspace(0, math.log10(2048), 40)).astype(int)).tolist()
    ls = np.unique(np.round(np.logspace(math.log10(512), math.log10(16384), 30)).astype(int)).tolist()
    fig, axes = plt.subplots(1, len(streams), figsize=(4.8 * len(streams), 4.4), squeeze=False, layout="constrained")
    norm = TwoSlopeNorm(vmin=-4.0, vcenter=0.0, vmax=4.0)
    mesh = None
    for ax, n in zip(axes[0], streams, strict=True):
        z = np.clip(np.log2(grid(params, ms, ls, n)), -4.0, 4.0)
        mesh = ax.pcolormesh(ms, ls, z, cmap="coolwarm", norm=norm, shading="nearest")
        if z.min() < 0 < z.max():
            ax.contour(ms, ls, z, levels=[0.0], colors="black", linewidths=1.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlim(1, 2048)
        ax.set_ylim(512, 16384)
        ax.set_xlabel("m (new tokens)")
        ax.set_ylabel("L (cached on decode)")
        ax.set_title(f"N={n} streams: blue = P cheaper")
    fig.suptitle(f"{model_name}, {pair.replace('-', ' -> ')}, link {link_name}, weight {weight:g}: log2(T_P / T_D)")
    fig.colorbar(mesh, ax=axes[0].tolist(), shrink=0.85, label="log2(T_P / T_D)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/decision-maps")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--pairs", default="h200-h200,h200-h20", help="prefill-decode GPU pairs")
    ap.add_argument("--links", default="nvlink,rdma-100g,tcp-25g")
    ap.add_argument("--streams", default="0,8,32,128", help="background streams decoding on D")
    ap.add_argument("--weight", type=float, default=1.0, help="interference weight (0 = the append's TTFT only)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, links = args.pairs.split(","), args.links.split(",")
    streams = [int(s) for s in args.streams.split(",")]
    cmd = "python -m experiments.decision_map " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Cost-model decision maps",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        "Which route `ppd.costmodel.route_costs` finds cheaper for an append of m new tokens over L tokens cached on",
        "the decode server, with N background streams decoding there (each holding "
        f"{BACKGROUND_CONTEXT} tokens), cost = append TTFT + weight ({args.weight:g}) x extra ms summed over the N "
        "streams. The prefill server is assumed to hold the same L prefix (the P-route's best case, as in "
        "../shared/gpu/NOTES.md's runs); idle prefill queue. Specs and KernelEfficiency as in ppd/specs.py, no "
        "calibration. P = P-route cheaper, D = D-route cheaper. PNGs: colour = log2(T_P / T_D), black line = boundary.",
        "",
    ]
    for pair in pairs:
        for lk in links:
            png = out / f"{args.model}_{pair}_{lk}.png"
            plot(pair, lk, args.model, streams, args.weight, png)
            params = params_for(pair, lk, args.model, args.weight)
            md += [
                f"## {pair.replace('-', ' -> ')}, {lk} ({link(lk).gbytes_per_s:g} GB/s)",
                "",
                f"![map]({png.name})",
                "",
            ]
            ttft_only = params_for(pair, lk, args.model, 0.0)
            for n in streams:
                md += [
                    f"N = {n}: smallest m where P wins, by L: {_crossovers(params, n)}; "
                    f"with weight 0 (append TTFT only): {_crossovers(ttft_only, n)}",
                    "",
                    text_table(params, n),
                    "",
                ]
    (out / "README.md").write_text("\n".join(md))
    print(f"wrote {out}/README.md and {len(pairs) * len(links)} PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
