"""The router's HTTP to SGLang servers: one pooled aiohttp session, every failure turned into a `BackendError`.

aiohttp rather than httpx on this path: a streamed /generate call costs ~0.12 ms of client CPU with aiohttp's C
parser against ~0.77 ms through httpx/httpcore/anyio (`python -m experiments.http_client_cost`, 2-core CPU box,
results/router-overhead/), and a P-route request makes two of them before its first token. `Transport` is the
narrow surface `SGLangClient` needs; tests put an in-memory fake behind it (tests/unit/httpx_transport.py).

Idle keep-alive connections expire before the backends' own idle timeout (uvicorn's 5 s in SGLang): a request sent
on a connection the server has just closed fails, and on the P-route that once left the decode half waiting 300 s
(../shared/gpu/NOTES.md). A stream the caller leaves after the server's last chunk is read to its end in the
background, so its connection goes back to the pool instead of costing a new TCP handshake on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiohttp

BACKEND_KEEPALIVE_EXPIRY_S = 2.0  # below SGLang's (uvicorn's) 5 s idle timeout
DRAIN_AFTER_FINISH_S = 1.0  # how long a finished stream's tail ([DONE], chunk terminator) may take before we close
JSON_HEADERS = {"content-type": "application/json"}


class BackendError(Exception):
    """A backend call failed. `connect` = the server could not be reached (nothing was sent); `dropped` = the
    connection broke after the request was sent (the server died or closed it mid-flight); `status` = the HTTP
    status of a refusal."""

    def __init__(self, url: str, message: str, status: int | None = None, connect: bool = False, dropped: bool = False):
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message
        self.status = status
        self.connect = connect
        self.dropped = dropped


class StreamBody(Protocol):
    """A 200 response being streamed."""

    def reads(self) -> AsyncIterator[bytes]:
        """The body as the network delivers it (one item per read); BackendError(dropped) if it breaks."""
        ...

    def keep_alive_after(self) -> None:
        """The caller saw the server's last chunk: finish reading the tail in the background so the connection can
        be reused. Without this call, leaving the stream closes its connection (the server sees a disconnect)."""
        ...


class Transport(Protocol):
    def stream(self, url: str, path: str, body: bytes) -> AbstractAsyncContextManager[StreamBody]:
        """POST `body` (JSON) to `url` + `path`; BackendError(connect / status / dropped, naming the server `url`)
        unless the answer is a 200."""
        ...

    async def request(
        self, method: str, url: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        """A small call (health, metrics, abort, server info): (status, body); BackendError if it did not happen."""
        ...

    async def aclose(self) -> None: ...


def _classify(url: str, err: BaseException) -> BackendError:
    """aiohttp's failure before a response into ours: could it connect at all, or did the call die in flight."""
    if isinstance(err, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return BackendError(url, f"cannot connect: {type(err).__name__}", connect=True)
    return BackendError(url, f"request failed: {type(err).__name__}: {err}", dropped=True)


class _AiohttpBody:
    def __init__(self, url: str, response: aiohttp.ClientResponse, background: set[asyncio.Task]):
        self.url = url
        self.response = response
        self._background = background
        self.handed_off = False

    async def reads(self) -> AsyncIterator[bytes]:
        try:
            async for data in self.response.content.iter_any():
                yield data
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise BackendError(self.url, f"stream broken: {type(err).__name__}: {err}", dropped=True) from err

    def keep_alive_after(self) -> None:
        if self.response.content.at_eof():
            return
        self.handed_off = True
        task = asyncio.get_running_loop().create_task(self._drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read_to_end(self) -> None:
        while await self.response.content.readany():
            pass

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._read_to_end(), DRAIN_AFTER_FINISH_S)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.response.close()
            return
        except asyncio.CancelledError:
            self.response.close()
            raise
        self.response.release()


class AiohttpTransport:
    def __init__(self, connect_timeout_s: float, max_connections: int):
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        # created on first use, inside the running loop (aiohttp binds a session to its loop)
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, keepalive_timeout=BACKEND_KEEPALIVE_EXPIRY_S, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # read timeouts are enforced per token by the caller (first/inter-token)
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                auto_decompress=True,
            )
        return self._session

    @asynccontextmanager
    async def stream(self, url: str, path: str, body: bytes) -> AsyncIterator[StreamBody]:
        try:
            response = await self.session.post(url + path, data=body, headers=JSON_HEADERS)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise _classify(url, err) from err
        wrapped = _AiohttpBody(url, response, self._background)
        try:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                raise BackendError(url, f"HTTP {response.status}: {text[:500]}", status=response.status)
            yield wrapped
        finally:
            if wrapped.handed_off:
                pass  # its drain task releases or closes it
            elif response.content.at_eof():
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()  # mid-stream: closing tells the server the client is gone

    async def request(
        self, method: str, url: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)
        headers = JSON_HEADERS if body is not None else None
        try:
            async with self.session.request(method, url + path, data=body, headers=headers, timeout=timeout) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise _classify(url, err) from err

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
