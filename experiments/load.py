"""Bounded open-loop load test: N requests at Poisson rate R through the router, then stop; every request ends as
OK (a full answer), REJECTED (429/503 with Retry-After: admission control), ERROR (any other explicit error: an HTTP
error status or an error event in the stream) or LOST (none of these: a connection dropped without an error, a stream
cut before `[DONE]`, no answer within the client's deadline). A correct router has LOST = 0 at every rate.

Router overhead, in the same run: pairs of requests at a light rate, alternating between the router (forced D-route,
`x-ppd-policy: decode`) and the decode server's `/generate` called directly with the D-route body the router would
send. Both see the same server, the same prompt length and the same output length, so the TTFT/E2E difference is what
the router adds (HTTP hop, tokenization, policy, detokenization, SSE re-framing).

Times here are wall-clock ms as the client saw them (on an emulated stack, `time_scale` is recorded with the results:
the emulated GPU runs that many times slower than the real one).
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from experiments.metrics import describe
from ppd.sglang import protocol


class Outcome(str, enum.Enum):
    OK = "ok"
    REJECTED = "rejected"  # 429 / 503: admission control or no healthy backend, with Retry-After
    ERROR = "error"  # another explicit error: HTTP 4xx/5xx, or an error event inside a 200 stream
    LOST = "lost"  # neither an answer nor an explicit error


@dataclass(frozen=True)
class LoadSpec:
    requests: int
    rate_rps: float
    prompt_tokens: int = 1024
    max_tokens: int = 32
    policy: str | None = None  # x-ppd-policy for the load phase; None = the router's configured policy
    seed: int = 0
    timeout_s: float = 180.0  # client deadline per request: still open after it = LOST
    overhead_pairs: int = 50  # router-vs-direct pairs; 0 = skip
    overhead_rate_rps: float = 4.0


@dataclass
class StreamSeen:
    """What the client saw of one request (times in seconds on one perf_counter clock)."""

    sent_s: float
    status: int = 0
    first_token_s: float | None = None
    end_s: float | None = None
    finished: bool = False  # a chunk carried a finish_reason
    done: bool = False  # the stream's closing `data: [DONE]` (or a complete non-stream JSON body)
    error_event: str | None = None  # an error object inside a 200 stream
    error_body: dict[str, Any] | None = None  # the JSON body of a non-200 answer
    transport_error: str | None = None  # connection refused / reset / protocol error
    timed_out: bool = False
    retry_after: str | None = None
    tokens: int = 0
    route: str | None = None  # x-ppd-route, then the closing chunk's ppd.route (the route that answered)


@dataclass(frozen=True)
class Sample:
    """One request's result, flattened for the JSON report."""

    target: str  # router | direct
    index: int
    scheduled_s: float  # offset of its Poisson arrival from the phase start
    send_lag_ms: float  # how late the client actually sent it (event-loop lag)
    outcome: str
    status: int
    detail: str
    ttft_ms: float | None
    e2e_ms: float | None
    tokens: int
    route: str | None
    retry_after: str | None
    openai_error_shape: bool | None  # for non-200 answers: body is {"error": {"message", "type", "param", "code"}}


def openai_error_shape(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and {"type", "param", "code"} <= set(err)


def classify(seen: StreamSeen) -> tuple[Outcome, str]:
    """The outcome of one request and a short reason. Pure: unit-tested on hand-made StreamSeen objects."""
    if seen.timed_out:
        return Outcome.LOST, "no answer before the client deadline"
    if seen.status == 0:
        return Outcome.LOST, f"no HTTP answer: {seen.transport_error or 'unknown'}"
    if seen.status != 200:
        message = ""
        if seen.error_body is not None and openai_error_shape(seen.error_body):
            message = seen.error_body["error"]["message"]
        kind = Outcome.REJECTED if seen.status in (429, 503) else Outcome.ERROR
        return kind, f"HTTP {seen.status}: {message}"[:300]
    if seen.error_event is not None:
        if seen.done:
            return Outcome.ERROR, f"error event: {seen.error_event}"[:300]
        return Outcome.LOST, f"error event without [DONE]: {seen.error_event}"[:300]
    if seen.transport_error is not None:
        return Outcome.LOST, f"stream broken: {seen.transport_error}"[:300]
    if not seen.done:
        return Outcome.LOST, "stream ended before [DONE]"
    if not seen.finished:
        return Outcome.LOST, "[DONE] without a finish_reason"
    return Outcome.OK, ""


def to_sample(target: str, index: int, scheduled_s: float, t0: float, seen: StreamSeen) -> Sample:
    outcome, detail = classify(seen)
    ok = outcome is Outcome.OK
    return Sample(
        target=target,
        index=index,
        scheduled_s=scheduled_s,
        send_lag_ms=max(0.0, (seen.sent_s - t0 - scheduled_s) * 1e3),
        outcome=outcome.value,
        status=seen.status,
        detail=detail,
        ttft_ms=(seen.first_token_s - seen.sent_s) * 1e3 if ok and seen.first_token_s is not None else None,
        # for rejections and errors this is how fast the client learned it (fail fast)
        e2e_ms=(seen.end_s - seen.sent_s) * 1e3 if seen.end_s is not None else None,
        tokens=seen.tokens,
        route=seen.route,
        retry_after=seen.retry_after,
        openai_error_shape=openai_error_shape(seen.error_body) if seen.status not in (0, 200) else None,
    )


# --- arrivals and prompts ----------------------------------------------------------------------------------------


def poisson_offsets(n: int, rate_rps: float, seed: int) -> list[float]:
    """Arrival offsets (s) of an open-loop Poisson process: exponential gaps of mean 1/rate, the first at 0."""
    if n <= 0:
        return []
    if rate_rps <= 0 or math.isinf(rate_rps):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class PromptMaker:
    """Unique chat prompts of an exact token length: random single-token words (seeded) after a nonce, so no two
    requests share more than the chat template's header (no cross-request cache hits)."""

    def __init__(self, prompt_tokens: int, seed: int):
        from experiments.workloads import WordTokens
        from ppd.tokenizer import ChatTokenizer

        self.tok = ChatTokenizer.load()
        self.words = WordTokens(self.tok)
        self.rng = random.Random(seed)
        overhead = len(self.tok.encode_chat([{"role": "user", "content": ""}]))
        self.target_tokens = prompt_tokens
        self.body_tokens = max(1, prompt_tokens - overhead)

    def messages(self) -> list[dict[str, str]]:
        ids = self.words.token_ids(self.body_tokens + 4, self.rng)
        n = self.body_tokens
        for _ in range(4):  # the template may merge the first word with what precedes it: fix the count up
            messages = [{"role": "user", "content": self.words.text_of(ids[:n])}]
            got = len(self.tok.encode_chat(messages))
            if got == self.target_tokens:
                break
            n = max(1, min(len(ids), n + self.target_tokens - got))
        return messages

    def input_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.encode_chat(messages)


# --- the two kinds of request ------------------------------------------------------------------------------------


async def _read_error_body(resp: httpx.Response) -> dict[str, Any] | None:
    raw = await resp.aread()
    try:
        body = json.loads(raw)
    except ValueError:
        return {"raw": raw[:300].decode(errors="replace")}
    return body if isinstance(body, dict) else {"raw": body}


async def router_chat(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    headers: dict[str, str],
    timeout_s: float,
) -> StreamSeen:
    """One streamed chat completion through the router."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    seen = StreamSeen(sent_s=time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", base_url + "/v1/chat/completions", json=body, headers=headers) as resp:
                seen.status = resp.status_code
                seen.retry_after = resp.headers.get("retry-after")
                seen.route = resp.headers.get("x-ppd-route")
                if resp.status_code != 200:
                    seen.error_body = await _read_error_body(resp)
                    seen.end_s = time.perf_counter()
                    return seen
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == protocol.SSE_DONE:
                        seen.done = True
                        break
                    obj = json.loads(payload)
                    if obj.get("error"):
                        seen.error_event = json.dumps(obj["error"])[:300]
                        continue
                    if obj.get("usage"):
                        seen.tokens = int(obj["usage"].get("completion_tokens") or 0)
                    if obj.get("ppd"):  # the route that answered (a retry's, where the headers name the first try)
                        seen.route = obj["ppd"].get("route", seen.route)
                    for choice in obj.get("choices") or []:
                        if (choice.get("delta") or {}).get("content") and seen.first_token_s is None:
                            seen.first_token_s = time.perf_counter()
                        if choice.get("finish_reason"):
                            seen.finished = True
                seen.end_s = time.perf_counter()
    except TimeoutError:
        seen.timed_out = True
    except (httpx.HTTPError, ValueError) as err:
        seen.transport_error = f"{type(err).__name__}: {err}"[:300]
        seen.end_s = time.perf_counter()
    return seen


async def direct_generate(
    client: httpx.AsyncClient, decode_url: str, input_ids: list[int], max_tokens: int, timeout_s: float
) -> StreamSeen:
    """The same work straight on the decode server: SGLang's /generate with the router's D-route body."""
    sampling = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body = protocol.local_append(
        protocol.generate_body(input_ids, sampling, stream=True, rid=uuid.uuid4().hex), protocol.new_bootstrap_room()
    )
    seen = StreamSeen(sent_s=time.perf_counter(), route="decode")
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", decode_url + "/generate", json=body) as resp:
                seen.status = resp.status_code
                if resp.status_code != 200:
                    seen.error_body = await _read_error_body(resp)
                    seen.end_s = time.perf_counter()
                    return seen
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == protocol.SSE_DONE:
                        seen.done = True
                        break
                    out = protocol.GenerateOutput.from_json(json.loads(payload))
                    if out.output_ids and seen.first_token_s is None:
                        seen.first_token_s = time.perf_counter()
                    reason = out.finish_reason
                    if reason is not None:
                        if reason.get("type") == "abort":
                            seen.error_event = str(reason.get("message") or "aborted")
                        else:
                            seen.finished = True
                        seen.tokens = out.completion_tokens
                seen.end_s = time.perf_counter()
    except TimeoutError:
        seen.timed_out = True
    except (httpx.HTTPError, ValueError) as err:
        seen.transport_error = f"{type(err).__name__}: {err}"[:300]
        seen.end_s = time.perf_counter()
    return seen


# --- phases ------------------------------------------------------------------------------------------------------


def make_client(max_connections: int) -> httpx.AsyncClient:
    # no connection reuse limits of our own: an open-loop client must never queue requests on its side
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64, keepalive_expiry=2.0)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0), trust_env=False)


async def _open_loop(offsets: Sequence[float], send) -> tuple[list, float]:
    """Start `send(i, t0)` at each offset (never waiting for earlier requests), then wait for all of them."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    tasks = []
    for i, off in enumerate(offsets):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(send(i, t0)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


async def run_load_phase(
    client: httpx.AsyncClient, router_url: str, model: str, spec: LoadSpec, prompts: PromptMaker
) -> tuple[list[Sample], float]:
    offsets = poisson_offsets(spec.requests, spec.rate_rps, spec.seed)
    messages = [prompts.messages() for _ in offsets]
    headers = {"x-ppd-policy": spec.policy} if spec.policy else {}

    async def send(i: int, t0: float) -> Sample:
        hdrs = {**headers, "x-ppd-conversation": f"load-{spec.seed}-{i}"}
        seen = await router_chat(client, router_url, model, messages[i], spec.max_tokens, hdrs, spec.timeout_s)
        return to_sample("router", i, offsets[i], t0, seen)

    return await _open_loop(offsets, send)


async def run_overhead_phase(
    client: httpx.AsyncClient, router_url: str, decode_url: str, model: str, spec: LoadSpec, prompts: PromptMaker
) -> tuple[list[Sample], float]:
    """Alternating router (forced D-route) / direct requests, each with its own fresh prompt of the same length."""
    n = 2 * spec.overhead_pairs
    offsets = poisson_offsets(n, spec.overhead_rate_rps, spec.seed + 1)
    messages = [prompts.messages() for _ in range(n)]
    ids = [prompts.input_ids(m) for m in messages]

    async def send(i: int, t0: float) -> Sample:
        if i % 2 == 0:
            hdrs = {"x-ppd-policy": "decode", "x-ppd-conversation": f"overhead-{spec.seed}-{i}"}
            seen = await router_chat(client, router_url, model, messages[i], spec.max_tokens, hdrs, spec.timeout_s)
            return to_sample("router", i, offsets[i], t0, seen)
        seen = await direct_generate(client, decode_url, ids[i], spec.max_tokens, spec.timeout_s)
        return to_sample("direct", i, offsets[i], t0, seen)

    return await _open_loop(offsets, send)


# --- report ------------------------------------------------------------------------------------------------------


def _stat(samples: Sequence[Sample], attr: str) -> dict[str, float]:
    return describe([getattr(s, attr) for s in samples if s.outcome == Outcome.OK.value])


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """Counts by outcome, latency percentiles of the OK requests, how fast rejections came back."""
    counts = Counter(s.outcome for s in samples)
    ok = [s for s in samples if s.outcome == Outcome.OK.value]
    rejected = [s for s in samples if s.outcome == Outcome.REJECTED.value]
    failed = [s for s in samples if s.outcome in (Outcome.REJECTED.value, Outcome.ERROR.value)]
    return {
        "requests": len(samples),
        **{o.value: counts.get(o.value, 0) for o in Outcome},
        "wall_s": round(wall_s, 3),
        "throughput_ok_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else math.nan,
        "ttft_ms": _stat(samples, "ttft_ms"),
        "e2e_ms": _stat(samples, "e2e_ms"),
        "reject_ms": describe([s.e2e_ms for s in rejected]),
        "rejected_with_retry_after": sum(1 for s in rejected if s.retry_after),
        "errors_openai_shape": sum(1 for s in failed if s.openai_error_shape),
        "errors_by_status": dict(Counter(str(s.status) for s in samples if s.outcome != Outcome.OK.value)),
        "routes": dict(Counter(s.route or "none" for s in ok)),
        "send_lag_ms": describe([s.send_lag_ms for s in samples]),
        "lost_details": [s.detail for s in samples if s.outcome == Outcome.LOST.value][:20],
    }


def overhead(samples: Sequence[Sample]) -> dict[str, Any]:
    """p50/p99 of router vs direct (OK requests), and router - direct at each percentile."""
    router = [s for s in samples if s.target == "router"]
    direct = [s for s in samples if s.target == "direct"]
    out: dict[str, Any] = {"router": summarize(router, 1.0), "direct": summarize(direct, 1.0)}
    for metric in ("ttft_ms", "e2e_ms"):
        r, d = out["router"][metric], out["direct"][metric]
        out[f"{metric}_added"] = {q: r[q] - d[q] for q in ("p50", "p99")}
    for side in ("router", "direct"):  # wall time and throughput mean nothing for interleaved halves
        out[side].pop("wall_s")
        out[side].pop("throughput_ok_rps")
    return out


@dataclass
class LoadReport:
    spec: LoadSpec
    command: str
    router_url: str
    decode_url: str | None
    time_scale: float
    service_rate_rps: float | None  # roofline estimate for one GPU prefilling these prompts (None: not emulated)
    load: dict[str, Any]
    overhead: dict[str, Any] | None
    config: dict[str, Any] | None = None
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "command": self.command,
            "router_url": self.router_url,
            "decode_url": self.decode_url,
            "time_scale": self.time_scale,
            "service_rate_rps_estimate": self.service_rate_rps,
            "load": self.load,
            "overhead": self.overhead,
            "config": self.config,
            "samples": [asdict(s) for s in self.samples],
        }


def service_rate_rps(cfg: dict[str, Any] | None, prompt_tokens: int) -> float | None:
    """Requests per second one GPU of the stack can prefill (roofline x time_scale): above it, a queue must grow."""
    if not cfg or cfg.get("backend") != "emulated":
        return None
    from ppd import roofline, specs

    server = (cfg.get("prefill") or cfg.get("decode") or cfg.get("colocated"))[0]
    seconds = roofline.prefill_time_s(
        specs.model(cfg["model"]["spec"]),
        specs.gpu(server["gpu"]),
        prompt_tokens,
        0,
        chunk_size=cfg["emulator"]["chunk_size"],
    )
    return round(1.0 / (seconds * cfg["emulator"]["time_scale"]), 2)


def _fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


TABLE_HEADER = (
    "| run | rate (req/s) | requests | ok | rejected | errors | **lost** | TTFT p50 / p99 (ms) | E2E p50 / p99 (ms) "
    "| reject p50 / p99 (ms) | ok req/s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(name: str, report: dict[str, Any]) -> str:
    s, spec = report["load"], report["spec"]
    return (
        f"| {name} | {spec['rate_rps']:g} | {s['requests']} | {s['ok']} | {s['rejected']} | {s['error']} "
        f"| **{s['lost']}** | {_fmt(s['ttft_ms']['p50'])} / {_fmt(s['ttft_ms']['p99'])} "
        f"| {_fmt(s['e2e_ms']['p50'])} / {_fmt(s['e2e_ms']['p99'])} "
        f"| {_fmt(s['reject_ms']['p50'])} / {_fmt(s['reject_ms']['p99'])} | {s['throughput_ok_rps']:.1f} |"
    )


OVERHEAD_HEADER = (
    "| run | pairs | router TTFT p50 / p99 | direct TTFT p50 / p99 | added p50 / p99 | router E2E p50 / p99 "
    "| direct E2E p50 / p99 | added p50 / p99 | lost |\n|---|---|---|---|---|---|---|---|---|"
)


def overhead_row(name: str, report: dict[str, Any]) -> str | None:
    o = report.get("overhead")
    if not o:
        return None
    r, d = o["router"], o["direct"]

    def pair(x: dict[str, float]) -> str:
        return f"{x['p50']:.1f} / {x['p99']:.1f}"

    return (
        f"| {name} | {report['spec']['overhead_pairs']} | {pair(r['ttft_ms'])} | {pair(d['ttft_ms'])} "
        f"| {pair(o['ttft_ms_added'])} | {pair(r['e2e_ms'])} | {pair(d['e2e_ms'])} | {pair(o['e2e_ms_added'])} "
        f"| {r['lost'] + d['lost']} |"
    )


def markdown(name: str, report: dict[str, Any]) -> str:
    spec = report["spec"]
    lines = [
        f"# Load test `{name}`",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{spec['requests']} requests at Poisson rate {spec['rate_rps']:g} req/s, prompts of {spec['prompt_tokens']} "
        f"tokens, {spec['max_tokens']} output tokens (ignore_eos), policy {spec['policy'] or '(configured)'}, "
        f"client deadline {spec['timeout_s']:g} s. Wall-clock ms on the client; emulator time_scale "
        f"{report['time_scale']:g}. One GPU's prefill-bound service rate for these prompts (roofline): "
        f"{report['service_rate_rps_estimate'] or 'n/a'} req/s.",
        "",
        TABLE_HEADER,
        table_row(name, report),
        "",
        f"Routes of the OK requests: {report['load']['routes']}; non-OK by HTTP status: "
        f"{report['load']['errors_by_status']}; rejections with Retry-After: "
        f"{report['load']['rejected_with_retry_after']}/{report['load']['rejected']}; client send lag p99 "
        f"{_fmt(report['load']['send_lag_ms']['p99'])} ms.",
    ]
    row = overhead_row(name, report)
    if row:
        lines += [
            "",
            "## Router overhead (same run): router with forced D-route vs the decode server's /generate directly",
            "",
            OVERHEAD_HEADER,
            row,
        ]
    return "\n".join(lines) + "\n"


def index_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """results/load/README.md: one row per run, then the overhead rows."""
    lines = [
        "# Load tests (`ppd load`)",
        "",
        "Open-loop Poisson arrivals, bounded (N requests then stop), on loopback against the embedded stack. "
        "LOST = requests that got neither a full answer nor an explicit error. Each run's command is in its "
        "`<run>.md`; raw samples in `<run>.json`.",
        "",
        TABLE_HEADER,
    ]
    lines += [table_row(name, r) for name, r in reports.items()]
    rows = [row for name, r in reports.items() if (row := overhead_row(name, r))]
    if rows:
        lines += ["", "## Router overhead (ms)", "", OVERHEAD_HEADER, *rows]
    return "\n".join(lines) + "\n"


# --- one whole run -----------------------------------------------------------------------------------------------


async def decode_url_of(client: httpx.AsyncClient, router_url: str) -> str | None:
    """The first healthy decode (or colocated) server the router knows, from its GET /ppd/backends."""
    try:
        resp = await client.get(router_url + "/ppd/backends")
        resp.raise_for_status()
        backends = resp.json()["backends"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    serving = [b for b in backends if b["name"].startswith(("decode", "colocated"))]
    healthy = [b for b in serving if b.get("health") == "healthy"] or serving
    return healthy[0]["url"] if healthy else None


async def run_load(
    spec: LoadSpec, router_url: str, decode_url: str | None = None, echo=print
) -> tuple[list[Sample], float, list[Sample] | None, str | None]:
    """Both phases against a running router: (load samples, load wall s, overhead samples or None, decode url)."""
    prompts = PromptMaker(spec.prompt_tokens, spec.seed)
    async with make_client(max(64, spec.requests + 2 * spec.overhead_pairs)) as client:
        model = (await client.get(router_url + "/v1/models")).json()["data"][0]["id"]
        echo(f"load: {spec.requests} requests at {spec.rate_rps:g} req/s through {router_url}")
        load, wall_s = await run_load_phase(client, router_url, model, spec, prompts)
        over = None
        if spec.overhead_pairs > 0:
            decode_url = decode_url or await decode_url_of(client, router_url)
            if decode_url is None:
                echo("overhead: no decode server found in /ppd/backends; skipped")
            else:
                echo(f"overhead: {spec.overhead_pairs} pairs router vs {decode_url}/generate")
                over, _ = await run_overhead_phase(client, router_url, decode_url, model, spec, prompts)
    return load, wall_s, over, decode_url
