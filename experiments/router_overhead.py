"""The router's own cost on the request path and per streamed chunk: our AppendRouter vs sglang-router 0.3.2 (Rust).

    python -m experiments.router_overhead --out results/router-overhead/router_overhead.json

Starts the embedded emulated stack (configs/local.yaml, `emulator.time_scale` small so server time is short) and the
Rust router (`python -m sglang_router.launch_router --pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL`)
in front of the same emulated prefill/decode servers, then, routers alternating:

1. Request path: fresh random prompts of each length (nothing cached), `--max-new-tokens` out. Ours is asked with
   `x-ppd-policy: prefill` as token ids through /v1/completions (what experiments/gpu_router_compare sends), as text
   through /v1/completions and as text through /v1/chat/completions; the Rust router gets SGLang's native /generate
   with the same ids (the emulated servers speak /generate only, so it cannot take text). Per request: TTFT and E2E
   (wall), and the router process's CPU time (psutil user+system over a block of requests, its idle rate - health
   and metrics polls - subtracted).
2. Per chunk: streams of `--chunk-tokens` output tokens; router CPU ms per 1000 streamed chunks.
3. Concurrency: `--conc-streams` concurrent streams of `--conc-tokens` output tokens each, routers alternating
   (`--conc-reps` rounds). Per round: the router's CPU seconds per second of wall time and per 1000 tokens, tokens/s
   through it, and the client-observed inter-token gap p50/p99 (a chunk carrying k tokens counts one gap since the
   previous chunk and k-1 gaps of 0; ours says k through `stream_options.continuous_usage_stats`, the Rust router's
   /generate chunks through meta_info.completion_tokens). Keep the emulator fast (small time_scale) so the router,
   not the servers, sets the pace.

`--mini-lb` adds sglang-router's Python mini-lb (`launch_router --mini-lb`, aiohttp) as a third router on the
request-path part. On the emulated servers the Rust router's TTFT carries a constant ~40 ms that neither mini-lb nor
ours shows (the same servers, the same /generate bodies; on real SGLang it is the fastest of the three: results/h200x2/
README.md): compare TTFT with mini-lb here, CPU with both.

The box this was built on has 2 cores shared with other work: wall-clock figures are noisy there, CPU-time figures
are the robust ones (many repetitions, medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import orjson
import psutil

from experiments.stack import port_overrides
from ppd.sglang.protocol import generate_body, parse_sse_line

CONFIG = "configs/local.yaml"


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of all the process's threads and of its child processes (our router's calibration worker), at
    nanosecond resolution (/proc/PID/task/*/schedstat, Linux); psutil's user+system ticks (10 ms) elsewhere. A thread
    that exits takes its time with it: both routers keep theirs (uvicorn's loop + a thread pool; tokio's workers)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        procs = [proc]
    return sum(_own_cpu_s(p) for p in procs)


def _own_cpu_s(proc: psutil.Process) -> float:
    tasks = pathlib.Path(f"/proc/{proc.pid}/task")
    if tasks.is_dir():
        total = 0
        for t in tasks.iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return total / 1e9
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def path_ms(sent_unix: float, first_unix: float | None, decode: dict[str, Any]) -> dict[str, float | None]:
    """Where a request's time outside the servers went, from the decode server's wall-clock stamps (the emulator's
    meta_info.ppd `arrival_unix_s`, `first_chunk_unix_s`; client and servers share this box's clock):
    `to_server_ms` = the client's send to the decode server's handler (the router's dispatch, both HTTP hops),
    `from_server_ms` = the decode server's first chunk to the client's first token (the router's relay)."""
    arrival, first_chunk = decode.get("arrival_unix_s"), decode.get("first_chunk_unix_s")
    return {
        "to_server_ms": None if arrival is None else (arrival - sent_unix) * 1000,
        "from_server_ms": None if first_chunk is None or first_unix is None else (first_unix - first_chunk) * 1000,
    }


async def rust_generate(c: httpx.AsyncClient, url: str, ids: list[int], n_out: int) -> dict[str, Any]:
    body = generate_body(ids, {"max_new_tokens": n_out, "temperature": 0.0, "ignore_eos": True}, stream=True)
    sent_unix, t0 = time.time(), time.perf_counter()
    ttft, chunks, first_unix, decode = None, 0, None, {}
    async with c.stream("POST", f"{url}/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"rust router: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            o = parse_sse_line(line)
            if o is None:
                continue
            chunks += 1
            if o.output_ids and ttft is None:
                ttft, first_unix = time.perf_counter() - t0, time.time()
            decode = o.meta_info.get("ppd") or decode  # the decode server's stream: its stamps
    return {
        "ttft_ms": ttft * 1000 if ttft else None,
        "e2e_ms": (time.perf_counter() - t0) * 1000,
        "chunks": chunks,
        **path_ms(sent_unix, first_unix, decode),
    }


async def ours_openai(c: httpx.AsyncClient, url: str, kind: str, prompt: list[int] | str, n_out: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "llama-3-8b",
        "max_tokens": n_out,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    sent_unix, t0 = time.time(), time.perf_counter()
    ttft, chunks, route, first_unix, timings = None, 0, None, None, {}
    async with c.stream("POST", url + path, json=body, headers={"x-ppd-policy": "prefill"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"ours: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunks += 1
            obj = json.loads(line[5:])
            if "error" in obj:
                raise RuntimeError(f"ours: {obj['error']}")
            for ch in obj.get("choices") or []:
                piece = ch.get("text") if kind != "chat" else (ch.get("delta") or {}).get("content")
                if piece and ttft is None:
                    ttft, first_unix = time.perf_counter() - t0, time.time()
            route = (obj.get("ppd") or {}).get("route", route)
            timings = (obj.get("ppd") or {}).get("server_timings", timings)
    if route != "prefill":
        raise RuntimeError(f"ours: expected the P-route, got {route!r}")
    # server_timings is flat, the prefill server's values first: the decode server's differing ones are
    # `decode_server.<key>`
    decode = {k: timings.get(f"decode_server.{k}", timings.get(k)) for k in ("arrival_unix_s", "first_chunk_unix_s")}
    return {
        "ttft_ms": ttft * 1000 if ttft else None,
        "e2e_ms": (time.perf_counter() - t0) * 1000,
        "chunks": chunks,
        **path_ms(sent_unix, first_unix, decode),
    }


async def stream_gaps(c: httpx.AsyncClient, who: str, url: str, ids: list[int], n_out: int) -> dict[str, Any]:
    """One stream, client side kept cheap (raw reads, orjson): arrival time and token count of every chunk."""
    if who == "rust":
        path = "/generate"
        body: dict[str, Any] = generate_body(
            ids, {"max_new_tokens": n_out, "temperature": 0.0, "ignore_eos": True}, stream=True
        )
        headers = {"content-type": "application/json"}
    else:
        path = "/v1/completions"
        body = {
            "model": "llama-3-8b",
            "prompt": ids,
            "max_tokens": n_out,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        headers = {"content-type": "application/json", "x-ppd-policy": "prefill"}
    arrivals: list[tuple[float, int]] = []  # (time, tokens in this chunk)
    seen = 0
    final_total: int | None = None
    per_chunk_counts = True
    pending = b""
    async with c.stream("POST", url + path, content=orjson.dumps(body), headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{who}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for data in r.aiter_raw():
            now = time.perf_counter()
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                obj = orjson.loads(line[5:])
                if "error" in obj:
                    raise RuntimeError(f"{who}: {obj['error']}")
                if who == "rust":
                    total = (obj.get("meta_info") or {}).get("completion_tokens", seen)
                else:
                    choices = obj.get("choices")
                    usage = obj.get("usage")
                    if not choices and usage:
                        final_total = usage["completion_tokens"]  # the closing usage chunk
                    if not choices or not choices[0].get("text"):
                        continue  # the closing chunks (finish_reason, usage)
                    if not usage:
                        per_chunk_counts = False  # a router without continuous_usage_stats: counted a token a chunk
                    total = usage["completion_tokens"] if usage else seen + 1
                if total > seen:
                    arrivals.append((now, total - seen))
                    seen = total
    exact = per_chunk_counts or final_total in (None, seen)  # a token a chunk was right if the totals agree
    return {"arrivals": arrivals, "tokens": final_total if final_total is not None else seen, "exact": exact}


async def concurrency_round(
    c: httpx.AsyncClient, who: str, url: str, proc: psutil.Process, idle: float, rng, hi: int, args
) -> dict[str, Any]:
    prompts = [[rng.randint(10, hi) for _ in range(128)] for _ in range(args.conc_streams)]
    c0, t0 = cpu_s(proc), time.perf_counter()
    res = await asyncio.gather(*(stream_gaps(c, who, url, ids, args.conc_tokens) for ids in prompts))
    wall = time.perf_counter() - t0
    cpu = cpu_s(proc) - c0 - idle * wall
    tokens = sum(r["tokens"] for r in res)
    gaps: list[float] = []
    chunks = 0
    for r in res:
        a = r["arrivals"]
        chunks += len(a)
        for (t_prev, _), (t, k) in zip(a, a[1:], strict=False):
            gaps.append((t - t_prev) * 1000)
            gaps.extend([0.0] * (k - 1))
    return {
        "router": who,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "chunks": chunks,
        "tokens_per_s": round(tokens / wall, 1),
        "cpu_s_per_s": round(cpu / wall, 4),
        "cpu_ms_per_1000_tokens": round(cpu * 1e6 / max(tokens, 1), 2),
        "gap_ms_p50": pct(gaps, 0.5),
        "gap_ms_p90": pct(gaps, 0.9),
        "gap_ms_p99": pct(gaps, 0.99),
        "gap_ms_max": round(max(gaps), 3) if gaps else None,
        # False: some chunk carried several tokens that the router did not count (no continuous_usage_stats), so
        # the gaps are per chunk, not per token; tokens and CPU per token use the closing usage (exact)
        "gaps_per_token": all(r["exact"] for r in res),
    }


def text_of(rng: random.Random, tok, n_tokens: int) -> str:
    """A text that the router's tokenizer turns into about `n_tokens` tokens (random words, no cache hits)."""
    words = [f"w{rng.randrange(10**6)}" for _ in range(n_tokens)]
    text = " ".join(words)
    ids = tok.encode(text)
    return tok.decode(ids[:n_tokens])


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


async def idle_rate(proc: psutil.Process, seconds: float) -> float:
    """Background CPU seconds per wall second (health/metrics polls)."""
    c0, t0 = cpu_s(proc), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_s(proc) - c0) / (time.perf_counter() - t0)


async def block(proc: psutil.Process, idle: float, fn, n: int) -> tuple[list[dict[str, Any]], float]:
    """Run `fn()` n times in a row; returns the results and the router's CPU ms per request (idle subtracted)."""
    c0, t0 = cpu_s(proc), time.perf_counter()
    res = [await fn() for _ in range(n)]
    cpu = cpu_s(proc) - c0 - idle * (time.perf_counter() - t0)
    return res, cpu * 1000 / n


def start_rust(
    prefill: str, bootstrap_port: int, decode: str, port: int, prom_port: int, log: pathlib.Path, mini_lb: bool = False
):
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", prefill, str(bootstrap_port), "--decode", decode,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    cmd += ["--mini-lb"] if mini_lb else ["--prometheus-port", str(prom_port), "--log-level", "warn"]
    f = log.open("w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), cmd


async def wait_ready(c: httpx.AsyncClient, url: str, path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await c.get(url + path)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{url}{path} not ready after {timeout_s:g} s")


def find_router_pid(stack) -> int:
    child = next(ch for ch in stack.supervisor.children if ch.spec.role == "router")
    proc = psutil.Process(child.proc.pid)
    # the spec may wrap the router in a shell or launcher: take the process that runs `-m router`
    for p in [proc, *proc.children(recursive=True)]:
        if any(a == "router" for a in p.cmdline()):
            return p.pid
    return proc.pid


async def measure(
    args: argparse.Namespace,
    ours_url: str,
    rust_url: str,
    ours_pid: int,
    rust_pid: int,
    minilb: tuple[str, int] | None = None,
) -> dict:
    from ppd.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load("builtin")
    rng = random.Random(args.seed)
    hi = tok.vocab_size - 1
    ours_p, rust_p = psutil.Process(ours_pid), psutil.Process(rust_pid)
    print(f"router pids: ours {ours_pid}, rust {rust_pid}", flush=True)
    urls = {"ours": ours_url, "rust": rust_url}
    proc_of = {"ours": ours_p, "rust": rust_p}
    variants = ["rust-generate-ids", "ours-completions-ids", "ours-completions-text", "ours-chat-text"]
    variants = [v for v in variants if v.split("-")[0] == "rust" or v.split("-", 1)[1] in args.ours_variants]
    if minilb is not None:  # sglang-router's Python mini-lb (aiohttp), the same /generate as the Rust router
        urls["minilb"], proc_of["minilb"] = minilb[0], psutil.Process(minilb[1])
        variants.insert(1, "minilb-generate-ids")

    def call(variant: str, n_tokens: int, n_out: int):
        async def fn() -> dict[str, Any]:
            if variant.endswith("generate-ids"):
                who = variant.split("-")[0]
                return await rust_generate(c, urls[who], [rng.randint(10, hi) for _ in range(n_tokens)], n_out)
            kind = "chat" if "chat" in variant else "completions"
            prompt = [rng.randint(10, hi) for _ in range(n_tokens)] if variant.endswith("ids") else texts.pop()
            return await ours_openai(c, ours_url, kind, prompt, n_out)

        return fn

    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as c:
        texts: list[str] = []
        # warm the routers (connection pools, tokenizer, policies; ours: enough requests that the calibration
        # worker process has started and done its first refits, so its start-up is not charged to the first block)
        for v in variants:
            texts.extend(text_of(rng, tok, 256) for _ in range(args.warmup))
            for _ in range(args.warmup):
                await call(v, 256, 4)()
        await asyncio.sleep(2.0)
        idle = {who: await idle_rate(proc, args.idle_s) for who, proc in proc_of.items()}
        print("idle CPU ms/s: " + ", ".join(f"{who} {v * 1000:.1f}" for who, v in idle.items()), flush=True)

        rows = []
        for n in args.lengths if args.reps > 0 else []:
            lat: dict[str, dict[str, list[float]]] = {
                v: {"ttft": [], "e2e": [], "cpu": [], "to_server": [], "from_server": []} for v in variants
            }
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else variants[::-1]
                for v in order:
                    who = v.split("-")[0]
                    if v.endswith("text"):
                        texts.extend(text_of(rng, tok, n) for _ in range(args.block))
                    res, cpu_ms = await block(proc_of[who], idle[who], call(v, n, args.max_new_tokens), args.block)
                    lat[v]["cpu"].append(cpu_ms)
                    lat[v]["ttft"] += [r["ttft_ms"] for r in res if r["ttft_ms"] is not None]
                    lat[v]["e2e"] += [r["e2e_ms"] for r in res]
                    for key in ("to_server", "from_server"):
                        lat[v][key] += [r[f"{key}_ms"] for r in res if r.get(f"{key}_ms") is not None]
            for v in variants:
                row = {
                    "prompt_tokens": n,
                    "variant": v,
                    "n": len(lat[v]["e2e"]),
                    "cpu_ms_per_req_p50": pct(lat[v]["cpu"], 0.5),
                    "cpu_ms_per_req_mean": round(statistics.fmean(lat[v]["cpu"]), 3),
                    "ttft_ms_p50": pct(lat[v]["ttft"], 0.5),
                    "ttft_ms_p90": pct(lat[v]["ttft"], 0.9),
                    "e2e_ms_p50": pct(lat[v]["e2e"], 0.5),
                    "e2e_ms_p90": pct(lat[v]["e2e"], 0.9),
                    "to_server_ms_p50": pct(lat[v]["to_server"], 0.5),
                    "from_server_ms_p50": pct(lat[v]["from_server"], 0.5),
                }
                rows.append(row)
                print(row, flush=True)

        chunk_rows = []
        stream_variants = ["rust-generate-ids", "ours-completions-ids"]
        per: dict[str, list[float]] = {v: [] for v in stream_variants}
        for rep in range(args.chunk_reps):
            for v in stream_variants if rep % 2 == 0 else stream_variants[::-1]:
                who = v.split("-")[0]
                res, cpu_ms = await block(proc_of[who], idle[who], call(v, 128, args.chunk_tokens), 2)
                chunks = statistics.fmean(r["chunks"] for r in res)
                per[v].append(cpu_ms / chunks * 1000)
        for v in stream_variants if args.chunk_reps > 0 else []:
            row = {
                "variant": v,
                "output_tokens": args.chunk_tokens,
                "streams": len(per[v]) * 2,
                "cpu_ms_per_1000_chunks_p50": pct(per[v], 0.5),
                "cpu_ms_per_1000_chunks_mean": round(statistics.fmean(per[v]), 2) if per[v] else None,
            }
            chunk_rows.append(row)
            print(row, flush=True)
        conc_rows = []
        for rep in range(args.conc_reps):
            for who in ("rust", "ours") if rep % 2 == 0 else ("ours", "rust"):
                if args.conc_streams <= 0:
                    break
                row = await concurrency_round(c, who, urls[who], proc_of[who], idle[who], rng, hi, args)
                row["round"] = rep
                conc_rows.append(row)
                print(row, flush=True)
    return {
        "request": rows,
        "chunks": chunk_rows,
        "concurrency": conc_rows,
        "conc_streams": args.conc_streams,
        "conc_tokens": args.conc_tokens,
        "idle_cpu_ms_per_s": {k: v * 1000 for k, v in idle.items()},
    }


def markdown(doc: dict) -> str:
    out = [
        "# Router overhead: AppendRouter (`prefill` policy) vs sglang-router 0.3.2 (Rust"
        + (", mini-lb" if any(r["variant"].startswith("minilb") for r in doc["request"]) else "")
        + ")",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Emulated stack ({CONFIG}, emulator.time_scale={doc['time_scale']}), the routers in front of the same "
        f"emulated prefill/decode servers; {doc['reps']} alternating repetitions of {doc['block']} requests per "
        f"length and router, {doc['max_new_tokens']} output tokens. CPU = the router process's CPU time (all "
        "threads and child processes, /proc schedstat), its idle rate (health/metrics polls) subtracted. The box has 2 shared cores with other jobs "
        "running: CPU-time figures are the robust ones; wall-clock TTFT/E2E are noisy and include the emulated "
        "servers' own (scaled) time.",
        "",
        "To server / from server (wall ms, p50): the client's send to the decode server's handler, and the decode "
        "server's first chunk to the client's first token (the emulator's wall-clock stamps; one clock on this box): "
        "what the router adds on each way, HTTP hops included.",
        "",
        "| prompt tokens | router / request | CPU ms/req p50 | CPU ms/req mean | TTFT p50 | TTFT p90 | E2E p50 | E2E p90 "
        "| to server p50 | from server p50 | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["request"]:
        out.append(
            f"| {r['prompt_tokens']} | {r['variant']} | {r['cpu_ms_per_req_p50']} | {r['cpu_ms_per_req_mean']} | "
            f"{r['ttft_ms_p50']} | {r['ttft_ms_p90']} | {r['e2e_ms_p50']} | {r['e2e_ms_p90']} | "
            f"{r.get('to_server_ms_p50')} | {r.get('from_server_ms_p50')} | {r['n']} |"
        )
    if doc["chunks"]:
        out += [
            "",
            "Per streamed chunk (128-token prompt, one chunk per output token):",
            "",
            "| router / request | output tokens | streams | CPU ms per 1000 chunks p50 | mean |",
            "|---|---|---|---|---|",
        ]
    for r in doc["chunks"]:
        out.append(
            f"| {r['variant']} | {r['output_tokens']} | {r['streams']} | {r['cpu_ms_per_1000_chunks_p50']} | "
            f"{r['cpu_ms_per_1000_chunks_mean']} |"
        )
    if doc.get("concurrency"):
        out += [
            "",
            f"Concurrency: {doc['conc_streams']} concurrent streams of {doc['conc_tokens']} output tokens (128-token "
            "prompts), one round per row. CPU s/s = router CPU seconds per wall second; gaps are client-observed "
            "per token (a chunk of k tokens: one gap since the previous chunk, k-1 gaps of 0).",
            "",
            "| round | router | tokens/s | chunks | CPU s/s | CPU ms / 1000 tokens | gap p50 ms | gap p90 ms | "
            "gap p99 ms | gap max ms | wall s | gaps per token |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["concurrency"]:
            out.append(
                f"| {r['round']} | {r['router']} | {r['tokens_per_s']} | {r['chunks']} | {r['cpu_s_per_s']} | "
                f"{r['cpu_ms_per_1000_tokens']} | {r['gap_ms_p50']} | {r['gap_ms_p90']} | {r['gap_ms_p99']} | "
                f"{r['gap_ms_max']} | {r['wall_s']} | {r['gaps_per_token']} |"
            )
    idle = doc["idle_cpu_ms_per_s"]
    out += ["", "Idle CPU (subtracted): " + ", ".join(f"{who} {v:.1f} ms/s" for who, v in idle.items()) + ".", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    p.add_argument("--reps", type=int, default=6, help="alternating repetitions per length")
    p.add_argument("--block", type=int, default=5, help="requests per repetition (one CPU reading)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--chunk-reps", type=int, default=6)
    p.add_argument("--conc-streams", type=int, default=32, help="concurrent streams (0: skip the scenario)")
    p.add_argument("--conc-tokens", type=int, default=512)
    p.add_argument("--conc-reps", type=int, default=4, help="rounds, routers alternating")
    p.add_argument("--time-scale", type=float, default=0.02, help="emulator.time_scale (small: short server time)")
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=40, help="requests per request kind before measuring")
    p.add_argument(
        "--ours-variants",
        type=lambda s: s.split(","),
        default=["completions-ids", "completions-text", "chat-text"],
        help="which of our request kinds to run",
    )
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra stack config override")
    p.add_argument("--mini-lb", action="store_true", help="also measure sglang-router's Python mini-lb (--mini-lb)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default="results/router-overhead/router_overhead.json")
    args = p.parse_args(argv)

    from launch.supervisor import free_ports, start_stack

    sets = [f"emulator.time_scale={args.time_scale}", *args.sets]
    stack = start_stack(CONFIG, overrides=sets + port_overrides(CONFIG, sets))
    rust = minilb = None
    try:
        cfg = stack.config
        rust_port, prom_port, minilb_port = free_ports(3)
        rust, rust_cmd = start_rust(
            stack.prefill_urls[0],
            int(cfg.prefill[0].bootstrap_port or 0),
            stack.decode_urls[0],
            rust_port,
            prom_port,
            stack.log_dir / "sglang-router.log",
        )
        rust_url = f"http://127.0.0.1:{rust_port}"
        minilb_url = f"http://127.0.0.1:{minilb_port}"
        if args.mini_lb:
            minilb, _ = start_rust(
                stack.prefill_urls[0],
                int(cfg.prefill[0].bootstrap_port or 0),
                stack.decode_urls[0],
                minilb_port,
                0,
                stack.log_dir / "mini-lb.log",
                mini_lb=True,
            )

        async def go() -> dict:
            async with httpx.AsyncClient() as c:
                await wait_ready(c, rust_url, "/health")
                if minilb is not None:
                    await wait_ready(c, minilb_url, "/health")
            other = (minilb_url, minilb.pid) if minilb is not None else None
            return await measure(args, stack.router_url, rust_url, find_router_pid(stack), rust.pid, other)

        doc = asyncio.run(go())
    finally:
        for proc in (rust, minilb):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        stack.stop()
    doc.update(
        {
            "experiment": "router_overhead",
            "command": "python -m experiments.router_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
            "rust_router": " ".join(rust_cmd[1:]),
            "time_scale": args.time_scale,
            "reps": args.reps,
            "block": args.block,
            "max_new_tokens": args.max_new_tokens,
            "stack_overrides": sets,
        }
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
