"""A real Redis for the tests that share state through it: one `redis-server` per test session,
on a free loopback port, with a password and no persistence, flushed before each test.

Started by `store.redis_server.start_local_redis` (the helper `dragon up --replicas` uses),
only when a test asks for `redis_url`, and stopped, by the pid we hold, at the session's end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from dragonswarm.store.redis_server import LocalRedis, start_local_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = start_local_redis(tmp_path_factory.mktemp("redis"), persist=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """The session's Redis, empty: what one test wrote is gone before the next starts."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(params=["sqlite", "redis"])
def state_redis(request: pytest.FixtureRequest) -> str | None:
    """Where an orchestrator under test keeps its state, for tests that run on both: None for its
    own SQLite file, else the session's Redis (flushed), started only when this param needs it."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url
