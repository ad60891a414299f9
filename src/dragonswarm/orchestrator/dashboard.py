"""The operator's view: the `/dashboard` page, its login, its live feed, and `/metrics`.

The page is static (`web/static/dashboard.*`, shipped in the package: no build step, no
CDN) and holds no data; everything it shows comes over `/dashboard/events`, a stream of
server-sent events carrying the `Overview` snapshot once a second. Access is admin only:

1. `dragon dashboard` asks `POST /v1/dashboard/login` with an admin key for a one-time URL
   (`.../dashboard#login=TOKEN`; see `logins` for why the fragment);
2. the page posts the token to `/dashboard/session` and gets a session cookie: HttpOnly
   (no script reads it), Secure (TLS only), SameSite=Strict (no other site's page sends it);
3. the event stream and the logout need that cookie.

`/metrics` is Prometheus' text format for an admin key or a `metrics` key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dragonswarm.errors import Forbidden, NotFound, Unauthorized
from dragonswarm.orchestrator.auth import require
from dragonswarm.orchestrator.logins import TOKEN_TTL_S, Logins
from dragonswarm.orchestrator.metrics import CONTENT_TYPE, Metrics, SwarmState
from dragonswarm.orchestrator.overview import Overview
from dragonswarm.orchestrator.swarm import Swarm
from dragonswarm.store.base import KeyRecord

router = APIRouter()

COOKIE = "dragon_dashboard"
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads only its own script and style, talks only to its own origin, and may not be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}  # fmt: skip
KEEPALIVE_S = 15.0  # a comment line when nothing changed, so proxies keep the stream open


def _static(name: str) -> bytes:
    return resources.files("dragonswarm.web").joinpath("static", name).read_bytes()


def _parts(request: Request) -> tuple[Logins, Overview, Swarm]:
    state = request.app.state
    return state.logins, state.overview, state.swarm


class LoginAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: float = Field(default=TOKEN_TTL_S, gt=0, le=3600)


class SessionAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=200)


@router.post("/v1/dashboard/login")
async def dashboard_login(request: Request, key: Annotated[KeyRecord, Depends(require("admin", what="open the "
                          "dashboard"))], ask: LoginAsk | None = None) -> dict[str, Any]:  # fmt: skip
    """A one-time URL for a browser (admin keys only)."""
    logins = _parts(request)[0]
    ttl = ask.ttl_s if ask else TOKEN_TTL_S
    token = logins.issue(time.monotonic(), ttl)
    base = f"{request.url.scheme}://{request.url.netloc}"
    return {"url": f"{base}/dashboard#login={token}", "expires_in": ttl}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return Response(_static("dashboard.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(f"no file {name!r} here")
    return Response(_static(name), media_type=STATIC[name], headers=SECURITY_HEADERS)


def _same_origin(request: Request) -> bool:
    """A browser's POST says where its page came from; it must be this server's own."""
    origin = request.headers.get("origin")
    return origin is None or hmac.compare_digest(origin, f"{request.url.scheme}://{request.url.netloc}")


@router.post("/dashboard/session", include_in_schema=False)
async def dashboard_session(request: Request, ask: SessionAsk) -> Response:
    """Exchange a one-time token for a session cookie."""
    if not _same_origin(request):
        raise Forbidden("a dashboard login must come from the dashboard's own page")
    session = _parts(request)[0].redeem(ask.token, time.monotonic())
    if session is None:
        raise Unauthorized("this login link has expired or was already used: run 'dragon dashboard' for a new one")
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, session, httponly=True, secure=request.url.scheme == "https", samesite="strict",
                        path="/dashboard", max_age=12 * 3600)  # fmt: skip
    return response


@router.post("/dashboard/logout", include_in_schema=False)
async def dashboard_logout(request: Request) -> Response:
    if not _same_origin(request):
        raise Forbidden("a dashboard logout must come from the dashboard's own page")
    session = request.cookies.get(COOKIE)
    if session:
        _parts(request)[0].end(session)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


@router.get("/dashboard/events", include_in_schema=False)
async def dashboard_events(request: Request) -> StreamingResponse:
    logins, overview, _ = _parts(request)
    if not logins.valid(request.cookies.get(COOKIE), time.monotonic()):
        raise Unauthorized("log in to the dashboard first: run 'dragon dashboard' for a one-time link")
    return StreamingResponse(_feed(request, overview), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip


async def _feed(request: Request, overview: Overview) -> AsyncIterator[bytes]:
    logins = request.app.state.logins
    session = request.cookies.get(COOKIE)
    overview.viewers += 1
    try:
        yield b"data: " + await overview.first_snapshot() + b"\n\n"
        while logins.valid(session, time.monotonic()):  # a logout ends the stream too
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    snapshot = await overview.next_snapshot()
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            yield b"data: " + snapshot + b"\n\n"
        yield b"event: logout\ndata: {}\n\n"
    finally:
        overview.viewers -= 1


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, key: Annotated[KeyRecord, Depends(require("metrics", what="read metrics"))]
                  ) -> Response:  # fmt: skip
    swarm: Swarm = request.app.state.swarm
    m: Metrics = swarm.metrics
    records = await asyncio.to_thread(swarm.store.list_nodes)
    gone = sum(1 for r in records if r.name not in swarm.registry.conns)
    waiting = [f.request.model for f in [*swarm.dispatcher.queue, *swarm.dispatcher.retries]]
    state = SwarmState(swarm.registry, waiting, len(swarm.requests), len(swarm.running), gone)
    return Response(m.render(state), media_type=CONTENT_TYPE)
