"""The response cache in the Redis that orchestrator replicas share: an answer kept by one
replica is a hit on every other. Each answer is one string key (`rediskeys.response`) that
Redis itself expires after the time to live; how much memory they may take is the Redis
server's to bound (`maxmemory` with an eviction policy), as for any cache in Redis.

redis-py's asyncio client: a lookup is on the request's path and must not hold the event loop.
"""

from __future__ import annotations

import logging
from typing import cast

import redis
import redis.asyncio

from dragonswarm.errors import StoreUnavailable
from dragonswarm.store import rediskeys as rk
from dragonswarm.store.redis import async_client

log = logging.getLogger("dragonswarm.store")


class RedisResponses:
    """`ResponseStore` on a shared Redis, each answer expiring `ttl_s` after it was kept."""

    def __init__(self, client: redis.asyncio.Redis, ttl_s: float) -> None:
        self._r = client
        self._ttl_ms = max(1, round(ttl_s * 1000))

    @classmethod
    def from_url(cls, url: str, ttl_s: float) -> RedisResponses:
        """The cache on the Redis at `url` (the store's `connect` has checked it); it connects on first use."""
        # Bytes, not text: an answer is stored as the JSON bytes it was encoded to.
        return cls(async_client(url, decode_responses=False), ttl_s)

    async def get(self, key: str) -> bytes | None:
        try:
            return cast(bytes | None, await self._r.get(rk.response(key)))
        except redis.RedisError as exc:
            log.warning("the response cache (Redis) failed to read: %s", exc)
            raise StoreUnavailable("the response cache is unavailable") from exc

    async def put(self, key: str, value: bytes) -> None:
        try:
            await self._r.set(rk.response(key), value, px=self._ttl_ms)
        except redis.RedisError as exc:
            log.warning("the response cache (Redis) failed to write: %s", exc)
            raise StoreUnavailable("the response cache is unavailable") from exc

    async def close(self) -> None:
        await self._r.aclose()
