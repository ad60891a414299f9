"""The node program: app factory, lifespan and `run_node()`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from dragonswarm import __version__
from dragonswarm.errors import Unauthorized
from dragonswarm.governor.caps import open_cap
from dragonswarm.governor.cgroups import cpu_limit
from dragonswarm.governor.governor import Governor
from dragonswarm.governor.policy import OwnerPolicy, usable_cpus
from dragonswarm.governor.sampler import Sampler, allowed_cpus
from dragonswarm.node.api import router
from dragonswarm.node.handoff import Handoff
from dragonswarm.node.lending import Lending
from dragonswarm.node.link import SwarmLink
from dragonswarm.node.overview import overview
from dragonswarm.node.page import router as page_router
from dragonswarm.node.service import LocalModel, NodeService
from dragonswarm.settings import NodeSettings
from dragonswarm.tls import client_context
from dragonswarm.web.errors import BodyLimit, dragon_error_response, install_error_handlers
from dragonswarm.web.hosts import CheckHost, HostPolicy
from dragonswarm.web.requestlog import RequestLog

log = logging.getLogger("dragonswarm.node")


def create_app(service: NodeService) -> FastAPI:
    settings = service.settings
    lending = Lending.load(settings.lending_path)
    link = handoff = None
    if settings.orchestrator and settings.key:
        key = settings.key.get_secret_value()
        urls = settings.orchestrator_urls
        ssl = client_context(settings.ca) if urls[0].startswith("https://") else None
        link = SwarmLink(service, lending, urls, key, ssl)
        joined = link
        handoff = Handoff(lambda: joined.url, link.credential, settings.name, ssl, settings.request_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.governor.start()
        service.start()
        if link:
            link.start()
        try:
            yield
        finally:
            if link:
                await link.close()
            if handoff:
                await handoff.close()
            await service.close()
            await service.governor.close()

    app = FastAPI(title="Py Dragon Swarm node", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.link = link
    app.state.handoff = handoff
    app.state.lending = lending
    app.state.closing = asyncio.Event()  # set when the server starts to stop: open event streams end
    app.state.overview = lambda: overview(service, link, lending)  # for /v1/node, its event stream, /metrics
    service.metrics.watch(app.state.overview)
    app.include_router(router)
    app.include_router(page_router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog, logger=log)  # a line and an id per API request
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key.get_secret_value())
    app.add_middleware(CheckHost, policy=HostPolicy.for_bind(settings.host, settings.allowed_hosts))  # outermost
    return app


class RequireKey:
    """The local API beyond loopback: every request but /health needs the node's API key."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if hmac.compare_digest(given, b"Bearer " + self.key):
            await self.app(scope, receive, send)
            return
        message = "this node's API needs its key: send 'Authorization: Bearer KEY'"
        await dragon_error_response(Unauthorized(message))(scope, receive, send)


class NodeServer(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to stop: the node's page keeps an event
    stream open, which would otherwise hold the shutdown for its whole grace period."""

    def __init__(self, config: uvicorn.Config, closing: asyncio.Event):
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.closing.set()
        await super().shutdown(sockets)


def build_service(settings: NodeSettings, models: list[LocalModel]) -> NodeService:
    cpus = allowed_cpus()
    # Read before our own quota exists: a container's limit, not the share we set ourselves.
    n_cpus = usable_cpus(len(cpus), cpu_limit())
    sampler = Sampler(settings.swarm_pid or os.getpid(), cpus, n_cpus)
    cap = open_cap(settings.cap_mechanism, cpus, n_cpus)
    policy = OwnerPolicy(noise=settings.owner_noise, headroom=settings.owner_headroom, min_share=settings.min_share,
                         hold_s=settings.owner_hold_s)  # fmt: skip
    governor = Governor(sampler, cap, local_share=settings.local_share, share=settings.share, policy=policy,
                        interval=settings.sample_interval, gpu_share=settings.gpu_share)  # fmt: skip
    governor.attach(os.getpid(), runner=False)
    return NodeService(settings, governor, models)


def run_node(settings: NodeSettings, models: list[LocalModel]) -> None:
    """Serve the node's API until interrupted. Also the Python API behind `dragon node`."""
    service = build_service(settings, models)
    app = create_app(service)
    config = uvicorn.Config(app, host=settings.host, port=settings.api_port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)  # fmt: skip
    server = NodeServer(config, app.state.closing)
    log.info("node %s API on http://%s:%d/v1 (cpu cap: %s)", settings.name, settings.host, settings.api_port,
             service.governor.cap.name)  # fmt: skip
    asyncio.run(server.serve())
