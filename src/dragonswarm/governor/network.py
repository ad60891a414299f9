"""The network: the machine's traffic and link speed, the swarm link's round-trip time, and when
the owner's traffic makes the link too busy to carry work for others.

The only module that reads network counters (psutil). The decisions are pure functions of plain
values; `NetworkMeter` only samples.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass

import psutil

# The owner saturates the link at 80% of its speed: past that, TCP queues build and every packet
# (the owner's and our streamed tokens alike) waits; below it, bursts still have room.
SATURATED_SHARE = 0.8
# Most links report no speed (Wi-Fi, VMs), and a LAN's 1 Gbit/s says nothing of the 50 Mbit/s uplink
# behind the router. A queue on a full link shows anyway as the round-trip time rising far above the
# path's own: five times its lowest seen, and at least 200 ms so that a fast LAN's jitter
# (1 ms -> 5 ms) or a CPU-capped node's event loop (held up to one 100 ms CFS period) never counts.
RTT_RISE = 5.0
RTT_QUEUE_S = 0.2
# A sustained rise, not one slow pong: the lowest of the last three round trips (about six seconds
# of pings) must be high, so that one pause of either event loop does not take a node out of service.
RTT_WINDOW = 3
# Busy stays busy this long after the last saturated reading: an owner's transfers come in bursts
# (page loads, a paused download), and work placed in a gap would meet the next burst; it also keeps
# a node from entering and leaving the orchestrator's index at every heartbeat.
NET_HOLD_S = 5.0
# Link speeds and loopback flags hardly ever change; reading them for every NIC each second would
# cost more than the counters themselves on a host with many virtual interfaces.
NIC_REFRESH_S = 30.0
BYTES_PER_MBIT = 125_000  # psutil reports link speed in Mbit/s
# What some drivers report for "unknown": -1 as an unsigned 16- or 32-bit number.
UNKNOWN_SPEEDS = frozenset({0xFFFF, 0xFFFFFFFF})


def is_loopback(name: str, flags: str = "") -> bool:
    """Loopback traffic never leaves the machine: it cannot fill the link. `flags` as psutil gives them."""
    # "lo" on Linux, "lo0" on macOS and the BSDs, "Loopback Pseudo-Interface 1" on Windows.
    if re.fullmatch(r"lo\d*", name) or name.lower().startswith("loopback"):
        return True
    return "loopback" in flags.split(",")


def nic_speed_bps(mbit: int) -> float:
    """A NIC's speed in bytes per second from psutil's Mbit/s; 0 when unknown."""
    return 0.0 if mbit <= 0 or mbit in UNKNOWN_SPEEDS else float(mbit * BYTES_PER_MBIT)


def rate(before: int, after: int, elapsed_s: float) -> float:
    """Bytes per second between two counter readings; a counter that went back (a NIC that went away,
    a reset) reads as 0 for that interval, never negative."""
    return max(0, after - before) / max(elapsed_s, 1e-3)


def owner_bps(machine_bps: float, ours_bps: float) -> float:
    """The owner's traffic: the machine's less our own swarm link's, clamped at 0 (our figure counts
    message bytes, the machine's counts them again with headers, so the difference is an estimate)."""
    return max(0.0, machine_bps - ours_bps)


def link_saturated(owner_bps: float, link_bps: float, rtt_s: float | None, rtt_floor_s: float | None) -> bool:
    """The owner's traffic fills the link: by the link's known speed (`link_bps` 0 means unknown), or by
    the round-trip time to the orchestrator sustained far above its floor."""
    if link_bps > 0 and owner_bps >= SATURATED_SHARE * link_bps:
        return True
    if rtt_s is None or rtt_floor_s is None:
        return False
    return rtt_s >= RTT_QUEUE_S and rtt_s >= RTT_RISE * rtt_floor_s


def held_busy(busy_now: bool, last_busy_at: float | None, now: float, hold_s: float = NET_HOLD_S) -> bool:
    """Busy now, or saturated no longer ago than `hold_s`."""
    return busy_now or (last_busy_at is not None and now - last_busy_at <= hold_s)


class RttTracker:
    """Round-trip times of one connection: the latest, the floor (lowest seen) and the sustained level.

    Fed with times, so that it is tested with plain values. One per connection: a new connection may
    take a new path, with a floor of its own.
    """

    def __init__(self, window: int = RTT_WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self.floor: float | None = None
        self._pending_since: float | None = None

    def sent(self, now: float) -> None:
        self._pending_since = now

    def received(self, now: float) -> float:
        """The pong for the ping sent last has come: record its round trip, which is returned."""
        if self._pending_since is None:
            raise ValueError("no ping is waiting for its pong")
        rtt = max(0.0, now - self._pending_since)
        self._pending_since = None
        self._recent.append(rtt)
        self.floor = rtt if self.floor is None else min(self.floor, rtt)
        return rtt

    def _values(self, now: float) -> list[float]:
        values = list(self._recent)
        if values and self._pending_since is not None:
            # A late pong already tells the round trip is at least this long: a queue that is building
            # must not hide behind the last answer that came back.
            waited = now - self._pending_since
            if waited > values[-1]:
                values = [*values[1:], waited] if len(values) == self._recent.maxlen else [*values, waited]
        return values

    def latest(self, now: float) -> float | None:
        """The last round trip, or the wait for an unanswered ping if longer; None before the first pong."""
        values = self._values(now)
        return values[-1] if values else None

    def sustained(self, now: float) -> float | None:
        """The lowest of the recent round trips: high only when every recent one was."""
        values = self._values(now)
        return min(values) if values else None


class Rates:
    """Bytes per second sent and received, from running byte totals read now and then."""

    def __init__(self, sent: int, recv: int, at: float) -> None:
        self._last = (sent, recv, at)

    def update(self, sent: int, recv: int, at: float) -> tuple[float, float]:
        last_sent, last_recv, last_at = self._last
        self._last = (sent, recv, at)
        elapsed = at - last_at
        return rate(last_sent, sent, elapsed), rate(last_recv, recv, elapsed)


@dataclass(frozen=True, slots=True)
class NetSample:
    sent_bps: float  # the machine's bytes sent per second, loopback left out
    recv_bps: float
    link_bps: float  # the links' summed speed in bytes per second; 0 when unknown


class NetworkMeter:
    """The machine's traffic on its real (non-loopback) interfaces, and their link speed."""

    def __init__(self) -> None:
        self._loopback: set[str] = set()  # NICs flagged loopback whatever their name
        self.link_bps = 0.0
        self._nics_at: float | None = None
        sent, recv = self.totals()
        self._rates = Rates(sent, recv, time.monotonic())

    def _refresh_nics(self, now: float) -> None:
        try:
            stats = psutil.net_if_stats()
        except OSError:  # some sandboxes refuse the ioctl: then names alone tell loopback, speed unknown
            stats = {}
        # `flags` came with psutil 5.9.3.
        self._loopback = {n for n, s in stats.items() if is_loopback(n, getattr(s, "flags", ""))}
        up = [s for n, s in stats.items() if s.isup and n not in self._loopback]
        self.link_bps = sum((nic_speed_bps(s.speed) for s in up), 0.0)
        self._nics_at = now

    def totals(self) -> tuple[int, int]:
        """Bytes sent and received since boot on the interfaces that are not loopback."""
        now = time.monotonic()
        if self._nics_at is None or now - self._nics_at >= NIC_REFRESH_S:
            self._refresh_nics(now)
        sent = recv = 0
        for name, io in psutil.net_io_counters(pernic=True).items():
            if name not in self._loopback and not is_loopback(name):
                sent += io.bytes_sent
                recv += io.bytes_recv
        return sent, recv

    def sample(self) -> NetSample:
        """Traffic per second since the last sample, and the link speed."""
        sent, recv = self.totals()
        sent_bps, recv_bps = self._rates.update(sent, recv, time.monotonic())
        return NetSample(sent_bps, recv_bps, self.link_bps)
