"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

A request body that is not valid JSON or does not validate is a 400 in that shape (FastAPI's own 422 too), so OpenAI
clients raise their usual `BadRequestError`. Anything unexpected is a 500 in the same shape, and the router keeps
serving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None, str]:
    """One readable sentence from pydantic's error list (`ValidationError.errors()`, or FastAPI's, whose locations
    start with "body"); the first failing field is `param`."""
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return "; ".join(parts), param, code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(exc.errors())
        return OpenAIError(400, message, param=param, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
