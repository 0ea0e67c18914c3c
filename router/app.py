"""The AppendRouter: an OpenAI-compatible FastAPI app in front of SGLang prefill/decode servers.

The request path, in three hops:
    POST /v1/chat/completions -> admission (total in-flight limit) -> tokenize -> `Router.plan` (servers +
    policy.decide: P-route or D-route) -> `RouteCall` (ppd.sglang.client: /generate on prefill+decode, or decode
    only) -> text back to the client.
All state (HTTP pool, tokenizer, backends with their prefix indexes, policies, metrics) lives in the app's lifespan.

The event loop serves every stream, so nothing long runs on it: long inputs are tokenized in a worker thread (the
tokenizers library's batch API releases the GIL), and calibration refits run in one too (`Router.record`).

A request whose first attempt fails before any token reached the client is planned once more: without a server it
could not connect to, or, when the prefill half of a P-route failed after it was sent, by the D-route
(reason `prefill-failed-retry`); only when no retry can run does the client get the first attempt's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from ppd import specs
from ppd.config import StackConfig, resolve_path, to_dict
from ppd.policies import Route, policy_names
from ppd.sglang import protocol
from ppd.sglang.client import BackendError, SGLangClient, loads
from ppd.sglang.transport import AiohttpTransport, Transport
from ppd.tokenizer import ChatTokenizer, message_text
from router import openai_models as om
from router.backends import BackendPool
from router.errors import OpenAIError, install_error_handlers
from router.metrics import RouterMetrics
from router.pd import PrefillFailed, RouteCall, Timeouts
from router.routing import Retry, RoutePlan, Router
from router.streaming import Generation, error_from, sse_stream

log = logging.getLogger(__name__)

T = TypeVar("T")
CALIBRATION_SAVE_INTERVAL_S = 30.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
# Inputs up to this many characters are tokenized on the event loop (well under a millisecond); longer ones in a
# worker thread: 30k tokens take 100+ ms, which would stall every other stream.
TOKENIZE_INLINE_MAX_CHARS = 8192
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class RouterState:
    cfg: StackConfig
    transport: Transport
    client: SGLangClient
    tokenizer: ChatTokenizer
    pool: BackendPool
    router: Router
    metrics: RouterMetrics
    timeouts: Timeouts
    started: int

    @property
    def model_vocab_size(self) -> int:
        return specs.model(self.cfg.model.spec).vocab


def load_tokenizer(cfg: StackConfig) -> ChatTokenizer:
    source = cfg.model.tokenizer
    return ChatTokenizer.load(source if source == "builtin" else str(resolve_path(source)))


def create_app(cfg: StackConfig, transport: Transport | None = None) -> FastAPI:
    """The router app for `cfg`. `transport` replaces the network (tests pass an in-memory fake of the servers)."""
    if cfg.router.policy not in policy_names():
        raise ValueError(f"router.policy: unknown policy {cfg.router.policy!r}; known: {', '.join(policy_names())}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = cfg.router
        metrics = RouterMetrics()
        # P-route requests hold two connections (prefill + decode), plus health/metrics polls and aborts.
        net = transport or AiohttpTransport(r.connect_timeout_s, 2 * r.max_inflight_total + 4 * len(cfg.servers) + 16)
        client = SGLangClient(net)
        pool = BackendPool(cfg, client, metrics)
        state = RouterState(
            cfg=cfg,
            transport=net,
            client=client,
            tokenizer=load_tokenizer(cfg),
            pool=pool,
            router=Router(cfg, pool, metrics),
            metrics=metrics,
            timeouts=Timeouts(r.first_token_timeout_s, r.inter_token_timeout_s),
            started=int(time.time()),
        )
        app.state.ppd = state
        metrics.watch_policies(lambda: state.router.policies)
        await pool.start()
        state.router.start_refit_worker()
        saver = asyncio.create_task(_save_calibration_every(state.router, CALIBRATION_SAVE_INTERVAL_S))
        try:
            yield
        finally:
            saver.cancel()
            await pool.stop()
            await state.router.drain_refits()
            _save_calibration(state.router)
            await client.drain()
            await net.aclose()

    app = FastAPI(title="P-PD AppendRouter", version="0.1.0", lifespan=lifespan)
    app.router.route_class = FastJSONRoute
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: om.ChatCompletionRequest, request: Request) -> Response:
        state: RouterState = request.app.state.ppd
        req.check_supported()
        _check_model(state, req.model)
        messages = [m.as_dict() for m in req.messages]
        with _reserved(state, "chat"):  # refused before tokenizing when the router is full
            chars = sum(len(message_text(m.get("content"))) for m in messages)
            prompt_ids = await _off_loop_if(chars > TOKENIZE_INLINE_MAX_CHARS, state.tokenizer.encode_chat, messages)
            max_new = _max_new_tokens(state, len(prompt_ids), req.requested_max_tokens(), "messages")
        return await _serve(state, request, "chat", req, prompt_ids, max_new)

    @app.post("/v1/completions")
    async def completions(req: om.CompletionRequest, request: Request) -> Response:
        state: RouterState = request.app.state.ppd
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
            max_new = _max_new_tokens(state, len(prompt_ids), req.requested_max_tokens(), "prompt")
        return await _serve(state, request, "completions", req, prompt_ids, max_new)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state: RouterState = request.app.state.ppd
        return om.models_list(state.cfg.model.served_name, state.started)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """200 when the configured policy can serve a request with the servers that are healthy now (a dead prefill
        server does not make a router that can serve by the D-route unready); 503 otherwise."""
        state: RouterState = request.app.state.ppd
        body = {
            "ready": state.router.ready(),
            "policy": state.cfg.router.policy,
            "backends": {b.name: b.health.value for b in state.pool.all},
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state: RouterState = request.app.state.ppd
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/ppd/model")
    async def ppd_model(request: Request, policy: str | None = None) -> dict[str, Any]:
        """The policy's own description (cost-model parameters, calibration state); `?policy=` for another one."""
        state: RouterState = request.app.state.ppd
        p = state.router.policy(policy)
        describe = getattr(p, "describe", None)
        return describe() if describe is not None else {"policy": p.name}

    @app.get("/ppd/backends")
    async def ppd_backends(request: Request) -> dict[str, Any]:
        state: RouterState = request.app.state.ppd
        return {
            "mode": state.cfg.mode,
            "policy": state.cfg.router.policy,
            "backends": [
                {
                    "name": b.name,
                    "url": b.url,
                    "health": b.health.value,
                    "inflight": b.inflight,
                    "metrics": to_dict(b.metrics) if b.has_metrics else None,
                    "index_tokens": b.index.total_tokens,
                    "capacity_tokens": b.index.capacity_tokens,
                    "capacity_source": b.capacity_source,
                }
                for b in state.pool.all
            ],
        }

    return app


class FastJSONRequest(Request):
    """A request whose JSON body is parsed by orjson: the stdlib parser took ~0.8 ms of an 8k-id prompt's request
    path. What orjson refuses (ints beyond 64 bits) goes to json, which also raises the usual JSONDecodeError."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class FastJSONRoute(APIRoute):
    """FastAPI's documented hook for a custom Request class: every route parses its body with `FastJSONRequest`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def fast_json(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return fast_json


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


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it if the client disconnects first (the backends are then aborted on the way out).
    Starlette only notices a disconnect while streaming a response; before that, and for non-stream answers, the
    router must watch for it itself, or a client that gave up would keep a GPU busy for nothing."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _save_calibration_every(router: Router, interval_s: float) -> None:
    if not router.cfg.router.calibration_path:
        return
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(_save_calibration, router)


def _save_calibration(router: Router) -> None:
    try:
        router.save_calibration()
    except Exception:  # a full disk must not take the router down
        log.exception("saving calibration to %s failed", router.cfg.router.calibration_path)


def _checked_token_ids(state: RouterState, prompt: list[int]) -> list[int]:
    vocab = max(state.tokenizer.vocab_size, state.model_vocab_size)  # the model may outnumber the tokenizer
    # min/max run in C; the first offender is looked for only when there is one (8k ids: ~0.3 ms less per request)
    bad = [t for t in prompt if not 0 <= t < vocab] if prompt and (min(prompt) < 0 or max(prompt) >= vocab) else []
    if bad:
        raise OpenAIError(
            400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt", code="invalid_value"
        )
    if not prompt:
        raise OpenAIError(400, "prompt is empty", param="prompt", code="invalid_value")
    return list(prompt)


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
    request: Request,
    endpoint: str,
    req: om._SamplingFields,
    prompt_ids: list[int],
    max_new: int,
    t0: float,
) -> Generation:
    """Plan, send, wait for the first token; if that fails before any token reached the client, plan once more
    (`_retry_after`). When the retry cannot be planned (no route, no slot), a failed prefill half is answered with
    its own 502/503 `prefill_failed`."""
    policy = request.headers.get("x-ppd-policy") or None
    conversation = request.headers.get("x-ppd-conversation") or None
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
        rid = uuid.uuid4().hex
        body = protocol.generate_body(prompt_ids, sampling, stream=True, rid=rid)
        call = RouteCall(state.client, plan, body, state.timeouts, on_prefill_done=state.router.release_prefill)
        gen = Generation(state, endpoint, plan, call, req.stop_strings(), t0, req.return_token_ids)
        try:
            await until_disconnect(request, gen.prime())
            return gen
        except BaseException as exc:
            state.router.release(plan)
            for name in call.aborted:
                state.metrics.aborts.labels(name).inc()
            if isinstance(exc, ClientGone):
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


async def _serve(
    state: RouterState, request: Request, endpoint: str, req: om._SamplingFields, prompt_ids: list[int], max_new: int
) -> Response:
    t0 = time.perf_counter()
    incoming = request.headers.get("x-request-id", "")
    try:
        gen = await _start(state, request, endpoint, req, prompt_ids, max_new, t0)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    request_id = incoming if _REQUEST_ID.match(incoming) else gen.call.rid
    headers = _route_headers(gen.plan, request_id)
    model = state.cfg.model.served_name
    rid = gen.call.rid

    if req.stream:
        first, chunk = om.stream_chunks(endpoint, rid, model)
        return StreamingResponse(
            sse_stream(gen, chunk, first, req.include_usage(), req.continuous_usage()),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    try:
        result = await until_disconnect(request, gen.run())
    except ClientGone:
        gen.abandon()
        state.metrics.requests.labels(endpoint, gen.plan.route.value, "client_disconnect").inc()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as exc:
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
