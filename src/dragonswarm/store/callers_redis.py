"""A request's key and usage in the Redis that replicas share (`callers.CallerStore`).

The same keys and the same usage script as the Redis store (`redis.py`), through redis-py's
asyncio client instead of its blocking one in a thread, and with the calls made while a
round trip is out sent together in the next (`Pipelined`). Every request makes two such calls,
and in a replica at 1,000 users they were a tenth of its work: a thread hop and a round trip
each, 320 µs of CPU a usage count with ten at once, against 60 µs here (`bench/results/users.md`).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis
import redis.asyncio

from dragonswarm.errors import StoreUnavailable
from dragonswarm.store import rediskeys as rk
from dragonswarm.store.base import KeyRecord, hash_key
from dragonswarm.store.redis import COUNT, client_options, count_call, key_record
from dragonswarm.store.redis_pipeline import Pipelined

log = logging.getLogger("dragonswarm.store")


class RedisCallers:
    """`CallerStore` on a shared Redis."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._r = client
        self._count = client.register_script(COUNT)
        # A usage count that ran must not run twice; lookups and counts do not depend on each other's order.
        self._calls = Pipelined(client, [self._count], "key lookups and usage counts", repeatable=False)

    @classmethod
    def from_url(cls, url: str) -> RedisCallers:
        """On the Redis at `url` (the store's `connect` has checked it); it connects on first use."""
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, **client_options())
        return cls(redis.asyncio.Redis.from_pool(pool))

    async def find_key(self, key: str) -> KeyRecord | None:
        fields = cast(dict[str, str], await self._shared("find_key", "HGETALL", rk.key(hash_key(key))))
        return key_record(fields) if fields else None

    async def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        keys, args = count_call(rk.USAGE, rk.usage_hour, key_id, model, prompt_tokens, completion_tokens, None)
        await self._shared("record_usage", "EVALSHA", self._count.sha, len(keys), *keys, *args)

    async def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        keys, args = count_call(rk.NODE_USAGE, rk.node_usage_hour, node, model, prompt_tokens, completion_tokens, None)
        await self._shared("record_node_usage", "EVALSHA", self._count.sha, len(keys), *keys, *args)

    async def _shared(self, what: str, *command: str | int) -> Any:
        """The command's answer; a Redis that fails it is `StoreUnavailable` (503), as in `redis.py`."""
        try:
            return await self._calls.command(*command)
        except redis.RedisError as exc:
            log.warning("the shared store (Redis) failed in %s: %s", what, exc)
            raise StoreUnavailable("the orchestrator's shared store is unavailable; retry shortly") from exc

    async def close(self) -> None:
        await self._calls.close()
        await self._r.aclose()
