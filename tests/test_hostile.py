"""Node identity and hostile peers: a real orchestrator, real nodes, and a test client that
speaks the node protocol with bad intent while a real job streams."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, wait_until
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from dragonswarm.protocol.swarm import VERSION

Start = Callable[..., Any]


@contextlib.contextmanager
def join(orch: OrchestratorProcess, name: str, token: str, max_size: int | None = 1 << 20
         ) -> Iterator[ClientConnection]:  # fmt: skip
    """Connect as node `name`, say hello and read the welcome: a well-behaved start."""
    with connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {token}", "X-Dragon-Node": name},
                 open_timeout=10, max_size=max_size, ssl=orch.ws_ssl) as ws:  # fmt: skip
        models = [{"name": "tiny", "sha256": "0" * 64}]
        ws.send(json.dumps({"type": "hello", "v": VERSION, "name": name, "models": models, "share": 0.1,
                            "local_share": 0.8, "cpus": 1, "ram_total": 1}))  # fmt: skip
        welcome = json.loads(ws.recv(timeout=10))
        assert welcome["type"] == "welcome"
        if welcome.get("credential"):  # a new name: kept (here: not at all) and confirmed
            ws.send(json.dumps({"type": "confirm", "credential": welcome["credential"]}))
        yield ws


def closed_with(ws: ClientConnection, send: Callable[[], None]) -> int | None:
    """Do something, then read until the orchestrator closes the connection; its close code."""
    try:
        send()
        while True:
            ws.recv(timeout=15)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


def credential_of(node: NodeProcess) -> str:
    data = json.loads((node.home / "swarm-credential.json").read_text())
    return str(data["credential"])


class LongStream:
    """A streaming request in a thread, to check it comes through an attack intact."""

    def __init__(self, orch: OrchestratorProcess, max_tokens: int):
        self.orch, self.max_tokens = orch, max_tokens
        self.events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        body = {"model": "tiny", "prompt": "steady", "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with self.orch.client() as c, c.stream("POST", "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.events.append(json.loads(line[6:]))

    def check_intact(self) -> list[str]:
        self.thread.join(300)
        assert not any("error" in e for e in self.events), [e for e in self.events if "error" in e]
        assert self.events[-1]["usage"]["completion_tokens"] == self.max_tokens
        return list(self.events[-1]["dragon"]["nodes"])


def test_hostile_node_is_cut_off_while_real_work_goes_on(start_orchestrator: Start, start_node: Start,
                                                         tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--share", "0.1", swarm=orch)
    orch.wait_live("w1")
    stream = LongStream(orch, 1200)
    wait_until(lambda: len(stream.events) > 5, 60, "the real job to stream")
    key = orch.keys["node"]

    attacks: dict[str, Callable[[ClientConnection], None]] = {
        "malformed": lambda ws: ws.send("{not json"),
        "unknown type": lambda ws: ws.send(json.dumps({"type": "launch", "target": "w1"})),
        "chunk for a job it does not hold": lambda ws: ws.send(json.dumps(
            {"type": "event", "job": "0123456789abcdef-0", "ev": "text", "text": "injected"})),
        "second hello": lambda ws: ws.send(json.dumps({"type": "hello", "v": VERSION, "name": "w1", "models": [],
                                                       "share": 0.1, "local_share": 0.8, "cpus": 1,
                                                       "ram_total": 1})),
        "oversized": lambda ws: ws.send("x" * (2 << 20)),
        "heartbeat flood": lambda ws: [ws.send(json.dumps({
            "type": "heartbeat", "cpu_total": 0.0, "cpu_ours": 0.0, "owner_load": 0.0, "owner_busy": False,
            "ram_available": 1, "share_in_force": 0.1, "local_busy": 0})) for _ in range(200)],
    }  # fmt: skip
    codes = {}
    for i, (label, attack) in enumerate(attacks.items()):
        with join(orch, f"evil-{i}", key, max_size=None) as ws:
            codes[label] = closed_with(ws, lambda ws=ws, attack=attack: attack(ws))  # type: ignore[misc]
    # An oversized frame is refused from its header, while the client still writes the rest: the
    # orchestrator's 1009 is on its way when its close turns into a reset (unread data), so the
    # client may see the close or only the connection ending. Either way it is cut off.
    assert codes.pop("oversized") in (1009, None)
    assert codes == {"malformed": 1008, "unknown type": 1008, "chunk for a job it does not hold": 1008,
                     "second hello": 1008, "heartbeat flood": 1008}  # fmt: skip

    # A node cannot speak for another: not with the shared node key, not while it is live.
    with pytest.raises(InvalidStatus) as taken:
        connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {key}", "X-Dragon-Node": "w1"},
                ssl=orch.ws_ssl)
    assert taken.value.response.status_code == 403
    assert stream.check_intact() == ["w1"]  # untouched by any of it
    assert "injected" not in json.dumps(stream.events)
    nodes = orch.nodes()
    assert nodes["w1"]["state"] == "live"
    assert all(nodes[f"evil-{i}"]["state"] == "gone" for i in range(len(attacks)))


def test_node_identity_and_revocation(start_orchestrator: Start, start_node: Start, tiny_model: Path) -> None:
    orch = start_orchestrator()
    w1 = start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--share", "0.1", swarm=orch)
    w2 = start_node("--name", "w2", "--model", f"tiny={tiny_model}", "--share", "0.1", swarm=orch)
    orch.wait_live("w1", "w2")
    credential = credential_of(w1)
    assert credential.startswith("dnc_")
    assert oct((w1.home / "swarm-credential.json").stat().st_mode & 0o777) == "0o600"
    assert credential_of(w2) != credential

    # Its own credential, but the node is live: a second connection is refused.
    second = join_refused_code(orch, "w1", credential)
    assert second == 4009
    # w1's credential does not speak for w2.
    with pytest.raises(InvalidStatus) as wrong:
        connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {credential}", "X-Dragon-Node": "w2"},
                ssl=orch.ws_ssl)
    assert wrong.value.response.status_code == 401

    # Revoked while serving: cut off at once, its fragment moves to w2, and it cannot return.
    stream = LongStream(orch, 1500)
    wait_until(lambda: len(stream.events) > 5, 60, "the job to stream")
    serving = stream_node(orch)
    revoked = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "nodes", "revoke", serving, "--url", orch.url,
                              "--key", orch.keys["admin"], "--ca", str(orch.ca)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    assert "cut off" in revoked.stderr
    other = "w2" if serving == "w1" else "w1"
    assert stream.check_intact() == [serving, other]
    node = w1 if serving == "w1" else w2
    wait_until(lambda: node.status()["swarm"]["refused"], 30, "the revoked node to give up")
    assert "revoked" in node.status()["swarm"]["refused"]
    assert orch.nodes()[serving]["state"] == "gone"
    with pytest.raises(InvalidStatus) as gone:
        connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {credential_of(node)}",
                                                  "X-Dragon-Node": serving}, ssl=orch.ws_ssl)  # fmt: skip
    assert gone.value.response.status_code == 403
    # The revoked machine still serves its own owner.
    local = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "mine", "max_tokens": 3})
    assert local.status_code == 200 and local.headers["x-dragon-nodes"] == serving
    # ... and cannot hand its owner's requests to the swarm any more either.
    handed = httpx.post(f"{orch.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                        headers={"Authorization": f"Bearer {credential_of(node)}", "X-Dragon-Node": serving},
                        verify=orch.verify)  # fmt: skip
    assert handed.status_code == 403 and "revoked" in handed.json()["error"]["message"], handed.text
    admin = {"Authorization": f"Bearer {orch.keys['admin']}"}
    missing = httpx.post(f"{orch.url}/v1/nodes/nobody/revoke", headers=admin, verify=orch.verify)
    assert missing.status_code == 404


def join_refused_code(orch: OrchestratorProcess, name: str, token: str) -> int | None:
    hello = {"type": "hello", "v": VERSION, "name": name, "models": [], "share": 0.1, "local_share": 0.8, "cpus": 1,
             "ram_total": 1}  # fmt: skip
    with connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {token}", "X-Dragon-Node": name},
                 open_timeout=10, ssl=orch.ws_ssl) as ws:  # fmt: skip
        return closed_with(ws, lambda: ws.send(json.dumps(hello)))


def stream_node(orch: OrchestratorProcess) -> str:
    running = wait_until(lambda: [n for n, info in orch.nodes().items() if info.get("running")], 30, "a busy node")
    return str(running[0])
