"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

FastAPI's own 422 (body validation, malformed JSON) becomes a 400 in the same shape, so OpenAI clients raise their
usual `BadRequestError`. Anything unexpected is a 500 in the same shape, and the router keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "backend_error",
    503: "service_unavailable",
    504: "timeout",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status in (429, 503) and "retry-after" not in {k.lower() for k in self.headers}:
            self.headers["Retry-After"] = "1"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(extra_headers or {})})


def _validation_message(err: RequestValidationError) -> tuple[str, str | None, str]:
    """One readable sentence from pydantic's error list; the first failing field is `param`."""
    errors = err.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return (
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
            None,
            "invalid_json",
        )
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return "; ".join(parts), param, code


_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def _count_bad_request(request: Request, status: int) -> None:
    """Refused input counts in ppd_requests_total too (429/503 are counted where they are decided)."""
    endpoint = _ENDPOINTS.get(request.url.path)
    state = getattr(request.app.state, "ppd", None)
    if endpoint and state is not None and 400 <= status < 500 and status != 429:
        state.metrics.requests.labels(endpoint, "none", "bad_request").inc()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        _count_bad_request(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        _count_bad_request(request, 400)
        return OpenAIError(400, message, param=param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
