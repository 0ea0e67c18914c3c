"""HTTP client for SGLang 0.5.10.post1 servers (and the emulated ones): /generate streams, aborts, health, metrics.

One pooled `httpx.AsyncClient` per router. Idle keep-alive connections expire before the backends' own idle timeout
(uvicorn's 5 s in SGLang): a request sent on a connection the server has just closed fails, and on the P-route that
once left the decode half waiting 300 s (../shared/gpu/NOTES.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ppd.sglang.protocol import (
    METRIC_MAX_TOTAL_TOKENS,
    METRIC_QUEUED,
    METRIC_RUNNING,
    METRIC_TOKEN_USAGE,
    METRIC_USED_TOKENS,
    SSE_DONE,
    GenerateOutput,
)

log = logging.getLogger(__name__)

BACKEND_KEEPALIVE_EXPIRY_S = 2.0  # below SGLang's (uvicorn's) 5 s idle timeout
JSON_HEADERS = {"content-type": "application/json"}
_METRICS_WANTED = (METRIC_RUNNING, METRIC_QUEUED, METRIC_TOKEN_USAGE, METRIC_USED_TOKENS, METRIC_MAX_TOTAL_TOKENS)


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


def make_http_client(
    connect_timeout_s: float, max_connections: int, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The router's one pooled client. Read timeouts are enforced per token by the caller (first/inter-token)."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(connect=connect_timeout_s, read=None, write=connect_timeout_s, pool=connect_timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections, 256),
            keepalive_expiry=BACKEND_KEEPALIVE_EXPIRY_S,
        ),
    )


@dataclass
class DeltaIds:
    """Turns SGLang stream chunks into new token ids, whether `output_ids` is cumulative (SGLang's default) or
    incremental (`--incremental-streaming-output`)."""

    ids: list[int] = field(default_factory=list)

    def feed(self, out: GenerateOutput) -> list[int]:
        total = out.meta_info.get("completion_tokens")
        cumulative = len(out.output_ids) == total if total is not None else out.output_ids[: len(self.ids)] == self.ids
        new = out.output_ids[len(self.ids) :] if cumulative else out.output_ids
        self.ids.extend(new)
        return list(new)


@dataclass(frozen=True)
class BackendMetrics:
    running_reqs: int = 0
    queued_reqs: int = 0
    token_usage: float = 0.0
    used_tokens: int = 0
    max_total_tokens: int = 0


def _wanted_lines(text: str) -> str:
    """The lines of an exposition that can belong to the gauges we read (their samples and # TYPE/# HELP), so the
    parser skips SGLang's many histograms: parsing all of /metrics twice a second cost the event loop ~10 ms/s."""
    keep = []
    for line in text.splitlines():
        body = line[7:] if line.startswith(("# TYPE ", "# HELP ")) else line
        if body.startswith(_METRICS_WANTED):
            for name in _METRICS_WANTED:
                if body.startswith(name) and body[len(name) : len(name) + 1] in ("{", " ", "\t"):
                    keep.append(line)
                    break
    return "\n".join(keep) + "\n"


def parse_metrics(text: str) -> BackendMetrics:
    """Sum SGLang's gauges over their label sets (one per DP rank / model)."""
    sums: dict[str, float] = {}
    wanted = set(_METRICS_WANTED)
    for family in text_string_to_metric_families(_wanted_lines(text)):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name == family.name:
                sums[family.name] = sums.get(family.name, 0.0) + float(sample.value)
    return BackendMetrics(
        running_reqs=int(sums.get(METRIC_RUNNING, 0)),
        queued_reqs=int(sums.get(METRIC_QUEUED, 0)),
        token_usage=float(sums.get(METRIC_TOKEN_USAGE, 0.0)),
        used_tokens=int(sums.get(METRIC_USED_TOKENS, 0)),
        max_total_tokens=int(sums.get(METRIC_MAX_TOTAL_TOKENS, 0)),
    )


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; orjson (~20x faster on a long input_ids list), json for what orjson refuses (ints beyond
    64 bits, non-str keys)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # what orjson refuses but json takes (NaN is fine for both; big ints are not)


_SSE_DONE_BYTES = SSE_DONE.encode()


def _parse_chunk(url: str, line: bytes | str) -> GenerateOutput | None:
    if isinstance(line, str):
        line = line.encode()
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == _SSE_DONE_BYTES:
        return None
    try:
        obj = loads(payload)
    except json.JSONDecodeError as err:
        raise BackendError(url, f"malformed stream chunk: {payload[:200].decode(errors='replace')!r}") from err
    if isinstance(obj, dict) and obj.get("error"):
        err_obj = obj["error"]
        message = err_obj.get("message", str(err_obj)) if isinstance(err_obj, dict) else str(err_obj)
        raise BackendError(url, f"error in stream: {message}")
    return GenerateOutput.from_json(obj)


class SGLangClient:
    def __init__(self, http: httpx.AsyncClient):
        self.http = http
        self._background: set[asyncio.Task] = set()

    @asynccontextmanager
    async def generate_batches(
        self, url: str, body: dict[str, Any] | bytes
    ) -> AsyncIterator[AsyncIterator[list[GenerateOutput]]]:
        """POST /generate with stream=True; yields an iterator of chunk lists, one per network read: every chunk
        that had arrived by then. At low load that is one chunk; under load the caller handles several at once (one
        downstream event for all their tokens). Raises BackendError on connect/non-200. `body` may come encoded
        already (`dumps`): the P-route sends the same one to two servers."""
        try:
            content = body if isinstance(body, bytes) else dumps(body)
            request = self.http.build_request("POST", f"{url}/generate", content=content, headers=JSON_HEADERS)
            response = await self.http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise BackendError(url, f"cannot connect: {type(err).__name__}", connect=True) from err
        except httpx.PoolTimeout as err:  # our side is out of connections; the server is not at fault
            raise BackendError(url, "router connection pool exhausted", status=503) from err
        except httpx.HTTPError as err:  # sent, then no response: the server closed or lost the connection
            raise BackendError(url, f"request failed: {type(err).__name__}: {err}", dropped=True) from err
        try:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise BackendError(url, f"HTTP {response.status_code}: {text[:500]}", status=response.status_code)
            yield self._batches(url, response)
        finally:
            await response.aclose()

    async def _batches(self, url: str, response: httpx.Response) -> AsyncIterator[list[GenerateOutput]]:
        # Lines split from raw bytes (no text decoding, no httpx line/byte chunkers): each read's complete `data:`
        # lines, one orjson parse each. aiter_raw hands over whatever the socket read gave (up to 64 KiB); a
        # compressed body (SGLang never sends one) goes through httpx's decoder.
        reads = response.aiter_bytes() if response.headers.get("content-encoding") else response.aiter_raw()
        pending = b""
        try:
            async for data in reads:
                if pending:
                    data = pending + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                pending = data[cut + 1 :]
                batch = [
                    out for line in data[:cut].split(b"\n") if line and (out := _parse_chunk(url, line)) is not None
                ]
                if batch:
                    yield batch
            if pending:
                out = _parse_chunk(url, pending)
                if out is not None:
                    yield [out]
        except httpx.HTTPError as err:
            raise BackendError(url, f"stream broken: {type(err).__name__}: {err}", dropped=True) from err

    async def generate_last(self, url: str, body: dict[str, Any] | bytes) -> GenerateOutput:
        """Run a /generate stream to its end and return the last chunk (the prefill half of a P-route)."""
        last: GenerateOutput | None = None
        async with self.generate_batches(url, body) as batches:
            async for batch in batches:
                last = batch[-1]
        if last is None:
            raise BackendError(url, "stream ended without output", dropped=True)
        return last

    async def abort(self, url: str, rid: str) -> bool:
        """SGLang's POST /abort_request {"rid"}; best effort (the server may already have finished the request)."""
        try:
            resp = await self.http.post(f"{url}/abort_request", json={"rid": rid})
            return resp.status_code == 200
        except httpx.HTTPError as err:
            log.warning("abort %s on %s failed: %s", rid, url, err)
            return False

    def abort_soon(self, url: str, rid: str) -> asyncio.Task:
        """Abort in the background: callable from a cancelled task (client disconnect) without awaiting. The task is
        returned for a caller that must know the abort landed before it sends more work (a retry)."""
        task = asyncio.get_running_loop().create_task(self.abort(url, rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def keep(self, task: asyncio.Task) -> None:
        """Hold a reference to a fire-and-forget task until it ends; its exception is logged, never lost."""
        self._background.add(task)

        def _done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background task failed: %s", t.exception())

        task.add_done_callback(_done)

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)

    async def health(self, url: str, timeout_s: float) -> bool:
        try:
            resp = await self.http.get(f"{url}/health", timeout=timeout_s)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    async def metrics(self, url: str, timeout_s: float) -> BackendMetrics | None:
        try:
            resp = await self.http.get(f"{url}/metrics", timeout=timeout_s)
            if resp.status_code != 200:
                return None
            return parse_metrics(resp.text)
        except (httpx.HTTPError, ValueError):
            return None

    async def server_info(self, url: str, timeout_s: float) -> dict[str, Any] | None:
        """/server_info (SGLang 0.5.10), falling back to the deprecated /get_server_info."""
        for path in ("/server_info", "/get_server_info"):
            try:
                resp = await self.http.get(f"{url}{path}", timeout=timeout_s)
                if resp.status_code == 200:
                    return resp.json()
            except (httpx.HTTPError, ValueError):
                continue
        return None
