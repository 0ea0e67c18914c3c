"""The router app on real uvicorn on loopback, in front of the in-process fake backends (tests/unit/router_fakes):
what httpx's in-process ASGI transport cannot show (it hands over a response only once it is complete)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from httpx_transport import HttpxTransport  # noqa: E402
from router_fakes import FakeCluster  # noqa: E402

from launch.supervisor import free_ports  # noqa: E402
from router.app import create_app  # noqa: E402


@contextlib.asynccontextmanager
async def live_router(cfg, cluster: FakeCluster) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the router served by uvicorn on a free port, once the router is ready."""
    app = create_app(cfg, transport=HttpxTransport(cluster.transport))
    (port,) = free_ports(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(100):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield client
    finally:
        server.should_exit = True
        await serving
