"""Our router's `prefill` policy vs SGLang's own router on the same PD servers: same tokens, TTFT side by side.

    python -m experiments.gpu_router_compare --ours http://127.0.0.1:8000 \
        --sglang http://127.0.0.1:8100 --sglang-label sglang-router --mini-lb http://127.0.0.1:8200 \
        --out results/h200x2/router_compare.json

Reference routers are sglang-router 0.3.2 (`python -m sglang_router.launch_router --pd-disaggregation --prefill URL
PORT --decode URL`, the Rust router; `--mini-lb` for its Python MiniLB), sent SGLang's native /generate with token
ids. Ours gets the same ids as an OpenAI completion (`prompt` as a token list) with `x-ppd-policy: prefill`; the ids
are drawn below the router tokenizer's vocabulary size (it refuses others), which the model's vocabulary contains.
1. Tokens: one prompt per length through each router, greedy, ignore_eos, the servers' caches flushed before each
   (a cached prefix changes the prefill kernel's arithmetic); the reference output ids vs ours (ids from
   our `ppd` extension when it carries them, else the text decoded by the router's tokenizer, compared with the
   reference ids decoded the same way; a dummy-weight model emits ids outside that tokenizer's vocabulary, which
   decode to nothing, so the text comparison is the weaker one and is labelled as such).
2. TTFT: fresh prompts (nothing cached) of each length; every router first gets `--warmup` untimed requests of that
   length, then `--reps` rounds in which each router serves one request, the order rotating round by round (with
   ours + 2 references and 9 reps every router is first, second and third three times; but each router then always
   follows the same one, so whatever a request leaves behind on the servers always lands on the same next router),
   or with `--order shuffle` drawn anew each round (kept in `orders`). Per length: p50 and mean
   TTFT and E2E of each router and ours minus each reference (difference of p50s, of means, and the median of the
   per-round paired differences, which cancels slow drifts of the servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

import httpx

from experiments import gpu_common as G
from ppd.sglang.client import DeltaIds
from ppd.sglang.protocol import generate_body, parse_sse_line


async def via_sglang_router(c: httpx.AsyncClient, url: str, ids: list[int], n_out: int) -> dict[str, Any]:
    body = generate_body(ids, G.sampling(n_out), stream=True)
    t0 = time.perf_counter()
    ttft, out_ids, err = None, [], None
    delta = DeltaIds()  # the servers may stream incremental output_ids (sglang.incremental_streaming_output)
    try:
        async with c.stream("POST", f"{url}/generate", json=body) as r:
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    o = parse_sse_line(line)
                    if o is None:
                        continue
                    if o.output_ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    delta.feed(o)
                    out_ids = list(delta.ids)
    except httpx.HTTPError as e:
        err = repr(e)
    e2e_ms = (time.perf_counter() - t0) * 1000
    return {
        "ttft_ms": None if ttft is None else ttft * 1000,
        "e2e_ms": e2e_ms,
        "output_ids": out_ids,
        "text": None,
        "error": err,
    }


async def via_ours(c: httpx.AsyncClient, url: str, model: str, ids: list[int], n_out: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": n_out,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # ids in the `ppd` object: identity by ids, not by text
    }
    t0 = time.perf_counter()
    ttft, text, ppd, usage, err = None, "", {}, {}, None
    try:
        async with c.stream("POST", f"{url}/v1/completions", json=body, headers={"x-ppd-policy": "prefill"}) as r:
            if r.status_code != 200:
                err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    obj = json.loads(line[5:])
                    for ch in obj.get("choices") or []:
                        if ch.get("text") is not None and ttft is None:
                            ttft = time.perf_counter() - t0
                        text += ch.get("text") or ""
                    ppd = obj.get("ppd") or ppd
                    usage = obj.get("usage") or usage
    except httpx.HTTPError as e:
        err = repr(e)
    return {
        "ttft_ms": None if ttft is None else ttft * 1000,
        "e2e_ms": (time.perf_counter() - t0) * 1000,
        "output_ids": ppd.get("output_ids"),
        "text": text,
        "completion_tokens": usage.get("completion_tokens"),
        "route": ppd.get("route"),
        # the router's own time on the path (ms): dispatch (arrival -> written to the servers), relay (first token
        # read -> its first byte sent); absent from builds before it was measured
        "router_ms": ppd.get("router_ms"),
        "error": err,
    }


def _stats(xs: list[float | None]) -> tuple[float | None, float | None, int]:
    ok = [x for x in xs if x is not None]
    if not ok:
        return None, None, 0
    return round(statistics.median(ok), 2), round(statistics.fmean(ok), 2), len(ok)


def summary_row(
    n: int,
    names: list[str],
    ttft: dict[tuple[str, int], list[float | None]],
    e2e: dict[tuple[str, int], list[float | None]],
) -> dict[str, Any]:
    """One length: p50/mean TTFT and E2E per router; ours minus each reference (p50s, means, paired rounds)."""
    row: dict[str, Any] = {"prompt_tokens": n}
    for name in names:
        p50, mean, k = _stats(ttft.get((name, n), []))
        row[f"{name}_ttft_ms_p50"], row[f"{name}_ttft_ms_mean"], row[f"{name}_n"] = p50, mean, k
        p50, mean, _ = _stats(e2e.get((name, n), []))
        row[f"{name}_e2e_ms_p50"], row[f"{name}_e2e_ms_mean"] = p50, mean
    for ref in names[1:]:
        for what in ("p50", "mean"):
            a, b = row[f"ours_ttft_ms_{what}"], row[f"{ref}_ttft_ms_{what}"]
            row[f"ours_minus_{ref}_ttft_ms_{what}"] = None if a is None or b is None else round(a - b, 2)
        pairs = [
            a - b
            for a, b in zip(ttft.get(("ours", n), []), ttft.get((ref, n), []), strict=True)
            if a is not None and b is not None
        ]
        row[f"ours_minus_{ref}_ttft_ms_paired_p50"] = round(statistics.median(pairs), 2) if pairs else None
    return row


def router_path_row(path: dict[tuple[str, int], list[dict | None]], n: int) -> dict[str, Any]:
    """Medians of our builds' own time on the path at length n (ms): dispatch and relay, as their answers report."""
    row: dict[str, Any] = {}
    for (name, length), values in path.items():
        if length != n:
            continue
        for phase in ("dispatch", "relay"):
            xs = [v[phase] for v in values if v and v.get(phase) is not None]
            row[f"{name}_router_{phase}_ms_p50"] = round(statistics.median(xs), 3) if xs else None
    return row


def same_tokens(ref: dict[str, Any], ours: dict[str, Any], decode) -> tuple[bool | None, str]:
    if ref["error"] or ours["error"]:
        return None, "error"
    if ours.get("output_ids") is not None:
        return list(ours["output_ids"]) == list(ref["output_ids"]), "ids"
    same_len = ours.get("completion_tokens") in (None, len(ref["output_ids"]))
    return same_len and decode(ref["output_ids"]) == ours["text"], "text (weak: dummy ids outside the vocab)"


async def flush(c: httpx.AsyncClient, args: argparse.Namespace) -> None:
    await asyncio.sleep(0.5)  # SGLang flushes only when idle
    for url in (args.prefill, args.decode):
        if not await G.flush_cache(c, url):
            print(f"warning: /flush_cache refused by {url}", file=sys.stderr)


async def run(args: argparse.Namespace) -> dict:
    from ppd.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(args.tokenizer)
    refs = [(args.sglang_label, args.sglang)] + ([("mini-lb", args.mini_lb)] if args.mini_lb else [])
    rng = random.Random(args.seed)
    hi = tok.vocab_size - 1  # our router refuses prompt ids outside its tokenizer's vocabulary

    def ids_of(n: int) -> list[int]:
        return G.random_ids(rng, n, lo=10, hi=hi)

    async with G.client() as c:
        model = args.model
        # warm every path once
        for _name, url in refs:
            await via_sglang_router(c, url, ids_of(256), 4)
        await via_ours(c, args.ours, model, ids_of(256), 4)

        identity = []
        for n in args.lengths:
            ids = ids_of(n)
            await flush(c, args)
            ours = await via_ours(c, args.ours, model, ids, args.max_new_tokens)
            for name, url in refs:
                await flush(c, args)
                ref = await via_sglang_router(c, url, ids, args.max_new_tokens)
                same, how = same_tokens(ref, ours, tok.decode)
                identity.append(
                    {
                        "router": name,
                        "prompt_tokens": n,
                        "same_tokens": same,
                        "compared": how,
                        "ref_error": ref["error"],
                        "ours_error": ours["error"],
                        "route": ours["route"],
                        "ref_ids_head": ref["output_ids"][:8],
                    }
                )
                print(f"tokens L={n} {name} vs ours: {same} ({how})", flush=True)

        # another build of our router (--ours-before), timed the same way: ours minus it is what the change did
        before = [("ours-before", args.ours_before)] if args.ours_before else []
        routers = [("ours", args.ours)] + before + refs

        async def one(name: str, url: str, n: int) -> dict[str, Any]:
            ids = ids_of(n)  # fresh: no router gets a cache hit the other made
            if name.startswith("ours"):
                return await via_ours(c, url, model, ids, args.max_new_tokens)
            return await via_sglang_router(c, url, ids, args.max_new_tokens)

        # per (router, length): the TTFT/E2E of each round (None where the request failed)
        ttft: dict[tuple[str, int], list[float | None]] = {}
        orders: dict[int, list[list[str]]] = {}  # per length, each round's order
        order_rng = random.Random(args.seed + 1)
        e2e: dict[tuple[str, int], list[float | None]] = {}
        path: dict[tuple[str, int], list[dict | None]] = {}  # our builds' router_ms per round
        for n in args.lengths:
            for _ in range(args.warmup):
                for name, url in routers:
                    await one(name, url, n)
            for rep in range(args.reps):
                if args.order == "shuffle":  # every router after every other one alike, in expectation
                    order = order_rng.sample(routers, len(routers))
                else:  # rotate: every router in every position alike, but always after the same one
                    k = rep % len(routers)
                    order = routers[k:] + routers[:k]
                orders.setdefault(n, []).append([name for name, _ in order])
                for name, url in order:
                    res = await one(name, url, n)
                    ok = res["ttft_ms"] is not None and not res["error"]
                    ttft.setdefault((name, n), []).append(res["ttft_ms"] if ok else None)
                    e2e.setdefault((name, n), []).append(res["e2e_ms"] if ok else None)
                    if name.startswith("ours"):
                        path.setdefault((name, n), []).append(res.get("router_ms") if ok else None)
        rows = [summary_row(n, [r[0] for r in routers], ttft, e2e) for n in args.lengths]
        for row in rows:
            row.update(router_path_row(path, row["prompt_tokens"]))
        for row in rows:
            print(row, flush=True)
    return {
        "experiment": "gpu_router_compare",
        "command": " ".join(sys.argv),
        "max_new_tokens": args.max_new_tokens,
        "reps": args.reps,
        "warmup": args.warmup,
        "identity": identity,
        "ttft": rows,
        # every timed round, in order (None: the request failed): lets runs be pooled and re-analysed
        "rounds": {f"{name}@{n}": ttft.get((name, n), []) for n in args.lengths for name, _ in routers},
        "router_ms_rounds": {f"{name}@{n}": v for (name, n), v in path.items()},
        "order": args.order,
        "orders": {str(n): o for n, o in orders.items()},
        "versions": G.versions(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", default="http://127.0.0.1:8000")
    p.add_argument("--sglang", default="http://127.0.0.1:8100", help="sglang-router (Rust) in PD mode")
    p.add_argument("--sglang-label", default="sglang-router")
    p.add_argument("--mini-lb", default=None, help="sglang-router's --mini-lb, if running")
    p.add_argument("--ours-before", default=None, help="an earlier build of our router, timed alongside (TTFT only)")
    p.add_argument("--prefill", default="http://127.0.0.1:31000", help="flushed before each identity request")
    p.add_argument("--decode", default="http://127.0.0.1:31001")
    p.add_argument("--model", default="llama-3-8b", help="served model name of our router")
    p.add_argument("--tokenizer", default="builtin")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    p.add_argument("--reps", type=int, default=9, help="timed rounds per length (each router once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per router and length first")
    p.add_argument(
        "--order",
        choices=["rotate", "shuffle"],
        default="rotate",
        help="each round's router order: rotated (a fixed cycle: each router always follows the same one) or shuffled",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    doc = asyncio.run(run(args))
    G.write_json(args.out, doc)
    with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(G.md_table(doc["ttft"], [(k, k) for k in doc["ttft"][0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
