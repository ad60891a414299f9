"""Handing an owner's request that cannot run here to the orchestrator.

The node forwards the request's body unchanged, speaking as itself (its own credential,
which the orchestrator gave it when it joined), and streams the orchestrator's answer back
unchanged: status, body, SSE events and the route header. The orchestrator knows the
request came from this node (and runs it elsewhere), holds it to this node's own limits,
and stops taking hand-offs from it if it is revoked. Before the node has joined once, it
has no credential yet, and serves its owner itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from ssl import SSLContext

import httpx
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dragonswarm.errors import error_body
from dragonswarm.protocol.swarm import NODE_HEADER

log = logging.getLogger("dragonswarm.node")

PASS_HEADERS = ("content-type", "x-dragon-nodes", "retry-after", "cache-control", "www-authenticate")


class Handoff:
    def __init__(self, base_url: Callable[[], str], credential: Callable[[], str | None], name: str,
                 ssl: SSLContext | None, timeout_s: float) -> None:  # fmt: skip
        self.credential = credential  # read per request: the node may join (or rejoin) meanwhile
        self.base_url = base_url  # ... and so is the orchestrator: the replica the link holds now
        self.client = httpx.AsyncClient(
            verify=ssl if ssl is not None else True,
            headers={NODE_HEADER: name},
            timeout=httpx.Timeout(timeout_s, connect=5.0),
        )

    async def forward(self, request: Request, local_fallback: bool) -> Response | None:
        """The orchestrator's answer, or None if it cannot be reached, or cannot take the
        request now while this node could, or this node has not joined yet (serve locally then)."""
        credential = self.credential()
        if credential is None:
            log.info("not admitted to the swarm yet: serving locally")
            return None
        body = await request.body()
        url = self.base_url().rstrip("/") + request.url.path
        upstream = self.client.build_request("POST", url, content=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {credential}"})  # fmt: skip
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            log.warning("orchestrator unreachable (%s): serving locally", type(exc).__name__)
            return None
        if local_fallback and response.status_code in (429, 503):
            await response.aclose()
            log.info("the swarm cannot take the request now (%d): serving locally", response.status_code)
            return None
        if local_fallback and response.status_code in (401, 403):  # forgotten or revoked: the owner still comes first
            await response.aclose()
            log.warning("the orchestrator refused this node's hand-off (%d): serving locally", response.status_code)
            return None
        headers = {k: v for k, v in response.headers.items() if k.lower() in PASS_HEADERS}
        log.info("handed a request to the orchestrator: %d via %s", response.status_code,
                 response.headers.get("x-dragon-nodes", "-"))  # fmt: skip
        return StreamingResponse(_relay(response), status_code=response.status_code, headers=headers)

    async def close(self) -> None:
        await self.client.aclose()


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    # Closing the upstream response when our client leaves tells the orchestrator to
    # cancel the work, exactly as if the client had been connected to it directly.
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError:
        log.warning("orchestrator connection lost while relaying an answer")
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            # The stream has started: the error is its last event, as everywhere else.
            error = error_body("the orchestrator connection was lost", "server_error", "orchestrator_unreachable")
            yield b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n"
    finally:
        await response.aclose()
