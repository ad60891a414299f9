"""The orchestrator's own listener: at most `limit` TLS handshakes under way, the rest in the
kernel's backlog; silent connections give their place back and one address holds a share at
most; out of file descriptors it waits and goes on; a port taken is one line."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from tests.conftest import free_port, wait_until

from dragonswarm.tls import TlsFiles, init_ca
from dragonswarm.web.listener import Gate, GatedServer, listen

pytestmark = pytest.mark.timeout(60)


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def test_the_gate_has_room_until_its_places_are_taken() -> None:
    async def run() -> list[bool]:
        gate = Gate(limit=2, per_peer=2)
        seen = []
        for step in (lambda: gate.take("10.0.0.1"), lambda: gate.take("10.0.0.2"), lambda: gate.give("10.0.0.1"),
                     lambda: gate.take("10.0.0.3")):  # fmt: skip
            step()
            seen.append(await has_room(gate))
        return seen

    async def has_room(gate: Gate) -> bool:
        try:
            await asyncio.wait_for(gate.room(), 0.01)
            return True
        except TimeoutError:
            return False

    assert asyncio.run(run()) == [True, False, True, False]
    with pytest.raises(ValueError):
        Gate(limit=0)


def test_one_address_holds_its_share_of_places_this_machine_is_not_counted() -> None:
    gate = Gate(limit=10, per_peer=2)
    assert [gate.take("203.0.113.7") for _ in range(3)] == [True, True, False]
    assert gate.take("2001:db8::1") and gate.take("2001:db8::1") and not gate.take("2001:db8::1")
    gate.give("203.0.113.7")
    assert gate.take("203.0.113.7")  # a place given back is its own again
    assert all(gate.take("127.0.0.1") for _ in range(4)) and gate.take("::1")  # loopback: dragon up, a proxy
    assert gate.taken == 9 and gate.peers["203.0.113.7"] == 2


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[GatedServer, int, Path]]:
    """A real TLS server with a gate of 2 places on a loopback port, run on a thread of its own."""
    files = TlsFiles(tmp_path / "tls")
    init_ca(files, ["127.0.0.1"])
    port = free_port()
    config = uvicorn.Config(hello_app, host="127.0.0.1", port=port, log_level="warning",
                            ssl_certfile=str(files.server_cert), ssl_keyfile=str(files.server_key))  # fmt: skip
    server = GatedServer(config, listen("127.0.0.1", port), Gate(limit=2))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "the server to start")
    try:
        yield server, port, files.ca_cert
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


def test_silent_connections_wait_in_the_backlog_and_cannot_keep_the_gate_shut(
    gated: tuple[GatedServer, int, Path],
) -> None:
    server, port, ca = gated
    # Five clients connect and never start their handshake: two are accepted, three wait.
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        wait_until(lambda: server.gate.taken == 2, 5, "two handshakes under way")
        time.sleep(0.3)
        assert server.gate.taken == 2  # not more: the others are still the kernel's
        # Each silent one gives its place back after SLOT_S (2 s), long before its handshake times
        # out (60 s, past this request's deadline): a real client is served behind all five.
        r = httpx.get(f"https://127.0.0.1:{port}/", verify=ssl.create_default_context(cafile=str(ca)), timeout=30)
        assert r.status_code == 200 and r.text == "hello"
        assert server.gate.taken <= 2
    finally:
        for s in silent:
            s.close()


def test_failed_handshakes_give_their_places_back(gated: tuple[GatedServer, int, Path]) -> None:
    server, port, ca = gated
    for _ in range(4):  # more failures than places: each must give its place back
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
            raw.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(4096):  # until the server closes it
                    pass
    wait_until(lambda: server.gate.taken == 0, 5, "every place given back")
    r = httpx.get(f"https://127.0.0.1:{port}/", verify=ssl.create_default_context(cafile=str(ca)), timeout=10)
    assert r.text == "hello"
    assert server.failed is None


def test_a_port_taken_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "orchestrator", "--home", str(tmp_path),
                              "--port", str(port)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr


CHILD = """
import asyncio, resource, sys
import uvicorn
from dragonswarm.web.listener import GatedServer, listen

async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

port, files = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", timeout_keep_alive=120)
server = GatedServer(config, listen("127.0.0.1", port))
print("serving", flush=True)
asyncio.run(server.serve())
"""


def test_out_of_file_descriptors_the_listener_waits_and_accepts_again(tmp_path: Path) -> None:
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), "64"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    held: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdout.readline() == "serving\n"
        wait_until(lambda: _answers(port, timeout=1), 10, "the server to answer")
        # More open connections than the server has file descriptors: it runs out while accepting.
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(s)
        # The server has taken what it can: every descriptor its limit allows is open.
        wait_until(lambda: psutil.Process(child.pid).num_fds() >= 64, 10, "the server to run out of descriptors")
        assert not _answers(port, timeout=1)  # full: a new connection waits in the backlog
        for s in held:
            s.close()
        held.clear()
        wait_until(lambda: _answers(port, timeout=2), 15, "the server to accept again once descriptors are free")
        assert child.poll() is None
    finally:
        for s in held:
            s.close()
        child.terminate()
        _, err = child.communicate(timeout=15)
    assert "cannot accept connections (Too many open files)" in err


def _answers(port: int, timeout: float) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=timeout).text == "hello"
    except httpx.TransportError:
        return False


def test_a_listener_that_breaks_stops_the_server_and_says_why(tmp_path: Path) -> None:
    server = GatedServer(uvicorn.Config(hello_app), [])

    async def broken() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    async def run() -> None:
        task = asyncio.create_task(broken())
        await asyncio.gather(task, return_exceptions=True)
        server._accepting_ended(task)

    asyncio.run(run())
    assert server.should_exit  # uvicorn's main loop stops, and `run_orchestrator` exits 1 with the reason
    assert isinstance(server.failed, OSError) and server.failed.errno == errno.EBADF
