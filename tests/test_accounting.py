"""A request's accounting (refund, then usage) over the real in-process limiter and a real SQLite
store: written in a task of its own, and waited for by a stop even for a request cut by it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dragonswarm.orchestrator.accounting import Accounting
from dragonswarm.orchestrator.auth import Caller
from dragonswarm.orchestrator.limits import LocalLimiter
from dragonswarm.scheduler.ratelimit import Charge, RateLimiter
from dragonswarm.store.callers import InThreads
from dragonswarm.store.sqlite import SqliteStore


def test_a_stop_waits_for_a_cut_request_to_write_its_accounting(tmp_path: Path) -> None:
    """Cancelled, a request reaches its accounting a turn of the loop after the stop looked:
    `settled` must wait for it to begin, and then for its writes to end."""
    store = SqliteStore(tmp_path / "state.db")
    _, record = store.create_key("user", "u")
    limits = RateLimiter(10, 1000)

    async def main() -> int:
        accounting = Accounting(LocalLimiter(limits), InThreads(store))
        charge = limits.admit("key-1", 100, 0.0)
        assert isinstance(charge, Charge)

        async def request() -> None:
            accounting.begin()
            try:
                await asyncio.Event().wait()  # a stream that has not ended
            finally:
                await asyncio.shield(accounting.start(Caller("key-1", key=record), "m", charge, True, 3, 4))

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        task.cancel()  # as uvicorn cancels it, and starts the app's shutdown at once
        return await accounting.settled(5)

    try:
        assert asyncio.run(main()) == 0
        assert store.usage_by_key() == {record.id: (1, 3, 4)}
        assert limits.charged("key-1", 1.0) == (1, 7)  # the unused 93 of 100 tokens given back
    finally:
        store.close()


def test_settled_says_how_many_have_not_written_when_time_runs_out(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")

    async def main() -> int:
        accounting = Accounting(LocalLimiter(RateLimiter(0, 0)), InThreads(store))
        accounting.begin()  # never reaches its accounting
        return await accounting.settled(0.2)

    try:
        assert asyncio.run(main()) == 1
    finally:
        store.close()
