"""Requests' accounting, written in tasks of its own that the orchestrator's shutdown waits for.

When a request ends, it gives back the unused part of its rate-limit charge and records its
usage (`api._metered`). Stopped while streams run, uvicorn cancels them after its grace
period and starts the app's shutdown at once. A cancelled request runs under anyio's
cancellation, which cancels every await it makes afterwards: it could not wait for its own
writes, shielded or not, and the end of the event loop then cancelled them (the usage of
every stream cut by a stop was lost). So the writes run as tasks of their own, and shutdown
waits for them before it closes the limiter and the store they write to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Accounting:
    """The accounting tasks still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a request's accounting as its own task (kept until it ends)."""
        task = asyncio.get_running_loop().create_task(work, name="accounting")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def settled(self, timeout: float) -> int:
        """Wait until every accounting task has ended, or `timeout` seconds: how many still run."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return len(self._tasks)
