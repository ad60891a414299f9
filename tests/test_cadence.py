"""How often a node reports, and how long the orchestrator waits for it: plain values, then one
real orchestrator that tells a quiet node from a busy one by the cadence it allowed each."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import OrchestratorProcess, wait_until
from websockets.sync.client import connect

from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.protocol.cadence import Cadence, quiet
from dragonswarm.protocol.swarm import VERSION, Heartbeat, Hello

CADENCE = Cadence(heartbeat_s=1.0, idle_heartbeat_s=5.0)
IDLE = {"cpu_total": 0.1, "cpu_ours": 0.0, "owner_load": 0.1, "owner_busy": False, "ram_available": 1 << 30,
        "share_in_force": 0.5, "local_busy": 0, "loaded": ["tiny"], "running": []}  # fmt: skip


def beat(**changes: Any) -> Heartbeat:
    return Heartbeat.model_validate({**IDLE, **changes})


def test_quiet_means_nothing_runs_there() -> None:
    assert quiet(beat()) and quiet(beat(owner_busy=True)) and quiet(beat(loaded=[]))
    assert not quiet(beat(running=["j-1"])) and not quiet(beat(local_busy=1))


def test_a_quiet_node_beats_at_the_idle_period() -> None:
    assert CADENCE.due(None, beat(), 0.0)  # the first beat always goes out
    assert not CADENCE.due(beat(), beat(cpu_total=0.9, rtt_ms=3.0), 1.0)  # drifting figures wait
    assert not CADENCE.due(beat(), beat(), 4.0)
    assert CADENCE.due(beat(), beat(), 4.6)  # the tick nearest 5 s
    assert CADENCE.due(beat(), beat(), 60.0)


@pytest.mark.parametrize("change", [{"owner_busy": True}, {"net_busy": True}, {"gpu_owner_busy": True},
                                    {"lending_paused": True}, {"loaded": []}, {"local_busy": 1},
                                    {"running": ["j-1"]}])  # fmt: skip
def test_a_change_goes_out_at_the_next_tick(change: dict[str, Any]) -> None:
    assert CADENCE.due(beat(), beat(**change), 1.0)


def test_a_busy_node_beats_every_tick() -> None:
    busy = beat(running=["j-1"])
    assert CADENCE.due(busy, busy, 1.0)
    assert CADENCE.due(busy, beat(), 1.0)  # ... and says at once that it is quiet again
    assert CADENCE.due(beat(local_busy=1), beat(local_busy=1), 1.0)


def test_without_an_idle_period_every_tick_beats() -> None:
    old = Cadence(heartbeat_s=1.0)  # what an orchestrator that sends no idle period gets
    assert old.due(beat(), beat(), 1.0) and old.period(beat()) == 1.0


def test_the_period_the_last_beat_allows() -> None:
    assert CADENCE.period(None) == 1.0  # joined, no beat yet
    assert CADENCE.period(beat()) == 5.0
    assert CADENCE.period(beat(running=["j-1"])) == 1.0
    assert Cadence(heartbeat_s=2.0, idle_heartbeat_s=1.0).period(beat()) == 2.0  # never shorter than a busy node's
    assert CADENCE.slack(beat()) == 5.0 and CADENCE.slack(beat(local_busy=2)) == 1.0


def test_our_link_rates_are_averaged_since_the_last_beat_sent() -> None:
    last = beat(swarm_sent_bytes=1000, swarm_recv_bytes=50)
    now = beat(swarm_sent_bytes=1500, swarm_recv_bytes=50, swarm_sent_bps=0.0, swarm_recv_bps=7.0)
    averaged = CADENCE.averaged(last, now, 5.0)
    assert (averaged.swarm_sent_bps, averaged.swarm_recv_bps) == (100.0, 0.0)
    assert CADENCE.averaged(None, now, 5.0) == now


def node_conn(hb: Heartbeat | None, silent_for: float, now: float) -> NodeConn:
    hello = Hello(v=VERSION, name="w1", models=[], share=0.5, local_share=1.0, cpus=2, ram_total=1)
    conn = NodeConn(hello=hello, send=lambda _: None, close=lambda _code, _reason: None, cadence=CADENCE)
    conn.heartbeat, conn.last_seen = hb, now - silent_for
    return conn


@pytest.mark.parametrize(("hb", "silent_for", "state", "gone"), [
    (beat(), 10.0, "live", False),  # stale after 3.5 x 5 s
    (beat(), 18.0, "stale", False),
    (beat(), 28.0, "stale", False),  # gone 11.5 s after stale, as for a busy node
    (beat(), 30.0, "stale", True),
    (beat(running=["j-1"]), 3.0, "live", False),
    (beat(running=["j-1"]), 4.0, "stale", False),
    (beat(running=["j-1"]), 16.0, "stale", True),
    (None, 4.0, "stale", False),  # joined and never beat: the working cadence
])  # fmt: skip
def test_stale_and_gone_by_the_cadence_allowed(hb: Heartbeat | None, silent_for: float, state: str,
                                               gone: bool) -> None:  # fmt: skip
    now = 1000.0
    conn = node_conn(hb, silent_for, now)
    assert conn.state(now, 3.5) == state
    assert conn.gone(now, 3.5, 15.0) is gone


def test_the_orchestrator_waits_longer_for_a_quiet_node(start_orchestrator: Callable[..., OrchestratorProcess],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Short periods so the test is quick: a busy node is stale 0.6 s after its beat, a quiet one 3 s after.
    for name, value in (("HEARTBEAT_S", "0.2"), ("IDLE_HEARTBEAT_S", "1.0"), ("STALE_AFTER_S", "0.6")):
        monkeypatch.setenv(f"DRAGON_ORCHESTRATOR_{name}", value)
    orch = start_orchestrator()
    with contextlib.ExitStack() as stack:
        for name, hb in (("quiet", beat()), ("busy", beat(local_busy=1))):
            headers = {"Authorization": f"Bearer {orch.keys['node']}", "X-Dragon-Node": name}
            ws = stack.enter_context(connect(orch.ws_url, additional_headers=headers, open_timeout=10, ssl=orch.ws_ssl))
            ws.send(json.dumps({"type": "hello", "v": VERSION, "name": name, "models": [], "share": 0.1,
                                "local_share": 0.8, "cpus": 1, "ram_total": 1}))  # fmt: skip
            welcome = json.loads(ws.recv(timeout=10))
            assert (welcome["heartbeat_s"], welcome["idle_heartbeat_s"]) == (0.2, 1.0)
            ws.send(json.dumps({"type": "confirm", "credential": welcome["credential"]}))
            ws.send(hb.model_dump_json())
        wait_until(lambda: orch.nodes()["busy"]["state"] == "stale", 10, "the busy node to go stale")
        nodes = orch.nodes()
        assert nodes["quiet"]["state"] == "live", nodes["quiet"]
        # Not for good: it goes stale too, later.
        wait_until(lambda: orch.nodes()["quiet"]["state"] == "stale", 10, "the quiet node to go stale")


def test_a_new_heartbeat_changes_the_silence_allowed() -> None:
    """The silence a node's last beat allows is kept per beat (housekeeping reads it for every
    node twice a second): a beat that says work started shortens it at once."""
    now = 1000.0
    conn = node_conn(beat(), 10.0, now)
    assert conn.state(now, 3.5) == "live"
    conn.heartbeat = beat(running=["j-1"])
    assert conn.state(now, 3.5) == "stale"
    conn.heartbeat = beat()
    assert conn.state(now, 3.5) == "live"
