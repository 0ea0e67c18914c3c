"""HTTP face of an emulated server: SGLang 0.5.10.post1's native API as the router uses it, and, for a prefill server,
the bootstrap endpoint on its bootstrap port.

Errors: bad input gets HTTP 400 with `{"error": {"message", "type", "param", "code"}}` (SGLang's `{"error":
{"message"}}` plus OpenAI's fields); a request aborted by a failed KV transfer answers 500 (non-stream) or ends its
stream with `finish_reason: {"type": "abort", ...}` like SGLang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppd.emulator.schemas import AbortBody, KVAux, RequestError, RoomRegistration, parse_generate
from ppd.emulator.server import EmulatedServer
from ppd.sglang.protocol import SSE_DONE_CHUNK

log = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "BadRequestError" if status == 400 else "NotFoundError" if status == 404 else "InternalServerError"
    if 400 < status < 500 and status != 404:
        kind = "InvalidRequestError"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, str(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))


async def _json_body(request: Request):
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise RequestError(f"body is not valid JSON: {err}") from None


def build_app(server: EmulatedServer, manage_lifecycle: bool = True) -> FastAPI:
    """The server's FastAPI app. With manage_lifecycle, the app's lifespan starts and stops the server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_lifecycle:
            await server.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await server.stop()

    app = FastAPI(title=f"ppd emulated SGLang {server.role} server", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        arrival, arrival_unix = asyncio.get_running_loop().time(), time.time()
        try:
            data = await _json_body(request)
            req = parse_generate(
                data,
                vocab_size=server.input_vocab_size,
                context_length=server.cfg.model.context_length,
                encode=server.tokenizer.encode,
            )
            job = server.submit(req, arrival)
            job.arrival_unix = arrival_unix
        except RequestError as err:
            return error_response(400, str(err))
        if req.stream:
            return StreamingResponse(_stream(server, job), media_type="text/event-stream")
        if not await _wait_or_disconnect(job, request):  # like SGLang: a client that left aborts its request
            server.engine.abort(job.rid, "client disconnected")
            return Response(status_code=499)
        reason = job.finish_reason or {}
        if reason.get("type") == "abort" and reason.get("status_code") in (400, 500, 503):
            return error_response(int(reason["status_code"]), reason.get("message", "aborted"))
        return JSONResponse(server.output(job))

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200 if server.engine.alive else 503)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse(server.server_info())

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> JSONResponse:
        return JSONResponse(server.model_info())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        name = server.cfg.model.served_name
        card = {
            "id": name,
            "object": "model",
            "created": int(server.started_at),
            "owned_by": "sglang",
            "root": name,
            "parent": None,
            "max_model_len": server.cfg.model.context_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if server.engine.flush_cache():
            return PlainTextResponse(
                "Cache flushed.\nPlease check backend logs for more details. "
                "(When there are running or waiting requests, the operation will not be performed.)\n"
            )
        return PlainTextResponse("Cache not flushed: there are running or waiting requests.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        try:
            body = AbortBody.model_validate(await _json_body(request))
        except (RequestError, ValidationError) as err:
            return error_response(400, str(err))
        if body.abort_all:
            server.engine.abort_all()
        elif body.rid:
            server.engine.abort(body.rid)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/ppd/kv_aux")
    async def kv_aux(request: Request) -> Response:
        """Prefill -> decode, out of band after the KV write (SGLang sends its aux data over TCP too)."""
        try:
            aux = KVAux.model_validate(await _json_body(request))
        except (RequestError, ValidationError) as err:
            return error_response(400, str(err))
        if not server.deliver_aux(aux):
            return error_response(404, f"no request is waiting for the KV of room {aux.room}")
        return Response(status_code=200)

    return app


async def _wait_or_disconnect(job, request: Request, poll_s: float = 0.5) -> bool:
    """Wait for the job to end; False if the client disconnected first."""
    waiter = asyncio.ensure_future(job.done.wait())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll_s)
            if done:
                return True
            if await request.is_disconnected():
                return False
    except asyncio.CancelledError:
        return False
    finally:
        waiter.cancel()


async def _stream(server: EmulatedServer, job):
    """SGLang's stream: `data: {...}` chunks with cumulative output_ids (or only the new ones, as SGLang's
    `--incremental-streaming-output`: sglang.incremental_streaming_output), then `data: [DONE]`. Cumulative ids' JSON
    grows by appending (a long stream would otherwise re-encode all its ids for every token); meta_info.ppd rides on
    the first and the last chunk."""
    sent = 0
    ids_text = bytearray()
    incremental = server.cfg.sglang.incremental_streaming_output
    try:
        while True:
            await job.changed.wait()
            job.changed.clear()
            if job.quiet and not job.finished:
                continue
            n = len(job.output_ids)
            if n > sent or job.finished:
                new = ",".join(str(i) for i in job.output_ids[sent:n]).encode()
                if incremental:
                    ids_text = bytearray(new)
                else:
                    ids_text += (b"," + new) if sent and new else new
                meta = server.meta_info(job, with_timings=sent == 0 or job.finished)
                if n and job.first_chunk_unix is None:
                    job.first_chunk_unix = time.time()  # reported from the next chunk on (this one is built)
                sent = n
                yield b'data: {"text":"","output_ids":[' + ids_text + b'],"meta_info":' + _dumps(meta) + b"}\n\n"
            if job.finished:
                break
        yield SSE_DONE_CHUNK
    finally:
        if not job.finished:  # the client went away mid-stream: SGLang aborts the request
            server.engine.abort(job.rid, "client disconnected")


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def build_bootstrap_app(server: EmulatedServer) -> FastAPI:
    """A prefill server's bootstrap endpoint (SGLang: --disaggregation-bootstrap-port)."""
    app = FastAPI(title="ppd emulated SGLang bootstrap server")
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("OK")

    @app.get("/route")
    async def route(request: Request) -> JSONResponse:
        """SGLang's GET /route: the prefill's parallel layout, or one rank's address."""
        q = request.query_params
        ranks = [q.get(k) for k in ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")]
        if not all(ranks):
            return PlainTextResponse("Missing inputs for bootstrap server.", status_code=400)  # type: ignore[return-value]
        if all(r == "-1" for r in ranks):
            return JSONResponse(
                {
                    "attn_tp_size": 1,
                    "attn_cp_size": 1,
                    "dp_size": 1,
                    "pp_size": 1,
                    "page_size": 1,
                    "kv_cache_dtype": "bfloat16",
                    "follow_bootstrap_room": True,
                }
            )
        if any(r != "0" for r in ranks):
            return PlainTextResponse("Bootstrap info not found", status_code=404)  # type: ignore[return-value]
        transfer = server.transfer
        return JSONResponse({"rank_ip": transfer.host, "rank_port": transfer.rpc_port} if transfer else {})

    @app.put("/ppd/rooms/{room}")
    async def register_room(room: int, request: Request) -> Response:
        try:
            reg = RoomRegistration.model_validate(await _json_body(request))
        except (RequestError, ValidationError) as err:
            return error_response(400, str(err))
        if reg.room != room:
            return error_response(400, f"room in path ({room}) and body ({reg.room}) differ")
        try:
            server.register_room(reg)
        except RequestError as err:
            return error_response(409, str(err))
        return Response(status_code=200)

    app.state.created = time.time()
    return app
