"""Every failure leaves an API as `{"error": {...}}`: this is the one place that says how."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dragonswarm.errors import DragonError, RetryLater, error_body

log = logging.getLogger("dragonswarm.web")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def error_response(status: int, message: str, type_: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    param = loc[0] if loc else None  # the request field, as OpenAI names it (not pydantic's union branch)
    detail = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return (f"missing required field {where!r}" if where else "missing request body"), param
    return f"invalid value for {where!r}: {detail}" if where else detail, param


def dragon_error_response(exc: DragonError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DragonError)
    async def dragon_error(_: Request, exc: DragonError) -> JSONResponse:
        return dragon_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(ClientGone)
    async def gone(_: Request, exc: ClientGone) -> JSONResponse:
        return error_response(499, "client closed the request", "invalid_request_error", "client_closed")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error", "server_error", "internal_error")


class BodyLimit:
    """Refuse request bodies over a size before reading them whole (413)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body larger than {self.max_bytes} bytes",
                                  "invalid_request_error", "request_too_large")  # fmt: skip
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
