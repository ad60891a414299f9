"""The orchestrator's end of a node's WebSocket: admit, greet, listen, and let go.

A node is admitted before the handshake completes, by its own credential or, the first
time, by a `node` (or `admin`) key; a refusal is a plain HTTP 400/401/403. A name admitted
by the node key is offered a credential in `welcome` and bound to it when the node
`confirm`s it has kept it. After that, anything that breaks the protocol ends the
connection with close code 1008, and its fragments move to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from dragonswarm.errors import DragonError, Forbidden, InvalidRequest
from dragonswarm.orchestrator.auth import authenticate, bearer, node_identity
from dragonswarm.orchestrator.federation import Federation
from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.orchestrator.swarm import Swarm
from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.swarm import (
    CREDENTIAL_PREFIX,
    NAME_PATTERN,
    NODE_HEADER,
    VERSION,
    Confirm,
    Heartbeat,
    Hello,
    JobEvent,
    ProtocolError,
    Welcome,
    dump,
    parse_node_message,
)
from dragonswarm.store.base import Store
from dragonswarm.web.errors import dragon_error_response

log = logging.getLogger("dragonswarm.orchestrator")

router = APIRouter()

HELLO_TIMEOUT_S = 10.0
CLOSE_PROTOCOL = 1008  # policy violation
CLOSE_CONFLICT = 4009  # another live connection already speaks for this node


@dataclass(frozen=True)
class Admission:
    name: str
    credential: str | None  # a new credential to hand over, when a node key admitted a new name


def admit(store: Store, headers: Mapping[str, str]) -> Admission:
    """Who may open a node connection, decided before the handshake completes (in a thread:
    it reads and writes the store).

    A node's own credential speaks for its name only. A node key may speak for a name
    nobody holds: it is offered a new credential (replacing one offered before and never
    confirmed), and once the node confirms it the node key can no longer speak for that
    name. A revoked name never returns; a forgotten one is free again.
    """
    name = headers.get(NODE_HEADER.lower(), "")
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidRequest(f"the {NODE_HEADER} header must carry the node's name", param=NODE_HEADER)
    token = bearer(headers) or ""
    if token.startswith(CREDENTIAL_PREFIX):
        identity = node_identity(store, name, token)
        if identity.confirmed is None:  # its confirm was lost, but it came back holding the credential
            store.confirm_identity(name, token)
        return Admission(name, None)
    authenticate(store, headers, ("node",), "join the swarm")
    credential = store.offer_identity(name)
    if credential is None:
        existing = store.get_identity(name)
        if existing is None or existing.revoked is not None:
            raise Forbidden(f"node {name!r} has been revoked; a node key cannot speak for it")
        raise Forbidden(f"node {name!r} is held by a machine with its own credential; a node key cannot speak "
                        "for it (an admin can free the name: dragon nodes forget NAME)")  # fmt: skip
    return Admission(name, credential)


SWARM_PATH = "/v1/swarm"


@router.websocket(SWARM_PATH)
async def swarm_socket(ws: WebSocket) -> None:
    swarm: Swarm = ws.app.state.swarm
    store: Store = ws.app.state.store
    try:
        admission = await asyncio.to_thread(admit, store, ws.headers)
    except DragonError as exc:
        await ws.send_denial_response(dragon_error_response(exc))
        return
    await ws.accept()
    try:
        hello = parse_node_message(await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT_S))
        if not isinstance(hello, Hello):
            raise ProtocolError("the first message must be hello")
        if hello.v != VERSION:
            raise ProtocolError(f"protocol version {hello.v} is not supported (this orchestrator speaks {VERSION})")
        if hello.name != admission.name:
            raise ProtocolError(f"hello names {hello.name!r} but the connection was admitted as {admission.name!r}")
        # What the node claims is a ceiling, not a grant: it runs what policy allows.
        hello = hello.model_copy(update={"capacity": min(hello.capacity, swarm.settings.max_node_capacity)})
        if swarm.registry.claimed(hello.name, time.monotonic()):
            log.warning("refused a second live connection for node %s", hello.name)
            await ws.close(CLOSE_CONFLICT, f"node {hello.name} is already connected")
            return
        cadence = Cadence(swarm.settings.heartbeat_s, swarm.settings.idle_heartbeat_s)
        await ws.send_text(dump(Welcome(v=VERSION, name=hello.name, heartbeat_s=cadence.heartbeat_s,
                                        idle_heartbeat_s=cadence.idle_heartbeat_s,
                                        credential=admission.credential)))  # fmt: skip
        if admission.credential is not None and not await _confirmed(ws, store, hello.name):
            log.warning("node %s did not confirm its credential, another machine's did", hello.name)
            await ws.close(CLOSE_CONFLICT, f"the name {hello.name} was just taken by another machine")
            return
    except (ProtocolError, TimeoutError, WebSocketDisconnect, KeyError) as exc:
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_PROTOCOL, str(exc)[:120] or "expected hello")
        return
    await _serve(ws, swarm, hello, cadence)


def nodes_first(app: FastAPI) -> ASGIApp:
    """`app`, with node connections (`/v1/swarm`) handed to `swarm_socket` straight away.

    They pass no middleware of ours (the request log and the body limit are for HTTP), so
    the framework's stack of middleware, routing and dependency solving is skipped: at a
    join storm of ten thousand nodes it was a quarter of the orchestrator's work per join.
    The route stays registered, so `app` served alone behaves the same.
    """

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == SWARM_PATH:
            scope["app"] = app  # what the framework sets: `ws.app.state` holds the swarm
            await swarm_socket(WebSocket(scope, receive, send))
        else:
            await app(scope, receive, send)

    return asgi


async def _confirmed(ws: WebSocket, store: Store, name: str) -> bool:
    """Wait for the node to confirm it has kept the credential its welcome offered; bind
    the name to it then. Until it does, the name stays free for the node key to ask again."""
    message = parse_node_message(await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT_S))
    if not isinstance(message, Confirm):
        raise ProtocolError("a node offered a credential must confirm it first")
    return await asyncio.to_thread(store.confirm_identity, name, message.credential)


async def _serve(ws: WebSocket, swarm: Swarm, hello: Hello, cadence: Cadence) -> None:
    federation: Federation | None = ws.app.state.federation
    outbox: asyncio.Queue[str | None] = asyncio.Queue()
    closing: list[tuple[int, str]] = []

    def close(code: int, reason: str) -> None:
        closing.append((code, reason))
        outbox.put_nowait(None)

    conn = NodeConn(hello=hello, send=outbox.put_nowait, close=close, cadence=cadence)
    replaced = swarm.registry.conns.get(hello.name)
    if replaced is not None:  # a stale connection of the same node (say, a half-open TCP link)
        replaced.close(CLOSE_CONFLICT, "replaced by a new connection")
        swarm.node_left(replaced)  # its work moves before the new connection can take any
    swarm.registry.join(conn)
    log.info("node %s joined (%s)", hello.name, ", ".join(m.name for m in hello.models))
    writer = asyncio.create_task(_write(ws, outbox), name=f"ws-writer-{hello.name}")
    reader = asyncio.create_task(_read(ws, swarm, conn, federation), name=f"ws-reader-{hello.name}")
    swarm.dispatcher.dispatch()
    try:
        await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, writer):
            if not task.done() or task.cancelled() or (exc := task.exception()) is None:
                continue
            if isinstance(exc, ProtocolError):
                log.warning("node %s broke the protocol: %s", hello.name, exc)
                conn.cut_off = str(exc)[:500]  # marked in its record: `dragon nodes list`, GET /v1/nodes
                closing.append((CLOSE_PROTOCOL, str(exc)[:120]))
            elif not isinstance(exc, WebSocketDisconnect):
                log.error("connection of node %s failed", hello.name, exc_info=exc)
                closing.append((1011, "internal error"))
    finally:
        for task in (reader, writer):
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)  # no send may overlap the close
        swarm.node_left(conn)
        if federation is not None:
            federation.node_left(conn)
        log.info("node %s left", hello.name)
        code, reason = closing[0] if closing else (1000, "")
        with contextlib.suppress(Exception):
            await ws.close(code, reason)


async def _write(ws: WebSocket, outbox: asyncio.Queue[str | None]) -> None:
    while (message := await outbox.get()) is not None:
        await ws.send_text(message)


class FloodGuard:
    """Heartbeats come about once a second; many more than that is an attack or a bug."""

    def __init__(self, limit: int = 20, window_s: float = 2.0):
        self.window_s = window_s
        self.times: deque[float] = deque(maxlen=limit)

    def flooding(self, now: float) -> bool:
        self.times.append(now)
        return len(self.times) == self.times.maxlen and now - self.times[0] < self.window_s


async def _read(ws: WebSocket, swarm: Swarm, conn: NodeConn, federation: Federation | None) -> None:
    guard = FloodGuard()
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text") or message.get("bytes")
            if raw is None:
                raise ProtocolError("empty message")
            parsed = parse_node_message(raw)
            if isinstance(parsed, Heartbeat):
                if guard.flooding(time.monotonic()):
                    raise ProtocolError("heartbeat flood")
                swarm.on_heartbeat(conn, parsed)
            elif isinstance(parsed, JobEvent):
                conn.seen(time.monotonic(), swarm.registry.stale_after)
                if federation is not None and federation.owns(parsed.job):  # run here for another replica
                    federation.relay(conn, parsed, raw if isinstance(raw, str) else raw.decode())
                else:
                    swarm.on_event(conn, parsed)
            else:
                raise ProtocolError(f"{parsed.type} out of place")
