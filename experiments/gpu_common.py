"""Shared pieces of the GPU measurement scripts (experiments/gpu_*.py): SGLang /generate calls by route, with the
arrival time of every streamed token, plus Prometheus scraping and result files.

Requests go straight to the SGLang servers with token ids (no router, no tokenizer), so lengths are exact:
- P-route: the same body to prefill and decode with bootstrap fields (exactly sglang-router's mini_lb), tokens
  streamed from decode; if the prefill half fails the decode half is aborted (../shared/gpu/NOTES.md);
- D-route: the decode server alone, `bootstrap_host = LOCAL_APPEND_HOST` (needs ppd.sglang.ext on it);
- single: one normal (non-disaggregated) server.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from ppd.sglang.client import DeltaIds
from ppd.sglang.protocol import (
    generate_body,
    local_append,
    new_bootstrap_room,
    parse_sse_line,
    with_bootstrap,
)

TIMEOUT = httpx.Timeout(900.0, connect=10.0)


@dataclass
class Generation:
    """One request's outcome as the client saw it. Times are seconds from sending the request."""

    route: str
    prompt_len: int
    output_ids: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # arrival of each output token
    e2e_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # the serving server's final meta_info
    prefill_meta: dict[str, Any] | None = None  # P-route: the prefill server's meta_info
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.output_ids)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def decode_tok_per_s(self) -> float | None:
        """Output tokens after the first, over the time from the first to the last."""
        if len(self.token_times_s) < 2:
            return None
        span = self.token_times_s[-1] - self.token_times_s[0]
        return (len(self.token_times_s) - 1) / span if span > 0 else None

    @property
    def cached_tokens(self) -> int:
        return int(self.meta.get("cached_tokens") or 0)

    @property
    def details(self) -> dict[str, Any]:
        return self.meta.get("cached_tokens_details") or {}

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("token_times_s")
        d["ttft_ms"] = None if self.ttft_s is None else round(self.ttft_s * 1000, 2)
        d["decode_tok_per_s"] = self.decode_tok_per_s
        return d


def sampling(max_new_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], gen: Generation, t0: float) -> None:
    async with client.stream("POST", f"{url}/generate", json=body) as resp:
        if resp.status_code != 200:
            gen.error = f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
            return
        delta = DeltaIds()  # cumulative or incremental output_ids (sglang.incremental_streaming_output)
        async for line in resp.aiter_lines():
            out = parse_sse_line(line)
            if out is None:
                continue
            now = time.perf_counter() - t0
            new = delta.feed(out)
            gen.token_times_s.extend([now] * len(new))
            gen.output_ids = list(delta.ids)
            gen.meta = out.meta_info
            reason = out.finish_reason
            if reason and reason.get("type") == "abort":
                gen.error = f"{url}: aborted: {reason.get('message')}"


async def single(
    client: httpx.AsyncClient, url: str, ids: list[int], max_new_tokens: int, route: str = "single"
) -> Generation:
    gen = Generation(route=route, prompt_len=len(ids))
    t0 = time.perf_counter()
    try:
        await _stream(client, url, generate_body(ids, sampling(max_new_tokens), stream=True), gen, t0)
    except httpx.HTTPError as err:
        gen.error = f"{url}: {err!r}"
    gen.e2e_s = time.perf_counter() - t0
    return gen


async def local(client: httpx.AsyncClient, decode_url: str, ids: list[int], max_new_tokens: int) -> Generation:
    """D-route: the decode server matches its radix tree and prefills the rest itself."""
    gen = Generation(route="decode", prompt_len=len(ids))
    body = local_append(generate_body(ids, sampling(max_new_tokens), stream=True), new_bootstrap_room())
    t0 = time.perf_counter()
    try:
        await _stream(client, decode_url, body, gen, t0)
    except httpx.HTTPError as err:
        gen.error = f"{decode_url}: {err!r}"
    gen.e2e_s = time.perf_counter() - t0
    return gen


async def pd(
    client: httpx.AsyncClient,
    prefill_url: str,
    decode_url: str,
    bootstrap_port: int,
    ids: list[int],
    max_new_tokens: int,
    bootstrap_host: str = "127.0.0.1",
) -> Generation:
    """P-route, as mini_lb sends it: both halves at once, the stream from decode."""
    gen = Generation(route="prefill", prompt_len=len(ids))
    room = new_bootstrap_room()
    rid = f"gpu-{room:x}"
    base = generate_body(ids, sampling(max_new_tokens), stream=False, rid=rid)
    p_body = with_bootstrap(base, bootstrap_host, bootstrap_port, room)
    d_body = dict(p_body, stream=True)
    t0 = time.perf_counter()

    async def prefill_half() -> None:
        try:
            r = await client.post(f"{prefill_url}/generate", json=p_body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            gen.prefill_meta = r.json().get("meta_info", {})
        except Exception as err:  # the decode half would wait 300 s for KV that never comes
            gen.error = f"prefill {prefill_url}: {err!r}"
            try:
                await client.post(f"{decode_url}/abort_request", json={"rid": rid})
            except httpx.HTTPError:
                pass

    try:
        await asyncio.gather(prefill_half(), _stream(client, decode_url, d_body, gen, t0))
    except httpx.HTTPError as err:
        gen.error = gen.error or f"{decode_url}: {err!r}"
    gen.e2e_s = time.perf_counter() - t0
    return gen


def random_ids(rng: random.Random, n: int, lo: int = 10, hi: int = 120000) -> list[int]:
    """Token ids away from the special tokens of Llama-3 (128000+) and from SGLang's warm-up ids."""
    return [rng.randint(lo, hi) for _ in range(n)]


async def health(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/health", timeout=10.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def flush_cache(client: httpx.AsyncClient, url: str) -> bool:
    """SGLang's /flush_cache empties the radix tree; it waits up to `timeout` s for the server to be idle."""
    try:
        return (await client.post(f"{url}/flush_cache", params={"timeout": 10}, timeout=30.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def scrape(client: httpx.AsyncClient, url: str, prefix: str = "sglang:") -> dict[str, float]:
    """Every sample of the server's /metrics whose name starts with `prefix`, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get(f"{url}/metrics", timeout=10.0)
    r.raise_for_status()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name.startswith(prefix):
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def versions() -> dict[str, Any]:
    """What the measurement ran on: package versions, GPUs, driver."""
    out: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("sglang", "torch", "triton", "transformers", "sgl_kernel", "sglang_router", "flashinfer"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as err:  # a missing optional package is a fact to record, not a failure
            out[mod] = f"not importable: {type(err).__name__}"
    try:
        from importlib.metadata import version

        out["mooncake"] = version("mooncake-transfer-engine-cuda13")
    except Exception:
        out["mooncake"] = "?"
    try:
        q = "--query-gpu=name,memory.total,driver_version"
        out["gpus"] = subprocess.run(
            ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["gpus"] = "?"
    return out


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=str))


def md_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns."""
    head = "| " + " | ".join(h for _, h in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in cols) + " |\n" for r in rows)
    return head + body


def client() -> httpx.AsyncClient:
    # no keep-alive reuse past SGLang's 5 s idle timeout (NOTES: a reused closed connection once stalled a PD pair)
    return httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=2.0))
