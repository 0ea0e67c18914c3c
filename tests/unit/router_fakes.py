"""A tiny in-process fake of SGLang PD servers for router tests, behind an httpx.MockTransport.

It speaks the parts of the protocol the router uses (/generate streams with cumulative output_ids and meta_info,
/abort_request, /health, /metrics, /server_info), pairs a P-route's prefill and decode halves by bootstrap_room, and
records every request so tests can assert the exact JSON the router sent. Failure knobs per server: HTTP status,
connect errors, a connection dropped mid-flight, delays before the first and between tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_transport import HttpxTransport

from ppd.config import parse_config
from ppd.prefix_index import PrefixIndex
from ppd.sglang.protocol import LOCAL_APPEND_HOST

VOCAB_LOW, VOCAB_HIGH = 40, 4000  # generated ids avoid the special tokens (0..4) of the builtin tokenizer


def expected_tokens(input_ids: list[int], n: int, seed: int = 0) -> list[int]:
    """The fake's deterministic 'model': the same prompt gives the same tokens on every route."""
    h = (sum((i + 1) * t for i, t in enumerate(input_ids)) + seed) % 1000003
    return [VOCAB_LOW + (h * 7919 + k * 104729) % (VOCAB_HIGH - VOCAB_LOW) for k in range(n)]


@dataclass
class FakeServer:
    role: str
    url: str
    status: int = 200  # /generate answers this status (non-200 = failure with a JSON error)
    connect_error: bool = False  # every request fails to connect
    kv_wait_s: float = 30.0  # a P-route decode half aborts itself (finish_reason abort) if no KV came by then
    drop_after_s: float | None = None  # /generate streams break (connection lost) this long after they start
    meta_ppd: dict[str, Any] = field(default_factory=dict)  # extra meta_info.ppd on the last chunk (e.g. time_scale)
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    eos_after: int | None = None  # emit EOS (id 4) as token number eos_after (finish_reason stop)
    capacity_tokens: int = 100_000
    cache: PrefixIndex = field(default_factory=lambda: PrefixIndex(100_000))
    requests: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: int = 0
    served_tokens: int = 0  # tokens actually streamed (shows an abort stopped the work)


class FakeCluster:
    def __init__(self, prefill_urls: list[str], decode_urls: list[str], colocated_urls: list[str] = ()):
        self.servers: dict[str, FakeServer] = {}
        for role, urls in (("prefill", prefill_urls), ("decode", decode_urls), ("colocated", colocated_urls)):
            for u in urls:
                self.servers[u] = FakeServer(role, u)
        self.arrivals: list[tuple[str, str]] = []  # (server url, path) of every request, in arrival order
        self.rooms: dict[int, asyncio.Event] = {}
        self.abort_events: dict[str, asyncio.Event] = {}
        self.transport = httpx.MockTransport(self.handle)

    def __getitem__(self, url: str) -> FakeServer:
        return self.servers[url]

    def generate_bodies(self, url: str) -> list[dict[str, Any]]:
        return [b for p, b in self[url].requests if p == "/generate" and b is not None]

    def _room(self, room: int) -> asyncio.Event:
        return self.rooms.setdefault(room, asyncio.Event())

    def _abort_event(self, rid: str) -> asyncio.Event:
        return self.abort_events.setdefault(rid, asyncio.Event())

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        server = self.servers[base]
        if server.connect_error:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        server.requests.append((path, body))
        self.arrivals.append((base, path))
        # A real server answers at least one event-loop turn later (a network round trip): the router's other tasks
        # (the prefill half of a P-route, sent while the decode half waits) run meanwhile.
        await asyncio.sleep(0)
        if path == "/health":
            return httpx.Response(200)
        if path == "/server_info":
            return httpx.Response(200, json={"max_total_num_tokens": server.capacity_tokens})
        if path == "/metrics":
            text = (
                "# TYPE sglang:num_running_reqs gauge\n"
                f'sglang:num_running_reqs{{model_name="m"}} {server.running}\n'
                "# TYPE sglang:num_queue_reqs gauge\n"
                'sglang:num_queue_reqs{model_name="m"} 0\n'
                "# TYPE sglang:token_usage gauge\n"
                'sglang:token_usage{model_name="m"} 0.25\n'
            )
            return httpx.Response(200, text=text)
        if path == "/abort_request":
            server.aborted.append(body["rid"])
            self._abort_event(body["rid"]).set()
            return httpx.Response(200)
        if path == "/generate":
            if server.status != 200:
                return httpx.Response(server.status, json={"error": {"message": "injected failure"}})
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=self._stream(server, body)
            )
        return httpx.Response(404, json={"detail": "not found"})

    async def _stream(self, server: FakeServer, body: dict[str, Any]):
        rid = body.get("rid", "")
        aborted = self._abort_event(rid)
        ids: list[int] = body["input_ids"]
        sp = body.get("sampling_params", {})
        n = int(sp.get("max_new_tokens", 16))
        tokens = expected_tokens(ids, n, int(sp.get("sampling_seed", 0)))
        server.running += 1
        try:
            if server.drop_after_s is not None:
                await asyncio.sleep(server.drop_after_s)
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            if server.role == "prefill":
                await asyncio.sleep(server.first_token_delay_s)
                self._room(body["bootstrap_room"]).set()
                meta = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": 1,
                    "cached_tokens": server.cache.match(ids),
                    "finish_reason": {"type": "length", "length": 1},
                    "ppd": {"prefill_ms": 1.5},
                }
                server.cache.insert(ids)
                yield _sse({"output_ids": tokens[:1], "meta_info": meta})
                yield b"data: [DONE]\n\n"
                return
            local = server.role == "colocated" or body.get("bootstrap_host") == LOCAL_APPEND_HOST
            cached = min(server.cache.match(ids), len(ids) - 1) if local else 0
            if not local:  # P-route decode half: wait for the KV of the paired prefill half (or an abort)
                room = self._room(body["bootstrap_room"])
                waits = [asyncio.ensure_future(room.wait()), asyncio.ensure_future(aborted.wait())]
                await asyncio.wait(waits, timeout=server.kv_wait_s, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if aborted.is_set():
                    return
                if not room.is_set():  # like SGLang: the request ends with an abort, not an HTTP error
                    reason = {"type": "abort", "message": "KV transfer timed out", "status_code": 500}
                    yield _sse({"output_ids": [], "meta_info": {"completion_tokens": 0, "finish_reason": reason}})
                    yield b"data: [DONE]\n\n"
                    return
            await asyncio.sleep(server.first_token_delay_s)
            out: list[int] = []
            for k, tok in enumerate(tokens):
                if aborted.is_set():
                    return
                if k:
                    await asyncio.sleep(server.token_delay_s)
                out.append(4 if server.eos_after is not None and k == server.eos_after else tok)
                server.served_tokens += 1
                last = k == n - 1 or out[-1] == 4
                meta = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(out),
                    "cached_tokens": cached,
                    "finish_reason": (
                        {"type": "stop", "matched": 4} if out[-1] == 4 else {"type": "length", "length": n}
                    )
                    if last
                    else None,
                }
                if last:  # the scheduler caches the KV before the last chunk reaches the client
                    server.cache.insert(ids + out[:-1])
                    if server.meta_ppd:
                        meta["ppd"] = dict(server.meta_ppd)
                yield _sse({"output_ids": list(out), "meta_info": meta})
                if last:
                    break
            yield b"data: [DONE]\n\n"
        finally:
            server.running -= 1


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


P_URL, P2_URL, D_URL, D2_URL = (
    "http://10.0.0.1:30100",
    "http://10.0.0.3:30101",
    "http://10.0.0.2:30200",
    "http://10.0.0.4:30201",
)


def make_config(
    policy: str = "decode",
    prefill: int = 1,
    decode: int = 1,
    colocated: int = 0,
    context_length: int = 4096,
    emulator: dict[str, Any] | None = None,
    **router: Any,
):
    """A StackConfig pointing at the fake servers (fast polls so health is known within milliseconds)."""
    p_urls, d_urls = [P_URL, P2_URL][:prefill], [D_URL, D2_URL][:decode]

    def server(url: str, boot: int | None = None) -> dict[str, Any]:
        host, port = url.removeprefix("http://").split(":")
        s: dict[str, Any] = {"host": host, "port": int(port)}
        if boot is not None:
            s["bootstrap_port"] = boot
        return s

    data: dict[str, Any] = {
        "router": {"policy": policy, "health_interval_s": 0.05, "metrics_poll_interval_s": 0.05, **router},
        "model": {"context_length": context_length},
        "emulator": emulator or {},
    }
    if colocated:
        data["mode"] = "colocated"
        data["colocated"] = [server(u) for u in d_urls]
    else:
        data["prefill"] = [server(u, 8998 + i) for i, u in enumerate(p_urls)]
        data["decode"] = [server(u) for u in d_urls]
    return parse_config(data), FakeCluster(
        p_urls if not colocated else [], [] if colocated else d_urls, d_urls if colocated else []
    )


@contextlib.asynccontextmanager
async def running_router(cfg, cluster: FakeCluster, ready: bool = True):
    """The router app on `cfg` with its lifespan running, talking to `cluster`; yields (app, client)."""
    from router.app import create_app

    app = create_app(cfg, transport=HttpxTransport(cluster.transport))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=30) as client:
            if ready:
                for _ in range(200):
                    if (await client.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
            yield app, client
