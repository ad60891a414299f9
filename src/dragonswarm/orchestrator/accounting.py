"""Each request's accounting: the unused part of its rate-limit charge given back, then its
usage counted, in a task of its own that the orchestrator's stop waits for.

Stopped while requests run, uvicorn cancels them after its grace period and starts the app's
shutdown at once. A cancelled request cannot wait for its own writes: a stream runs under
anyio's cancellation, which cancels every await it makes afterwards, shielded or not, and a
plain request's answer is cancelled and not waited for (`web/replies.py`). The end of the
event loop then cancelled the writes, and the usage of every request cut by a stop was lost.
So the writes run as tasks of their own, and the stop waits (`settled`) for every request
that began metering to have started its accounting, and for those tasks to end, before it
closes the limiter and the store they write to.
"""

from __future__ import annotations

import asyncio
import logging

from dragonswarm.errors import StoreUnavailable
from dragonswarm.orchestrator.auth import Caller
from dragonswarm.orchestrator.limits import Limiter
from dragonswarm.scheduler.ratelimit import Charge
from dragonswarm.store.callers import CallerStore

log = logging.getLogger("dragonswarm.orchestrator")

POLL_S = 0.05  # how often `settled` looks again for requests that have yet to start their accounting


class Accounting:
    """Requests' accounting over the limiter and the store, and what of it is still to be written."""

    def __init__(self, limiter: Limiter, callers: CallerStore) -> None:
        self._limiter = limiter
        self._callers = callers
        self._metering = 0  # requests that began and have not started their accounting yet
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self) -> None:
        """A request begins metering; `start` ends that, once per `begin`."""
        self._metering += 1

    def start(self, caller: Caller, model: str, charge: Charge, began: bool, prompt: int,
              completion: int) -> asyncio.Task[None]:  # fmt: skip
        """Write a request's accounting in a task of its own (kept until it ends)."""
        self._metering -= 1
        task = asyncio.get_running_loop().create_task(self._write(caller, model, charge, began, prompt, completion),
                                                      name="accounting")  # fmt: skip
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def settled(self, timeout: float) -> int:
        """Wait until every request that began has written its accounting, or `timeout` seconds:
        how many have not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._metering or self._tasks) and (left := deadline - loop.time()) > 0:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=min(left, POLL_S))
            else:  # cut requests reach their `start` a few turns of the loop after the stop
                await asyncio.sleep(min(left, POLL_S))
        return self._metering + len(self._tasks)

    async def _write(self, caller: Caller, model: str, charge: Charge, began: bool, prompt: int,
                     completion: int) -> None:  # fmt: skip
        """Give back what the request did not use of its charge (all of it when it never began: a
        request refused before any work, queue full or no node serving the model, is no request at
        all), then count its usage. Never raises: the answer is out, and a failure is logged."""
        try:
            if began:
                await self._limiter.refund(charge, prompt + completion)
            else:
                await self._limiter.cancel(charge)
        except Exception:
            log.exception("giving back the unused part of a request's rate-limit charge failed")
        if not (prompt or completion):
            return
        try:
            if caller.key is not None:
                await self._callers.record_usage(caller.key.id, model, prompt, completion)
            elif caller.node is not None:
                await self._callers.record_node_usage(caller.node, model, prompt, completion)
        except StoreUnavailable:
            log.error("the usage of a request of %s was not recorded: the store is unavailable", caller.name)
        except Exception:
            log.exception("recording usage failed")
