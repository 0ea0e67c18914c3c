"""Append-prefill TTFT by P-route vs D-route on real SGLang, straight to the servers (no router).

    python -m experiments.gpu_append --out results/h200x2/append_d_vs_p.json \
        --l-values 2048,16384 --m-values 16,256,2048 --reps 3

For each (L, m): a fresh L-token history is sent once by the P-route (1 output token), so the prefill server's radix
cache holds it and the decode server (running ppd.sglang.ext) holds it too, as after a normal PD turn. Then, `--reps`
times, the history plus m fresh tokens is sent by each route, the order alternating; every measured request has its
own fresh tail, so each finds the same cached state (the history). Reported per route: TTFT median and all values,
the tokens each server reported cached (prefill: meta_info.cached_tokens; decode: its own hit on the D-route and
`ppd_decode_cached_tokens` on the P-route). `--single URL` adds the same appends on a normal server as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from typing import Any

from experiments import gpu_common as G


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    rows = []
    async with G.client() as c:

        async def send(route: str, ids: list[int]) -> G.Generation:
            if route == "prefill":
                return await G.pd(c, args.prefill, args.decode, args.bootstrap_port, ids, args.max_new_tokens)
            if route == "decode":
                return await G.local(c, args.decode, ids, args.max_new_tokens)
            return await G.single(c, args.single, ids, args.max_new_tokens)

        routes = ["prefill", "decode"] + (["single"] if args.single else [])
        await send("prefill", G.random_ids(rng, 256))  # warm-up
        for L in args.l_values:
            history = G.random_ids(rng, L)
            warm = await G.pd(c, args.prefill, args.decode, args.bootstrap_port, history, 1)
            if args.single:
                await G.single(c, args.single, history, 1)
            for m in args.m_values:
                res: dict[str, list[G.Generation]] = {r: [] for r in routes}
                for rep in range(args.reps):
                    order = routes if rep % 2 == 0 else list(reversed(routes))
                    for route in order:
                        res[route].append(await send(route, history + G.random_ids(rng, m)))
                row: dict[str, Any] = {"L": L, "m": m, "warm_ok": warm.ok}
                for route, gens in res.items():
                    ttfts = [g.ttft_s * 1000 for g in gens if g.ok and g.ttft_s is not None]
                    row[f"{route}_ttft_ms_p50"] = round(statistics.median(ttfts), 2) if ttfts else None
                    row[f"{route}_ttft_ms"] = [round(x, 2) for x in ttfts]
                    row[f"{route}_errors"] = [g.error for g in gens if g.error]
                    last = gens[-1]
                    row[f"{route}_cached_tokens"] = last.cached_tokens
                    row[f"{route}_decode_cached_tokens"] = last.details.get("ppd_decode_cached_tokens")
                rows.append(row)
                print(
                    f"L={L} m={m}: "
                    + ", ".join(
                        f"{r} {row[f'{r}_ttft_ms_p50']} ms (cached {row[f'{r}_cached_tokens']})" for r in routes
                    ),
                    flush=True,
                )
    return {
        "experiment": "gpu_append",
        "command": " ".join(sys.argv),
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
        "versions": G.versions(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefill", default="http://127.0.0.1:31000")
    p.add_argument("--decode", default="http://127.0.0.1:31001")
    p.add_argument("--single", default=None, help="a normal server for the single-server baseline")
    p.add_argument("--bootstrap-port", type=int, default=8998)
    p.add_argument("--l-values", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 16384])
    p.add_argument("--m-values", type=lambda s: [int(x) for x in s.split(",")], default=[16, 256, 2048])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    doc = asyncio.run(run(args))
    G.write_json(args.out, doc)
    cols = (
        [("L", "L"), ("m", "m")]
        + [(k, k) for k in doc["rows"][0] if k.endswith("_p50") or k.endswith("_cached_tokens")]
        if doc["rows"]
        else []
    )
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(G.md_table(doc["rows"], cols))
    ok = all(not r[f"{x}_errors"] for r in doc["rows"] for x in ("prefill", "decode"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
