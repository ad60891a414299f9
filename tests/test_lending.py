"""The owner's lending switch: plain values first, then a node speaking to an orchestrator
the test plays (a `run` that crosses the switch), then a real swarm of two nodes."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, free_port, wait_until
from websockets.sync.server import Server, ServerConnection, serve

from dragonswarm.node.lending import Lending
from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.runner import Generation
from dragonswarm.protocol.swarm import (
    VERSION,
    Cancel,
    Heartbeat,
    Hello,
    JobEvent,
    ModelInfo,
    RunFragment,
    Welcome,
    dump,
    parse_node_message,
)
from dragonswarm.scheduler.placement import choose

Start = Callable[..., Any]
SHA = "ab" * 32
BEAT = {"cpu_total": 0.1, "cpu_ours": 0.0, "owner_load": 0.0, "owner_busy": False, "ram_available": 1 << 30,
        "share_in_force": 0.1, "local_busy": 0, "loaded": ["tiny"]}  # fmt: skip


# --- Plain values -----------------------------------------------------------------------------


def test_the_switch_is_kept_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "home" / "lending.json"
    fresh = Lending.load(path)
    assert not fresh.paused and fresh.since is None and not path.exists()  # lending until the owner says
    fresh.set(True)
    assert Lending.load(path).paused and Lending.load(path).since == fresh.since
    fresh.set(False)
    assert not Lending.load(path).paused


@pytest.mark.parametrize("text", ["{not json", '{"paused": "no"}', "[]", '{"since": 1.0}'])
def test_a_switch_that_cannot_be_read_stays_paused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "lending.json"
    path.write_text(text)
    assert Lending.load(path).paused  # written only when the owner switched: not lending against their wish


def test_a_switch_that_cannot_be_written_still_holds(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    lending = Lending(blocker / "lending.json")  # its folder is a file: the write fails
    lending.set(True)
    assert lending.paused and not lending.saved


def test_a_paused_node_is_given_no_work() -> None:
    hello = Hello(v=VERSION, name="a", models=[ModelInfo(name="tiny", sha256=SHA)], share=0.1, local_share=0.8,
                  cpus=2, ram_total=1 << 30)  # fmt: skip
    conn = NodeConn(hello=hello, send=lambda _: None, close=lambda _code, _reason: None)
    key = conn.keys["tiny"]
    conn.heartbeat = Heartbeat.model_validate(BEAT)
    assert choose(key, [conn.placement_state(time.monotonic(), 3.5)]) == "a"
    conn.heartbeat = Heartbeat.model_validate({**BEAT, "lending_paused": True})
    assert choose(key, [conn.placement_state(time.monotonic(), 3.5)]) is None


def test_pausing_goes_out_at_the_next_heartbeat_tick() -> None:
    quiet = Cadence(heartbeat_s=1.0, idle_heartbeat_s=5.0)
    idle = Heartbeat.model_validate(BEAT)
    paused = Heartbeat.model_validate({**BEAT, "lending_paused": True})
    assert quiet.due(idle, paused, 1.0) and quiet.due(paused, idle, 1.0)
    assert idle.lending_paused is False  # a node older than the field still validates, lending


# --- One node, and an orchestrator played by the test -------------------------------------------


class PlayedOrchestrator:
    """The orchestrator's side of the protocol, played by the test: it welcomes one node and
    keeps every message the node sends, in order."""

    def __init__(self, server: Server, port: int):
        self.server = server
        self.port = port
        self.hello: Hello | None = None
        self.conn: ServerConnection | None = None
        self.messages: queue.Queue[Any] = queue.Queue()
        self.joined = threading.Event()

    def handle(self, conn: ServerConnection) -> None:
        hello = parse_node_message(conn.recv(timeout=30))
        assert isinstance(hello, Hello)
        # Every beat goes out (no idle period): the test waits on heartbeats, not on the clock.
        conn.send(dump(Welcome(v=VERSION, name=hello.name, heartbeat_s=0.2)))
        self.hello, self.conn = hello, conn
        self.joined.set()
        for raw in conn:
            self.messages.put(parse_node_message(raw))

    def send(self, message: RunFragment) -> None:
        assert self.conn is not None
        self.conn.send(dump(message))

    def send_together(self, *messages: RunFragment | Cancel) -> None:
        """Messages in one write to the socket, so that the node reads them in one go: text frames
        framed here (a server's frames are not masked), each with the shortest length form."""
        assert self.conn is not None
        frames = b""
        for message in messages:
            payload = dump(message).encode()
            assert len(payload) < 1 << 16
            length = bytes([len(payload)]) if len(payload) < 126 else bytes([126]) + len(payload).to_bytes(2, "big")
            frames += bytes([0x81]) + length + payload
        self.conn.socket.sendall(frames)

    def next_message(self, accept: Callable[[Any], bool], what: str, timeout: float = 60) -> Any:
        """The next message `accept` takes, skipping the rest."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None
            if accept(message):
                return message

    def events(self, job: str) -> list[JobEvent]:
        """A job's events, up to its `done` or `error`."""
        out: list[JobEvent] = []
        while not out or out[-1].ev not in ("done", "error"):
            out.append(self.next_message(lambda m: isinstance(m, JobEvent) and m.job == job, f"events of {job}"))
        return out

    def beat_saying(self, paused: bool) -> None:
        self.next_message(lambda m: isinstance(m, Heartbeat) and m.lending_paused is paused,
                          f"a heartbeat with lending_paused={paused}")  # fmt: skip


@contextmanager
def played_orchestrator() -> Iterator[PlayedOrchestrator]:
    port = free_port()
    played: list[PlayedOrchestrator] = []
    with serve(lambda conn: played[0].handle(conn), "127.0.0.1", port) as server:
        played.append(PlayedOrchestrator(server, port))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield played[0]
        finally:
            server.shutdown()
            thread.join(30)


def set_lending(node: NodeProcess, paused: bool) -> dict[str, Any]:
    r = node.client.post("/v1/node/lending", json={"paused": paused})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["paused"] is paused and body["saved"] is True
    return body


def test_a_run_that_crosses_the_switch_is_handed_back(start_node: Start, tiny_model: Path) -> None:
    with played_orchestrator() as orch:
        node = start_node("--name", "n1", "--model", f"tiny={tiny_model}", "--orchestrator",
                          f"http://127.0.0.1:{orch.port}", "--insecure", env={"DRAGON_KEY": "unused"})  # fmt: skip
        assert orch.joined.wait(60), "the node never said hello"
        assert orch.hello is not None
        sha = orch.hello.models[0].sha256
        gen = Generation(prompt="crossing", max_tokens=4, temperature=0.0)

        set_lending(node, True)
        orch.beat_saying(paused=True)
        # Placed as if the heartbeat had not arrived yet: given back, nothing run.
        orch.send(RunFragment(job="j-paused", model="tiny", sha256=sha, gen=gen))
        events = orch.events("j-paused")
        assert [(e.ev, e.finish_reason, e.completion_tokens) for e in events] == [("done", "cancelled", 0)]
        assert node.model_status("tiny")["jobs"] == {"completed": 0, "cancelled": 0, "failed": 0}
        assert "fragment j-paused handed back: lending is paused" in node.log()

        set_lending(node, False)
        orch.beat_saying(paused=False)
        orch.send(RunFragment(job="j-lent", model="tiny", sha256=sha, gen=gen))
        events = orch.events("j-lent")
        assert events[-1].ev == "done" and events[-1].finish_reason == "length", events
        assert events[-1].completion_tokens == 4


def test_a_cancel_right_behind_its_run_is_answered(start_node: Start, tiny_model: Path) -> None:
    """A `cancel` read in the same turn of the node's loop as its `run` (a client gone at once, a
    replica's messages landing together) cancelled the job's task before its first step: its body,
    which says `done`, never ran, and the node said nothing. The orchestrator counted the job on
    the node until its stall timeout. Every such job must end with one `done`, and the node serve on."""
    with played_orchestrator() as orch:
        start_node("--name", "n1", "--model", f"tiny={tiny_model}", "--orchestrator",
                   f"http://127.0.0.1:{orch.port}", "--insecure", env={"DRAGON_KEY": "unused"})  # fmt: skip
        assert orch.joined.wait(60), "the node never said hello"
        assert orch.hello is not None
        sha = orch.hello.models[0].sha256
        gen = Generation(prompt="at once", max_tokens=64, temperature=0.0)
        for i in range(10):
            orch.send_together(RunFragment(job=f"j{i}", model="tiny", sha256=sha, gen=gen), Cancel(job=f"j{i}"))
            events = orch.events(f"j{i}")
            assert events[-1].ev == "done" and events[-1].finish_reason == "cancelled", events
        orch.send(RunFragment(job="after", model="tiny", sha256=sha, gen=gen.model_copy(update={"max_tokens": 4})))
        assert orch.events("after")[-1].finish_reason == "length"


# --- A real swarm --------------------------------------------------------------------------------


def served_by(orch: OrchestratorProcess, prompts: int = 2) -> set[str]:
    """The nodes that served a request of `prompts` prompts at once (one fragment each)."""
    with orch.client() as c:
        # `cache: false`: asked again and again, it must be placed each time, not answered from the cache.
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [f"p{i}" for i in range(prompts)],
                                            "max_tokens": 4, "temperature": 0, "cache": False})  # fmt: skip
    assert r.status_code == 200, r.text
    nodes = set(r.json()["dragon"]["nodes"])
    assert nodes == set(r.headers["x-dragon-nodes"].split(","))  # no fragment moved: first nodes are all nodes
    return nodes


def seen_paused(orch: OrchestratorProcess, name: str, paused: bool) -> Callable[[], bool]:
    """The orchestrator holds a heartbeat of this node's live connection saying so."""

    def check() -> bool:
        node = orch.nodes().get(name, {})
        return node.get("state") == "live" and node.get("lending_paused") is paused

    return check


def test_a_paused_node_gets_no_new_work_until_resumed_even_across_a_restart(start_orchestrator: Start,
                                                                           start_node: Start,
                                                                           tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    model = ("--model", f"tiny={tiny_model}")
    a = start_node("--name", "a", *model, swarm=orch)
    start_node("--name", "b", *model, swarm=orch)
    orch.wait_live("a", "b")
    assert served_by(orch) == {"a", "b"}  # both lend: two fragments at once take both

    assert set_lending(a, True)["fragments_running"] == 0
    assert a.status()["lending"]["paused"] is True
    wait_until(seen_paused(orch, "a", True), 30, "the orchestrator to see a paused")
    for _ in range(3):
        assert served_by(orch) == {"b"}

    set_lending(a, False)
    wait_until(seen_paused(orch, "a", False), 30, "the orchestrator to see a lending again")
    assert served_by(orch) == {"a", "b"}

    # Paused, stopped, started again on the same home: still paused.
    set_lending(a, True)
    a.stop()
    a = start_node("--name", "a", *model, home=a.home, swarm=orch)
    assert a.status()["lending"]["paused"] is True
    wait_until(seen_paused(orch, "a", True), 60, "a to join again, paused")
    assert served_by(orch) == {"b"}
    assert "lending to the swarm is paused" in a.log()

    # The owner's own requests are not affected.
    own = a.client.post("/v1/completions", json={"model": "tiny", "prompt": "mine", "max_tokens": 4})
    assert own.status_code == 200 and own.headers["x-dragon-nodes"] == "a"


def test_a_fragment_running_when_lending_pauses_finishes_in_full(start_orchestrator: Start, start_node: Start,
                                                                 tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    model = ("--model", f"tiny={tiny_model}")
    a = start_node("--name", "a", *model, swarm=orch)
    b = start_node("--name", "b", *model, swarm=orch)
    orch.wait_live("a", "b")
    set_lending(b, True)  # so that the request runs on a
    wait_until(seen_paused(orch, "b", True), 30, "the orchestrator to see b paused")

    max_tokens = 1500
    events: list[dict[str, Any]] = []
    with orch.client() as c, c.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": "keep going", "max_tokens": max_tokens, "temperature": 0, "cache_prompt": False,
        "stream": True, "stream_options": {"include_usage": True},
    }) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["x-dragon-nodes"] == "a"
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 20:
                # Well into the answer: a pauses (the fragment must still be running), b lends again,
                # so a fragment moved off a would show up on b.
                assert set_lending(a, True)["fragments_running"] == 1
                set_lending(b, False)
    assert not any("error" in e for e in events), [e for e in events if "error" in e]
    final = events[-1]
    assert final["usage"]["completion_tokens"] == max_tokens
    assert final["dragon"]["nodes"] == ["a"]  # it ran to its end where it started
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    assert finishes == ["length"]
    wait_until(lambda: a.status()["swarm"]["fragments_running"] == 0, 30, "a to finish its fragment")
    assert a.status()["lending"]["paused"] is True
    wait_until(seen_paused(orch, "b", False), 30, "the orchestrator to see b lending")
    assert served_by(orch) == {"b"}


def test_the_switch_refuses_a_bad_body_and_a_foreign_page(tiny_node: NodeProcess) -> None:
    for body in ({"paused": "yes"}, {"paused": 1}, {}, {"paused": True, "extra": 1}, [True]):
        r = tiny_node.client.post("/v1/node/lending", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request", error
    r = tiny_node.client.post("/v1/node/lending", content=b'{"paused": true}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 400, "a body a cross-site form could send is not taken as JSON"
    # A page of another site, through the owner's browser (it sends its Origin), and DNS rebinding.
    url = f"http://127.0.0.1:{tiny_node.port}/v1/node/lending"
    r = httpx.post(url, json={"paused": True}, headers={"Origin": "https://attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
    r = httpx.post(url, json={"paused": True}, headers={"Host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    assert tiny_node.status()["lending"]["paused"] is False
    # The node's own page (same origin) may switch it.
    r = httpx.post(url, json={"paused": True}, headers={"Origin": f"http://127.0.0.1:{tiny_node.port}"})
    assert r.status_code == 200 and r.json()["fragments_running"] == 0  # not linked: nothing runs for others
    assert tiny_node.status()["lending"]["paused"] is True
    assert json.loads((tiny_node.home / "lending.json").read_text())["paused"] is True
