"""From backend token ids to OpenAI text: incremental detokenization, stop strings, SSE framing, and the bookkeeping
that ends a request (usage, the `ppd` extension, metrics, prefix indexes, policy observations).

Stop strings are the router's job: backends get token ids only (SGLang runs with --skip-tokenizer-init), so the router
detokenizes, cuts at the first stop string, and aborts the backend. In a stream, text that could still turn out to be
the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ppd.policies import Route
from ppd.sglang.client import BackendError, dumps
from ppd.tokenizer import ChatTokenizer
from router.errors import OpenAIError
from router.pd import PrefillFailed, RouteCall
from router.routing import Outcome, RoutePlan

if TYPE_CHECKING:
    from router.app import RouterState

log = logging.getLogger(__name__)


class TextAssembler:
    """Token ids in, text deltas out (vLLM-style offsets: decode only a short window per step)."""

    def __init__(self, tokenizer: ChatTokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode_new(self) -> str:
        prefix = self._decoded_prefix()
        full = self.tok.decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # wait for the rest of a multi-byte char
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def _decoded_prefix(self) -> str:
        # the window's already-shown head; none before the first token (no call into the tokenizer for it)
        if self._prefix_offset == self._read_offset:
            return ""
        return self.tok.decode(self.ids[self._prefix_offset : self._read_offset])

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def add(self, new_ids: list[int]) -> str:
        """Append generated ids; returns the text that is now safe to show."""
        if self.stopped or not new_ids:
            return ""
        self.ids.extend(new_ids)
        before = len(self.text)
        self.text += self._decode_new()
        if self.stops:
            start = max(0, before - max(len(s) for s in self.stops) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text) if self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def flush(self) -> str:
        """At the end: any text still held back (a partial stop-string match that never completed)."""
        if not self.stopped:
            self.text += self.tok.decode(self.ids[self._prefix_offset :])[len(self._decoded_prefix()) :]
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def ids_for_text(self) -> list[int] | None:
        """The generated ids that spell exactly `text` (after a stop cut: a prefix of them), or None if none do."""
        if not self.stopped:
            return list(self.ids)
        k = len(self.ids)
        while k > 0 and len(self.tok.decode(self.ids[: k - 1])) >= len(self.text):
            k -= 1
        return self.ids[:k] if self.tok.decode(self.ids[:k]) == self.text else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _timings(meta: dict[str, Any] | None) -> dict[str, float]:
    ppd = (meta or {}).get("ppd") or {}
    return {k: float(v) for k, v in ppd.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def server_timings(serving: dict[str, float], prefill: dict[str, float] | None) -> dict[str, float]:
    """Backend-reported timings, flat. On the P-route the prefill server did the prefill, so its numbers win for
    shared keys (queue_ms, prefill_ms, ...); the decode server's own values, where they differ, are kept as
    `decode_server.<key>`."""
    if prefill is None:
        return dict(serving)
    out = {**serving, **prefill}
    out.update({f"decode_server.{k}": v for k, v in serving.items() if k in prefill and prefill[k] != v})
    return out


@dataclass
class Result:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    ppd: dict[str, Any]


class Generation:
    """One request from routed plan to finished answer. `prime()` waits for the first token (errors before it become
    plain HTTP errors); `deltas()` yields the text; `result` is set when it ends."""

    def __init__(
        self,
        state: RouterState,
        endpoint: str,
        plan: RoutePlan,
        call: RouteCall,
        stops: list[str],
        t0: float,
        return_token_ids: bool = False,  # the request's `return_token_ids`: output ids in the `ppd` object
        arrived: float | None = None,  # perf_counter when the request reached the router (before its body was read)
    ):
        self.state = state
        self.endpoint = endpoint
        self.plan = plan
        self.call = call
        self.text = TextAssembler(state.tokenizer, stops)
        self.t0 = t0
        self.arrived = t0 if arrived is None else arrived
        self.t_first: float | None = None
        self.t_first_sent: float | None = None  # streams: the first token's bytes written to the client
        self.t_last: float | None = None
        self.result: Result | None = None
        self.return_token_ids = return_token_ids
        self._chunks = call.chunks()
        self._pending: list[str] = []
        self._done = False

    async def _pull(self) -> bool:
        """Read one backend chunk; False once the backend is done or a stop string ended the text."""
        try:
            new_ids, out = await anext(self._chunks)
        except StopAsyncIteration:
            return False
        now = time.perf_counter()
        if new_ids:
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
        delta = self.text.add(new_ids)
        if delta:
            self._pending.append(delta)
        return not (self.text.stopped or self.call.finished)

    async def prime(self) -> None:
        """Wait for the first chunk. Raises OpenAIError/BackendError before anything was sent to the client."""
        try:
            if not await self._pull():
                await self._close()
        except BaseException:
            await self._chunks.aclose()
            raise

    async def deltas(self) -> AsyncIterator[str]:
        try:
            while True:
                while self._pending:
                    yield self._pending.pop(0)
                if self._done or not await self._pull():
                    break
            while self._pending:
                yield self._pending.pop(0)
            if not self._done:
                await self._close()
            tail = self.text.flush()
            if tail:
                yield tail
        finally:
            await self._chunks.aclose()  # aborts the backends if they are still working (stop string, disconnect)

    async def _close(self) -> None:
        self._done = True
        await self._chunks.aclose()

    def usage_so_far(self) -> dict[str, int]:
        n = len(self.text.ids)
        return {
            "prompt_tokens": self.plan.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.plan.prompt_tokens + n,
        }

    def abandon(self) -> None:
        """The request ended without an answer; what the server computed before that is still cached there."""
        if self.t_first is not None:
            self.state.router.record_partial(self.plan, self.text.ids)

    async def run(self) -> Result:
        parts = [d async for d in self.deltas()]
        return await self.finish("".join(parts))

    async def finish(self, text: str) -> Result:
        """Bookkeeping once the last text is out: usage, the ppd object, indexes, policies, metrics."""
        plan, call, state = self.plan, self.call, self.state
        end = time.perf_counter()
        await call.prefill_result(timeout_s=0.5)  # P-route: the prefill half's meta_info (done long before now)
        meta = call.last.meta_info if call.last is not None else {}
        prefill_meta = call.prefill_out.meta_info if call.prefill_out is not None else None
        if self.text.stopped:
            finish_reason = "stop"
        else:
            reason = meta.get("finish_reason")
            finish_reason = {"length": "length", "stop": "stop"}.get((reason or {}).get("type"), "stop")
        out_ids = self.text.ids
        completion_tokens = len(out_ids)
        backend_cached = meta.get("cached_tokens")
        if backend_cached is not None:
            cached = int(backend_cached)
        else:
            cached = 0 if plan.route is Route.PREFILL else plan.decode_cached_tokens
        timings = server_timings(_timings(meta), _timings(prefill_meta) if prefill_meta is not None else None)
        kv_bytes = int(timings.get("kv_bytes", 0)) or state.router.kv_bytes_moved(plan)
        if plan.route is not Route.PREFILL:
            kv_bytes = 0
        ttft_ms = ((self.t_first or end) - self.t0) * 1000
        tpot_ms = (
            ((self.t_last or end) - (self.t_first or end)) * 1000 / (completion_tokens - 1)
            if completion_tokens > 1
            else None
        )
        e2e_ms = (end - self.t0) * 1000
        route = plan.route.value
        m = state.metrics
        m.ttft.labels(route).observe(ttft_ms / 1000)
        if tpot_ms is not None:
            m.tpot.labels(route).observe(tpot_ms / 1000)
        m.e2e.labels(route).observe(e2e_ms / 1000)
        if kv_bytes:
            m.kv_bytes.inc(kv_bytes)
        m.requests.labels(self.endpoint, route, "ok").inc()
        if call.aborted:
            for name in call.aborted:
                m.aborts.labels(name).inc()
        state.router.record(
            plan,
            Outcome(
                output_ids=tuple(out_ids),
                ttft_ms=ttft_ms,
                tpot_ms=tpot_ms,
                e2e_ms=e2e_ms,
                backend_cached_tokens=int(backend_cached) if backend_cached is not None else None,
                prefill_reported_cached=(
                    int(prefill_meta["cached_tokens"]) if prefill_meta and "cached_tokens" in prefill_meta else None
                ),
                kv_bytes=kv_bytes,
                server_timings=timings,
            ),
        )
        remembered = self.text.ids_for_text()
        if remembered is not None and text:
            state.tokenizer.remember_output(text, remembered)
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        ppd = ppd_object(plan, call.rid, kv_bytes, timings)
        ppd["ttft_ms"] = round(ttft_ms, 3)
        ppd["e2e_ms"] = round(e2e_ms, 3)
        ppd["router_ms"] = self._router_path()
        if self.return_token_ids:
            ppd["output_ids"] = list(out_ids)
        self.result = Result(text, finish_reason, usage, ppd)
        return self.result

    def _router_path(self) -> dict[str, float | None]:
        """The router's own time on this request's path (ms), also into ppd_router_path_seconds."""
        phases = {
            "dispatch": self.call.t_sent - self.arrived if self.call.t_sent is not None else None,
            "relay": self.t_first_sent - self.t_first
            if self.t_first_sent is not None and self.t_first is not None
            else None,
        }
        hist = self.state.metrics.router_path
        for phase, seconds in phases.items():
            if seconds is not None:
                hist.labels(phase).observe(seconds)
        return {phase: None if s is None else round(s * 1000, 3) for phase, s in phases.items()}


def ppd_object(plan: RoutePlan, rid: str, kv_bytes: int, timings: dict[str, float]) -> dict[str, Any]:
    d = plan.decision
    return {
        "route": d.route.value,
        "policy": d.policy,
        "reason": d.reason,
        "cache_rate": round(d.cache_rate, 6),
        "decode_cached_tokens": plan.decode_cached_tokens,
        "prefill_cached_tokens": plan.prefill_cached_tokens,
        "append_tokens": plan.append_tokens,
        "kv_bytes": kv_bytes,
        "scores": {s.route.value: {"cost_ms": _finite(s.cost_ms), "terms": s.terms} for s in d.scores},
        "server_timings": timings,
        "decode_server": plan.decode.name,
        "prefill_server": plan.prefill.name if plan.prefill is not None else None,
        "request_id": rid,
        "retry_of": plan.retry_of,  # the failed first attempt (route, server, error) when this answer is a retry
    }


def error_from(exc: BaseException) -> OpenAIError:
    """Any failure of a backend call as the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, PrefillFailed):
        status = 503 if exc.connect or exc.status == 503 else 502
        return OpenAIError(status, f"prefill server failed ({exc}); the decode half was aborted", code="prefill_failed")
    if isinstance(exc, BackendError):
        status = 503 if exc.connect or exc.status == 503 else 502
        return OpenAIError(status, f"backend failed: {exc}", code="backend_error")
    return OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def sse(obj: dict[str, Any]) -> bytes:
    """One SSE event. Text chunks go through orjson (one per token: the stream's hot path); an object that may hold
    floats (the closing chunk's `ppd`) through json, which keeps writing a non-finite float as before."""
    return b"data: " + dumps(obj) + b"\n\n"


def sse_exact(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def sse_stream(
    gen: Generation, chunk_fn, first_fn, include_usage: bool, continuous_usage: bool = False
) -> AsyncIterator[bytes]:
    """OpenAI SSE: an opening chunk, text chunks, a chunk with finish_reason, a usage chunk if asked, [DONE].
    The `ppd` object rides on the last chunk before [DONE]. Errors after the first byte become an error event.
    One text chunk per backend read: under load it carries the text of several tokens (with
    `continuous_usage_stats`, its `usage` says how many tokens there are so far)."""
    outcome = "ok"
    try:
        opening = first_fn()
        if opening is not None:
            yield sse(opening)
        parts: list[str] = []
        async with aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                parts.append(delta)
                obj = chunk_fn(delta, None)
                if continuous_usage:
                    obj["usage"] = gen.usage_so_far()
                yield sse(obj)
                if gen.t_first_sent is None:  # resumed once the event was handed to the server (SSEReply)
                    gen.t_first_sent = time.perf_counter()
        result = await gen.finish("".join(parts))
        final = chunk_fn(None, result.finish_reason)
        if include_usage:
            yield sse(final)
            yield sse_exact({**chunk_fn(None, None, empty=True), "usage": result.usage, "ppd": result.ppd})
        else:
            yield sse_exact({**final, "ppd": result.ppd})
        yield SSE_DONE
    except BaseException as exc:
        if isinstance(exc, Exception):
            err = error_from(exc)
            outcome = "timeout" if err.status == 504 else "backend_error"
            log.warning("stream %s failed: %s", gen.call.rid, err.message)
            yield sse(err.body())
            yield SSE_DONE
        else:  # client went away (cancelled): the backends were aborted on the way out
            outcome = "client_disconnect"
            raise
    finally:
        if outcome != "ok":
            gen.abandon()
            gen.state.metrics.requests.labels(gen.endpoint, gen.plan.route.value, outcome).inc()
            for name in gen.call.aborted:
                gen.state.metrics.aborts.labels(name).inc()
        gen.state.router.release(gen.plan)
