"""The orchestrator program: app factory, lifespan and `run_orchestrator()`."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from dragonswarm import __version__
from dragonswarm.errors import ConfigError
from dragonswarm.orchestrator.accounting import Accounting
from dragonswarm.orchestrator.api import router as api_router
from dragonswarm.orchestrator.cache import ResponseCache
from dragonswarm.orchestrator.dashboard import router as dashboard_router
from dragonswarm.orchestrator.federation import Federation, federation_client
from dragonswarm.orchestrator.housekeeping import Housekeeping
from dragonswarm.orchestrator.limits import make_limiter
from dragonswarm.orchestrator.logins import Logins
from dragonswarm.orchestrator.looplag import LoopLag
from dragonswarm.orchestrator.metrics import Metrics
from dragonswarm.orchestrator.overview import Overview
from dragonswarm.orchestrator.swarm import Swarm
from dragonswarm.orchestrator.ws import nodes_first
from dragonswarm.orchestrator.ws import router as ws_router
from dragonswarm.settings import OrchestratorSettings
from dragonswarm.store.backends import open_store
from dragonswarm.store.base import Store
from dragonswarm.store.callers import open_callers
from dragonswarm.store.redis import COMMAND_TIMEOUT_S
from dragonswarm.store.responses import ResponseStore, open_responses
from dragonswarm.tls import TlsFiles
from dragonswarm.web import eventloop
from dragonswarm.web.errors import BodyLimit, install_error_handlers
from dragonswarm.web.listener import GatedServer, listen
from dragonswarm.web.requestlog import RequestFacts, RequestLog

log = logging.getLogger("dragonswarm.orchestrator")

# uvicorn closes an idle connection after 5 s; a client then pays a new TLS handshake
# (about 15 ms here) on its next request. Clients that pool connections (the OpenAI SDK,
# an IDE) should keep theirs for longer.
KEEP_ALIVE_S = 75
# How long a stop waits for the requests it cut to write their usage: a round trip each, or a
# command's timeout when the store does not answer. (Closing the limiter and the store may each
# wait as long again for calls of theirs still out.)
ACCOUNTING_WAIT_S = COMMAND_TIMEOUT_S


def create_app(settings: OrchestratorSettings, store: Store, responses: ResponseStore | None = None) -> FastAPI:
    """The orchestrator's app over its store; `responses`: where its response cache keeps answers
    (None: no cache)."""
    metrics = Metrics()
    swarm = Swarm(settings, store, metrics)
    loop_lag = LoopLag()
    housekeeping = Housekeeping(swarm, loop_lag)
    overview = Overview(swarm, metrics, loop_lag)
    # Per process, or shared by every replica through Redis (--redis).
    limiter = make_limiter(settings)
    redis_url = settings.redis.get_secret_value() if settings.redis else None
    federation = Federation(swarm, federation_client(redis_url)) if redis_url else None
    callers = open_callers(store, redis_url)  # every request's key and usage
    accounting = Accounting(limiter, callers)  # each request's refund and usage
    cache = ResponseCache(responses, metrics, shared=settings.cache_shared) if responses else None

    def request_done(facts: RequestFacts) -> None:
        metrics.request_done(facts)
        overview.request_done(facts.ttft())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_lag.start()
        housekeeping.start()
        overview.start()
        if federation:
            federation.start()
        try:
            yield
        finally:
            # First: the requests cut by the stop write their accounting through the limiter and the store.
            if writing := await accounting.settled(ACCOUNTING_WAIT_S):
                log.warning("stopping with %d requests' usage still being written: it may not be counted", writing)
            if federation:
                await federation.close()
            await overview.close()
            await housekeeping.close()
            await swarm.close()
            await loop_lag.close()
            await limiter.close()
            await callers.close()
            if cache:
                await cache.close()
            store.close()

    # No open documentation pages: every endpoint but /health needs a key.
    app = FastAPI(title="Py Dragon Swarm orchestrator", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.swarm = swarm
    app.state.limiter = limiter
    app.state.loop_lag = loop_lag
    app.state.store = store
    app.state.callers = callers
    app.state.accounting = accounting
    app.state.started = time.time()
    app.state.overview = overview
    app.state.federation = federation
    app.state.cache = cache
    app.state.logins = Logins()
    app.include_router(api_router)
    app.include_router(ws_router)
    app.include_router(dashboard_router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog, logger=log, on_end=request_done)  # outermost: it sees every answer
    return app


def run_orchestrator(settings: OrchestratorSettings) -> None:
    """Serve the orchestrator until interrupted. Also the Python API behind `dragon orchestrator`."""
    redis_url = settings.redis.get_secret_value() if settings.redis else None
    store = open_store(settings.home, redis_url)  # first: an unusable Redis is one line and exit 2 here
    responses = None
    if settings.response_cache:
        responses = open_responses(settings.home, redis_url, settings.cache_ttl_s, settings.cache_max_mb << 20)
    app = create_app(settings, store, responses)
    tls: dict[str, str] = {}
    if settings.insecure:
        log.warning("serving plain HTTP (--insecure): keys, prompts and answers cross the network unencrypted")
    else:
        files = TlsFiles(settings.tls_dir)
        tls = {"ssl_certfile": str(files.server_cert), "ssl_keyfile": str(files.server_key)}
    # No keepalive pings from us: a node heartbeats and pings, and housekeeping lets a silent
    # one go. No compression: node messages are small JSON, and at 10,000 nodes the pongs and
    # the per-connection deflate state were a fifth of the event loop's steady work.
    config = uvicorn.Config(nodes_first(app), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False,
                            ws="websockets-sansio", ws_max_size=settings.max_message_bytes,
                            ws_ping_interval=None, ws_per_message_deflate=False,
                            timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S,
                            **tls)  # type: ignore[arg-type]  # fmt: skip
    try:  # before anything starts: a port taken is one line and exit 2
        sockets = listen(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    scheme = "http" if settings.insecure else "https"
    log.info("orchestrator on %s://%s:%d/v1", scheme, settings.host, settings.port)
    server = GatedServer(config, sockets)
    eventloop.run(server.serve())
    if server.failed is not None:  # a supervisor should see a failure, and may start it again
        sys.exit(f"dragon orchestrator: stopped, accepting connections failed: {server.failed}")
