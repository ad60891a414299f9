"""What every request asks of the orchestrator's store: the record of the key it came with,
and, once it ends, its usage. Awaited on the event loop, which they never hold.

Two implementations, as for the response cache (`responses.py`): the blocking `Store` of one
orchestrator (its SQLite file) called in a thread (`InThreads`); and the Redis that replicas
share, through redis-py's asyncio client, the calls of a wave of requests in one pipeline
(`callers_redis.py`), which raises `StoreUnavailable` when Redis fails.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from dragonswarm.store.base import KeyRecord, Store


class CallerStore(Protocol):
    """A request's key and usage, over the orchestrator's store."""

    async def find_key(self, key: str) -> KeyRecord | None:
        """As `Store.find_key`: the record of a plaintext key (revoked and expired ones too), or None."""

    async def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """As `Store.record_usage`, now."""

    async def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """As `Store.record_node_usage`, now."""

    async def close(self) -> None:
        """Release what it holds of its own; the store it reads is closed by its owner."""


@dataclass
class InThreads:
    """`CallerStore` over a blocking `Store`: each call in a thread, so the loop never waits on a lock."""

    store: Store

    async def find_key(self, key: str) -> KeyRecord | None:
        return await asyncio.to_thread(self.store.find_key, key)

    async def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        await asyncio.to_thread(self.store.record_usage, key_id, model, prompt_tokens, completion_tokens)

    async def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        await asyncio.to_thread(self.store.record_node_usage, node, model, prompt_tokens, completion_tokens)

    async def close(self) -> None:
        pass


def open_callers(store: Store, redis_url: str | None) -> CallerStore:
    """The Redis one when the orchestrator has `--redis` (`store` is then the same Redis's), else `store` in threads."""
    if redis_url:
        from dragonswarm.store.callers_redis import RedisCallers

        return RedisCallers.from_url(redis_url)
    return InThreads(store)
