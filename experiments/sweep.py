"""`ppd sweep`: the append-prefill trade-off over an m x L grid, per policy, optionally under decode load.

For each grid point (L cached tokens, m appended), background level N, repetition and policy:
1. a fresh L-token history (its own random words, so every policy and repetition starts from the same cache state:
   nothing of it cached anywhere) is sent once with the warm-up policy (`prefill` by default: both servers end up
   holding the prefix, as after a normal PD turn) and 1 output token;
2. with N background streams decoding (issue 11), we wait until each has produced a few tokens after the warm-up
   (the "before" window);
3. the history + m new tokens is streamed with `x-ppd-policy: <policy>` and `max_new_tokens` out; TTFT/TPOT/E2E
   are measured client-side, the route and KV bytes read from the router's `ppd` extension, and the background
   streams' gaps before vs during the append's wait for its first token.
Prompts are texts of single-token words, so L and m are exact in tokens whatever the router's tokenizer path.

Per-point cost = append TTFT + weight x (sum over background streams of the extra time the append made them wait).
Results go to one JSON (the format of the P-PD framework document), a CSV, PNG plots and a Markdown report; a JSONL
checkpoint makes the run resumable (points already measured are skipped).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import pathlib
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from experiments import metrics as M
from experiments.background import BackgroundPool
from experiments.client import flush_server_caches, make_client, model_id, probe_policies, stream_request
from experiments.workloads import WordTokens
from ppd.tokenizer import ChatTokenizer

M_FULL = tuple(2**k for k in range(12))  # 1 .. 2048
L_FULL = tuple(512 * 2**k for k in range(6))  # 512 .. 16384
M_MINIMAL = (16, 1024)
L_MINIMAL = (1024, 4096)
M_VALIDATE = (16,)
L_VALIDATE = (512,)
POLICIES = ("prefill", "decode", "auto", "threshold")
FORCED = ("prefill", "decode")


@dataclass(frozen=True)
class SweepSettings:
    m_values: tuple[int, ...] = M_FULL
    l_values: tuple[int, ...] = L_FULL
    policies: tuple[str, ...] = POLICIES
    repetitions: int = 1
    max_new_tokens: int = 32
    seed: int = 0
    background_streams: tuple[int, ...] = (0,)
    bg_prompt_tokens: int = 2048
    bg_output_tokens: int = 1024
    bg_before_tokens: int = (
        16  # background tokens waited for after the warm-up, before the append (the "before" window)
    )
    bg_max_points: int | None = None  # at N > 0, measure only this many grid points (an even subset) to bound time
    bg_direct: bool = False  # background streams straight to the servers (PD protocol), not through the router
    cost_weight: float = 1.0
    warmup_policy: str = "prefill"
    settle_ms: float = 20.0  # idle pause (emulated ms) between warm-up and append when N = 0
    time_scale: float = 1.0
    ignore_eos: bool = True
    tokenizer: str = "builtin"
    prompt_format: str = (
        "ids"  # ids: token-id prompts (no tokenizing in the router's path); text: the same words as text
    )

    def prompt(self, words: WordTokens, ids: list[int]) -> list[int] | str:
        return list(ids) if self.prompt_format == "ids" else words.text_of(ids)

    def extra_body(self) -> dict[str, Any]:
        return {"ignore_eos": True} if self.ignore_eos else {}


def grid(settings: SweepSettings, n_streams: int) -> list[tuple[int, int]]:
    """(L, m) points in order of L then m; at N > 0 optionally an evenly spread subset."""
    points = [(L, m) for L in settings.l_values for m in settings.m_values]
    cap = settings.bg_max_points
    if n_streams > 0 and cap is not None and cap < len(points):
        step = len(points) / cap
        points = [points[int(i * step)] for i in range(cap)]
    return points


def result_key(r: dict[str, Any]) -> tuple:
    tc = r["test_case"]
    return (tc.get("background_streams", 0), tc["context_length"], tc["append_length"], r["policy"], r["repetition"])


# --- persistence: JSONL checkpoint, resumable ---


class ResultStore:
    def __init__(self, out_dir: pathlib.Path, name: str):
        self.out_dir = out_dir
        self.name = name
        self.jsonl = out_dir / f"{name}.results.jsonl"
        self.json = out_dir / f"{name}.json"
        self.results: list[dict[str, Any]] = []
        self.previous_config: dict[str, Any] | None = None
        self.start_time: str | None = None

    def load(self) -> None:
        by_key: dict[tuple, dict] = {}
        if self.json.exists():
            doc = json.loads(self.json.read_text())
            self.previous_config = doc.get("config")
            self.start_time = doc.get("start_time")
            for r in doc.get("results", []):
                by_key[result_key(r)] = r
        if self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    by_key[result_key(r)] = r
        self.results = list(by_key.values())

    def done_keys(self) -> set[tuple]:
        return {result_key(r) for r in self.results if r.get("ok")}

    def add(self, r: dict[str, Any]) -> None:
        self.results = [x for x in self.results if result_key(x) != result_key(r)] + [r]
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")


# --- one measurement ---


@dataclass
class Context:
    client: Any
    url: str
    model: str
    words: WordTokens
    settings: SweepSettings
    consumed_tokens: dict[int, int] = field(default_factory=dict)  # L -> most background tokens one measurement took


def _body(ctx: Context, prompt: list[int] | str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": ctx.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **ctx.settings.extra_body(),
    }


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def background_metrics(
    pool: BackgroundPool, before_start: float, send: float, first: float, scale: float
) -> dict[str, float | None]:
    """The others' TPOT before vs during the append's wait for its first token, and the total delay imposed."""
    before_gaps, during_gaps, delays = [], [], []
    for times in pool.times:
        b = M.gaps_within_ms(times, before_start, send, scale)
        before_gaps += b
        baseline = M.pace_ms(b)  # the comparator of stream_delay_ms: k chunks at the undisturbed pace
        during_gaps += M.gaps_in_window_ms(times, send, first, scale)
        delays.append(M.stream_delay_ms(times, send, first, baseline, scale))
    valid = [d for d in delays if not math.isnan(d)]
    return {
        "bg_tpot_before_p50_ms": _f(M.percentile(before_gaps, 50)),
        "bg_tpot_before_p99_ms": _f(M.percentile(before_gaps, 99)),
        "bg_max_gap_before_ms": _f(max(before_gaps)) if before_gaps else None,
        "bg_tpot_p50_ms": _f(M.percentile(during_gaps, 50)),
        "bg_tpot_p99_ms": _f(M.percentile(during_gaps, 99)),
        "bg_max_gap_ms": _f(max(during_gaps)) if during_gaps else None,
        "bg_extra_sum_ms": float(sum(valid)) if valid else 0.0,
        "bg_extra_mean_ms": _f(M.mean(valid)),
        "bg_streams_measured": len(valid),
    }


async def measure(
    ctx: Context, n_streams: int, L: int, m: int, policy: str, rep: int, pool: BackgroundPool | None
) -> dict[str, Any]:
    s = ctx.settings
    scale = s.time_scale
    rng = random.Random(f"sweep-{s.seed}-{n_streams}-{L}-{m}-{policy}-{rep}")
    history, append = ctx.words.token_ids(L, rng), ctx.words.token_ids(m, rng)
    conv = f"sweep-{s.seed}-{n_streams}-{L}-{m}-{policy}-{rep}-{rng.getrandbits(32):08x}"
    record: dict[str, Any] = {
        "test_case": {
            "context_length": L,
            "append_length": m,
            "cache_rate": round(L / (L + m), 6),
            "background_streams": n_streams,
        },
        "policy": policy,
        "repetition": rep,
        "ok": False,
        "time_scale": scale,
    }
    if pool is not None:
        await pool.ensure(int(1.5 * ctx.consumed_tokens.get(L, 128)) + s.max_new_tokens + s.bg_before_tokens + 16)
        tokens_at_start = pool.tokens()[0]
    warm = await stream_request(
        ctx.client,
        ctx.url,
        _body(ctx, s.prompt(ctx.words, history), 1),
        {"x-ppd-policy": s.warmup_policy, "x-ppd-conversation": conv},
    )
    record["warmup"] = {
        "route": warm.route,
        "ttft_ms": _f(M.ttft_ms(warm.timing(), scale)),
        "error": warm.error,
    }
    if not warm.ok:
        record["error"] = f"warm-up failed: {warm.error or warm.status}"
        return record
    if pool is not None:
        before_start = time.perf_counter()
        await pool.wait_new_tokens(s.bg_before_tokens)
    else:
        await asyncio.sleep(s.settle_ms * scale / 1e3)
    res = await stream_request(
        ctx.client,
        ctx.url,
        _body(ctx, s.prompt(ctx.words, history + append), s.max_new_tokens),
        {"x-ppd-policy": policy, "x-ppd-conversation": conv},
    )
    if not res.ok:
        record["error"] = f"append failed: {res.error or res.status}"
        return record
    rm = M.request_metrics(res.timing(), scale)
    ppd = res.ppd or {}
    timings = ppd.get("server_timings") or {}
    ttft = rm.ttft_ms
    metrics: dict[str, Any] = {
        "ttft_ms": ttft,
        "tpot_ms": _f(rm.tpot_ms),
        "e2e_latency_ms": _f(rm.e2e_ms),
        "output_tokens": rm.n_tokens,
        "kv_bytes": ppd.get("kv_bytes", timings.get("kv_bytes")),
        "router_ttft_ms": _f(ppd["ttft_ms"] / scale) if ppd.get("ttft_ms") is not None else None,
    }
    if pool is not None:
        if pool.any_done():
            record["error"] = "a background stream ended during the measurement"
            return record
        bg = background_metrics(pool, before_start, res.arrival_s, res.token_times_s[0], scale)
        metrics.update(bg)
        pace = bg["bg_tpot_before_p50_ms"]
        if pace and bg["bg_extra_mean_ms"] is not None and bg["bg_extra_mean_ms"] < -0.5 * pace:
            # the others cannot gain time from an append: a clearly negative delay means the client's clock of
            # their tokens was disturbed (a CPU-starved client or router); measure again
            record["error"] = (
                f"background clock disturbed: mean delay {bg['bg_extra_mean_ms']:.1f} ms per stream at a "
                f"{pace:.1f} ms pace"
            )
            record["metrics"] = metrics
            return record
        consumed = pool.tokens()[0] - tokens_at_start
        ctx.consumed_tokens[L] = max(ctx.consumed_tokens.get(L, 0), consumed)
    else:
        metrics.update({"bg_extra_sum_ms": 0.0, "bg_streams_measured": 0})
    metrics["cost_w0_ms"] = ttft
    metrics["cost_ms"] = ttft + s.cost_weight * metrics["bg_extra_sum_ms"]
    record.update(
        {
            "ok": True,
            "route": res.route,
            "metrics": metrics,
            "router": {
                "policy": ppd.get("policy", res.headers.get("x-ppd-policy")),
                "reason": ppd.get("reason", res.headers.get("x-ppd-reason")),
                "cache_rate": _f(ppd.get("cache_rate", res.headers.get("x-ppd-cache-rate"))),
                "decode_cached_tokens": ppd.get("decode_cached_tokens", res.headers.get("x-ppd-decode-cached-tokens")),
                "prefill_cached_tokens": ppd.get("prefill_cached_tokens"),
                "append_tokens": ppd.get("append_tokens", res.headers.get("x-ppd-append-tokens")),
                "scores": ppd.get("scores"),
            },
            "server_timings": timings,
            "usage": res.usage,
        }
    )
    return record


# --- the run ---


def _run_entry(config: dict[str, Any]) -> dict[str, Any]:
    st = config.get("settings") or {}
    return {
        "command": config.get("command"),
        "time_scale": st.get("time_scale"),
        "background_streams": st.get("background_streams"),
        "policies_measured": config.get("policies_measured"),
        "stack_overrides": config.get("stack_overrides"),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


async def run_sweep(
    url: str,
    settings: SweepSettings,
    out_dir: pathlib.Path,
    name: str = "sweep",
    run_config: dict[str, Any] | None = None,
    decode_urls: list[str] | None = None,
    progress: bool = True,
    echo=print,
    flush_caches: bool = False,
) -> dict[str, Any]:
    """Measure every (N, L, m, repetition, policy) not already in `out_dir/<name>.*`; write all outputs; return
    the results document."""
    from experiments.report import write_sweep_outputs

    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir, name)
    store.load()
    done = store.done_keys()
    start_time = store.start_time or datetime.datetime.now().isoformat(timespec="seconds")
    words = WordTokens(ChatTokenizer.load(settings.tokenizer))
    async with make_client() as client:
        model = await model_id(client, url)
        ctx = Context(client, url, model, words, settings)
        policies, skipped = await probe_policies(client, url, model, settings.policies)
        if skipped:
            echo("skipping policies the router refused: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        todo = [
            (n, L, m, rep, p)
            for n in settings.background_streams
            for (L, m) in grid(settings, n)
            for rep in range(settings.repetitions)
            for p in policies
            if (n, L, m, p, rep) not in done
        ]
        config = {
            **(run_config or {}),
            "settings": asdict(settings),
            "policies_measured": policies,
            "policies_skipped": skipped,
            "model": model,
            "router_url": url,
            "python": sys.version.split()[0],
            "host": platform.node(),
            "resumed_from": len(done),
        }
        # every invocation that added to this output (a resumed or extended run keeps the earlier ones)
        prev = store.previous_config or {}
        runs = list(prev.get("runs") or ([_run_entry(prev)] if prev.get("command") else []))
        this_run = _run_entry(config)
        this_run["start_time"] = datetime.datetime.now().isoformat(timespec="seconds")
        this_run["measurements"] = len(todo)
        config["runs"] = runs + [this_run]
        echo(f"{len(todo)} measurements to run ({len(done)} already in {store.jsonl})")
        bar = tqdm(total=len(todo), disable=not progress, unit="req", dynamic_ncols=True)
        try:
            for n in settings.background_streams:
                mine = [t for t in todo if t[0] == n]
                if not mine:
                    continue
                if flush_caches:
                    flushed = await flush_server_caches(client, url)
                    config.setdefault("cache_flushes", []).append({"background_streams": n, "flushed": flushed})
                    if not all(flushed.values()):
                        bar.write(f"N={n}: cache flush refused by {[u for u, ok in flushed.items() if not ok]}")
                pool = None
                if n > 0:
                    pool = BackgroundPool(
                        client,
                        url,
                        model,
                        words,
                        n,
                        settings.bg_prompt_tokens,
                        settings.bg_output_tokens,
                        seed=settings.seed,
                        extra_body=settings.extra_body(),
                        prompt_format=settings.prompt_format,
                        decode_urls=decode_urls,
                        time_scale=settings.time_scale,
                        direct=settings.bg_direct,
                    )
                    bar.set_description(f"N={n} starting background")
                    await pool.start()
                try:
                    for _, L, m, rep, p in mine:
                        bar.set_description(f"N={n} L={L} m={m} {p}")
                        rec, attempts = None, 0
                        while attempts < 3:
                            attempts += 1
                            rec = await measure(ctx, n, L, m, p, rep, pool)
                            if rec["ok"] or "background" not in str(rec.get("error")):
                                break
                        rec["attempts"] = attempts  # > 1: measured again after a disturbed background clock
                        store.add(_jsonable(rec))
                        if not rec["ok"]:
                            bar.write(f"N={n} L={L} m={m} {p} rep {rep}: {rec.get('error')}")
                        bar.update(1)
                finally:
                    if pool is not None:
                        config.setdefault("background_restarts", {})[str(n)] = pool.restarts
                        await pool.stop()
        finally:
            bar.close()
            doc = {
                "config": _jsonable(config),
                "start_time": start_time,
                "end_time": datetime.datetime.now().isoformat(timespec="seconds"),
                "results": sorted(store.results, key=result_key),
            }
            write_sweep_outputs(doc, out_dir, name, settings.cost_weight)
            store.jsonl.unlink(missing_ok=True)  # everything is in the JSON now (the next run resumes from it)
    return doc


def rebuild_outputs(out_dir: pathlib.Path, name: str, weight: float) -> dict[str, Any]:
    """Rewrite JSON/CSV/plots/Markdown from what is in `out_dir` (e.g. after a run on a machine without matplotlib)."""
    from experiments.report import write_sweep_outputs

    store = ResultStore(out_dir, name)
    store.load()
    if not store.results:
        raise ValueError(f"no results under {out_dir} named {name}")
    doc: dict[str, Any] = {}
    if store.json.exists():
        doc = json.loads(store.json.read_text())
    doc["results"] = sorted(store.results, key=result_key)
    doc.setdefault("config", {})
    write_sweep_outputs(doc, out_dir, name, weight)
    return doc
