"""Which store the orchestrator keeps its state in: SQLite under its home, or a shared Redis."""

from __future__ import annotations

from pathlib import Path

from dragonswarm.store.base import Store


def open_store(home: Path, redis_url: str | None = None) -> Store:
    """The Redis store when a URL is given (replicas share it; `ConfigError` if it cannot be used),
    else the SQLite file under `home`, as one orchestrator has always kept it."""
    if redis_url:
        from dragonswarm.store.redis import RedisStore  # loaded only when used, like the redis client

        return RedisStore.connect(redis_url)
    from dragonswarm.store.sqlite import open_store as open_sqlite

    return open_sqlite(home)
