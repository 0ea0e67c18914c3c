"""Greedy token identity of one conversation by P-route, D-route and a single normal server (issue 6).

    # servers up: single on :31002 (normal mode), decode with ppd.sglang.ext on :31001
    python -m experiments.gpu_identity run --paths single,decode --out /root/run/results/identity_a.json
    # prefill on :31000 up too
    python -m experiments.gpu_identity run --paths prefill,prefill-then-decode --out .../identity_b.json
    python -m experiments.gpu_identity compare .../identity_a.json .../identity_b.json --out .../identity.json
    # (run --paths prefill --suffix @stock against a stock decode server adds the unpatched P-route to the table)

A conversation of `--turns` turns: turn 1 is `--first-tokens` random ids; turn k+1's prompt is turn k's prompt, its
output ids and `--message-tokens` new ids (the same new ids on every path). Paths:
- single: every turn on the normal server (radix cache on) - the reference;
- decode: every turn a D-route local append on the decode server (turn 1 prefilled there from nothing);
- prefill: every turn a P-route (prefill server computes, KV moves to the decode server);
- prefill-then-decode: turn 1 P-route, later turns D-route (the product's common case).
Before each path every server's radix cache is flushed, so paths do not share cached KV.

With dummy weights fixed by seed (SGLang's dummy loader seeds every tensor), identical arithmetic gives identical
tokens. Expected: decode and prefill-then-decode equal single in every turn (same kernels, same chunking, the cached
history's KV computed the same way: prompt by extend, answers by decode steps); prefill equals single in turn 1; in
later turns the prefill server recomputes the previous answer by an extend instead of reusing decode-step KV, a
different order of floating-point sums, so its tokens may part from single's at some position (reported, with the
first differing position). Each D-route turn also checks that the decode server reused prompt + output - 1 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from typing import Any

from experiments import gpu_common as G

PATHS = ("single", "decode", "prefill", "prefill-then-decode")


def route_of(path: str, turn: int) -> str:
    if path == "single":
        return "single"
    if path == "decode" or (path == "prefill-then-decode" and turn > 0):
        return "decode"
    return "prefill"


async def run_path(c, args: argparse.Namespace, path: str) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    prompt = G.random_ids(rng, args.first_tokens)
    messages = [G.random_ids(rng, args.message_tokens) for _ in range(args.turns)]
    turns = []
    prev: tuple[int, int] | None = None  # previous turn's (prompt length, output length)
    for k in range(args.turns):
        route = route_of(path, k)
        if route == "single":
            g = await G.single(c, args.single, prompt, args.max_new_tokens)
        elif route == "decode":
            g = await G.local(c, args.decode, prompt, args.max_new_tokens)
        else:
            g = await G.pd(c, args.prefill, args.decode, args.bootstrap_port, prompt, args.max_new_tokens)
        expected_cached = prev[0] + prev[1] - 1 if prev and route in ("decode", "single") else None
        turns.append(
            {
                "turn": k + 1,
                "route": route,
                "prompt_tokens": len(prompt),
                "output_ids": g.output_ids,
                "ok": g.ok,
                "error": g.error,
                "ttft_ms": None if g.ttft_s is None else round(g.ttft_s * 1000, 2),
                "cached_tokens": g.cached_tokens,
                "expected_cached_tokens": expected_cached,
                "cached_tokens_details": g.details,
            }
        )
        print(
            f"{path} turn {k + 1} ({route}): {len(g.output_ids)} tokens, cached {g.cached_tokens} "
            f"(expected {expected_cached}), TTFT {turns[-1]['ttft_ms']} ms {g.error or ''}",
            flush=True,
        )
        if not g.ok:
            break
        prev = (len(prompt), len(g.output_ids))
        prompt = prompt + g.output_ids + messages[k]
    return turns


async def run(args: argparse.Namespace) -> dict[str, Any]:
    urls = {"single": [args.single], "decode": [args.decode], "prefill": [args.prefill, args.decode]}
    urls["prefill-then-decode"] = [args.prefill, args.decode]
    out: dict[str, Any] = {"experiment": "gpu_identity", "command": " ".join(sys.argv), "settings": vars(args)}
    out["paths"] = {}
    async with G.client() as c:
        for path in args.paths:
            await asyncio.sleep(0.5)
            for url in urls[path]:
                if not await G.flush_cache(c, url):
                    print(f"warning: {url} refused /flush_cache", file=sys.stderr)
            out["paths"][path + args.suffix] = await run_path(c, args, path)
        await asyncio.sleep(args.idle_check_s)  # SGLang's idle memory check raises on a KV leak: still alive?
        out["alive_after_idle"] = {u: await G.health(c, u) for p in args.paths for u in urls[p]}
    out["versions"] = G.versions()
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(docs: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    paths: dict[str, list[dict[str, Any]]] = {}
    alive: dict[str, bool] = {}
    for d in docs:
        paths.update(d["paths"])
        alive.update(d.get("alive_after_idle", {}))
    ref = paths.get(reference)
    rows = []
    for name, turns in paths.items():
        for t in turns:
            r = {"path": name, "turn": t["turn"], "route": t["route"], "ok": t["ok"], "ttft_ms": t["ttft_ms"]}
            if ref is not None and name != reference and t["turn"] <= len(ref):
                rt = ref[t["turn"] - 1]
                diff = first_difference(t["output_ids"], rt["output_ids"])
                same_prompt = t["prompt_tokens"] == rt["prompt_tokens"]
                r.update(identical=diff is None, first_difference=diff, same_prompt_length=same_prompt)
            if t.get("expected_cached_tokens") is not None:
                r["cache_reuse_ok"] = t["cached_tokens"] == t["expected_cached_tokens"]
            r["decode_cached_tokens"] = (t.get("cached_tokens_details") or {}).get("ppd_decode_cached_tokens")
            rows.append(r)
    return {
        "experiment": "gpu_identity",
        "reference": reference,
        "rows": rows,
        "alive_after_idle": alive,
        "paths": paths,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--paths", default="single,decode,prefill,prefill-then-decode")
    r.add_argument("--prefill", default="http://127.0.0.1:31000")
    r.add_argument("--decode", default="http://127.0.0.1:31001")
    r.add_argument("--single", default="http://127.0.0.1:31002")
    r.add_argument("--bootstrap-port", type=int, default=8998)
    r.add_argument("--turns", type=int, default=3)
    r.add_argument("--first-tokens", type=int, default=2048)
    r.add_argument("--message-tokens", type=int, default=256)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--seed", type=int, default=6)
    r.add_argument("--idle-check-s", type=float, default=3.0)
    r.add_argument("--suffix", default="", help="appended to the path names in the output (e.g. @stock)")
    r.add_argument("--out", required=True)
    cp = sub.add_parser("compare")
    cp.add_argument("files", nargs="+")
    cp.add_argument("--reference", default="single")
    cp.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.paths = [x for x in args.paths.split(",") if x]
        bad = [x for x in args.paths if x not in PATHS]
        if bad:
            p.error(f"unknown paths {bad}; choose from {PATHS}")
        doc = asyncio.run(run(args))
        G.write_json(args.out, doc)
        return 0 if all(t["ok"] for ts in doc["paths"].values() for t in ts) else 1
    docs = [json.loads(open(f).read()) for f in args.files]
    doc = compare(docs, args.reference)
    G.write_json(args.out, doc)
    cols = [
        ("path", "path"),
        ("turn", "turn"),
        ("route", "route"),
        ("identical", "identical to ref"),
        ("first_difference", "first diff at"),
        ("cache_reuse_ok", "D cache reuse ok"),
        ("decode_cached_tokens", "decode held"),
        ("ttft_ms", "TTFT ms"),
    ]
    table = G.md_table(doc["rows"], cols)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(table + f"\nalive after idle: {doc['alive_after_idle']}\n")
    print(table)
    print("alive after idle:", doc["alive_after_idle"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
