"""Python's cyclic garbage collector, kept from stopping the event loop at thousands of nodes.

Every node connection holds a few hundred objects the collector tracks: its TLS and
WebSocket protocol state, tasks and queues, its parsed hello. At 10,000 nodes a full
collection walks millions of objects and stops the loop for one to two seconds. CPython
3.11 starts one whenever the objects that survived into the old generation since the last
grow by a quarter of those already there, and steady heartbeats do that: each replaces
its node's last one, which had lived long enough to be promoted. `bench/loop_bench`
measured 5 full passes in a steady minute, 10.7 s in all, the longest 2.2 s.

So what has lived through a freeze period is frozen (`gc.freeze`: the collector stops
walking it, reference counting still frees it), and so is everything as soon as a hundred
nodes have joined (a join storm made 24 full passes, 16 s, before all 10,000 were in); new
objects are collected as usual. A full pass over everything (unfreeze, collect, freeze)
runs only when enough frozen objects may have become cyclic garbage: after many nodes
left, or every `FULL_PASS_EVERY_S`, which bounds what a freeze can keep alive.

The automatic passes are made rarer too. A young pass every `YOUNG_THRESHOLD` new objects
instead of 700: each heartbeat parses into hundreds, almost all freed by reference counting
before any pass, so the collector ran about 5 times a second for nothing (312 young passes,
3.2 s, in the steady minute). And no middle or full pass runs on its own: what survives a
young pass waits in the middle generation for the next freeze (at most `FREEZE_EVERY_S`,
half a second in a join storm), and only the passes above walk it after that. A middle pass
walks everything that survived since the last freeze; in a join storm that is thousands of
half-open connections, and its passes held the loop up to 0.28 s each, 8 times while 10,000
nodes joined (`bench/loop_bench`). Cyclic garbage that outlives a young pass is therefore
freed at the next full pass, which is what a freeze already meant.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("dragonswarm.orchestrator")

FREEZE_EVERY_S = 5.0
FREEZE_AFTER_JOINS = 100
FULL_PASS_EVERY_S = 600.0
FULL_PASS_AFTER_LEFT = 0.1  # of the nodes connected at the last full pass
FULL_PASS_MIN_LEFT = 100
YOUNG_THRESHOLD = 20_000  # new objects between two young passes (CPython's default: 700)
# Young passes between two middle ones (the default: 10), and middle passes between two full
# ones: never, in practice (a young pass every few seconds would take years to reach them).
MIDDLE_THRESHOLD = 2**30
OLD_THRESHOLD = 2**30


def freeze_due(joined: int, since_s: float) -> bool:
    """Freeze what lives now: a hundred nodes have joined, or a period has passed."""
    return joined >= FREEZE_AFTER_JOINS or since_s >= FREEZE_EVERY_S


def full_pass_due(left: int, nodes_then: int, since_s: float) -> bool:
    """A full collection is worth its pause when a tenth of the nodes there were (at least
    100) have left since the last one, their connections' cycles frozen with the rest; or
    when the last one is `FULL_PASS_EVERY_S` old, for whatever else became garbage."""
    return since_s >= FULL_PASS_EVERY_S or left >= max(FULL_PASS_MIN_LEFT, FULL_PASS_AFTER_LEFT * nodes_then)


class Collector:
    """Ticked by housekeeping with the registry's node count and its departures so far."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.frozen_at = self.full_at = now
        self.nodes_then = self.departures_then = self.nodes_frozen = 0
        self.thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
        gc.freeze()  # what the server set up before serving lives as long as it does

    def tick(self, nodes: int, departures: int, now: float) -> None:
        if full_pass_due(departures - self.departures_then, self.nodes_then, now - self.full_at):
            start = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            log.debug("full garbage collection: %d objects freed in %.0f ms", found,
                      (time.perf_counter() - start) * 1e3)
            self.full_at = self.frozen_at = now
            self.nodes_then = self.nodes_frozen = nodes
            self.departures_then = departures
        elif freeze_due(nodes - self.nodes_frozen, now - self.frozen_at):
            gc.freeze()
            self.frozen_at, self.nodes_frozen = now, nodes

    def close(self) -> None:
        gc.set_threshold(*self.thresholds)
        gc.unfreeze()
