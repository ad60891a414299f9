"""Nodes get what policy gives, not what they claim: capacity, events, text and GPU records are
bounded by the orchestrator, and a worker that sends more than it was asked for is cut off
while its request finishes elsewhere."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from dragonswarm.protocol.swarm import VERSION, ProtocolError, parse_node_message

HEARTBEAT = {"type": "heartbeat", "cpu_total": 0.0, "cpu_ours": 0.0, "owner_load": 0.0, "owner_busy": False,
             "ram_available": 1 << 30, "share_in_force": 0.1, "local_busy": 0}  # fmt: skip
GPU = {"index": 0, "name": "NVIDIA RTX 4090", "util": 0.25, "mem_used": 1 << 30, "mem_total": 24 << 30,
       "ours_mem": 0, "owner_mem": 1 << 30, "owner_util": 0.25}  # fmt: skip


def test_a_heartbeat_carries_typed_gpu_records_only() -> None:
    parsed = parse_node_message(json.dumps({**HEARTBEAT, "gpus": [GPU]}))
    assert parsed.gpus[0].name == "NVIDIA RTX 4090"  # type: ignore[union-attr]
    for bad in ({"anything": {"nested": [1, 2, 3]}}, {**GPU, "util": 7.0}, {**GPU, "name": "x" * 1000},
                {**GPU, "extra": 1}):  # fmt: skip
        with pytest.raises(ProtocolError):
            parse_node_message(json.dumps({**HEARTBEAT, "gpus": [bad]}))


@contextlib.contextmanager
def join(orch: OrchestratorProcess, name: str, sha256: str, capacity: int = 1) -> Iterator[ClientConnection]:
    """Connect as node `name` serving the tiny model's file (by its sha256), and say hello."""
    headers = {"Authorization": f"Bearer {orch.keys['node']}", "X-Dragon-Node": name}
    with connect(orch.ws_url, additional_headers=headers, ssl=orch.ws_ssl, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "hello", "v": VERSION, "name": name, "share": 0.1, "local_share": 0.8, "cpus": 2,
                            "ram_total": 1 << 30, "capacity": capacity,
                            "models": [{"name": "tiny", "sha256": sha256, "loaded": True}]}))  # fmt: skip
        welcome = json.loads(ws.recv(timeout=10))
        assert welcome["type"] == "welcome"
        ws.send(json.dumps({"type": "confirm", "credential": welcome["credential"]}))
        yield ws


def closed_reason(ws: ClientConnection, send: Callable[[], None]) -> tuple[int | None, str]:
    """Do something, then read until the orchestrator closes the connection: its code and reason."""
    try:
        send()
        while True:
            ws.recv(timeout=15)
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


def ask(orch: OrchestratorProcess, body: dict[str, Any], answers: list[Any]) -> None:
    with orch.client() as client:
        answers.append(client.post("/v1/completions", json=body, timeout=120))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_capacity_is_what_policy_grants(start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    orch = start_orchestrator("--max-node-capacity", "3")
    with join(orch, "greedy", "0" * 64, capacity=64):
        assert orch.nodes()["greedy"]["capacity"] == 3


@pytest.mark.parametrize("event, cut", [
    # Events that add no token: what a flood has to be once tokens are bounded by max_tokens.
    ({"ev": "progress", "prompt_done": 1}, "progress events in"),
    ({"ev": "text", "text": "a", "completion_tokens": 1}, "without the ids of its tokens"),
    ({"ev": "text", "text": "a" * 1000, "ids": [1], "completion_tokens": 1}, "1000 characters of text for 1 tokens"),
])  # fmt: skip
def test_events_beyond_the_work_asked_cut_the_node_off(start_orchestrator: Callable[..., OrchestratorProcess],
                                                      tiny_model: Path, event: dict[str, Any],
                                                      cut: str) -> None:  # fmt: skip
    orch = start_orchestrator()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4000}
    with join(orch, "flooder", sha256_of(tiny_model)) as ws:
        asked = threading.Thread(target=ask, args=(orch, body, []))
        asked.start()
        run = json.loads(ws.recv(timeout=30))
        assert run["type"] == "run"
        message = json.dumps({"type": "event", "job": run["job"], **event})
        code, reason = closed_reason(ws, lambda: [ws.send(message) for _ in range(300)])
    assert code == 1008 and cut in reason, reason
    asked.join(60)


class Liar:
    """A node that takes a job and answers it with more tokens than it was asked for,
    heartbeating meanwhile so that it stays live until then."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.stop = threading.Event()
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.beats.start()

    def _beat(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.ws.send(json.dumps(HEARTBEAT))
            except ConnectionClosed:
                return


def test_a_worker_that_sends_more_than_asked_is_cut_and_its_request_finishes_elsewhere(
        start_orchestrator: Callable[..., OrchestratorProcess], start_node: Callable[..., NodeProcess],
        tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    with join(orch, "liar", sha256_of(tiny_model)) as ws:
        answer, alone = _lie(orch, Liar(ws), start_node, tiny_model)
    assert " lie" not in answer["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] == 12
    assert answer["dragon"]["nodes"] == ["liar", "honest"]
    # The same text the honest node gives on its own: nothing of the lie was kept.
    assert alone["choices"][0]["text"] == answer["choices"][0]["text"]
    wait_until(lambda: orch.nodes()["liar"]["state"] == "gone", 10, "the liar to be gone")
    wait_until(lambda: "12 asked for" in orch.nodes()["liar"].get("cut_off", ""), 10, "the liar to be marked")


def _lie(orch: OrchestratorProcess, liar: Liar, start_node: Callable[..., NodeProcess],
         tiny_model: Path) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The liar takes a request, an honest node joins, the liar lies: the answer, and the honest node's alone."""
    body = {"model": "tiny", "prompt": "steady", "max_tokens": 12, "temperature": 0, "cache_prompt": False}
    answers: list[Any] = []
    asked = threading.Thread(target=ask, args=(orch, body, answers))
    asked.start()
    run = json.loads(liar.ws.recv(timeout=30))
    assert run["type"] == "run" and run["gen"]["max_tokens"] == 12
    start_node("--name", "honest", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("honest")
    time.sleep(1)  # its model's hash reaches the orchestrator with the next heartbeat
    lie = {"type": "event", "job": run["job"], "ev": "text", "text": " lie" * 20, "ids": [7] * 20,
           "completion_tokens": 20}  # fmt: skip
    code, reason = closed_reason(liar.ws, lambda: liar.ws.send(json.dumps(lie)))
    liar.stop.set()
    assert code == 1008 and "12 asked for" in reason, reason
    asked.join(120)
    answer: dict[str, Any] = answers[0].json()
    assert answers[0].status_code == 200, answer
    ask(orch, body, answers)
    alone: dict[str, Any] = answers[1].json()
    return answer, alone
