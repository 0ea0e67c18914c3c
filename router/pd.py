"""Running one routed request on its backends.

- P-route: exactly sglang-router's mini_lb: one /generate body with bootstrap_host/port/room, POSTed concurrently to
  the prefill and the decode server; tokens stream from the decode server. If the prefill half fails, the decode half
  is aborted (/abort_request) at once: otherwise the decode server holds the slot until its 300 s bootstrap timeout.
  The failure surfaces as `PrefillFailed` (also when the decode half's own abort came a moment before it), which the
  app answers with a D-route retry when it can (router/app.py).
- D-route: the decode server only, marked as a local append (protocol.local_append).
- colocated: a plain /generate to one normal server.

`RouteCall.chunks()` yields (new token ids, chunk) and enforces the first-token and inter-token timeouts; whenever it
stops before the backend said the request finished (error, timeout, stop string, client gone), every server still
working on the request gets an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ppd.policies import Route
from ppd.sglang import protocol
from ppd.sglang.client import BackendError, DeltaIds, GenerateStream, SGLangClient, dumps
from router.errors import OpenAIError
from router.routing import RoutePlan

T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    first_token_s: float
    inter_token_s: float


# A decode half aborted by its server before its first token (e.g. "transfer failed") may be the echo of a prefill
# failure whose own report is a moment behind: wait this long for it before blaming the decode server.
PREFILL_BLAME_GRACE_S = 0.25


class PrefillFailed(BackendError):
    """The prefill half of a P-route failed; the decode half has been aborted."""


class DecodeAborted(BackendError):
    """The answering server ended the request with finish_reason abort (failed KV transfer, overload, ...)."""


def backend_body(plan: RoutePlan, body: dict[str, Any]) -> dict[str, Any]:
    """The exact /generate body each route sends (the same one to both servers on the P-route)."""
    room = protocol.new_bootstrap_room()
    if plan.route is Route.PREFILL:
        assert plan.prefill is not None
        return protocol.with_bootstrap(
            body, protocol.bootstrap_hostname(plan.prefill.url), int(plan.prefill.server.bootstrap_port or 0), room
        )
    if plan.route is Route.DECODE:
        return protocol.local_append(body, room)
    return dict(body)


async def _with_timeout(aw: Awaitable[T], timeout_s: float) -> T:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await aw
    return await asyncio.wait_for(aw, timeout_s)  # pragma: no cover - Python 3.10


def uncancel(task: asyncio.Task | None) -> None:
    """Take back a cancel request that was handled (Python 3.11+ counts them; later awaits would see it)."""
    take_back = getattr(task, "uncancel", None)
    if take_back is not None:
        take_back()


class FirstTokenWait:
    """`async with` around each await before the first token: cancels the waiting task at the first-token deadline
    (loop time; TimeoutError) or when the prefill half fails (its PrefillFailed). The awaits run in the request's own
    task: wrapping each in a task of its own, to race it against the prefill half, cost an event-loop turn per await
    on the path to the first token."""

    def __init__(self, deadline: float, prefill: asyncio.Task | None):
        self.deadline = deadline
        self.prefill = prefill
        self._task: asyncio.Task | None = None
        self._fired: str | None = None  # "timeout" or "prefill": this object cancelled the task
        self._timer: asyncio.TimerHandle | None = None

    def _raise_if_prefill_failed(self) -> None:
        p = self.prefill
        if p is not None and p.done():
            if p.cancelled():
                raise PrefillFailed("prefill", "prefill half cancelled")
            if p.exception() is not None:
                raise p.exception()  # type: ignore[misc]

    def _fire(self, why: str) -> None:
        if self._fired is None and self._task is not None:
            self._fired = why
            self._task.cancel()

    def _prefill_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self._fire("prefill")

    async def __aenter__(self) -> None:
        self._raise_if_prefill_failed()
        self._task = asyncio.current_task()
        self._fired = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.deadline, self._fire, "timeout")
        if self.prefill is not None:
            self.prefill.add_done_callback(self._prefill_done)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        assert self._timer is not None and self._task is not None
        self._timer.cancel()
        if self.prefill is not None:
            self.prefill.remove_done_callback(self._prefill_done)
        fired, self._fired, task, self._task = self._fired, None, self._task, None
        if fired is None:
            return False
        if exc_type is asyncio.CancelledError:
            uncancel(task)
            if fired == "timeout":
                raise TimeoutError
            self._raise_if_prefill_failed()
            return False
        # the await ended otherwise in the turn the cancel came: take the cancel back before anything else awaits
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            uncancel(task)
        return False


class RouteCall:
    """One in-flight backend generation of a `RoutePlan`."""

    def __init__(
        self,
        client: SGLangClient,
        plan: RoutePlan,
        body: dict[str, Any],
        timeouts: Timeouts,
        on_prefill_done: Callable[[RoutePlan], None] | None = None,
        on_accepted: Callable[[], Awaitable[None]] | None = None,
    ):
        self.client = client
        self.on_prefill_done = on_prefill_done  # frees the prefill server's admission slot once its half is over
        # awaited once every server of the route has answered 200 and before the first token (a stream's response
        # starts there, as sglang-router passes the decode server's status on: see router.endpoints._stream_start)
        self.on_accepted = on_accepted
        self._prefill_accepted = asyncio.Event()
        self.plan = plan
        self.body = backend_body(plan, body)
        self.payload = dumps(self.body)  # encoded once: the P-route sends the same bytes to both servers
        self.rid: str = self.body["rid"]
        self.timeouts = timeouts
        self.finished = False  # the backend sent a finish_reason
        self.last: protocol.GenerateOutput | None = None
        self.prefill_out: protocol.GenerateOutput | None = None
        self.aborted: list[str] = []  # backend names that were sent /abort_request
        self.abort_tasks: list[asyncio.Task] = []  # those aborts, in flight (a retry waits for them)
        self._prefill_task: asyncio.Task | None = None
        self.t_sent: float | None = None  # perf_counter when the request was written to its server(s)

    async def _prefill_half(self, stream: GenerateStream) -> protocol.GenerateOutput:
        assert self.plan.prefill is not None
        try:
            out = await self.client.last_of(self.plan.prefill.url, stream, on_accepted=self._prefill_accepted.set)
        except BackendError as err:
            raise PrefillFailed(
                err.url, err.message, status=err.status, connect=err.connect, dropped=err.dropped
            ) from err
        self.prefill_out = out
        if self.on_prefill_done is not None:
            self.on_prefill_done(self.plan)
        return out

    def _abort(self, include_decode: bool, include_prefill: bool) -> None:
        targets = ([self.plan.decode] if include_decode else []) + (
            [self.plan.prefill] if include_prefill and self.plan.prefill else []
        )
        for b in targets:
            self.abort_tasks.append(self.client.abort_soon(b.url, self.rid))
            self.aborted.append(b.name)

    async def _prefill_failure(self, deadline: float) -> PrefillFailed | None:
        """The prefill half's failure, if it failed or fails within PREFILL_BLAME_GRACE_S (and before `deadline`)."""
        task = self._prefill_task
        if task is None:
            return None
        if not task.done():
            grace_s = min(PREFILL_BLAME_GRACE_S, deadline - asyncio.get_running_loop().time())
            if grace_s > 0:
                await asyncio.wait({task}, timeout=grace_s)
        if task.done() and not task.cancelled() and isinstance(task.exception(), PrefillFailed):
            return task.exception()  # type: ignore[return-value]
        return None

    async def chunks(self) -> AsyncIterator[tuple[list[int], protocol.GenerateOutput]]:
        """(new ids, last chunk) per network read of the decode stream: under load one read holds several chunks,
        whose ids come out together (one downstream event); the first token is passed on as soon as it is read.
        The timeouts apply per read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.first_token_s
        inter_token_s = self.timeouts.inter_token_s
        delta = DeltaIds()
        first = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Both halves of a P-route leave in this event-loop turn, the prefill's first, as sglang-router sends
                # them: the prefill server holds its half until the decode server has reserved KV for it, so the
                # first token waits for whichever arrives last.
                if self.plan.route is Route.PREFILL:
                    assert self.plan.prefill is not None
                    prefill_stream = self.client.generate_batches(self.plan.prefill.url, self.payload)
                decode = self.client.generate_batches(self.plan.decode.url, self.payload)
                self.t_sent = time.perf_counter()
                stack.callback(decode.close)  # a no-op once the stream ended; else its connection is closed
                if self.plan.route is Route.PREFILL:
                    self._prefill_task = asyncio.create_task(self._prefill_half(prefill_stream))
                    self._prefill_task.add_done_callback(_retrieve)
                    # a task cancelled before it ran never entered its stream: close that one's connection
                    self._prefill_task.add_done_callback(lambda _: prefill_stream.close())
                waiting = FirstTokenWait(deadline, self._prefill_task)
                async with waiting:
                    stream = await stack.enter_async_context(decode)
                    if self.on_accepted is not None:
                        if self._prefill_task is not None:  # a refusal by either server stays an HTTP error
                            await self._prefill_accepted.wait()
                        await self.on_accepted()
                it = aiter(stream)
                while True:
                    try:
                        if first:
                            async with waiting:
                                batch = await anext(it)
                        else:
                            batch = await _with_timeout(anext(it), inter_token_s)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        what = "first token" if first else "next token"
                        limit = self.timeouts.first_token_s if first else inter_token_s
                        raise OpenAIError(
                            504,
                            f"backend timed out waiting for the {what} (limit {limit:g} s)",
                            code="first_token_timeout" if first else "inter_token_timeout",
                        ) from None
                    new_ids: list[int] = []
                    aborted: DecodeAborted | None = None
                    for out in batch:
                        new_ids += delta.feed(out)
                        self.last = out
                        if out.finish_reason is not None:
                            self.finished = True  # the server is done with this rid, whatever the reason
                            if out.finish_reason.get("type") == "abort":
                                # SGLang ends an aborted request's stream this way (failed KV transfer, overload...)
                                message = out.finish_reason.get("message") or "aborted"
                                status = out.finish_reason.get("status_code")
                                aborted = DecodeAborted(
                                    self.plan.decode.url, f"request aborted by the server: {message}", status=status
                                )
                            break
                    if aborted is not None and not new_ids:
                        raise aborted
                    if new_ids or self.finished:
                        first = False
                        yield new_ids, self.last  # type: ignore[misc]
                    if aborted is not None:
                        raise aborted  # after the tokens that came before it, as one chunk at a time did
                    if self.finished:
                        break
            if not self.finished:
                raise BackendError(self.plan.decode.url, "stream ended before the request finished")
        except TimeoutError:  # waiting for the decode server's response headers
            raise OpenAIError(
                504,
                f"backend timed out waiting for the first token (limit {self.timeouts.first_token_s:g} s)",
                code="first_token_timeout",
            ) from None
        except DecodeAborted as err:
            if first:  # a P-route whose decode half gave up waiting for KV: was it the prefill half that failed?
                blame = await self._prefill_failure(deadline)
                if blame is not None:
                    raise blame from err
            raise
        finally:
            prefill = self._prefill_task
            prefill_running = prefill is not None and not prefill.done()
            if not self.finished:
                # Whatever stopped us, the servers still working on this rid must stop too.
                self._abort(include_decode=True, include_prefill=prefill_running)
                if prefill_running:
                    prefill.cancel()
            elif prefill_running and self.last is not None and _aborted(self.last):
                self._abort(include_decode=False, include_prefill=True)  # its KV has nowhere to go
                prefill.cancel()
            elif prefill_running:
                self.client.keep(prefill)  # nearly done: the decode server already has its KV

    async def prefill_result(self, timeout_s: float = 1.0) -> protocol.GenerateOutput | None:
        """The prefill half's last chunk (its meta_info), once the decode half finished."""
        if self._prefill_task is None:
            return None
        with contextlib.suppress(Exception):  # a slow or failed prefill report only costs us its timings
            return await asyncio.wait_for(asyncio.shield(self._prefill_task), timeout_s)
        return None


def _aborted(out: protocol.GenerateOutput) -> bool:
    return (out.finish_reason or {}).get("type") == "abort"


def _retrieve(task: asyncio.Task) -> None:
    """Mark a task's exception as seen (it is raised where it matters, through `FirstTokenWait`)."""
    if not task.cancelled():
        task.exception()


def monotonic_ms() -> float:
    return time.perf_counter() * 1000.0
