"""Single-request TTFT vs context length on real SGLang (the Phase-1 table of ../shared/seeds/001_*.txt, on PD).

    python -m experiments.gpu_context_table --mode pd --prefill http://127.0.0.1:31000 --decode http://127.0.0.1:31001 \
        --lengths 1024,2048,4096,8192,16384,32768,65536,128000 --out results/h200x2/context_table.json

One fresh prompt per length (random token ids, nothing cached), `--max-new-tokens` out with ignore_eos. Columns:
TTFT (client-side, to the first streamed token; on PD it includes the KV move), prefill tok/s = L / TTFT, KV GiB =
L x the model's KV bytes per token (Llama-3-8B: 32 layers x 8 KV heads x 128 x 2 x bf16 = 128 KiB), decode tok/s =
tokens after the first / time from first to last. `--mode single --url U` measures one normal server instead.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from experiments import gpu_common as G
from ppd import specs


async def run(args: argparse.Namespace) -> dict:
    model = specs.model(args.model_spec)
    rng = random.Random(args.seed)
    rows = []
    async with G.client() as c:

        async def one(ids: list[int]) -> G.Generation:
            if args.mode == "pd":
                return await G.pd(c, args.prefill, args.decode, args.bootstrap_port, ids, args.max_new_tokens)
            return await G.single(c, args.url, ids, args.max_new_tokens)

        warm = await one(G.random_ids(rng, 512))  # first request pays one-off costs (graphs, handshakes)
        if not warm.ok:
            print(f"warm-up failed: {warm.error}", file=sys.stderr)
        for n in args.lengths:
            for rep in range(args.reps):
                g = await one(G.random_ids(rng, n))
                row = {
                    "context_tokens": n,
                    "rep": rep,
                    "ok": g.ok,
                    "error": g.error,
                    "ttft_s": None if g.ttft_s is None else round(g.ttft_s, 4),
                    "prefill_tok_per_s": None if not g.ttft_s else round(n / g.ttft_s),
                    "kv_gib": round(model.kv_bytes_per_token * n / 2**30, 3),
                    "decode_tok_per_s": None if g.decode_tok_per_s is None else round(g.decode_tok_per_s, 1),
                    "output_tokens": len(g.output_ids),
                    "e2e_s": round(g.e2e_s, 4),
                    "cached_tokens": g.cached_tokens,
                }
                rows.append(row)
                print(
                    f"L={n:>6} TTFT={row['ttft_s']} s prefill={row['prefill_tok_per_s']} tok/s "
                    f"KV={row['kv_gib']} GiB decode={row['decode_tok_per_s']} tok/s {g.error or ''}",
                    flush=True,
                )
    return {
        "experiment": "gpu_context_table",
        "mode": args.mode,
        "command": " ".join(sys.argv),
        "max_new_tokens": args.max_new_tokens,
        "model_spec": args.model_spec,
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "versions": G.versions(),
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    cols = [
        ("context_tokens", "context (tokens)"),
        ("ttft_s", "TTFT (s)"),
        ("prefill_tok_per_s", "prefill tok/s"),
        ("kv_gib", "KV (GiB)"),
        ("decode_tok_per_s", "decode tok/s"),
    ]
    return G.md_table([r for r in doc["rows"] if r["rep"] == 0], cols)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("pd", "single"), default="pd")
    p.add_argument("--prefill", default="http://127.0.0.1:31000")
    p.add_argument("--decode", default="http://127.0.0.1:31001")
    p.add_argument("--bootstrap-port", type=int, default=8998)
    p.add_argument("--url", default="http://127.0.0.1:31000", help="the server in --mode single")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536,128000")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--model-spec", default="llama-3-8b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    doc = asyncio.run(run(args))
    G.write_json(args.out, doc)
    table = markdown(doc)
    pathlib_md = args.out.rsplit(".", 1)[0] + ".md"
    with open(pathlib_md, "w") as f:
        f.write(table)
    print(table)
    return 0 if all(r["ok"] for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
