"""SGLang 0.5.10.post1's HTTP API as the router uses it (and the emulated servers speak it): /generate streams split
into chunks per network read, aborts, health, metrics, server info. The HTTP itself is `ppd.sglang.transport`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

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
from ppd.sglang.transport import BackendError, Exchange, StreamBody, Transport

__all__ = ["BackendError", "DeltaIds", "SGLangClient"]

log = logging.getLogger(__name__)

_METRICS_WANTED = (METRIC_RUNNING, METRIC_QUEUED, METRIC_TOKEN_USAGE, METRIC_USED_TOKENS, METRIC_MAX_TOTAL_TOKENS)


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


def _parse_chunk(url: str, line: bytes) -> GenerateOutput | None:
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


class GenerateStream:
    """A /generate request on its way (`SGLangClient.generate_batches`): `async with` it for its chunk batches;
    `close()` gives it up if it will never be entered."""

    def __init__(self, url: str, exchange: Exchange):
        self.url = url
        self.exchange = exchange
        self.finished = False  # the stream delivered the server's last chunk (a finish_reason)
        self._response: StreamBody | None = None

    async def __aenter__(self) -> AsyncIterator[list[GenerateOutput]]:
        self._response = await self.exchange.__aenter__()
        return self._batches(self._response)

    async def __aexit__(self, *exc: object) -> None:
        # however the caller left (it may close its generator at the last chunk): once the server has sent its last
        # chunk it is done with the request, and the connection can serve the next one
        if self.finished and self._response is not None:
            self._response.keep_alive_after()
        await self.exchange.__aexit__(*exc)

    def close(self) -> None:
        self.exchange.close()

    async def _batches(self, response: StreamBody) -> AsyncIterator[list[GenerateOutput]]:
        # Lines split from raw bytes (no text decoding): each read's complete `data:` lines, one orjson parse each.
        url, pending = self.url, b""
        async for data in response.reads():
            if pending:
                data = pending + data
            cut = data.rfind(b"\n")
            if cut < 0:
                pending = data
                continue
            pending = data[cut + 1 :]
            batch = [out for line in data[:cut].split(b"\n") if line and (out := _parse_chunk(url, line)) is not None]
            if batch:
                self.finished = self.finished or batch[-1].finish_reason is not None
                yield batch
        if pending:
            out = _parse_chunk(url, pending)
            if out is not None:
                yield [out]


class SGLangClient:
    def __init__(self, transport: Transport):
        self.transport = transport
        self._background: set[asyncio.Task] = set()

    def generate_batches(self, url: str, body: dict[str, Any] | bytes) -> GenerateStream:
        """POST /generate with stream=True; `async with` the result for an iterator of chunk lists, one per network
        read: every chunk that had arrived by then. At low load that is one chunk; under load the caller handles
        several at once (one downstream event for all their tokens). Raises BackendError on connect/non-200. `body`
        may come encoded already (`dumps`): the P-route sends the same one to two servers. The request leaves from
        this call when the transport has a kept-alive connection at hand (not when the context is entered): the
        P-route's two halves go out in one event-loop turn. Left after the server's last chunk, the stream's
        connection is kept for the next request; left earlier, it is closed (the server aborts)."""
        content = body if isinstance(body, bytes) else dumps(body)
        return GenerateStream(url, self.transport.stream(url, "/generate", content))

    async def last_of(
        self, url: str, stream: GenerateStream, on_accepted: Callable[[], None] | None = None
    ) -> GenerateOutput:
        """The last chunk of a stream already sent (`generate_batches`), read to its end (the prefill half of a
        P-route); `on_accepted` is called once the server has answered 200 (its response headers are in)."""
        last: GenerateOutput | None = None
        async with stream as batches:
            if on_accepted is not None:
                on_accepted()
            async for batch in batches:
                last = batch[-1]
        if last is None:
            raise BackendError(url, "stream ended without output", dropped=True)
        return last

    async def abort(self, url: str, rid: str) -> bool:
        """SGLang's POST /abort_request {"rid"}; best effort (the server may already have finished the request)."""
        try:
            status, _ = await self.transport.request("POST", url, "/abort_request", dumps({"rid": rid}))
            return status == 200
        except BackendError as err:
            log.warning("abort %s on %s failed: %s", rid, url, err.message)
            return False

    def abort_soon(self, url: str, rid: str) -> asyncio.Task:
        """Abort in the background: callable from a cancelled task (client disconnect) without awaiting. The task is
        returned for a caller that must know the abort landed before it sends more work (a retry)."""
        task = asyncio.get_running_loop().create_task(self.abort(url, rid))
        self.keep(task)
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
            status, _ = await self.transport.request("GET", url, "/health", timeout_s=timeout_s)
            return status == 200
        except BackendError:
            return False

    async def metrics(self, url: str, timeout_s: float) -> BackendMetrics | None:
        try:
            status, text = await self.transport.request("GET", url, "/metrics", timeout_s=timeout_s)
            if status != 200:
                return None
            return parse_metrics(text.decode(errors="replace"))
        except (BackendError, ValueError):
            return None

    async def server_info(self, url: str, timeout_s: float) -> dict[str, Any] | None:
        """/server_info (SGLang 0.5.10), falling back to the deprecated /get_server_info."""
        for path in ("/server_info", "/get_server_info"):
            try:
                status, data = await self.transport.request("GET", url, path, timeout_s=timeout_s)
                if status == 200:
                    return loads(data)
            except (BackendError, ValueError):
                continue
        return None
