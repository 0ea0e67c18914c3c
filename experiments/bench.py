"""`ppd bench`: split vs colocated on the same GPUs (issue 12).

A light/heavy prefill x light/heavy decode matrix (DistServe-style; default 128/2048-token prompts x 32/512-token
answers) plus a multi-turn chat cell, each at several Poisson request rates, run against
- `colocated`: normal servers that each do prefill and decode (configs/local-colocated.yaml), behind the same router;
- `pd-prefill`: disaggregated, every request P-routed (what SGLang PD does);
- `pd-auto`: disaggregated, the router's cost model picks P-route or D-route per request;
on the same number of GPUs. The stacks are started here (launch.supervisor via experiments.stack), one per mode.

Every cell is a trace (ppd.simulate.trace: arrival, prompt and answer lengths, conversation and turn, think time), so
`ppd simulate` can run exactly the same requests. The trace is sent through /v1/chat/completions with token-exact
messages (`ChatTexts`): the prompt the server sees has exactly the trace's `prompt_tokens` (checked against
usage.prompt_tokens), and a later turn's prompt extends the previous prompt + answer, as the trace format says. Turn 0
is issued at its arrival time, turn k at max(arrival, previous answer's end + think time) (the simulator's rule).

Metrics are experiments.metrics, the same code for every mode: TTFT = first token - scheduled issue time (open loop:
client lag counts against the system under test, and is reported as `send_lag_ms`), TPOT = (last - first) /
(tokens - 1); goodput = requests meeting both SLOs per second of the run's arrival window (`duration_s`: every
request of a cell's trace arrives in [0, duration_s); DistServe-style goodput = SLO attainment x offered rate);
decode tokens/s = answer tokens / makespan. All times are emulated: wall / time_scale. Each emulated run also carries
the simulator's prediction for the same trace (`sim`), a check on the machine running the emulation.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import pathlib
import platform
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from experiments import metrics as M
from experiments.client import StreamResult, make_client, model_id, stream_request
from experiments.workloads import WordTokens
from ppd.config import StackConfig
from ppd.simulate.cluster import ClusterSpec, SimResult, simulate
from ppd.simulate.summary import timing as sim_timing
from ppd.simulate.trace import TraceRequest, conversations
from ppd.simulate.workload import WORKLOADS, WorkloadSpec, generate
from ppd.tokenizer import HEADER, ChatTokenizer

# --- the workload matrix ---


@dataclass(frozen=True)
class Cell:
    name: str
    prompt_tokens: int = 0  # single-turn cells
    output_tokens: int = 0
    multiturn: bool = False  # the multi-turn cell: conversations of `BenchSettings.multiturn_spec()`

    def describe(self) -> str:
        if self.multiturn:
            return "multi-turn chat"
        return f"{self.prompt_tokens}-token prompts, {self.output_tokens}-token answers"


CELL_NAMES = ("light-light", "light-heavy", "heavy-light", "heavy-heavy", "multiturn")


@dataclass(frozen=True)
class System:
    """One way of serving the same GPUs: a stack mode and, when disaggregated, the routing policy."""

    label: str  # colocated | pd-prefill | pd-auto | pd-<policy>
    mode: str  # colocated | disaggregated
    policy: str | None  # x-ppd-policy header (None: colocated, the router has no choice to make)


def systems_for(modes: Sequence[str], policies: Sequence[str]) -> list[System]:
    out = []
    for mode in modes:
        if mode == "colocated":
            out.append(System("colocated", "colocated", None))
        elif mode == "disaggregated":
            out += [System(f"pd-{p}", "disaggregated", p) for p in policies]
        else:
            raise ValueError(f"unknown mode {mode!r}; known: colocated, disaggregated")
    return out


@dataclass(frozen=True)
class BenchSettings:
    modes: tuple[str, ...] = ("colocated", "disaggregated")
    policies: tuple[str, ...] = ("prefill", "auto")
    cells: tuple[str, ...] = CELL_NAMES
    rates: tuple[float, ...] = (1.0, 2.0, 4.0)  # requests per second (emulated)
    duration_s: float = 8.0  # seconds of arrivals per run (emulated); 45 runs x ~20 s wall at time_scale 2
    light_prompt_tokens: int = 128
    heavy_prompt_tokens: int = 2048
    light_output_tokens: int = 32
    heavy_output_tokens: int = 512
    multiturn_think_s: float = 1.0  # mean think time of the multi-turn cell (the chat preset's is 3 s)
    # a tight interactive SLO for an 8B model on H200, DistServe-style (a few times the unloaded latency): TTFT ~4x
    # an unloaded 2048-token prompt's (~65 ms), TPOT 3x an unloaded decode step (~5 ms)
    slo_ttft_ms: float = 250.0
    slo_tpot_ms: float = 15.0
    # the emulated GPU runs 2x slower than wall clock: on a 2-core box the stack's own CPU cost (router, HTTP, one SSE
    # event per token) then adds half as much to the emulated times (see results/bench: the `sim` columns)
    time_scale: float = 2.0
    seed: int = 0

    def cell(self, name: str) -> Cell:
        lp, hp, lo, ho = (
            self.light_prompt_tokens,
            self.heavy_prompt_tokens,
            self.light_output_tokens,
            self.heavy_output_tokens,
        )
        cells = {
            "light-light": Cell("light-light", lp, lo),
            "light-heavy": Cell("light-heavy", lp, ho),
            "heavy-light": Cell("heavy-light", hp, lo),
            "heavy-heavy": Cell("heavy-heavy", hp, ho),
            "multiturn": Cell("multiturn", multiturn=True),
        }
        if name not in cells:
            raise ValueError(f"unknown cell {name!r}; known: {', '.join(CELL_NAMES)}")
        return cells[name]

    def multiturn_spec(self) -> WorkloadSpec:
        """The simulator's `chat` preset (4 turns, ~120-token messages, ~150-token answers) with a shorter think time,
        so a run's last conversations end soon after its arrival window."""
        return replace(WORKLOADS["chat"], name="multiturn", think_mean_s=self.multiturn_think_s)

    @property
    def slo(self) -> M.Slo:
        return M.Slo(self.slo_ttft_ms, self.slo_tpot_ms)


def cell_trace(cell: Cell, rate: float, duration_s: float, seed: int = 0) -> list[TraceRequest]:
    """The cell's requests at `rate` req/s over `duration_s` of arrivals: Poisson arrivals of fixed-size single-turn
    requests, or the multi-turn workload generator. Seeded: every system gets the same trace."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    if cell.multiturn:
        raise ValueError("the multi-turn cell's trace comes from BenchSettings.multiturn_spec() (see bench_trace)")
    rng = np.random.default_rng([seed, zlib.crc32(cell.name.encode()), int(rate * 1000)])
    out, t, i = [], float(rng.exponential(1.0 / rate)), 0
    while t < duration_s:
        out.append(TraceRequest(t, cell.prompt_tokens, cell.output_tokens, f"{cell.name}-{seed}-{i}"))
        t += float(rng.exponential(1.0 / rate))
        i += 1
    return out


def bench_trace(s: BenchSettings, cell_name: str, rate: float) -> list[TraceRequest]:
    cell = s.cell(cell_name)
    if cell.multiturn:
        return generate(s.multiturn_spec(), rate, s.duration_s, s.seed)
    return cell_trace(cell, rate, s.duration_s, s.seed)


# --- token-exact chat messages for a trace ---


class ChatTexts:
    """Chat messages whose token ids (as the router's ChatTokenizer builds them) have exactly the trace's lengths.

    Layout (Llama-3 template, ppd/tokenizer.py): BOS, then per message header + body + EOT, then the assistant header.
    Turn 0: [system: shared prefix (prefix_id)] + user; turn k: the previous prompt + answer (its ids, which the router
    remembers) + EOT + user + assistant header. Bodies are single-token words, the first one chosen so that the
    router's `.strip()` keeps it one token; texts are seeded by (nonce, conversation, turn), so two runs with
    different nonces share no cached prefix and the same nonce gives the same prompts.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self.words = WordTokens(tokenizer)
        tok = tokenizer
        self._safe_first = [i for i in self.words.ids if len(tok.encode(self.words.text_of([i]).strip())) == 1]
        self.bos = 1 if tok.bos_id is not None else 0
        eot = 1 if tok.eot_id is not None else 0
        self.frame = {r: len(tok.encode(HEADER.format(role=r))) + eot for r in ("system", "user", "assistant")}
        self.gen = len(tok.encode(HEADER.format(role="assistant")))
        self.eot = eot

    def body(self, n_tokens: int, rng: random.Random) -> str:
        n = max(1, n_tokens)
        return self.words.text_of([rng.choice(self._safe_first)] + self.words.token_ids(n - 1, rng)).strip()

    def first_turn(self, tr: TraceRequest, nonce: str) -> tuple[list[dict[str, str]], int]:
        """Messages of a conversation's first turn (or a fresh history) and their expected prompt length."""
        msgs, used = [], self.bos
        if tr.prefix_id is not None and tr.prefix_tokens > 0:
            sys_n = max(1, tr.prefix_tokens - self.bos - self.frame["system"])
            msgs.append({"role": "system", "content": self.body(sys_n, random.Random(f"{nonce}/{tr.prefix_id}"))})
            used += self.frame["system"] + sys_n
        user_n = max(1, tr.prompt_tokens - used - self.frame["user"] - self.gen)
        rng = random.Random(f"{nonce}/{tr.conversation_id}/{tr.turn}")
        msgs.append({"role": "user", "content": self.body(user_n, rng)})
        return msgs, used + self.frame["user"] + user_n + self.gen

    def next_turn(
        self, history: list[dict[str, str]], prev_prompt: int, prev: TraceRequest, tr: TraceRequest, nonce: str
    ) -> tuple[list[dict[str, str]], int]:
        """history = the previous turn's messages + its answer. A prompt that does not extend the previous one starts
        a fresh history (the trace format's rule)."""
        new = tr.prompt_tokens - prev.prompt_tokens - prev.output_tokens
        if new < 0:
            return self.first_turn(tr, nonce)
        user_n = max(1, new - self.eot - self.frame["user"] - self.gen)
        rng = random.Random(f"{nonce}/{tr.conversation_id}/{tr.turn}")
        msgs = history + [{"role": "user", "content": self.body(user_n, rng)}]
        expected = prev_prompt + prev.output_tokens + self.eot + self.frame["user"] + user_n + self.gen
        return msgs, expected


# --- sending a trace ---


@dataclass
class RequestRecord:
    conversation_id: str
    turn: int
    issue_s: float  # scheduled issue time, emulated seconds since the run's start
    send_lag_ms: float  # how late the client actually sent it (CPU contention on the client), emulated ms
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    output_tokens: int
    expected_prompt_tokens: int
    prompt_tokens: int | None  # usage.prompt_tokens as the router counted them
    cached_tokens: int | None
    route: str | None
    first_token_s: float | None  # emulated seconds since the run's start
    last_token_s: float | None
    ok: bool
    error: str | None = None

    def metrics(self) -> M.RequestMetrics:
        return M.RequestMetrics(self.ttft_ms, self.tpot_ms, self.e2e_ms, self.output_tokens)


async def send_trace(
    client,
    url: str,
    model: str,
    trace: Sequence[TraceRequest],
    texts: ChatTexts,
    nonce: str,
    policy: str | None = None,
    time_scale: float = 1.0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Replay `trace` through the router's chat endpoint (streaming, ignore_eos); one task per conversation."""
    scale = time_scale
    out: list[RequestRecord] = []
    t0 = time.perf_counter() + 0.05

    async def conversation(turns: list[TraceRequest]) -> None:
        history: list[dict[str, str]] = []
        prev: TraceRequest | None = None
        prev_prompt, prev_end = 0, t0
        for k, tr in enumerate(turns):
            sched = t0 + tr.arrival_s * scale
            if prev is not None:
                sched = max(sched, prev_end + tr.think_s * scale)
            await asyncio.sleep(max(0.0, sched - time.perf_counter()))
            if prev is None:
                msgs, expected = texts.first_turn(tr, nonce)
            else:
                msgs, expected = texts.next_turn(history, prev_prompt, prev, tr, nonce)
            body = {
                "model": model,
                "messages": msgs,
                "max_tokens": tr.output_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            headers = {"x-ppd-conversation": f"{nonce}-{tr.conversation_id}"}
            if policy:
                headers["x-ppd-policy"] = policy
            res = await stream_request(client, url, body, headers, chat=True)
            rec = record_of(tr, expected, sched, t0, res, scale)
            out.append(rec)
            if on_done is not None:
                on_done(rec)
            if not res.ok:  # the conversation cannot go on without the answer: its later turns are misses
                for rest in turns[k + 1 :]:
                    out.append(_unsent(rest, "an earlier turn of the conversation failed"))
                return
            history = msgs + [{"role": "assistant", "content": res.text}]
            prev, prev_prompt, prev_end = tr, expected, res.end_s or time.perf_counter()

    await asyncio.gather(*(conversation(turns) for turns in conversations(trace).values()))
    return out


def record_of(
    tr: TraceRequest, expected_prompt_tokens: int, sched: float, t0: float, res: StreamResult, time_scale: float
) -> RequestRecord:
    """One request's record from its client-side timestamps (perf_counter seconds): TTFT/TPOT/E2E by
    experiments.metrics, measured from the scheduled issue time `sched`; times relative to the run's start `t0`."""
    scale = time_scale
    if res.ok:
        m = M.request_metrics(M.RequestTiming(sched, tuple(res.token_times_s), res.n_tokens, res.end_s), scale)
    else:
        m = M.RequestMetrics(math.nan, math.nan, math.nan, 0)
    usage = res.usage or {}
    times = res.token_times_s
    return RequestRecord(
        tr.conversation_id,
        tr.turn,
        (sched - t0) / scale,
        (res.arrival_s - sched) * 1e3 / scale,
        m.ttft_ms,
        m.tpot_ms,
        m.e2e_ms,
        m.n_tokens,
        expected_prompt_tokens,
        usage.get("prompt_tokens"),
        (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        res.route,
        (times[0] - t0) / scale if times else None,
        (times[-1] - t0) / scale if times else None,
        res.ok,
        None if res.ok else (res.error or f"HTTP {res.status}")[:300],
    )


def _unsent(tr: TraceRequest, why: str) -> RequestRecord:
    nan = math.nan
    return RequestRecord(
        tr.conversation_id, tr.turn, tr.arrival_s, nan, nan, nan, nan, 0, 0, None, None, None, None, None, False, why
    )


# --- summaries ---


def summarize(records: Sequence[RequestRecord], slo: M.Slo, window_s: float) -> dict[str, Any]:
    """Per-run numbers from experiments.metrics. A failed request is a miss (NaN TTFT never meets the SLO)."""
    ok = [r for r in records if r.ok]
    ms = [r.metrics() for r in records]
    met = sum(M.meets_slo(m, slo) for m in ms)
    makespan = max((r.last_token_s for r in ok if r.last_token_s is not None), default=math.nan)
    out_tokens = sum(r.output_tokens for r in ok)
    routes = Counter(r.route or "unknown" for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    mismatched = sum(1 for r in ok if r.prompt_tokens is not None and r.prompt_tokens != r.expected_prompt_tokens)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "window_s": window_s,
        "makespan_s": makespan,
        "offered_rps": len(records) / window_s if window_s > 0 else math.nan,
        "goodput_rps": M.goodput_rps(ms, window_s, slo) if window_s > 0 else math.nan,
        "slo_attainment": met / len(records) if records else math.nan,
        "ttft_p50_ms": M.percentile((r.ttft_ms for r in ok), 50),
        "ttft_p99_ms": M.percentile((r.ttft_ms for r in ok), 99),
        "tpot_p50_ms": M.percentile((r.tpot_ms for r in ok), 50),
        "tpot_p99_ms": M.percentile((r.tpot_ms for r in ok), 99),
        "e2e_p50_ms": M.percentile((r.e2e_ms for r in ok), 50),
        "decode_tokens_per_s": out_tokens / makespan if makespan and makespan > 0 else math.nan,
        "output_tokens": out_tokens,
        "cache_hit_frac": sum(r.cached_tokens or 0 for r in ok) / prompt if prompt else 0.0,
        "route_share": {k: v / len(ok) for k, v in sorted(routes.items())} if ok else {},
        "send_lag_p99_ms": M.percentile((r.send_lag_ms for r in ok), 99),
        "prompt_length_mismatches": mismatched,
    }


# --- the run ---


@dataclass
class BenchDoc:
    """The results document: settings, machine, command, one entry per (system, cell, rate), and every request."""

    settings: BenchSettings
    command: str
    configs: dict[str, str]
    runs: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stacks: dict[str, Any] = field(default_factory=dict)
    backend: str = "emulated"  # emulated: real processes on loopback; simulated: ppd.simulate on the same traces
    start_time: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    end_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _clean(
            {
                "command": self.command,
                "backend": self.backend,
                "start_time": self.start_time,
                "end_time": self.end_time,
                "machine": machine(),
                "settings": asdict(self.settings),
                "configs": self.configs,
                "stacks": self.stacks,
                "systems": [asdict(s) for s in systems_for(self.settings.modes, self.settings.policies)],
                "cells": {c: self.settings.cell(c).describe() for c in self.settings.cells},
                "runs": self.runs,
                "requests": self.requests,
            }
        )


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load] if load else None,
    }


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


async def warm_up(client, url: str, model: str, texts: ChatTexts, systems: Sequence[System], scale: float) -> None:
    """A few short requests per policy before measuring (first requests pay for imports and connection setup); an
    unusable policy fails here, loudly, rather than as a run of errors."""
    for s in systems:
        trace = [TraceRequest(0.01 * i, 64, 4, f"warm-{s.label}-{i}") for i in range(3)]
        recs = await send_trace(client, url, model, trace, texts, f"warm-{s.label}", s.policy, scale)
        bad = [r for r in recs if not r.ok]
        if bad:
            raise RuntimeError(f"{s.label}: warm-up request failed: {bad[0].error}")


async def run_stack(
    doc: BenchDoc,
    url: str,
    systems: Sequence[System],
    texts: ChatTexts,
    echo: Callable[[str], None],
    save: Callable[[], None],
    cfg: StackConfig | None = None,
) -> None:
    """Every (cell, rate) for the systems sharing one stack; systems interleaved per (cell, rate), so slow drift of
    the machine's background load affects them alike. With the stack's config, each run also gets the simulator's
    prediction for the same trace (`sim`): where the two part, the CPU running the emulation is the likely cause."""
    s = doc.settings
    scale = s.time_scale
    async with make_client() as client:
        model = await model_id(client, url)
        await warm_up(client, url, model, texts, systems, scale)
        for cell_name in s.cells:
            for rate in s.rates:
                trace = bench_trace(s, cell_name, rate)
                for system in systems:
                    nonce = f"{system.label}-{cell_name}-{rate:g}-{s.seed}-{random.getrandbits(32):08x}"
                    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                    t_wall = time.perf_counter()
                    recs = await send_trace(client, url, model, trace, texts, nonce, system.policy, scale)
                    wall = time.perf_counter() - t_wall
                    summ = summarize(recs, s.slo, s.duration_s)
                    summ["sim"] = _sim_reference(trace, cfg, system, s)
                    load1 = os.getloadavg()[0] if load0 is not None else None
                    _add_run(doc, system, cell_name, rate, summ, wall, [load0, load1], echo)
                    doc.requests[f"{system.label}/{cell_name}/{rate:g}"] = [asdict(r) for r in recs]
                    save()
                    await asyncio.sleep(0.3 * scale)  # let the router's load view settle between runs


def cluster_spec(cfg: StackConfig, policy: str | None) -> ClusterSpec:
    """The simulated twin of a stack config: same servers, GPU, model, link, chunk size, KV pool, admission limit and
    routing policy; `link_sharing="none"` because each emulated KV move takes its own link time."""
    serving = cfg.decode or cfg.colocated
    return ClusterSpec(
        prefill=len(cfg.prefill),
        decode=len(cfg.decode),
        colocated=len(cfg.colocated),
        model=cfg.model.spec,
        gpu=serving[0].gpu,
        prefill_gpu=cfg.prefill[0].gpu if cfg.prefill else None,
        link=cfg.link.kind,
        link_gbytes_per_s=cfg.link.gbytes_per_s,
        link_sharing="none",
        chunk_size=cfg.emulator.chunk_size,
        max_running_requests=cfg.emulator.max_running_requests,
        kv_capacity_tokens=cfg.emulator.kv_capacity_tokens,
        mem_fraction_static=cfg.emulator.mem_fraction_static,
        max_inflight_per_backend=cfg.router.max_inflight_per_backend,
        policy=policy or "prefill",
        policy_params=dict(cfg.router.policy_params),
    )


def sim_records(result: SimResult) -> list[RequestRecord]:
    """A simulation's requests as bench records (same metric code: experiments.metrics via RequestTiming)."""
    out = []
    for r in result.requests:
        m = M.request_metrics(sim_timing(r))
        t = r.trace
        done = r.done
        out.append(
            RequestRecord(
                t.conversation_id,
                t.turn,
                r.issue_s,
                0.0,
                m.ttft_ms,
                m.tpot_ms,
                m.e2e_ms,
                m.n_tokens if done else 0,
                t.prompt_tokens,
                t.prompt_tokens,
                r.cached_tokens,
                r.route or None,
                r.first_token_s if done else None,
                r.last_token_s if done else None,
                done,
                None if done else (r.failed or "not finished"),
            )
        )
    return out


def run_simulated(
    doc: BenchDoc, cfgs: dict[str, StackConfig], echo: Callable[[str], None], save: Callable[[], None]
) -> None:
    """The same matrix on `ppd simulate` (no processes): same traces, same summaries, any rate in seconds."""
    s = doc.settings
    systems = systems_for(s.modes, s.policies)
    for cell_name in s.cells:
        for rate in s.rates:
            trace = bench_trace(s, cell_name, rate)
            for system in systems:
                t = time.perf_counter()
                result = simulate(trace, cluster_spec(cfgs[system.mode], system.policy), drain_s=600.0)
                summ = summarize(sim_records(result), s.slo, s.duration_s)
                _add_run(doc, system, cell_name, rate, summ, time.perf_counter() - t, None, echo)
                save()


def _sim_reference(
    trace: Sequence[TraceRequest], cfg: StackConfig | None, system: System, s: BenchSettings
) -> dict[str, Any] | None:
    if cfg is None or cfg.backend != "emulated":
        return None
    summ = summarize(sim_records(simulate(trace, cluster_spec(cfg, system.policy), drain_s=600.0)), s.slo, s.duration_s)
    keys = ("goodput_rps", "slo_attainment", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    return {k: summ[k] for k in keys}


def _add_run(
    doc: BenchDoc,
    system: System,
    cell: str,
    rate: float,
    summ: dict[str, Any],
    wall_s: float,
    loadavg: list[float | None] | None,
    echo: Callable[[str], None],
) -> None:
    key = f"{system.label}/{cell}/{rate:g}"
    doc.runs.append(
        {
            "system": system.label,
            "mode": system.mode,
            "policy": system.policy,
            "cell": cell,
            "rate": rate,
            "wall_s": round(wall_s, 2),
            "loadavg_1m": loadavg,
            **summ,
        }
    )
    echo(
        f"{key:28s} ok {summ['ok']}/{summ['requests']}  TTFT p50/p99 {summ['ttft_p50_ms']:.0f}/"
        f"{summ['ttft_p99_ms']:.0f} ms  TPOT p50/p99 {summ['tpot_p50_ms']:.1f}/{summ['tpot_p99_ms']:.1f} ms  "
        f"goodput {summ['goodput_rps']:.2f} req/s ({wall_s:.0f} s wall)"
    )


def write_outputs(doc: BenchDoc, out_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
    from experiments.bench_report import bench_markdown, bench_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    data = doc.to_json()
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    paths[1].write_text(bench_markdown(data, name))
    if data["runs"]:
        bench_plot(data, paths[2])
    return [p for p in paths if p.exists()]
