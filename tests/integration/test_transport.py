"""The router's HTTP/1.1 transport against a real socket: requests leave from the `stream()` call; a stream left
after the server's last chunk keeps its connection for the next request; one left mid-stream is closed (the server
sees the client go); a kept connection the server closed is replaced without losing the request; failures map to
BackendError as the router's retry logic expects."""

from __future__ import annotations

import asyncio

import pytest

from ppd.emulator.testing import free_port
from ppd.sglang.client import SGLangClient
from ppd.sglang.transport import BackendError, Http11Transport

CHUNKS = [
    b'data: {"output_ids": [7], "meta_info": {"completion_tokens": 1, "finish_reason": null}}\n\n',
    b'data: {"output_ids": [8], "meta_info": {"completion_tokens": 2, "finish_reason": {"type": "length"}}}\n\n',
]


class SSEServer:
    """/generate answers CHUNKS, then `data: [DONE]` a moment later (as SGLang's tail arrives after the last chunk)
    or, with `endless`, keeps streaming; counts the TCP connections it accepted and those the client closed."""

    def __init__(self, endless: bool = False, status: int = 200, close_after: bool = False):
        self.endless = endless
        self.status = status
        self.close_after = close_after  # close each connection after its answer (as a server whose keep-alive ran out)
        self.connections = 0
        self.closed_by_client = 0
        self.requests: list[bytes] = []  # request heads, in arrival order
        self.arrived = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                self.requests.append(head)
                self.arrived.set()
                if self.status != 200:
                    text = b'{"error": "refused"}'
                    writer.write(b"HTTP/1.1 %d Nope\r\ncontent-length: %d\r\n\r\n%s" % (self.status, len(text), text))
                    await writer.drain()
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                chunks = [*CHUNKS] if not self.endless else [CHUNKS[0]] * 1000
                for c in chunks:
                    writer.write(b"%x\r\n%s\r\n" % (len(c), c))
                    await writer.drain()
                    await asyncio.sleep(0.01 if self.endless else 0)
                await asyncio.sleep(0.02)
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()


async def serve(server: SSEServer) -> tuple[asyncio.AbstractServer, str]:
    port = free_port()
    srv = await asyncio.start_server(server.handle, "127.0.0.1", port)
    return srv, f"http://127.0.0.1:{port}"


async def test_finished_streams_reuse_one_connection():
    server = SSEServer()
    srv, url = await serve(server)
    net = Http11Transport(connect_timeout_s=2.0)
    client = SGLangClient(net)
    try:
        for _ in range(4):
            async with client.generate_batches(url, b"{}") as batches:
                async for batch in batches:
                    if batch[-1].finish_reason is not None:
                        break  # like the router: done at the server's last chunk, before its [DONE] tail
            await asyncio.sleep(0.05)  # the tail is read in the background, the connection returns to the pool
        assert server.connections == 1
    finally:
        await net.aclose()
        srv.close()


async def test_leaving_mid_stream_closes_the_connection():
    server = SSEServer(endless=True)
    srv, url = await serve(server)
    net = Http11Transport(connect_timeout_s=2.0)
    try:
        async with SGLangClient(net).generate_batches(url, b"{}") as batches:
            async for _ in batches:
                break
        for _ in range(100):
            if server.closed_by_client:
                break
            await asyncio.sleep(0.01)
        assert server.closed_by_client == 1
    finally:
        await net.aclose()
        srv.close()


async def test_unreachable_server_is_a_connect_error():
    net = Http11Transport(connect_timeout_s=2.0)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        with pytest.raises(BackendError) as info:
            async with SGLangClient(net).generate_batches(url, b"{}"):
                pass
        assert info.value.connect and info.value.url == url
        assert not await SGLangClient(net).health(url, timeout_s=1.0)
    finally:
        await net.aclose()


async def _run_to_end(client: SGLangClient, url: str) -> list[int]:
    ids: list[int] = []
    async with client.generate_batches(url, b"{}") as batches:
        async for batch in batches:
            ids += [i for out in batch for i in (out.output_ids or [])]
    return ids


async def test_request_leaves_from_the_stream_call():
    """On a kept connection the request is written when `stream()` is called: a server sees it before the caller
    awaits anything (this is how the P-route's two halves leave in one event-loop turn)."""
    server = SSEServer()
    srv, url = await serve(server)
    net = Http11Transport(connect_timeout_s=2.0)
    client = SGLangClient(net)
    try:
        assert await _run_to_end(client, url) == [7, 8]
        await asyncio.sleep(0.05)  # the connection is back in the pool
        server.arrived.clear()
        stream = client.generate_batches(url, b'{"x": 1}')  # no await between this call and the check below
        await asyncio.wait_for(server.arrived.wait(), 2.0)
        async with stream as batches:
            assert [i async for batch in batches for out in batch for i in out.output_ids] == [7, 8]
        assert server.connections == 1 and len(server.requests) == 2
    finally:
        await net.aclose()
        srv.close()


async def test_kept_connection_closed_by_the_server_is_replaced():
    """The server closes each connection after answering (its keep-alive ran out): the next request, written on
    the dead kept connection, is sent again on a new one, and answered."""
    server = SSEServer(close_after=True)
    srv, url = await serve(server)
    net = Http11Transport(connect_timeout_s=2.0)
    client = SGLangClient(net)
    try:
        for _ in range(3):
            assert await _run_to_end(client, url) == [7, 8]
        assert len(server.requests) == 3 and server.connections == 3
    finally:
        await net.aclose()
        srv.close()


async def test_refusal_is_a_status_error_and_small_calls_work():
    server = SSEServer(status=503)
    srv, url = await serve(server)
    net = Http11Transport(connect_timeout_s=2.0)
    try:
        with pytest.raises(BackendError) as info:
            async with SGLangClient(net).generate_batches(url, b"{}"):
                pass
        assert info.value.status == 503 and "refused" in info.value.message and not info.value.connect
        status, body = await net.request("POST", url, "/abort_request", b'{"rid": "r"}', timeout_s=2.0)
        assert status == 503 and body == b'{"error": "refused"}'
        assert server.connections == 1  # the refusal's connection was reused for the second call
    finally:
        await net.aclose()
        srv.close()


async def test_concurrent_small_calls_each_get_their_own_status():
    """Many small calls at once over kept connections: a connection handed back to the pool may serve the next call
    at once, so each call's status and body are its own (a health check once read another call's reset status)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                body = b"ok:" + path
                await asyncio.sleep(0.001)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    net = Http11Transport(connect_timeout_s=2.0)
    try:

        async def worker(i: int) -> list[bool]:  # one call after another, as a health loop makes them
            return [
                await net.request("GET", url, f"/w{i}/{k}", timeout_s=5.0) == (200, f"ok:/w{i}/{k}".encode())
                for k in range(20)
            ]

        results = await asyncio.gather(*(worker(i) for i in range(16)))
        assert all(all(r) for r in results)
    finally:
        await net.aclose()
        srv.close()
