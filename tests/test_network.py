"""The network: the busy-link decision and the round-trip tracker with plain values, the machine's
counters for real, and the figures end to end from a real node through a real orchestrator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import OrchestratorProcess, wait_until

from dragonswarm.governor.network import (
    NET_HOLD_S,
    SATURATED_SHARE,
    NetworkMeter,
    Rates,
    RttTracker,
    held_busy,
    is_loopback,
    link_saturated,
    nic_speed_bps,
    owner_bps,
    rate,
)
from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.protocol.swarm import VERSION, Heartbeat, Hello, ProtocolError, dump, parse_node_message
from dragonswarm.status import human_rate, nodes_table

LINK = 12_500_000.0  # 100 Mbit/s in bytes per second

# --- the busy-link decision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "link", "rtt", "floor", "busy"),
    [
        (SATURATED_SHARE * LINK, LINK, None, None, True),  # 80% of a known link
        (LINK * 1.5, LINK, None, None, True),  # more than the link (headers, bursts): still busy
        (0.79 * LINK, LINK, None, None, False),
        (0.0, LINK, 0.001, 0.001, False),
        (1e12, 0.0, None, None, False),  # link speed unknown, no round trip yet: no evidence
        (1e12, 0.0, 0.004, 0.002, False),  # ...and the round trip is as usual
        (0.0, 0.0, 0.25, 0.01, True),  # a queue: 25x the floor and over 200 ms
        (0.0, LINK, 0.25, 0.01, True),  # the link's speed says little of the uplink behind it
        (0.0, 0.0, 0.19, 0.001, False),  # far above a LAN's floor, but not yet a queue worth the name
        (0.0, 0.0, 0.3, 0.1, False),  # a far orchestrator: 3x its floor is jitter, not a queue
        (0.0, 0.0, 0.5, 0.1, True),  # 5x
        (0.0, 0.0, 0.5, None, False),
        (0.0, 0.0, None, 0.01, False),
    ],
)
def test_link_saturated(owner: float, link: float, rtt: float | None, floor: float | None, busy: bool) -> None:
    assert link_saturated(owner, link, rtt, floor) is busy


def test_owner_traffic_is_the_machines_less_ours() -> None:
    assert owner_bps(1000.0, 300.0) == 700.0
    # Our figure counts messages, the machine's counts them again with headers: never negative.
    assert owner_bps(300.0, 1000.0) == 0.0


def test_busy_is_held_through_short_gaps() -> None:
    assert held_busy(True, None, 100.0)
    assert held_busy(False, 100.0, 100.0 + NET_HOLD_S)
    assert not held_busy(False, 100.0, 100.0 + NET_HOLD_S + 0.1)
    assert not held_busy(False, None, 100.0)


def test_rates_and_counters() -> None:
    assert rate(1000, 3000, 2.0) == 1000.0
    assert rate(5000, 1000, 1.0) == 0.0  # a NIC went away: its bytes left the total
    assert rate(0, 10, 0.0) > 0  # no division by zero when two readings share a clock tick
    rates = Rates(0, 0, 10.0)
    assert rates.update(500, 2000, 11.0) == (500.0, 2000.0)
    assert rates.update(1500, 2000, 13.0) == (500.0, 0.0)  # since the last reading, not since the start


@pytest.mark.parametrize(
    ("name", "flags", "loopback"),
    [("lo", "", True), ("lo0", "", True), ("Loopback Pseudo-Interface 1", "", True),
     ("eth0", "up,broadcast,running,multicast", False), ("wlan0", "", False), ("lowpan0", "up", False),
     ("vrf-lo", "up,loopback,running", True)],
)  # fmt: skip
def test_is_loopback(name: str, flags: str, loopback: bool) -> None:
    assert is_loopback(name, flags) is loopback


def test_nic_speed() -> None:
    assert nic_speed_bps(100) == LINK
    assert nic_speed_bps(0) == 0.0
    assert nic_speed_bps(-1) == 0.0
    assert nic_speed_bps(0xFFFF) == 0.0 and nic_speed_bps(0xFFFFFFFF) == 0.0  # drivers' "unknown"


# --- the round trip ---------------------------------------------------------------------------------


def test_rtt_before_the_first_pong() -> None:
    rtt = RttTracker()
    assert rtt.latest(0.0) is None and rtt.sustained(0.0) is None and rtt.floor is None
    rtt.sent(0.0)
    assert rtt.latest(5.0) is None  # no round trip to compare a wait with yet
    with pytest.raises(ValueError):
        RttTracker().received(1.0)


def test_rtt_floor_latest_and_sustained() -> None:
    rtt = RttTracker(window=3)
    for at, took in ((0.0, 0.010), (2.0, 0.004), (4.0, 0.008)):
        rtt.sent(at)
        rtt.received(at + took)
    assert rtt.floor == pytest.approx(0.004)
    assert rtt.latest(5.0) == pytest.approx(0.008)
    assert rtt.sustained(5.0) == pytest.approx(0.004)

    # One slow pong (an event loop's pause): the latest shows it, the sustained level does not.
    rtt.sent(6.0)
    rtt.received(6.9)
    assert rtt.latest(7.0) == pytest.approx(0.9)
    assert not link_saturated(0.0, 0.0, rtt.sustained(7.0), rtt.floor)
    # Every recent one slow: a queue.
    for at in (8.0, 10.0):
        rtt.sent(at)
        rtt.received(at + 0.5)
    assert rtt.sustained(11.0) == pytest.approx(0.5)
    assert link_saturated(0.0, 0.0, rtt.sustained(11.0), rtt.floor)
    assert rtt.floor == pytest.approx(0.004)  # the floor is the path's own, whatever came since


def test_a_late_pong_counts_before_it_comes() -> None:
    rtt = RttTracker(window=3)
    for at in (0.0, 2.0, 4.0):
        rtt.sent(at)
        rtt.received(at + 0.3)
    rtt.sent(6.0)
    assert rtt.latest(6.1) == pytest.approx(0.3)  # not late yet
    assert rtt.latest(9.0) == pytest.approx(3.0)  # three seconds without a pong: at least that
    assert rtt.sustained(9.0) == pytest.approx(0.3)


# --- the machine's counters, for real ---------------------------------------------------------------


def test_loopback_traffic_is_not_counted() -> None:
    """Bytes between two local sockets never reach a real link: they must not make the owner busy."""
    size = 64 << 20
    meter = NetworkMeter()
    with socket.create_server(("127.0.0.1", 0)) as server:
        received = [0]

        def drain() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received[0] += len(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        sent_before, recv_before = meter.totals()
        with socket.create_connection(server.getsockname()) as client:
            client.sendall(b"\0" * size)
        reader.join(60)
        sent_after, recv_after = meter.totals()
    assert received[0] == size
    # Counted, loopback would add the whole transfer to both directions.
    assert sent_after - sent_before < size / 2
    assert recv_after - recv_before < size / 2
    sample = meter.sample()
    assert sample.sent_bps >= 0 and sample.recv_bps >= 0 and sample.link_bps >= 0


# --- the heartbeat's fields ---------------------------------------------------------------------------

OLD_HEARTBEAT = {"type": "heartbeat", "cpu_total": 0.1, "cpu_ours": 0.0, "owner_load": 0.1, "owner_busy": False,
                 "ram_available": 1, "share_in_force": 0.5, "local_busy": 0}  # fmt: skip


def test_a_heartbeat_without_network_figures_still_validates() -> None:
    hb = parse_node_message(dump(Heartbeat.model_validate(OLD_HEARTBEAT)))
    assert isinstance(hb, Heartbeat)
    assert hb.rtt_ms is None and hb.net_busy is False and hb.net_recv_bps == 0.0 and hb.swarm_sent_bytes == 0


@pytest.mark.parametrize(
    "bad", [{"net_recv_bps": -1.0}, {"swarm_sent_bps": -0.5}, {"rtt_ms": -3.0}, {"swarm_recv_bytes": -1},
            {"net_busy": "yes"}, {"rtt_ms": "fast"}],
)  # fmt: skip
def test_network_figures_are_bounded(bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_node_message(json.dumps({**OLD_HEARTBEAT, **bad}))


def test_the_orchestrator_places_by_the_heartbeats_network() -> None:
    hello = Hello(v=VERSION, name="w1", models=[], share=0.5, local_share=1.0, cpus=2, ram_total=1)
    conn = NodeConn(hello=hello, send=lambda _: None, close=lambda _code, _reason: None)
    assert conn.placement_state(time.monotonic(), 5.0).rtt_ms is None
    conn.heartbeat = Heartbeat.model_validate({**OLD_HEARTBEAT, "rtt_ms": 12.5, "net_busy": True})
    state = conn.placement_state(time.monotonic(), 5.0)
    assert state.rtt_ms == 12.5 and state.net_busy
    assert conn.record(time.monotonic(), 5.0).info["rtt_ms"] == 12.5


# --- `dragon status` -----------------------------------------------------------------------------------


def test_human_rates() -> None:
    assert [human_rate(b) for b in (0, 950, 999.6, 1234, 12_345, 3.4e7, 2e9, -5)] == [
        "0B/s", "950B/s", "1.0kB/s", "1.2kB/s", "12kB/s", "34MB/s", "2.0GB/s", "0B/s"]  # fmt: skip


def test_status_shows_the_network() -> None:
    nodes = [
        {"name": "w1", "state": "live", "models": [{"name": "tiny"}], "share": 0.1, "cpu_total": 0.25,
         "owner_busy": False, "net_busy": True, "net_recv_bps": 1.2e6, "net_sent_bps": 30_000.0,
         "swarm_recv_bps": 0.0, "swarm_sent_bps": 350.0, "rtt_ms": 0.42, "last_seen": 100.0},
        {"name": "w2", "state": "live", "models": [], "cpu_total": 0.5, "owner_busy": True, "net_recv_bps": 0.0,
         "net_sent_bps": 0.0, "rtt_ms": 48.0, "last_seen": 100.0},
        {"name": "old", "state": "gone", "last_seen": 0.0},  # seen before nodes sent network figures
    ]  # fmt: skip
    lines = [line.split("  ") for line in nodes_table(nodes, now=101.0).splitlines()]
    rows = [[cell.strip() for cell in line if cell.strip()] for line in lines]
    assert rows[0][4:8] == ["CPU", "NET IN/OUT", "SWARM IN/OUT", "RTT"]
    assert rows[1][4:9] == ["25%", "1.2MB/s 30kB/s", "0B/s 350B/s", "0.4ms", "net busy"]
    assert rows[2][4:9] == ["50%", "0B/s 0B/s", "0B/s 0B/s", "48ms", "busy"]
    assert rows[3][2:9] == ["-", "-", "-", "-", "-", "-", "idle"]


# --- end to end -------------------------------------------------------------------------------------------


def test_nodes_report_round_trip_and_swarm_traffic(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(1)
    w1 = wait_until(lambda: (n := orch.nodes()["w1"]).get("rtt_ms") is not None and n, 30, "a measured round trip")
    # Loopback: well under a millisecond when idle; a busy two-core CI machine may hold an event loop a while.
    assert 0 < w1["rtt_ms"] < 1000
    assert w1["net_busy"] is False
    assert w1["net_recv_bps"] >= 0 and w1["net_sent_bps"] >= 0 and w1["net_link_bps"] >= 0
    assert w1["swarm_sent_bytes"] > 0 and w1["swarm_recv_bytes"] > 0  # hello and heartbeats; welcome
    # Heartbeats are our own traffic: a connected node always sends some.
    wait_until(lambda: orch.nodes()["w1"]["swarm_sent_bps"] > 0, 30, "our heartbeats counted as swarm traffic")

    # The orchestrator sends a node nothing but work (pings are not messages): a fragment's prompt shows.
    before = orch.nodes()["w1"]
    prompt = "the quick brown fox jumps over the lazy dog " * 20
    with orch.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["dragon"]["nodes"] == ["w1"]
    wanted = before["swarm_recv_bytes"] + len(prompt)
    wait_until(lambda: orch.nodes()["w1"]["swarm_recv_bytes"] >= wanted, 30, "the fragment counted as received")


def test_dragon_status_shows_the_network(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(1)
    wait_until(lambda: orch.nodes()["w1"].get("rtt_ms") is not None, 30, "a measured round trip")
    args = ["status", "--url", orch.url, "--key", orch.keys["admin"], "--ca", str(orch.ca)]
    status = subprocess.run([sys.executable, "-m", "dragonswarm.cli", *args], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()[:2]
    assert "NET IN/OUT" in header and "SWARM IN/OUT" in header and "RTT" in header
    assert row.split()[0] == "w1" and "ms" in row and "B/s" in row and "net busy" not in row
