"""How often a node reports: every `heartbeat_s` while it works, less often while it is quiet.

A quiet node (nothing running, for the swarm or for its owner) that changes nothing tells
the orchestrator nothing new with each beat; with ten thousand of them, beats that say
nothing are most of the orchestrator's work. Such a node may wait `idle_heartbeat_s`
between beats; anything placement reads (running jobs, the owner's or the network's
business, loaded models) goes out at the next `heartbeat_s` tick. The orchestrator sends
both periods in `welcome` and judges a node stale by the period its last beat allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dragonswarm.protocol.swarm import Heartbeat

# What placement reads from a heartbeat: a change in any of these is reported at once.
# Load and network figures drift all the time; a quiet node's drift is not worth a beat.
WATCHED = ("owner_busy", "net_busy", "gpu_owner_busy", "lending_paused", "local_busy", "loaded", "running")


def quiet(hb: Heartbeat) -> bool:
    """Nothing runs on the node: not our fragments, not its owner's requests."""
    return not hb.running and hb.local_busy == 0


def changed(before: Heartbeat, after: Heartbeat) -> bool:
    """Something placement reads differs between two heartbeats."""
    return any(getattr(before, f) != getattr(after, f) for f in WATCHED)


@dataclass(frozen=True, slots=True)
class Cadence:
    """The reporting periods an orchestrator allows its nodes (sent in `welcome`)."""

    heartbeat_s: float = 1.0
    idle_heartbeat_s: float | None = None  # None: every beat goes out (an orchestrator before this field)

    def due(self, last_sent: Heartbeat | None, beat: Heartbeat, since_sent_s: float) -> bool:
        """Whether the node sends `beat`, built at its `heartbeat_s` tick, `since_sent_s` after its last one."""
        if last_sent is None or self.idle_heartbeat_s is None:
            return True
        if not (quiet(last_sent) and quiet(beat)) or changed(last_sent, beat):
            return True
        # Ticks come every heartbeat_s, a little late each: the tick nearest the idle period sends.
        return since_sent_s >= self.idle_heartbeat_s - self.heartbeat_s / 2

    def period(self, last: Heartbeat | None) -> float:
        """The longest a node may stay silent after sending `last` (None: it has sent no beat yet)."""
        return self.period_when(last is not None and quiet(last))

    def period_when(self, is_quiet: bool) -> float:
        """The reporting period of a node that is quiet or not."""
        if not is_quiet or self.idle_heartbeat_s is None:
            return self.heartbeat_s
        return max(self.heartbeat_s, self.idle_heartbeat_s)

    def averaged(self, last_sent: Heartbeat | None, beat: Heartbeat, since_sent_s: float) -> Heartbeat:
        """`beat` with our link's rates over the time since the last beat sent, not the last tick:
        the ticks a quiet node skipped sent nothing, so the last tick's rate would read zero."""
        if last_sent is None or since_sent_s <= 0:
            return beat
        sent = max(0, beat.swarm_sent_bytes - last_sent.swarm_sent_bytes)
        recv = max(0, beat.swarm_recv_bytes - last_sent.swarm_recv_bytes)
        return beat.model_copy(update={"swarm_sent_bps": round(sent / since_sent_s, 1),
                                       "swarm_recv_bps": round(recv / since_sent_s, 1)})  # fmt: skip

    def slack(self, last: Heartbeat | None) -> float:
        """How many times longer than a working node's this node's silence may be: it scales the
        stale and gone thresholds, which are set for a node beating every `heartbeat_s`."""
        return self.period(last) / self.heartbeat_s
