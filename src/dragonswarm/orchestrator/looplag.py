"""How late the event loop runs: a task that sleeps a short period and records how late it woke.

Everything the orchestrator does shares one event loop: a handler that blocks it for 50 ms
delays every node's heartbeat and every client's tokens by as much. This makes that visible
(in `GET /v1/nodes`) instead of guessed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import TypedDict

PERIOD_S = 0.02  # short enough to see a 20 ms stall, long enough to cost nothing (50 wake-ups a second)
WINDOW_S = 60.0


class LagSummary(TypedDict):
    """Lag over the window, in milliseconds, and how many wake-ups it saw."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    window_s: float


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..100) of values sorted ascending; 0.0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(lags_s: list[float], window_s: float = WINDOW_S) -> LagSummary:
    """p50, p99 and max of these lags (seconds), in milliseconds."""
    ordered = sorted(lags_s)
    return LagSummary(samples=len(ordered), p50_ms=round(percentile(ordered, 50) * 1000, 3),
                      p99_ms=round(percentile(ordered, 99) * 1000, 3),
                      max_ms=round((ordered[-1] if ordered else 0.0) * 1000, 3), window_s=window_s)  # fmt: skip


class LoopLag:
    """Wakes every `period_s` and keeps (when, how late) for the last `window_s`."""

    def __init__(self, period_s: float = PERIOD_S, window_s: float = WINDOW_S):
        self.period_s = period_s
        self.window_s = window_s
        # Bounded: at most one sample per period fits in the window (a late loop gives fewer).
        self.samples: deque[tuple[float, float]] = deque(maxlen=math.ceil(window_s / period_s) + 1)
        self._task: asyncio.Task[None] | None = None

    def record(self, now: float, lag_s: float) -> None:
        self.samples.append((now, max(0.0, lag_s)))

    def summary(self, now: float | None = None) -> LagSummary:
        """p50 / p99 / max over the last window."""
        since = (time.monotonic() if now is None else now) - self.window_s
        return summarize([lag for when, lag in self.samples if when >= since], self.window_s)

    def worst_since(self, since: float) -> float:
        """The longest lag (seconds) recorded since `since` (monotonic)."""
        worst = 0.0
        for when, lag in reversed(self.samples):
            if when < since:
                break
            worst = max(worst, lag)
        return worst

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            self.record(now, now - start - self.period_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="loop-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
