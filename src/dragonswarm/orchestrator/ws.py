"""The orchestrator's end of a node's WebSocket: admit, greet, listen, and let go.

A node is admitted with a `node` (or `admin`) key before the handshake completes; a
refused key gets a plain HTTP 401/403. After that, anything that breaks the protocol
ends the connection with close code 1008, and its fragments move to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from dragonswarm.errors import DragonError
from dragonswarm.orchestrator.auth import authenticate
from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.orchestrator.swarm import Swarm
from dragonswarm.protocol.swarm import (
    VERSION,
    Heartbeat,
    Hello,
    JobEvent,
    ProtocolError,
    Welcome,
    dump,
    parse_node_message,
)
from dragonswarm.web.errors import dragon_error_response

log = logging.getLogger("dragonswarm.orchestrator")

router = APIRouter()

HELLO_TIMEOUT_S = 10.0
CLOSE_PROTOCOL = 1008  # policy violation
CLOSE_CONFLICT = 4009  # another live connection already speaks for this node


@router.websocket("/v1/swarm")
async def swarm_socket(ws: WebSocket) -> None:
    swarm: Swarm = ws.app.state.swarm
    try:
        authenticate(ws.app.state.store, ws.headers, ("node",), "join the swarm")
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
    except (ProtocolError, TimeoutError, WebSocketDisconnect, KeyError) as exc:
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_PROTOCOL, str(exc)[:120] or "expected hello")
        return
    if swarm.registry.claimed(hello.name, time.monotonic()):
        log.warning("refused a second live connection for node %s", hello.name)
        await ws.close(CLOSE_CONFLICT, f"node {hello.name} is already connected")
        return
    await _serve(ws, swarm, hello)


async def _serve(ws: WebSocket, swarm: Swarm, hello: Hello) -> None:
    outbox: asyncio.Queue[str | None] = asyncio.Queue()
    closing: list[tuple[int, str]] = []

    def close(code: int, reason: str) -> None:
        closing.append((code, reason))
        outbox.put_nowait(None)

    conn = NodeConn(hello=hello, send=outbox.put_nowait, close=close)
    replaced = swarm.registry.join(conn)
    if replaced is not None:
        replaced.close(CLOSE_CONFLICT, "replaced by a new connection")
        swarm.node_left(replaced)
    conn.send(dump(Welcome(v=VERSION, name=hello.name, heartbeat_s=swarm.settings.heartbeat_s)))
    log.info("node %s joined (%s)", hello.name, ", ".join(m.name for m in hello.models))
    writer = asyncio.create_task(_write(ws, outbox), name=f"ws-writer-{hello.name}")
    reader = asyncio.create_task(_read(ws, swarm, conn), name=f"ws-reader-{hello.name}")
    swarm.dispatch()
    try:
        await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done() and (exc := reader.exception()) is not None and isinstance(exc, ProtocolError):
            log.warning("node %s broke the protocol: %s", hello.name, exc)
            closing.append((CLOSE_PROTOCOL, str(exc)[:120]))
    finally:
        reader.cancel()
        writer.cancel()
        swarm.node_left(conn)
        log.info("node %s left", hello.name)
        code, reason = closing[0] if closing else (1000, "")
        with contextlib.suppress(Exception):
            await ws.close(code, reason)


async def _write(ws: WebSocket, outbox: asyncio.Queue[str | None]) -> None:
    while (message := await outbox.get()) is not None:
        await ws.send_text(message)


async def _read(ws: WebSocket, swarm: Swarm, conn: NodeConn) -> None:
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
                swarm.registry.heartbeat(conn, parsed)
                if swarm.registry.index.get(conn.name) and conn.heartbeat and not parsed.owner_busy:
                    swarm.dispatch()  # it may have room now
            elif isinstance(parsed, JobEvent):
                conn.last_seen = time.monotonic()
                swarm.on_event(conn, parsed)
            else:
                raise ProtocolError("hello sent twice")
