"""`ppd.sglang.transport.Transport` over an httpx transport, so router tests can put in-memory fake servers
(`httpx.MockTransport`) behind the router. Failures map as the real (aiohttp) transport maps them: cannot connect ->
BackendError(connect=True); broken after sending, or mid-stream -> BackendError(dropped=True)."""

from __future__ import annotations

import contextlib
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


class HttpxTransport:
    def __init__(self, inner: httpx.AsyncBaseTransport):
        self.http = httpx.AsyncClient(transport=inner)

    @contextlib.asynccontextmanager
    async def stream(self, url: str, path: str, body: bytes) -> AsyncIterator[_Body]:
        try:
            request = self.http.build_request("POST", url + path, content=body, headers=JSON_HEADERS)
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as err:
            raise _failure(url, err) from err
        try:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise BackendError(url, f"HTTP {response.status_code}: {text[:500]}", status=response.status_code)
            yield _Body(url, response)
        finally:
            await response.aclose()

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
