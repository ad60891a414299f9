"""The node program: app factory, error translation, lifespan and `run_node()`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dragonswarm import __version__
from dragonswarm.errors import DragonError, Overloaded, error_body
from dragonswarm.governor.caps import open_cap
from dragonswarm.governor.governor import Governor
from dragonswarm.governor.policy import OwnerPolicy
from dragonswarm.governor.sampler import Sampler
from dragonswarm.node.api import ClientGone, router
from dragonswarm.node.service import NodeService
from dragonswarm.settings import ModelSpec, NodeSettings

log = logging.getLogger("dragonswarm.node")


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
    detail = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return (f"missing required field {where!r}" if where else "missing request body"), where or None
    return f"invalid value for {where!r}: {detail}" if where else detail, where or None


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as `{"error": {...}}`: this is the one place that says how."""

    @app.exception_handler(DragonError)
    async def dragon_error(_: Request, exc: DragonError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, headers)

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


def create_app(service: NodeService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.governor.start()
        service.start()
        try:
            yield
        finally:
            await service.close()
            await service.governor.close()

    app = FastAPI(title="Py Dragon Swarm node", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    return app


def build_service(settings: NodeSettings, models: list[tuple[ModelSpec, int]]) -> NodeService:
    sampler = Sampler(os.getpid())
    cap = open_cap(settings.cap_mechanism, sampler.n_cpus)
    policy = OwnerPolicy(noise=settings.owner_noise, headroom=settings.owner_headroom, min_share=settings.min_share)
    governor = Governor(sampler, cap, local_share=settings.local_share, share=settings.share,
                        policy=policy, interval=settings.sample_interval)  # fmt: skip
    governor.attach(os.getpid(), runner=False)
    return NodeService(settings, governor, models)


def run_node(settings: NodeSettings, models: list[tuple[ModelSpec, int]], on_ready: Any = None) -> None:
    """Serve the node's API until interrupted. Also the Python API behind `dragon node`."""
    service = build_service(settings, models)
    app = create_app(service)
    config = uvicorn.Config(app, host=settings.host, port=settings.api_port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    log.info("node API on http://%s:%d/v1 (cpu cap: %s)", settings.host, settings.api_port, service.governor.cap.name)
    asyncio.run(server.serve())
