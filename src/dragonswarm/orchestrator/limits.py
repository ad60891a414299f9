"""The rate limiter the orchestrator calls: this process's own, or the windows replicas share in Redis.

Both keep the sliding window of `scheduler/ratelimit.py`; the API awaits them on its event
loop. The in-process one answers at once; the Redis one (`store/redis_limits.py`) makes
one round trip per call without holding the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dragonswarm.scheduler.ratelimit import Charge, RateLimiter, Refusal
from dragonswarm.settings import OrchestratorSettings


class Limiter(Protocol):
    """Requests and tokens per minute per lane (a key, or a node speaking for itself)."""

    async def admit(self, key: str, tokens: int) -> Charge | Refusal:
        """Charge a request of at most `tokens` tokens, or say why not and for how long (charging
        nothing; `wait` None: it never fits). A shared limiter may raise `StoreUnavailable`."""

    async def refund(self, charge: Charge, used: int) -> None:
        """Lower a charge to what the request used (never below 0, never above the charge). Never raises."""

    async def cancel(self, charge: Charge) -> None:
        """Take back an admission whose request was refused before it began. Never raises."""

    async def close(self) -> None:
        """Release connections; the limiter is unusable afterwards."""


@dataclass
class LocalLimiter:
    """`Limiter` over this process's own `RateLimiter`, on a monotonic clock: one orchestrator."""

    limits: RateLimiter
    clock: Callable[[], float] = field(default=time.monotonic)

    async def admit(self, key: str, tokens: int) -> Charge | Refusal:
        return self.limits.admit(key, tokens, self.clock())

    async def refund(self, charge: Charge, used: int) -> None:
        self.limits.refund(charge, used)

    async def cancel(self, charge: Charge) -> None:
        self.limits.cancel(charge)

    async def close(self) -> None:
        pass


def make_limiter(settings: OrchestratorSettings) -> Limiter:
    """Redis's shared windows when the orchestrator has `--redis`, else its own."""
    if settings.redis is not None:
        from dragonswarm.store.redis_limits import RedisRateLimiter

        return RedisRateLimiter.from_url(settings.redis.get_secret_value(), settings.rate_rpm, settings.rate_tpm)
    return LocalLimiter(RateLimiter(settings.rate_rpm, settings.rate_tpm))
