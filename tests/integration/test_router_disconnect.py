"""The router on real uvicorn on loopback, in front of the in-process fake backends (which record aborts and count the
tokens they produce): a client that goes away mid-stream gets /abort_request sent for its rid to every backend still
working on it; a stream's status and headers go out when its servers accept it, before its first token."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from live_router import live_router
from router_fakes import D_URL, P_URL, make_config


@pytest.mark.parametrize("policy", ["decode", "prefill"])
async def test_disconnect_mid_stream_aborts_backends(policy):
    cfg, cluster = make_config(policy)
    cluster[D_URL].token_delay_s = 0.02  # 500 tokens would take 10 s
    async with live_router(cfg, cluster) as client:
        body = {
            "model": "llama-3-8b",
            "messages": [{"role": "user", "content": "go on forever"}],
            "max_tokens": 500,
            "stream": True,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200 and resp.headers["x-ppd-route"] == policy
            lines = resp.aiter_lines()
            for _ in range(8):
                await anext(lines)
        # the client is gone; the abort must reach the decode server promptly
        rid = cluster.generate_bodies(D_URL)[0]["rid"]
        for _ in range(100):
            if cluster[D_URL].aborted:
                break
            await asyncio.sleep(0.02)
        assert cluster[D_URL].aborted == [rid]
        assert cluster[D_URL].served_tokens < 100  # generation stopped long before 500 tokens
        assert cluster[P_URL].aborted == []  # a finished prefill half needs no abort
        metrics = (await client.get("/metrics")).text
        assert f'ppd_requests_total{{endpoint="chat",outcome="client_disconnect",route="{policy}"}} 1.0' in metrics
        assert 'ppd_inflight{backend="decode0"} 0.0' in metrics  # the admission slot came back


@pytest.mark.parametrize("policy", ["prefill", "decode"])
async def test_stream_headers_come_before_the_first_token(policy):
    """A stream starts (200, the route's headers) once its servers accepted it, not with its first token: the client
    has read the headers by then, as sglang-router passes the decode server's status on."""
    cfg, cluster = make_config(policy)
    cluster[D_URL].first_token_delay_s = 0.3
    async with live_router(cfg, cluster) as client:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200 and resp.headers["x-ppd-route"] == policy
            assert cluster[D_URL].served_tokens == 0  # no token yet
            text = (await resp.aread()).decode()
        assert cluster[D_URL].served_tokens == 4 and text.rstrip().endswith("data: [DONE]")


async def test_stream_refused_by_a_server_is_an_http_error():
    """A server that refuses the request (non-200) answers before the stream starts: an HTTP error, not an event."""
    cfg, cluster = make_config("prefill", health_interval_s=60)
    cluster[P_URL].status = 400
    cfg = dataclasses.replace(cfg, backend="sglang")  # stock SGLang decode servers: no D-route retry
    async with live_router(cfg, cluster) as client:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}
        resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "prefill_failed"
