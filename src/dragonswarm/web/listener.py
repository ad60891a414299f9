"""The orchestrator's listening sockets, accepted no faster than TLS handshakes complete.

uvicorn's listener (the event loop's `create_server`) accepts every waiting connection at
once, and each starts its TLS handshake at once. When ten thousand nodes connect together,
one turn of the loop then reads thousands of handshakes and upgrade requests and holds the
loop for seconds: heartbeats and answers wait that long (`bench/loop_bench`: stalls up to
3.5 s, p99 0.68 s while 10,000 nodes joined). Here the server accepts by itself and keeps at
most `limit` handshakes under way; the rest wait in the kernel's backlog, where they cost
nothing, and the turns of the loop stay short (p99 under 30 ms, the longest 60 ms). A
place is held from accept to the handshake's end, one round trip after the client's first
message, so joins are bounded by `limit` / round trip too: 1,280 a second at 100 ms, more
than one core does (about 400 here). Accepting one connection per turn instead, without
places, was tried: bursts of clients answering together still made turns of seconds.

A place is given back when the handshake completes or fails, or after `slot_s`: a client
that connects and says nothing holds one only that long (its handshake is still ended at
the loop's own timeout). One address holds at most `per_peer` places, so one machine cannot
keep the gate shut; this machine's own connections (loopback: `dragon up`'s nodes, a proxy
in front) are not counted per address.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable

import uvicorn

LIMIT = 128  # handshakes under way at once
PER_PEER = 32  # of them from one address
SLOT_S = 2.0  # the longest one handshake holds its place
BACKLOG = 4096  # connections the kernel holds for us (capped by net.core.somaxconn)
ACCEPT_RETRY_S = 1.0  # after running out of file descriptors or memory (asyncio's own listener waits as long)
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BROKEN = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)  # the listening socket itself, not a connection

log = logging.getLogger("dragonswarm.web")


class Gate:
    """At most `limit` places, taken at accept and given back when the handshake ends; at most
    `per_peer` of them for one address other than this machine's."""

    def __init__(self, limit: int = LIMIT, per_peer: int = PER_PEER) -> None:
        if limit < 1 or per_peer < 1:
            raise ValueError("a gate needs at least one place, and one for each address")
        self.limit, self.per_peer = limit, per_peer
        self.taken = 0
        self.peers: Counter[str] = Counter()
        self._room = asyncio.Event()
        self._room.set()

    def take(self, peer: str) -> bool:
        """A place for a connection from address `peer`; False when that address holds its share."""
        if self.peers[peer] >= self.per_peer and not _loopback(peer):
            return False
        self.taken += 1
        self.peers[peer] += 1
        if self.taken >= self.limit:
            self._room.clear()
        return True

    def give(self, peer: str) -> None:
        self.taken -= 1
        self.peers[peer] -= 1
        if not self.peers[peer]:
            del self.peers[peer]
        if self.taken < self.limit:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address `host` names ("" for all; OSError when one cannot be had)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):  # one per address, in the resolver's order
            try:
                sock = socket.create_server(address, family=family, backlog=BACKLOG)
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
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in BROKEN:
                    raise
                if exc.errno in OUT_OF_RESOURCES:  # as asyncio's own listener: the backlog waits till some close
                    log.error("cannot accept connections (%s); trying again in %.0f s", exc.strerror, ACCEPT_RETRY_S)
                    await asyncio.sleep(ACCEPT_RETRY_S)
                else:  # one connection's trouble (aborted, reset, refused by a firewall): the next one may do
                    log.debug("a connection failed as it was accepted: %r", exc)
                continue
            peer = str(address[0]) if isinstance(address, tuple) else str(address)
            if not gate.take(peer):  # that address has enough handshakes under way: it may try again
                log.debug("closed a connection from %s: %d handshakes of its own under way", peer, gate.per_peer)
                conn.close()
                continue
            task = loop.create_task(_start(conn, protocol, tls, gate, peer, slot_s))
            starting.add(task)
            task.add_done_callback(starting.discard)
    finally:
        for task in starting:
            task.cancel()


async def _start(conn: socket.socket, protocol: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None,
                 gate: Gate, peer: str, slot_s: float) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    given = False

    def give() -> None:
        nonlocal given
        if not given:
            given = True
            gate.give(peer)

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
        self.failed: BaseException | None = None  # why accepting stopped, if it did
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
            self.failed = exc
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in self._acceptors:  # stop accepting first, as uvicorn closes its listeners first
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self.listening:
            sock.close()
        await super().shutdown(sockets=[])
