"""The AppendRouter: an OpenAI-compatible app in front of SGLang prefill/decode servers.

The request path, in three hops:
    POST /v1/chat/completions -> router/endpoints.py (admission, tokenize) -> `Router.plan` (router/routing.py:
    servers + policy.decide: P-route or D-route) -> `RouteCall` (router/pd.py: /generate on prefill+decode, or
    decode only) -> text back to the client.
The two generation endpoints are served as plain ASGI (router/endpoints.py says why); the rest (/v1/models, /health,
/ready, /metrics, /ppd/*) are FastAPI routes. All state (HTTP pool, tokenizer, backends with their prefix indexes,
policies, metrics) lives in the app's lifespan.

The event loop serves every stream, so nothing long runs on it: long inputs are tokenized in a worker thread (the
tokenizers library's batch API releases the GIL), and calibration refits run in a worker process (`Router.record`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ppd import specs
from ppd.config import StackConfig, resolve_path, to_dict
from ppd.policies import policy_names
from ppd.sglang.client import SGLangClient
from ppd.sglang.transport import Http11Transport, Transport
from ppd.tokenizer import ChatTokenizer
from router import endpoints
from router import openai_models as om
from router.backends import BackendPool
from router.errors import install_error_handlers
from router.metrics import RouterMetrics
from router.pd import Timeouts
from router.routing import Router

log = logging.getLogger(__name__)

CALIBRATION_SAVE_INTERVAL_S = 30.0


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


class AppendRouterApp(FastAPI):
    """FastAPI, except that POST /v1/chat/completions and /v1/completions go straight to router/endpoints.py."""

    async def __call__(self, scope, receive, send) -> None:
        endpoint = endpoints.PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await super().__call__(scope, receive, send)
        await endpoints.serve(getattr(self.state, "ppd", None), endpoint, scope, receive, send)


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
        # as many kept connections per server as requests the router lets run there at once
        net = transport or Http11Transport(r.connect_timeout_s, max_idle_per_server=r.max_inflight_per_backend)
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

    app = AppendRouterApp(title="P-PD AppendRouter", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    # Declared for the OpenAPI schema (/docs) only: `AppendRouterApp.__call__` serves these paths before FastAPI's
    # routing would reach them.
    @app.post("/v1/chat/completions")
    async def chat_completions(req: om.ChatCompletionRequest) -> Response:
        raise AssertionError("served by router.endpoints")

    @app.post("/v1/completions")
    async def completions(req: om.CompletionRequest) -> Response:
        raise AssertionError("served by router.endpoints")

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
