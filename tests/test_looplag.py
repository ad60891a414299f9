"""The event-loop lag monitor: its arithmetic on plain values, and the real monitor on a loop
that a test blocks on purpose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from tests.conftest import OrchestratorProcess, wait_until

from dragonswarm.orchestrator.looplag import LoopLag, percentile, summarize


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([], 99) == 0.0 and percentile([7.0], 1) == 7.0


def test_summary_in_milliseconds() -> None:
    s = summarize([0.001] * 98 + [0.050, 0.200])
    assert (s["samples"], s["p50_ms"], s["p99_ms"], s["max_ms"]) == (100, 1.0, 50.0, 200.0)
    assert summarize([])["max_ms"] == 0.0


def test_only_the_last_window_counts_and_memory_is_bounded() -> None:
    lag = LoopLag(period_s=0.02, window_s=60.0)
    lag.record(0.0, 0.5)  # over a minute before the summary: left out
    for i in range(1, 11):
        lag.record(100.0 + i, 0.001 * i)
    assert lag.summary(now=120.0)["samples"] == 10 and lag.summary(now=120.0)["max_ms"] == 10.0
    for i in range(10_000):
        lag.record(200.0 + i * 0.02, 0.0)
    assert len(lag.samples) <= 60 / 0.02 + 1


def test_a_blocked_loop_shows() -> None:
    async def run() -> float:
        lag = LoopLag(period_s=0.01)
        lag.start()
        try:
            await asyncio.sleep(0.05)
            time.sleep(0.15)  # what the monitor is for: something holding the loop
            deadline = time.monotonic() + 10
            while lag.summary()["max_ms"] < 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return lag.summary()["max_ms"]
        finally:
            await lag.close()

    assert asyncio.run(run()) >= 140


@pytest.mark.timeout(60)
def test_admins_see_the_loop_lag(start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    orch = start_orchestrator()

    def loop() -> dict[str, float] | None:
        with orch.client("admin") as c:
            found: dict[str, float] = c.get("/v1/nodes").json()["loop"]
        return found if found["samples"] > 0 else None

    found = wait_until(loop, 10, "loop-lag samples")
    assert set(found) == {"samples", "p50_ms", "p99_ms", "max_ms", "window_s"} and found["window_s"] == 60.0
    assert 0 <= found["p50_ms"] <= found["p99_ms"] <= found["max_ms"]
    with orch.client("admin") as c:
        summary = c.get("/v1/nodes", params={"summary": "true"}).json()
    assert summary["states"] == {"live": 0, "stale": 0} and "data" not in summary and summary["loop"]["samples"] > 0


def test_the_worst_recent_lag() -> None:
    lag = LoopLag(period_s=0.02, window_s=60.0)
    for when, late in ((1.0, 0.5), (5.0, 0.01), (9.0, 2.0), (10.0, 0.0)):
        lag.record(when, late)
    assert lag.worst_since(9.5) == 0.0
    assert lag.worst_since(8.0) == 2.0
    assert lag.worst_since(0.0) == 2.0
    assert LoopLag().worst_since(0.0) == 0.0
