"""The orchestrator's hold on the garbage collector: when a full pass is due, and that a
frozen cycle is still freed by one."""

from __future__ import annotations

import gc
import weakref

from dragonswarm.orchestrator.collector import FREEZE_EVERY_S, FULL_PASS_EVERY_S, Collector, freeze_due, full_pass_due


def test_a_full_pass_waits_for_departures_or_its_period() -> None:
    assert not full_pass_due(left=0, nodes_then=10_000, since_s=60)
    assert not full_pass_due(left=999, nodes_then=10_000, since_s=60)  # under a tenth
    assert full_pass_due(left=1000, nodes_then=10_000, since_s=60)
    assert not full_pass_due(left=99, nodes_then=3, since_s=60)  # a small swarm: at least 100
    assert full_pass_due(left=100, nodes_then=3, since_s=60)
    assert full_pass_due(left=0, nodes_then=10_000, since_s=FULL_PASS_EVERY_S)


def test_a_freeze_follows_a_period_or_a_hundred_joins() -> None:
    assert not freeze_due(joined=99, since_s=1)
    assert freeze_due(joined=100, since_s=0.5)  # a join storm: the connections just made
    assert freeze_due(joined=0, since_s=FREEZE_EVERY_S)


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_a_frozen_cycle_survives_young_passes_and_goes_with_a_full_one() -> None:
    collector = Collector()
    try:
        node = Node()
        gone = weakref.ref(node)
        collector.tick(nodes=1, departures=0, now=collector.frozen_at + FREEZE_EVERY_S)  # frozen: it has lived a period
        del node
        gc.collect()
        assert gone() is not None  # frozen objects are not walked, even by a full collection
        collector.tick(nodes=0, departures=100, now=collector.frozen_at + 1)  # 100 left: a full pass
        assert gone() is None
    finally:
        collector.close()


def test_the_collector_runs_rarely_while_it_holds_and_as_before_after() -> None:
    before = gc.get_threshold()
    collector = Collector()
    try:
        young, _, old = gc.get_threshold()
        assert young > before[0] and old > before[2]  # fewer young passes, automatic full ones only a fallback
    finally:
        collector.close()
    assert gc.get_threshold() == before
