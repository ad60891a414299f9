"""The orchestrator's listening sockets, accepted no faster than TLS handshakes complete.

uvicorn's listener (the event loop's `create_server`) accepts every connection waiting and
starts every TLS handshake at once. When ten thousand nodes connect together, one turn of
the event loop then reads thousands of handshakes and upgrade requests and holds the loop
for seconds: everything else on it, heartbeats and answers included, waits that long
(`bench/loop_bench`: stalls up to 3.8 s, p99 0.17 s while 10,000 nodes joined). Here the
server accepts by itself and keeps at most `limit` handshakes under way; the other
connections wait in the kernel's backlog, where they cost nothing, and the turns of the
loop stay short (p99 under 30 ms, the longest 60 ms, with joins as fast as before).

A handshake stops counting when it completes or fails, or after `slot_s`: a client that
connects and says nothing holds a place only that long (its handshake is still ended at the
loop's own timeout). To keep the gate shut, silent connections must keep coming, `limit /
slot_s` of them a second; the kernel's backlog is first come, first served.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable

import uvicorn

LIMIT = 64  # handshakes under way at once
SLOT_S = 2.0  # the longest one handshake holds its place
BACKLOG = 4096  # connections the kernel holds for us (capped by net.core.somaxconn)
ACCEPT_RETRY_S = 1.0  # after running out of file descriptors or memory (asyncio's own listener waits as long)
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

log = logging.getLogger("dragonswarm.web")


class Gate:
    """At most `limit` places, taken at accept and given back when the handshake ends."""

    def __init__(self, limit: int = LIMIT) -> None:
        if limit < 1:
            raise ValueError("a gate needs at least one place")
        self.limit = limit
        self.taken = 0
        self._room = asyncio.Event()
        self._room.set()

    def take(self) -> None:
        self.taken += 1
        if self.taken >= self.limit:
            self._room.clear()

    def give(self) -> None:
        self.taken -= 1
        if self.taken < self.limit:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address `host` names (OSError when it cannot be had)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):  # one per address, in the resolver's order
            try:
                sock = socket.create_server(address[:2], family=family, backlog=BACKLOG)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL and len(infos) > 1:
                    continue  # a family this machine has turned off ("localhost" as ::1), as asyncio skips it
                raise
            sock.setblocking(False)
            sockets.append(sock)
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, f"no address of {host!r} can be listened on")
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accept(sock: socket.socket, protocol: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None,
                 gate: Gate, slot_s: float = SLOT_S) -> None:  # fmt: skip
    """Accept from `sock` while the gate has room, each connection's handshake in a task of its own."""
    loop = asyncio.get_running_loop()
    starting: set[asyncio.Task[None]] = set()
    try:
        while True:
            await gate.room()
            try:
                conn, _ = await loop.sock_accept(sock)
            except ConnectionAbortedError:  # gone before it was taken
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise
                # Out of file descriptors or memory, as asyncio's own listener: the connections
                # wait in the backlog until some close.
                log.error("cannot accept connections (%s); trying again in %.0f s", exc.strerror, ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            gate.take()
            task = loop.create_task(_start(conn, protocol, tls, gate, slot_s))
            starting.add(task)
            task.add_done_callback(starting.discard)
    finally:
        for task in starting:
            task.cancel()


async def _start(conn: socket.socket, protocol: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None,
                 gate: Gate, slot_s: float) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    given = False

    def give() -> None:
        nonlocal given
        if not given:
            given = True
            gate.give()

    late = loop.call_later(slot_s, give)
    try:
        conn.setblocking(False)
        await loop.connect_accepted_socket(protocol, conn, ssl=tls)
    except asyncio.CancelledError:  # the server is stopping
        conn.close()
        raise
    except Exception as exc:  # a client gone, or its handshake failed or timed out: nobody to tell
        log.debug("a connection ended before it was served: %r", exc)
        conn.close()
    finally:
        late.cancel()
        give()


class GatedServer(uvicorn.Server):
    """uvicorn's server, on listening sockets of ours accepted through a `Gate`."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], gate: Gate | None = None) -> None:
        super().__init__(config)
        self.listening = sockets
        self.gate = gate or Gate()
        self._acceptors: list[asyncio.Task[None]] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's lifespan, and no listener of uvicorn's own
        if self.should_exit:
            return
        # What uvicorn's own listener builds for each connection (`Server.startup`).
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,  # type: ignore[call-arg]
                                     server_state=self.server_state, app_state=self.lifespan.state)  # fmt: skip
        self._acceptors = [asyncio.create_task(accept(sock, protocol, self.config.ssl, self.gate), name="accept")
                           for sock in self.listening]  # fmt: skip
        for task in self._acceptors:
            task.add_done_callback(self._accepting_ended)

    def _accepting_ended(self, task: asyncio.Task[None]) -> None:
        """A listener that fails stops the server: one that serves what it has but takes no one
        new would look alive to a supervisor while every node's reconnect fails."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.critical("accepting connections failed; stopping", exc_info=exc)
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in self._acceptors:  # stop accepting first, as uvicorn closes its listeners first
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self.listening:
            sock.close()
        await super().shutdown(sockets=[])
