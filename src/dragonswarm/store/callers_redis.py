"""A request's key and usage in the Redis that replicas share (`callers.CallerStore`).

The same keys and the same usage script as the Redis store (`redis.py`), through redis-py's
asyncio client instead of its blocking one in a thread, and with the calls made while a
round trip is out sent together in the next (`Pipelined`). Every request makes two such
calls. Through a thread each was a hop and a round trip of its own: in a usage-count test,
322 µs of the caller's CPU a call with ten at once, against 63 µs pipelined (docs/scale.md,
"Measured: many users").
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import redis
import redis.asyncio

from dragonswarm.store import rediskeys as rk
from dragonswarm.store.base import KeyRecord, hash_key
from dragonswarm.store.redis import COUNT, async_client, count_call, key_record, unavailable
from dragonswarm.store.redis_pipeline import Pipelined


class RedisCallers:
    """`CallerStore` on a shared Redis. A Redis that fails a call raises `StoreUnavailable`."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._r = client
        self._count = client.register_script(COUNT)
        self._calls = Pipelined(client, [self._count], "key lookups and usage counts")

    @classmethod
    def from_url(cls, url: str) -> RedisCallers:
        """On the Redis at `url` (the store's `connect` has checked it); it connects on first use."""
        return cls(async_client(url))

    async def find_key(self, key: str) -> KeyRecord | None:
        lookup = self._calls.submit_command("HGETALL", rk.key(hash_key(key)), repeatable=True)
        fields = cast(dict[str, str], await self._shared("find_key", lookup))
        return key_record(fields) if fields else None

    async def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        keys, args = count_call(rk.USAGE, rk.usage_hour, key_id, model, prompt_tokens, completion_tokens, None)
        await self._count_once("record_usage", keys, args)

    async def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        keys, args = count_call(rk.NODE_USAGE, rk.node_usage_hour, node, model, prompt_tokens, completion_tokens, None)
        await self._count_once("record_node_usage", keys, args)

    async def _count_once(self, what: str, keys: list[str], args: list[str | int]) -> None:
        # Never sent twice: a count whose connection broke may have run, and would count double.
        await self._shared(what, self._calls.submit(self._count, keys, args, repeatable=False))

    @staticmethod
    async def _shared(what: str, answer: asyncio.Future[Any]) -> Any:
        try:
            return await answer
        except redis.RedisError as exc:
            raise unavailable(what, exc) from exc

    async def close(self) -> None:
        await self._calls.close()
        await self._r.aclose()
