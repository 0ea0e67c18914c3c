"""The two generation endpoints, POST /v1/chat/completions and /v1/completions, served as plain ASGI.

The request path: read the body -> orjson -> the pydantic request model -> checks -> admission -> tokenize ->
`Router.plan` (router/routing.py: servers + the policy's route) -> `RouteCall` (router/pd.py: /generate on the
servers) -> [a stream's status and headers, once the servers accepted it] -> first token -> the answer, sent as ASGI
messages (one JSON body, or SSE events).

Why not FastAPI routes: FastAPI's middleware, routing and dependency solving, and Starlette's StreamingResponse (a
task group per stream), sit on the path to the first token, on the way in and out; served directly, a request meets
none of them (the router's TTFT against sglang-router's Rust router, before and after: results/h200x2/session4/).
Everything else (/v1/models, /health, /metrics, ...) stays on FastAPI (router/app.py), whose app hands these two paths
to `serve`. Errors keep the OpenAI shape (router/errors.py).

A request whose first attempt fails before any token reached the client is planned once more: without a server it
could not connect to, or, when the prefill half of a P-route failed after it was sent, by the D-route
(reason `prefill-failed-retry`); only when no retry can run does the client get the first attempt's error (in a
stream already started, as its error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ppd.policies import Route
from ppd.sglang import protocol
from ppd.sglang.client import BackendError, loads
from ppd.tokenizer import message_text
from router import openai_models as om
from router.errors import OpenAIError, validation_message
from router.pd import PrefillFailed, RouteCall, uncancel
from router.routing import Retry, RoutePlan
from router.streaming import SSE_DONE, Generation, error_from, sse, sse_stream

if TYPE_CHECKING:
    from router.app import RouterState

log = logging.getLogger(__name__)

T = TypeVar("T")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# Inputs up to this many characters are tokenized on the event loop (well under a millisecond); longer ones in a
# worker thread: 30k tokens take 100+ ms, which would stall every other stream.
TOKENIZE_INLINE_MAX_CHARS = 8192
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class ClientGone(Exception):
    """The client closed its connection before its request's body was read."""


class ClientWatch:
    """Cancels the request's task when the client disconnects: a client that gave up must not keep a GPU busy (the
    backends are aborted on the way out, where the cancellation passes). One watcher task per request, started once
    the body is read; the request itself runs in its own task throughout (racing each phase, as a task of its own,
    against a watcher cost an event-loop turn per phase on the path to the first token)."""

    def __init__(self, receive: Receive):
        self.gone = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._task is not None:
            self.gone = True
            self._task.cancel()

    def left(self, exc: BaseException) -> bool:
        """Whether `exc` is the cancellation this watch made because the client left."""
        return self.gone and isinstance(exc, asyncio.CancelledError)

    def stop(self) -> None:
        self._task = None
        self._watcher.cancel()


@dataclass
class Incoming:
    """What the request path needs of the HTTP request besides its body, and the response's start."""

    headers: dict[str, str]  # lower-case names, as ASGI gives them
    watch: ClientWatch
    arrived: float  # perf_counter when the request reached `serve`
    send: Send
    started: bool = False  # a stream's status and headers went out

    @classmethod
    def of(cls, scope: Scope, watch: ClientWatch, arrived: float, send: Send) -> Incoming:
        return cls({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}, watch, arrived, send)

    def request_id(self, rid: str) -> str:
        """x-request-id of the answer: the client's own, if it sent a usable one, else the backend rid."""
        given = self.headers.get("x-request-id", "")
        return given if _REQUEST_ID.match(given) else rid

    async def start_stream(self, plan: RoutePlan, rid: str) -> None:
        """Send a stream's status (200) and the route's headers, once (`plan`, `rid`: the attempt that starts it)."""
        if self.started:
            return
        self.started = True
        headers = _route_headers(plan, self.request_id(rid))
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()] + _SSE_HEADERS
        await self.send({"type": "http.response.start", "status": 200, "headers": encoded})


async def serve(state: RouterState | None, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request to a generation endpoint (`endpoint`: "chat" or "completions")."""
    if scope["method"] != "POST":
        err = OpenAIError(405, "Method Not Allowed", headers={"allow": "POST"})
        return await err.response()(scope, receive, send)
    if state is None:  # the lifespan has not started (or has ended)
        return await OpenAIError(503, "the router is not running", code="not_running").response()(scope, receive, send)
    watch: ClientWatch | None = None
    incoming: Incoming | None = None
    failure: OpenAIError | None = None
    arrived = time.perf_counter()
    try:
        body = await _read_body(receive)
        watch = ClientWatch(receive)
        incoming = Incoming.of(scope, watch, arrived, send)
        if endpoint == "chat":
            req: om._SamplingFields = _parse(om.ChatCompletionRequest, body)
            prompt_ids, max_new = await _chat_input(state, req)  # type: ignore[arg-type]
        else:
            req = _parse(om.CompletionRequest, body)
            prompt_ids, max_new = await _completion_input(state, req)  # type: ignore[arg-type]
        reply = await _answer(state, incoming, endpoint, req, prompt_ids, max_new)
        if isinstance(reply, SSEReply):
            return await reply(incoming)  # under the watch: a client that leaves mid-stream cancels it
    except ClientGone:
        return
    except asyncio.CancelledError:
        if watch is None or not watch.gone:
            raise
        uncancel(asyncio.current_task())  # the client left: nothing to answer, and the server goes on
        return
    except OpenAIError as err:
        if 400 <= err.status < 500 and err.status != 429:  # 429/503 are counted where they are decided
            state.metrics.requests.labels(endpoint, "none", "bad_request").inc()
        failure = err
    except Exception as exc:
        log.exception("unhandled error on POST %s", scope["path"])
        failure = OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
    finally:
        if watch is not None:
            watch.stop()
    if failure is None:
        return await reply(scope, receive, send)
    if incoming is not None and incoming.started:
        # a stream whose servers had accepted it failed before its first token: the error is its one event
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": sse(failure.body()) + SSE_DONE, "more_body": False})
        return
    await failure.response()(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _parse(model: type[T], body: bytes) -> T:
    """The request model from the raw body; 400s in OpenAI's shape. orjson then a dict validation: measured faster
    than pydantic's own JSON parser for long id prompts."""
    try:
        data = loads(body)
    except ValueError as err:
        raise OpenAIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    try:
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as err:
        message, param, code = validation_message(err.errors(include_url=False))
        raise OpenAIError(400, message, param=param, code=code) from None


async def _chat_input(state: RouterState, req: om.ChatCompletionRequest) -> tuple[list[int], int]:
    req.check_supported()
    _check_model(state, req.model)
    messages = [m.as_dict() for m in req.messages]
    with _reserved(state, "chat"):  # refused before tokenizing when the router is full
        chars = sum(len(message_text(m.get("content"))) for m in messages)
        prompt_ids = await _off_loop_if(chars > TOKENIZE_INLINE_MAX_CHARS, state.tokenizer.encode_chat, messages)
        return prompt_ids, _max_new_tokens(state, len(prompt_ids), req.requested_max_tokens(), "messages")


async def _completion_input(state: RouterState, req: om.CompletionRequest) -> tuple[list[int], int]:
    req.check_supported()
    _check_model(state, req.model)
    prompt = req.single_prompt()
    given_ids = None if isinstance(prompt, str) else _checked_token_ids(state, prompt)  # 400s before admission
    with _reserved(state, "completions"):
        prompt_ids = (
            given_ids
            if given_ids is not None
            else await _off_loop_if(len(prompt) > TOKENIZE_INLINE_MAX_CHARS, state.tokenizer.encode, prompt)
        )
        if not prompt_ids:
            raise OpenAIError(400, "prompt is empty", param="prompt", code="invalid_value")
        return prompt_ids, _max_new_tokens(state, len(prompt_ids), req.requested_max_tokens(), "prompt")


@contextlib.contextmanager
def _reserved(state: RouterState, endpoint: str):
    """Hold a slot of the total in-flight limit while the request is tokenized and checked (429/503 at once when
    there is none); it is given back right before `Router.plan` takes the real ones."""
    try:
        state.router.reserve()
    except OpenAIError:
        state.metrics.requests.labels(endpoint, "none", "rejected").inc()
        raise
    try:
        yield
    finally:
        state.router.unreserve()


async def _off_loop_if(long: bool, fn, *args):
    """`fn(*args)` in a worker thread when the input is long, inline otherwise (a thread hop costs ~0.1 ms)."""
    return await asyncio.to_thread(fn, *args) if long else fn(*args)


def _checked_token_ids(state: RouterState, prompt: list[int]) -> list[int]:
    vocab = max(state.tokenizer.vocab_size, state.model_vocab_size)  # the model may outnumber the tokenizer
    # min/max run in C; the first offender is looked for only when there is one
    bad = [t for t in prompt if not 0 <= t < vocab] if prompt and (min(prompt) < 0 or max(prompt) >= vocab) else []
    if bad:
        raise OpenAIError(
            400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt", code="invalid_value"
        )
    return prompt  # the model's own list, built by validation: nobody else holds it


def _check_model(state: RouterState, model: str) -> None:
    if model != state.cfg.model.served_name:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist; this router serves {state.cfg.model.served_name!r}",
            param="model",
            code="model_not_found",
        )


def _max_new_tokens(state: RouterState, prompt_tokens: int, requested: int | None, param: str) -> int:
    limit = state.cfg.model.context_length
    if requested is None:
        requested = max(1, min(om.DEFAULT_CHAT_MAX_TOKENS, limit - prompt_tokens))
    if prompt_tokens + requested > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {param}, {requested} in the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _route_headers(plan: RoutePlan, request_id: str) -> dict[str, str]:
    d = plan.decision
    return {
        "x-ppd-route": d.route.value,
        "x-ppd-policy": d.policy,
        "x-ppd-reason": d.reason,
        "x-ppd-cache-rate": f"{d.cache_rate:.4f}",
        "x-ppd-decode-cached-tokens": str(plan.decode_cached_tokens),
        "x-ppd-append-tokens": str(plan.append_tokens),
        "x-request-id": request_id,
    }


async def _start(
    state: RouterState,
    incoming: Incoming,
    endpoint: str,
    req: om._SamplingFields,
    prompt_ids: list[int],
    max_new: int,
    t0: float,
) -> Generation:
    """Plan, send, wait for the first token; if that fails before any token reached the client, plan once more
    (`_retry_after`). When the retry cannot be planned (no route, no slot), a failed prefill half is answered with
    its own 502/503 `prefill_failed`."""
    policy = incoming.headers.get("x-ppd-policy") or None
    conversation = incoming.headers.get("x-ppd-conversation") or None
    sampling = req.sampling_params(max_new)
    retry: Retry | None = None
    first_error: OpenAIError | None = None  # what the client gets if the retry cannot be planned
    for attempt in range(2):
        try:
            plan = state.router.plan(prompt_ids, max_new, policy, conversation, retry)
        except OpenAIError as err:
            if first_error is not None and retry is not None:
                log.warning("no retry of %s by the D-route: %s", endpoint, err.message)
                state.metrics.requests.labels(endpoint, retry.failed_route.value, "backend_error").inc()
                raise first_error from None
            if err.status in (429, 503):  # admission control: no slot, or no healthy server
                state.metrics.requests.labels(endpoint, "none", "rejected").inc()
            raise
        rid = protocol.new_rid()
        body = protocol.generate_body(prompt_ids, sampling, stream=True, rid=rid)
        call = RouteCall(
            state.client,
            plan,
            body,
            state.timeouts,
            on_prefill_done=state.router.release_prefill,
            on_accepted=_stream_start(incoming, plan, rid) if req.stream else None,
        )
        gen = Generation(state, endpoint, plan, call, req.stop_strings(), t0, req.return_token_ids, incoming.arrived)
        try:
            await gen.prime()
            return gen
        except BaseException as exc:
            state.router.release(plan)
            for name in call.aborted:
                state.metrics.aborts.labels(name).inc()
            if incoming.watch.left(exc):
                state.metrics.requests.labels(endpoint, plan.route.value, "client_disconnect").inc()
                raise
            if not isinstance(exc, Exception):
                raise
            err = error_from(exc)
            retry = _retry_after(state, plan, exc)  # also marks a server that failed as down
            if retry is None or attempt > 0:
                state.metrics.requests.labels(
                    endpoint, plan.route.value, "timeout" if err.status == 504 else "backend_error"
                ).inc()
                raise err from exc
            first_error = err if retry.decode_only else None
            state.metrics.retries.labels("prefill_failed" if retry.prefill_failed else "connect_failed").inc()
            log.warning("retrying %s without %s: %s", endpoint, retry.failed_server, exc)
            if call.abort_tasks:  # the decode half is gone before its retry arrives
                await asyncio.wait(call.abort_tasks, timeout=state.cfg.router.connect_timeout_s)
    raise AssertionError("unreachable")


def _stream_start(incoming: Incoming, plan: RoutePlan, rid: str) -> Callable[[], Awaitable[None]]:
    """A stream's response starts (200, the route's headers) once its servers have accepted the request, before its
    first token, as sglang-router passes the decode server's status on: the client has read the headers by the
    time the first token comes, and the first token's bytes are all it waits for then (sent with it, the client
    parsed the headers after the first token came: 1.6-1.8 ms from the decode server's first chunk to an httpx
    client's first token on the 2-core box, 0.8-0.9 ms with them sent before; results/router-overhead, session 5).
    A refusal by a server is still an HTTP error; what fails after the acceptance (a dropped prefill, a first-token
    timeout) is an error event in the stream, and a retry streams its answer under the first attempt's headers (the
    `ppd` object names the route that answered)."""
    return functools.partial(incoming.start_stream, plan, rid)


def _retry_after(state: RouterState, plan: RoutePlan, exc: Exception) -> Retry | None:
    """How to retry a request whose attempt on `plan` failed before its first token, or None.

    - A server that could not be reached is marked down and the request planned without it (nothing ran there): a
      dead prefill server makes the policy fall back to the D-route, a dead decode server sends the conversation
      elsewhere with L = 0.
    - The prefill half of a P-route failed after it was sent (an error status, the connection dropped mid-flight):
      its decode half was aborted; the request is retried by the D-route, if the decode servers can run one and the
      policy takes it. A dropped connection also marks the prefill server down (it most likely died)."""
    if not isinstance(exc, BackendError):
        return None
    if isinstance(exc, PrefillFailed) and plan.prefill is not None:
        failed = plan.prefill
        if exc.connect or exc.dropped:
            state.pool.mark_failed(failed, str(exc))
        if exc.connect:
            return Retry(Route.PREFILL, failed.name, exc.message, frozenset({failed.name}), prefill_failed=True)
        if not state.router.d_route_possible:
            return None
        return Retry(
            Route.PREFILL, failed.name, exc.message, frozenset({failed.name}), prefill_failed=True, decode_only=True
        )
    failed = next((b for b in plan.backends if b.url == exc.url), None)
    if failed is not None and exc.connect:
        state.pool.mark_failed(failed, str(exc))
        return Retry(plan.route, failed.name, exc.message, frozenset({failed.name}))
    return None


@dataclass
class SSEReply:
    """A streamed answer: SSE events from `events` (`sse_stream`, which also turns errors into events). Its status
    and headers went out when the servers accepted the request (`_stream_start`), unless a server never said so."""

    plan: RoutePlan
    rid: str
    events: AsyncIterator[bytes]

    async def __call__(self, incoming: Incoming) -> None:
        await incoming.start_stream(self.plan, self.rid)
        send = incoming.send
        with contextlib.suppress(OSError):  # a server that reports a closed client by raising
            async with contextlib.aclosing(self.events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _answer(
    state: RouterState, incoming: Incoming, endpoint: str, req: om._SamplingFields, prompt_ids: list[int], max_new: int
) -> SSEReply | Response:
    t0 = time.perf_counter()
    gen = await _start(state, incoming, endpoint, req, prompt_ids, max_new, t0)
    model = state.cfg.model.served_name
    rid = gen.call.rid

    if req.stream:  # its headers went out when the servers accepted it
        first, chunk = om.stream_chunks(endpoint, rid, model)
        return SSEReply(gen.plan, rid, sse_stream(gen, chunk, first, req.include_usage(), req.continuous_usage()))

    headers = _route_headers(gen.plan, incoming.request_id(rid))

    try:
        result = await gen.run()
    except BaseException as exc:
        if not isinstance(exc, Exception):
            if incoming.watch.left(exc):
                gen.abandon()
                state.metrics.requests.labels(endpoint, gen.plan.route.value, "client_disconnect").inc()
            raise
        gen.abandon()
        err = error_from(exc)
        state.metrics.requests.labels(
            endpoint, gen.plan.route.value, "timeout" if err.status == 504 else "backend_error"
        ).inc()
        return err.response(headers)
    finally:
        state.router.release(gen.plan)
    build = om.chat_response if endpoint == "chat" else om.completion_response
    return JSONResponse(build(rid, model, result.text, result.finish_reason, result.usage, result.ppd), headers=headers)
