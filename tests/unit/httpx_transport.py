"""`ppd.sglang.transport.Transport` over an httpx transport, so router tests can put in-memory fake servers
(`httpx.MockTransport`) behind the router. As the real transport, a stream's request is on its way from the
`stream()` call (here: a task started then), and failures map the same: cannot connect -> BackendError(connect=True);
broken after sending, or mid-stream -> BackendError(dropped=True)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from ppd.sglang.transport import JSON_HEADERS, BackendError


class _Body:
    def __init__(self, url: str, response: httpx.Response):
        self.url, self.response = url, response

    async def reads(self) -> AsyncIterator[bytes]:
        try:
            async for data in self.response.aiter_raw():
                yield data
        except httpx.HTTPError as err:
            raise BackendError(self.url, f"stream broken: {type(err).__name__}: {err}", dropped=True) from err

    def keep_alive_after(self) -> None:
        pass  # in memory: no connection to keep


def _failure(url: str, err: httpx.HTTPError) -> BackendError:
    if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendError(url, f"cannot connect: {type(err).__name__}", connect=True)
    return BackendError(url, f"request failed: {type(err).__name__}: {err}", dropped=True)


class _Exchange:
    def __init__(self, http: httpx.AsyncClient, url: str, path: str, body: bytes):
        self.url = url
        request = http.build_request("POST", url + path, content=body, headers=JSON_HEADERS)
        self._sending = asyncio.get_running_loop().create_task(http.send(request, stream=True))
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> _Body:
        try:
            self._response = response = await self._sending
        except httpx.HTTPError as err:
            raise _failure(self.url, err) from err
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            raise BackendError(self.url, f"HTTP {response.status_code}: {text[:500]}", status=response.status_code)
        return _Body(self.url, response)

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            await self._response.aclose()

    def close(self) -> None:
        if not self._sending.done():
            self._sending.cancel()
        elif not self._sending.cancelled() and self._sending.exception() is None and self._response is None:
            asyncio.get_running_loop().create_task(self._sending.result().aclose())


class HttpxTransport:
    def __init__(self, inner: httpx.AsyncBaseTransport):
        self.http = httpx.AsyncClient(transport=inner)

    def stream(self, url: str, path: str, body: bytes) -> _Exchange:
        return _Exchange(self.http, url, path, body)

    async def request(
        self, method: str, url: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        try:
            headers = JSON_HEADERS if body is not None else None
            resp = await self.http.request(method, url + path, content=body, headers=headers, timeout=timeout_s)
            return resp.status_code, resp.content
        except httpx.HTTPError as err:
            raise _failure(url, err) from err

    async def aclose(self) -> None:
        await self.http.aclose()
