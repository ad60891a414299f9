"""Where the orchestrator's response cache keeps answers: the interface, and which backend.

A backend maps a cache key (a sha256, see `orchestrator/cache.py`) to one answer's bytes,
for a time to live. Two implementations: a SQLite file under the home for one orchestrator
(`responses_sqlite.py`, bounded in size, oldest out first), and the Redis that replicas
share (`responses_redis.py`, where Redis expires each entry). Every call is awaited on the
event loop and never holds it: SQLite runs in a thread, Redis through its asyncio client.
A backend that fails raises `StoreUnavailable`; the cache then answers as if it held nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ResponseStore(Protocol):
    """Answers by cache key, each kept for the backend's time to live."""

    async def get(self, key: str) -> bytes | None:
        """The answer kept under `key`, or None (never kept, expired or evicted)."""

    async def put(self, key: str, value: bytes) -> None:
        """Keep an answer under `key` (replacing one kept before) for the time to live."""

    async def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""


def open_responses(home: Path, redis_url: str | None, ttl_s: float, max_bytes: int) -> ResponseStore:
    """The Redis backend when a URL is given (replicas share its answers), else `responses.db`
    under `home`, at most `max_bytes` of answers. Like `store.backends.open_store`, each backend
    and its client library are loaded only when used."""
    if redis_url:
        from dragonswarm.store.responses_redis import RedisResponses

        return RedisResponses.from_url(redis_url, ttl_s)
    from dragonswarm.store.responses_sqlite import SqliteResponses

    return SqliteResponses(home / "responses.db", ttl_s, max_bytes)
