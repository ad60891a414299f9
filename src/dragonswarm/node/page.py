"""The node's own page (`GET /dashboard`) and the live overview it reads (`GET /v1/node/events`).

One HTML page with its script and style sheet, shipped in the package under `web/static/`
(no build step, nothing from another site). It shows this machine as `GET /v1/node` does,
kept live by server-sent events about once a second, and holds the owner's lending switch
(`POST /v1/node/lending`). It is served by the loopback API, behind the same Host and
Origin checks (`web.hosts`) as everything else there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from dragonswarm.errors import NotFound

router = APIRouter()

EVENT_PERIOD_S = 1.0
RETRY_MS = 2000  # how soon a browser reconnects to the stream after losing it
ASSETS = {
    "node-dashboard.js": "text/javascript; charset=utf-8",
    "node-dashboard.css": "text/css; charset=utf-8",
    "node-dashboard.svg": "image/svg+xml",  # its icon (else the browser asks for /favicon.ico)
}
# The page runs only its own files and talks only to this node; it may not be framed by another
# page either, which could trick the owner into clicking the lending switch.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def static_file(name: str) -> bytes:
    return (resources.files("dragonswarm.web") / "static" / name).read_bytes()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    return Response(static_file("node-dashboard.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:  # only the page's own files, never a path into the package
        raise NotFound(f"no file {name!r} on this node's page")
    return Response(static_file(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


@router.get("/v1/node/events")
async def node_events(request: Request) -> StreamingResponse:
    """`GET /v1/node` as server-sent events, about once a second, until the client or the node goes."""
    stream = overview_events(request.app.state.overview, request.app.state.closing)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip


async def overview_events(read: Callable[[], dict[str, Any]], closing: asyncio.Event) -> AsyncIterator[bytes]:
    # A client gone is found at the next send (the server raises there); a node stopping ends the
    # stream at once, so that an open page never holds the shutdown for its grace period.
    yield f"retry: {RETRY_MS}\n\n".encode()
    while not closing.is_set():
        yield b"data: " + orjson.dumps(read()) + b"\n\n"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EVENT_PERIOD_S):
                await closing.wait()
