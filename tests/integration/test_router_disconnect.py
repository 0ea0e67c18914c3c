"""A client that goes away mid-stream: the router (real uvicorn on loopback) stops reading and sends
/abort_request for the rid to every backend still working on it. Backends are the in-process fakes, which record the
aborts and count the tokens they actually produced."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from httpx_transport import HttpxTransport
from router_fakes import D_URL, P_URL, make_config  # noqa: E402

from launch.supervisor import free_ports  # noqa: E402
from router.app import create_app  # noqa: E402


@pytest.mark.parametrize("policy", ["decode", "prefill"])
async def test_disconnect_mid_stream_aborts_backends(policy):
    cfg, cluster = make_config(policy)
    cluster[D_URL].token_delay_s = 0.02  # 500 tokens would take 10 s
    app = create_app(cfg, transport=HttpxTransport(cluster.transport))
    (port,) = free_ports(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for _ in range(100):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
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
    finally:
        server.should_exit = True
        await serving
