"""KV bandwidth of the P-route's Mooncake transfer: bytes moved / transfer time, from the prefill server's metrics.

    python -m experiments.gpu_kv_bandwidth --link nvlink --out results/h200x2/kv_bandwidth_nvlink.json

The prefill server (started with --enable-metrics) observes, per request, `sglang:kv_transfer_total_mb` (the
prompt's KV: pages x bytes per page over all layers) and `sglang:kv_transfer_latency_ms` (from the request entering
the transfer queue, after its last prefill chunk, to the transfer's completion). One request at a time, so the
change of each histogram's _sum is that request's value. Prompts no longer than the chunked-prefill size (8192) are
used: a longer prompt's earlier chunks move during its prefill, and its latency would cover the last chunk only.
The client-side TTFT of the same request is recorded beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys

from experiments import gpu_common as G

SUM_MB = "sglang:kv_transfer_total_mb_sum"
SUM_MS = "sglang:kv_transfer_latency_ms_sum"
COUNT = "sglang:kv_transfer_latency_ms_count"


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    rows = []
    async with G.client() as c:
        await G.pd(c, args.prefill, args.decode, args.bootstrap_port, G.random_ids(rng, 256), 4)  # warm-up
        for n in args.lengths:
            for rep in range(args.reps):
                before = await G.scrape(c, args.prefill)
                g = await G.pd(c, args.prefill, args.decode, args.bootstrap_port, G.random_ids(rng, n), 4)
                await asyncio.sleep(0.3)  # the prefill scheduler observes the transfer when it polls it done
                after = await G.scrape(c, args.prefill)
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (SUM_MB, SUM_MS, COUNT)}
                mb, ms = d[SUM_MB], d[SUM_MS]
                row = {
                    "prompt_tokens": n,
                    "rep": rep,
                    "ok": g.ok,
                    "error": g.error,
                    "observed_transfers": d[COUNT],
                    "kv_mb": round(mb, 2),
                    "transfer_ms": round(ms, 3),
                    "gb_per_s": round(mb / 1024 / (ms / 1000), 2) if ms > 0 else None,  # SGLang's own unit: GiB/s
                    "ttft_ms": None if g.ttft_s is None else round(g.ttft_s * 1000, 2),
                }
                rows.append(row)
                print(
                    f"{args.link} L={n} {row['kv_mb']} MB in {row['transfer_ms']} ms = {row['gb_per_s']} GB/s "
                    f"(TTFT {row['ttft_ms']} ms) {g.error or ''}",
                    flush=True,
                )
    good = [r["gb_per_s"] for r in rows if r["gb_per_s"] and r["observed_transfers"] == 1]
    return {
        "experiment": "gpu_kv_bandwidth",
        "link": args.link,
        "command": " ".join(sys.argv),
        "definition": "kv_transfer_total_mb / kv_transfer_latency_ms per request, from the prefill server's metrics",
        "median_gb_per_s": statistics.median(good) if good else None,
        "versions": G.versions(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--link", required=True, help="label: nvlink | tcp (how the servers were started)")
    p.add_argument("--prefill", default="http://127.0.0.1:31000")
    p.add_argument("--decode", default="http://127.0.0.1:31001")
    p.add_argument("--bootstrap-port", type=int, default=8998)
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    doc = asyncio.run(run(args))
    G.write_json(args.out, doc)
    print(f"median {doc['median_gb_per_s']} GB/s over {args.link}")
    return 0 if doc["median_gb_per_s"] else 1


if __name__ == "__main__":
    sys.exit(main())
