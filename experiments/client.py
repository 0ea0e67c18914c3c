"""Streaming OpenAI client for experiments: one request, every chunk's arrival time, the router's `ppd` extension.

Plain httpx rather than the `openai` package: we need the response headers (x-ppd-*), the per-chunk arrival times
and the non-standard `ppd` object on the final chunk, and we send the `x-ppd-policy` header per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from experiments.gpu_common import flush_cache
from experiments.metrics import RequestTiming

PPD_HEADERS = (
    "x-ppd-route",
    "x-ppd-policy",
    "x-ppd-reason",
    "x-ppd-cache-rate",
    "x-ppd-decode-cached-tokens",
    "x-ppd-append-tokens",
    "x-request-id",
)


@dataclass
class StreamResult:
    arrival_s: float
    status: int = 0
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    ppd: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and bool(self.token_times_s)

    @property
    def n_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or len(self.token_times_s))

    @property
    def route(self) -> str | None:
        return self.ppd.get("route") or self.headers.get("x-ppd-route")

    def timing(self) -> RequestTiming:
        return RequestTiming(self.arrival_s, tuple(self.token_times_s), self.n_tokens, self.end_s)


def make_client(max_connections: int = 1024) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64, keepalive_expiry=2.0)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


async def model_id(client: httpx.AsyncClient, base_url: str) -> str:
    r = await client.get(f"{base_url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _chunk_text(choice: dict[str, Any]) -> str | None:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or ""


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    chat: bool = False,
    on_token=None,
) -> StreamResult:
    """POST a streaming completion (or chat completion) and time every content chunk.

    A chunk that carries text is the arrival of every token generated since the previous one: the router sends a
    text chunk per backend read, which under load holds several tokens, and says how many so far in the chunk's
    `usage` (`stream_options.continuous_usage_stats`). The opening role chunk, the finish chunk and the usage chunk
    carry no text; tokens whose bytes do not yet decode to text arrive with the next chunk.
    `on_token(t)` is called with each arrival time (used by background streams to publish progress).
    """
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    res = StreamResult(arrival_s=time.perf_counter())
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers or {}) as resp:
            res.status = resp.status_code
            res.headers = {k: resp.headers[k] for k in PPD_HEADERS if k in resp.headers}
            if resp.status_code != 200:
                res.error = (await resp.aread()).decode(errors="replace")[:500]
                res.end_s = time.perf_counter()
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(payload)
                if obj.get("ppd"):
                    res.ppd = obj["ppd"]
                if obj.get("usage"):
                    res.usage = obj["usage"]
                if obj.get("error"):
                    res.error = json.dumps(obj["error"])[:500]
                for choice in obj.get("choices") or []:
                    text = _chunk_text(choice)
                    if text:
                        so_far = int((obj.get("usage") or {}).get("completion_tokens") or 0)
                        k = max(1, so_far - len(res.token_times_s))  # tokens this chunk carries
                        res.token_times_s.extend([now] * k)
                        res.text += text
                        if on_token is not None:
                            for _ in range(k):
                                on_token(now)
                        break
            res.end_s = time.perf_counter()
    except httpx.HTTPError as err:
        res.error = f"{type(err).__name__}: {err}"
        res.end_s = time.perf_counter()
    return res


async def probe_policies(
    client: httpx.AsyncClient, base_url: str, model: str, policies, prompt: str = " hello world"
) -> tuple[list[str], dict[str, str]]:
    """Which policies the router accepts for `x-ppd-policy` (one 1-token request each); the rest with the reason."""
    ok, refused = [], {}
    for p in policies:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        res = await stream_request(client, base_url, body, {"x-ppd-policy": p, "x-ppd-conversation": f"probe-{p}"})
        if res.ok:
            ok.append(p)
        else:
            refused[p] = (res.error or f"HTTP {res.status}")[:300]
    return ok, refused


async def flush_server_caches(client: httpx.AsyncClient, router_url: str, wait_s: float = 60.0) -> dict[str, bool]:
    """POST /flush_cache to every server behind the router (listed by its /ppd/backends); {url: flushed}.

    Why: on real SGLang a KV pool whose slots have cycled through radix-cache eviction moved KV 10-100x slower over
    Mooncake (results/h200x2/README.md), so runs that must not inherit an earlier run's pool state start from empty
    caches. A server only flushes when idle; it is retried until `wait_s` has passed.
    """
    r = await client.get(f"{router_url}/ppd/backends", timeout=10.0)
    r.raise_for_status()
    urls = [b["url"] for b in r.json().get("backends", [])]
    out: dict[str, bool] = {}
    for url in urls:
        deadline = time.monotonic() + wait_s
        ok = False
        while not ok and time.monotonic() < deadline:
            ok = await flush_cache(client, url)
            if not ok:
                await asyncio.sleep(1.0)
        out[url] = ok
    return out
