"""Per-key rate limits: requests and tokens per minute, as token buckets (pure, no clock of its own).

A request is charged at admission: one request, and its token estimate (prompt plus the
most it may generate). When it ends, the tokens it did not use are given back, so a key
is held to what it really consumed while no request can overrun the limit mid-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Bucket:
    capacity: float  # the per-minute limit
    level: float
    at: float  # when `level` was last brought up to date

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * rate)
        self.at = now

    def wait_for(self, cost: float) -> float:
        """Seconds until `cost` fits (0 if it fits now)."""
        deficit = min(cost, self.capacity) - self.level
        return 0.0 if deficit <= 0 else deficit / (self.capacity / 60.0)


@dataclass
class RateLimiter:
    """Requests per minute and tokens per minute per key; 0 turns a limit off."""

    rpm: int
    tpm: int
    _buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)

    def _bucket(self, key: str, kind: str, capacity: int, now: float) -> Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = Bucket(capacity, capacity, now)
        bucket.refill(now)
        return bucket

    def admit(self, key: str, tokens: int, now: float) -> int:
        """Charge a request; 0 if admitted, else the whole seconds to wait (nothing is charged)."""
        checks = [(kind, cap, cost) for kind, cap, cost in (("req", self.rpm, 1), ("tok", self.tpm, tokens)) if cap]
        waits = [self._bucket(key, kind, cap, now).wait_for(cost) for kind, cap, cost in checks]
        if any(w > 0 for w in waits):
            return max(1, math.ceil(max(waits)))
        for kind, cap, cost in checks:
            self._bucket(key, kind, cap, now).level -= min(cost, cap)
        return 0

    def refund(self, key: str, tokens: int, now: float) -> None:
        """Give back tokens charged at admission but not used."""
        if self.tpm and tokens > 0:
            bucket = self._bucket(key, "tok", self.tpm, now)
            bucket.level = min(bucket.capacity, bucket.level + tokens)
