"""A request's key and usage through `CallerStore`, on a real SQLite file and a real Redis.

What every request asks of the store goes through it: the key must read as the store reads
it, and usage must count exactly as the store counts it, however many requests end at once
and across a Redis restart. On Redis, the calls of concurrent requests share pipelines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from dragonswarm.errors import StoreUnavailable
from dragonswarm.store.base import KeyRecord, NodeUsage, Store
from dragonswarm.store.callers import CallerStore, InThreads, open_callers
from dragonswarm.store.callers_redis import RedisCallers
from dragonswarm.store.redis import RedisStore
from dragonswarm.store.redis_server import start_local_redis
from dragonswarm.store.sqlite import SqliteStore

T = TypeVar("T")


def run(store: Store, url: str | None, body: Callable[[CallerStore], Awaitable[T]]) -> T:
    """Run `body` with the callers' store the orchestrator would open, closed afterwards."""

    async def main() -> T:
        callers = open_callers(store, url)
        try:
            return await body(callers)
        finally:
            await callers.close()

    return asyncio.run(main())


@pytest.fixture
def state(state_redis: str | None, tmp_path: Path) -> Iterator[tuple[Store, str | None]]:
    """The orchestrator's store, and its Redis URL (None: its own SQLite file)."""
    store: Store = RedisStore.connect(state_redis) if state_redis else SqliteStore(tmp_path / "state.db")
    yield store, state_redis
    store.close()


def test_the_backend_follows_the_redis_url(state: tuple[Store, str | None]) -> None:
    store, url = state
    kind = run(store, url, lambda callers: asyncio.sleep(0, type(callers)))
    assert kind is (RedisCallers if url else InThreads)


def test_a_key_reads_as_the_store_reads_it(state: tuple[Store, str | None]) -> None:
    store, url = state
    user, user_record = store.create_key("user", "u")
    admin, admin_record = store.create_key("admin", "a", expires=2e9, cache=False)
    store.revoke_key(str(user_record.id))

    async def body(callers: CallerStore) -> list[object]:
        return list(await asyncio.gather(callers.find_key(user), callers.find_key(admin),
                                         callers.find_key(user + "x"), callers.find_key("")))  # fmt: skip

    found = run(store, url, body)
    assert found == [store.find_key(user), admin_record, None, None]
    assert isinstance(found[0], KeyRecord) and found[0].revoked is not None  # revoked since it was made


def test_usage_counts_as_the_store_counts_it(state: tuple[Store, str | None]) -> None:
    store, url = state
    _, record = store.create_key("user", "u")

    async def body(callers: CallerStore) -> None:
        await callers.record_usage(record.id, "coder", 10, 3)
        await callers.record_usage(record.id, "chat", 1, 2)
        await callers.record_node_usage("w1", "coder", 7, 5)

    run(store, url, body)
    assert store.usage_by_key() == {record.id: (2, 11, 5)}
    assert store.list_node_usage() == [NodeUsage("w1", "coder", 1, 7, 5)]
    assert [(u.model, u.requests) for u in store.list_usage(since=0)] == [("chat", 1), ("coder", 1)]  # in the hour too


def test_a_wave_of_requests_counts_each_once(state: tuple[Store, str | None]) -> None:
    """Requests ending together (on Redis, in shared pipelines): each counted, none twice."""
    store, url = state
    keys = [store.create_key("user", f"u{i}") for i in range(5)]
    if url:  # the usage script unknown to Redis: the first batch is refused it, then sent again
        with redis.Redis.from_url(url) as client:
            client.script_flush()

    async def body(callers: CallerStore) -> None:
        async def request(i: int) -> None:
            key, record = keys[i % len(keys)]
            assert await callers.find_key(key) == record
            await callers.record_usage(record.id, "m", 2, 1)

        await asyncio.gather(*(request(i) for i in range(300)))

    run(store, url, body)
    assert store.usage_by_key() == {record.id: (60, 120, 60) for _, record in keys}


def test_bad_counts_are_refused_and_nothing_is_counted(state: tuple[Store, str | None]) -> None:
    store, url = state
    _, record = store.create_key("user", "u")
    with pytest.raises(ValueError):
        run(store, url, lambda callers: callers.record_usage(record.id, "m", -1, 1))
    with pytest.raises(ValueError):
        run(store, url, lambda callers: callers.record_node_usage("w1", "m", 1, -1))
    assert store.usage_by_key() == {} and store.list_node_usage() == []


def test_redis_restarted_under_a_wave_answers_and_counts_once(tmp_path: Path) -> None:
    """A restart breaks every pooled connection and loses the loaded scripts. The next wave's
    pipelines mix key lookups (run at once) and usage scripts (refused until loaded again):
    each lookup answers, and each request is counted exactly once."""
    folder = tmp_path / "redis"
    server = start_local_redis(folder)  # with its append-only file: the restart keeps the data
    store = RedisStore.connect(server.url)
    key, record = store.create_key("user", "u")

    async def body(callers: CallerStore) -> None:
        nonlocal server

        async def wave(n: int) -> None:
            async def request() -> None:
                assert await callers.find_key(key) == record
                await callers.record_usage(record.id, "m", 1, 1)

            await asyncio.gather(*(request() for _ in range(n)))

        await wave(20)
        port = server.port
        server.stop()
        server = start_local_redis(folder, port)
        await wave(20)
        await wave(20)

    try:
        run(store, server.url, body)
        assert store.usage_by_key() == {record.id: (60, 60, 60)}
    finally:
        store.close()
        server.stop()


def test_a_redis_gone_away_is_store_unavailable(tmp_path: Path) -> None:
    server = start_local_redis(tmp_path / "redis", persist=False)
    store = RedisStore.connect(server.url)
    key, record = store.create_key("user", "u")

    async def body(callers: CallerStore) -> None:
        assert await callers.find_key(key) == record
        server.stop()
        for call in (callers.find_key(key), callers.record_usage(record.id, "m", 1, 1)):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert caught.value.status == 503

    try:
        run(store, server.url, body)
    finally:
        store.close()
        server.stop()
