"""The router's HTTP to SGLang servers: kept-alive HTTP/1.1 connections, every failure turned into a `BackendError`.

A small client of our own, on asyncio's protocol API with httptools (llhttp, the C parser uvicorn uses) reading the
responses, because the P-route's time to first token runs through it twice:
- it costs a fraction of aiohttp's CPU per call (`python -m experiments.http_client_cost`: 27 vs 121 us per streamed
  call on the 2-core CPU box, httpx 958 us; results/router-overhead/http_client_cost.json);
- a request is written to the socket in the caller's own event-loop turn, when `stream()` is called (on a kept-alive
  connection; a new connection is opened from that call too): the P-route's two halves leave back to back, as
  sglang-router's Rust router sends them, instead of each from a task of its own, one after the other.
Servers are SGLang's (uvicorn): bodies are chunked or sized, never ended by a close. `Transport` is the narrow surface
`SGLangClient` needs; tests put an in-memory fake behind it (tests/unit/httpx_transport.py).

Idle keep-alive connections expire before the backends' own idle timeout (uvicorn's 5 s in SGLang): a request sent on
a connection the server has just closed fails, and on the P-route that once left the decode half waiting 300 s
(../shared/gpu/NOTES.md). Should it happen anyway (a kept connection lost before any byte of the answer came), the
request is sent once more on a new connection: the server never read it. A stream the caller leaves after the
server's last chunk is read to its end in the background, so its connection goes back to the pool instead of costing
a new TCP handshake on the next request; one left earlier is closed, which tells the server the client is gone.
"""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Protocol

import httptools

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


class Exchange(Protocol):
    """One request on its way: `async with` it for the response (a 200's body, else BackendError)."""

    async def __aenter__(self) -> StreamBody: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def close(self) -> None:
        """Give up on the exchange if it was never entered or left unfinished (its connection is closed)."""
        ...


class Transport(Protocol):
    def stream(self, url: str, path: str, body: bytes) -> Exchange:
        """POST `body` (JSON) to `url` + `path`, sent from this call when the transport can (a kept-alive
        connection at hand); entering the exchange gives the body of a 200, else BackendError(connect / status /
        dropped, naming the server `url`)."""
        ...

    async def request(
        self, method: str, url: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        """A small call (health, metrics, abort, server info): (status, body); BackendError if it did not happen."""
        ...

    async def aclose(self) -> None: ...


class _Connection(asyncio.Protocol):
    """One TCP connection to a server and the response being read on it (one request at a time, no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.error: str | None = None
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status: int | None = None  # set once the response's headers are complete
        self.complete = False
        self.keep_alive = True
        self.got_bytes = False
        self.body: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future | None = None

    @property
    def reusable(self) -> bool:
        return not self.lost and self.error is None and self.transport is not None and not self.transport.is_closing()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.error = f"malformed HTTP response: {err}"
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the next bytes, the end of the response, or the end of the connection."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class _Server:
    """Where to connect for one base URL, and its idle kept-alive connections."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend URL must be http://host[:port]: {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode("latin-1")
        self.idle: list[_Connection] = []

    def head(self, method: str, path: str, body: bytes | None) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode(), self.host_header)]
        if body is not None:
            lines.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    def take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable and now - conn.idle_since < BACKEND_KEEPALIVE_EXPIRY_S:
                return conn
            conn.close()
        return None


class _Exchange:
    """A request written to a connection (or about to be, once connected) and its response."""

    def __init__(self, net: Http11Transport, server: _Server, method: str, path: str, body: bytes | None):
        self.net = net
        self.server = server
        self.request = server.head(method, path, body) + (body or b"")
        self.conn: _Connection | None = server.take_idle()
        self.reused = self.conn is not None
        self.finished = False  # the connection went back to the pool or was closed
        self.handed_off = False
        self._connecting: asyncio.Task | None = None
        if self.conn is not None:
            self._send(self.conn)
        else:  # connect now, not when entered: requests made in one turn still leave in that order
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def _send(self, conn: _Connection) -> None:
        conn.reset()
        assert conn.transport is not None
        conn.transport.write(self.request)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        s = self.server
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, s.host, s.port), self.net.connect_timeout_s
            )
        except (OSError, asyncio.TimeoutError) as err:
            raise BackendError(s.url, f"cannot connect: {type(err).__name__}: {err}", connect=True) from None
        return conn

    async def response(self) -> _Connection:
        """The connection once the response's headers are in (the request is sent first if it was not yet)."""
        for attempt in range(2):
            if self.conn is None:
                connecting, self._connecting = self._connecting, None
                if connecting is None:
                    connecting = asyncio.ensure_future(self._connect())
                try:
                    self.conn = await connecting
                except asyncio.CancelledError:
                    connecting.add_done_callback(_close_connected)  # made all the same: nobody will use it
                    raise
                self.reused = False
                self._send(self.conn)
            conn = self.conn
            while conn.status is None and not conn.lost:
                await conn.wait()
            if conn.status is not None:
                return conn
            if self.reused and not conn.got_bytes and attempt == 0:
                # a kept connection the server had closed: it never read the request, send it again
                conn.close()
                self.conn = None
                continue
            raise BackendError(self.server.url, conn.error or "connection closed before the response", dropped=True)
        raise AssertionError("unreachable")

    async def read_all(self) -> tuple[int, bytes]:
        """(status, body) of the whole response; the connection goes back to the pool (where the next exchange may
        take it at once: nothing of it is read after)."""
        conn = await self.response()
        while not conn.complete:
            if conn.lost:
                raise BackendError(self.server.url, conn.error or "connection closed mid-response", dropped=True)
            await conn.wait()
        status, data = conn.status or 0, b"".join(conn.body)
        conn.body.clear()
        self.release()
        return status, data

    def release(self) -> None:
        """Back to the pool if the response was read to its end on a connection that stays open; else closed."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn is None:
            return
        if conn.complete and conn.keep_alive and conn.reusable and len(self.server.idle) < self.net.max_idle_per_server:
            conn.idle_since = time.monotonic()
            self.server.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        if not self.finished and not self.handed_off:
            self.finished = True
            if self.conn is not None:
                self.conn.close()
            if self._connecting is not None:
                self._connecting.cancel()
                self._connecting.add_done_callback(_close_connected)

    # the StreamBody of a 200
    async def reads(self) -> AsyncIterator[bytes]:
        conn = self.conn
        assert conn is not None
        while True:
            if conn.body:
                data = b"".join(conn.body) if len(conn.body) > 1 else conn.body[0]
                conn.body.clear()
                yield data
                continue
            if conn.complete:
                return
            if conn.lost:
                raise BackendError(self.server.url, conn.error or "stream broken: connection lost", dropped=True)
            await conn.wait()

    def keep_alive_after(self) -> None:
        conn = self.conn
        if conn is None or conn.complete:
            return
        self.handed_off = True
        self.net.background(self._drain(conn))

    async def _drain(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_AFTER_FINISH_S
        try:
            while not conn.complete and not conn.lost and loop.time() < deadline:
                conn.body.clear()
                await asyncio.wait_for(conn.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            pass
        finally:
            conn.body.clear()
            self.handed_off = False
            self.finished = False
            self.release()

    # async context manager: the 200's body, or BackendError
    async def __aenter__(self) -> _Exchange:
        try:
            conn = await self.response()
            if conn.status != 200:
                status, data = await self.read_all()
                text = data.decode(errors="replace")
                raise BackendError(self.server.url, f"HTTP {status}: {text[:500]}", status=status)
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.handed_off:
            return  # its drain releases or closes the connection
        conn = self.conn
        if conn is not None and conn.complete:
            self.release()
        else:
            self.close()  # mid-stream: closing tells the server the client is gone


def _close_connected(task: asyncio.Task) -> None:
    """A connect given up on: close the connection if it was made all the same."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class Http11Transport:
    def __init__(self, connect_timeout_s: float, max_idle_per_server: int = 256):
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_server = max_idle_per_server  # kept-alive connections kept per server
        self._servers: dict[str, _Server] = {}
        self._background: set[asyncio.Task] = set()

    def _server(self, url: str) -> _Server:
        server = self._servers.get(url)
        if server is None:
            server = self._servers[url] = _Server(url)
        return server

    def stream(self, url: str, path: str, body: bytes) -> _Exchange:
        return _Exchange(self, self._server(url), "POST", path, body)

    async def request(
        self, method: str, url: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        exchange = _Exchange(self, self._server(url), method, path, body)
        try:
            return await asyncio.wait_for(exchange.read_all(), timeout_s)
        except asyncio.TimeoutError:
            raise BackendError(url, f"no answer within {timeout_s:g} s", dropped=True) from None
        finally:
            exchange.close()

    def background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for server in self._servers.values():
            for conn in server.idle:
                conn.close()
            server.idle.clear()
