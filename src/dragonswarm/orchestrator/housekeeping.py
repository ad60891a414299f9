"""The swarm's clock: twice a second, what time alone decides.

A node silent past `gone_after_s` is let go (its work moves); a fragment whose worker
made no progress for `stall_timeout_s` moves to another; a job cancelled long ago and
never confirmed stops counting its node busy; a request still running at its deadline,
or waiting for a model no connected node serves, ends. Every two seconds the registry
is saved, from a thread; the garbage collector is kept in check (`collector`). The
decisions are the small pure functions at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from dragonswarm.orchestrator.collector import Collector
from dragonswarm.orchestrator.fragments import Fragment
from dragonswarm.orchestrator.looplag import LoopLag
from dragonswarm.orchestrator.registry import model_key
from dragonswarm.orchestrator.swarm import CLOSE_STALE, Swarm
from dragonswarm.store.base import NodeRecord

log = logging.getLogger("dragonswarm.orchestrator")

SWEEP_S = 0.5
SAVE_S = 2.0
# A node's record is saved when its state changes, else at most this often: with ten thousand
# nodes, saving every record every 2 s (JSON and SQLite in a thread that holds the GIL) stalled
# the event loop for seconds.
RESAVE_S = 30.0
# A node kills a runner that ignores a cancel after 5 s, and gives it 3 s to exit: wait that
# long for its `done` before counting the node free again (else its frozen runner gets new work).
DRAIN_GRACE_S = 15.0


def stalled(f: Fragment, now: float, stall_s: float) -> bool:
    """On a worker, and no progress from it (a token, a prompt batch, its model loading) for the stall timeout."""
    return f.node is not None and now - f.last_progress > stall_s


def due_for_saving(state: str, saved: tuple[float, str] | None, now: float, every_s: float) -> bool:
    """A node's record is written when its state changed since the last save, or it is `every_s` old."""
    return saved is None or saved[1] != state or now - saved[0] >= every_s


def resave_budget(nodes: int, round_s: float, every_s: float) -> int:
    """How many unchanged records one saving round writes, so that all are written every `every_s`."""
    return math.ceil(nodes * round_s / every_s) + 1


def orphaned(f: Fragment, served: bool, now: float, wait_s: float) -> bool:
    """Waiting for a model (file) that no connected node has served for `wait_s`."""
    if f.node is not None or served:
        f.orphaned_since = None
        return False
    f.orphaned_since = f.orphaned_since or now
    return now - f.orphaned_since > wait_s


class Housekeeping:
    def __init__(self, swarm: Swarm, loop_lag: LoopLag | None = None):
        self.swarm = swarm
        self.loop_lag = loop_lag
        self._task: asyncio.Task[None] | None = None
        self._saved: dict[str, tuple[float, str]] = {}  # node -> (when its record was last saved, its state then)

    def records_due(self, now: float) -> list[NodeRecord]:
        registry, stale_after = self.swarm.registry, self.swarm.settings.stale_after_s
        # Nodes that joined together fall due together: the re-saves of unchanged records are
        # spread over the period (10,000 records built at once held the loop for about a second).
        budget = resave_budget(len(registry.conns), SAVE_S, RESAVE_S)
        due = []
        for name, conn in registry.conns.items():
            if conn.replica is not None:
                continue  # held by another replica, which saves it
            state = conn.state(now, stale_after)
            saved = self._saved.get(name)
            if not due_for_saving(state, saved, now, RESAVE_S):
                continue
            if saved is not None and saved[1] == state:  # due for its age only: within the round's budget
                if budget == 0:
                    continue
                budget -= 1
            due.append(conn.record(now, stale_after))
            self._saved[name] = (now, state)
        for name in [n for n in self._saved if n not in registry.conns]:  # gone: saved by `node_left`
            del self._saved[name]
        return due

    def sweep(self) -> None:
        swarm, s, now = self.swarm, self.swarm.settings, time.monotonic()
        # Heartbeats that arrived while this loop was busy are still unread: a node is not let
        # go for our own lateness (that turns a busy minute into a reconnect storm).
        late = self.loop_lag.worst_since(now - s.gone_after_s) if self.loop_lag else 0.0
        for conn in list(swarm.registry.conns.values()):
            if conn.gone(now - late, s.stale_after_s, s.gone_after_s):  # by the cadence its last beat allowed
                conn.close(CLOSE_STALE, "no heartbeat")
                swarm.node_left(conn)
                continue
            swarm.registry.recheck(conn, now)  # live -> stale shows in placement
            for job_id in list(conn.jobs):
                f = swarm.running.get(job_id)
                if f is not None and stalled(f, now, s.stall_timeout_s):
                    swarm.fail_over(f, "stalled", f"no progress for {s.stall_timeout_s:.0f} s")
            for job_id, since in list(conn.draining.items()):
                if now - since > max(s.stall_timeout_s, DRAIN_GRACE_S):  # it never said done: stop counting it busy
                    log.warning("node %s never finished cancelled job %s", conn.name, job_id)
                    swarm.release(conn, job_id)
        for f in swarm.unfinished():
            req = f.request
            served = bool(swarm.registry.serving_file(model_key(req.model, req.sha256)) if req.sha256
                          else swarm.registry.serving(req.model))  # fmt: skip
            if orphaned(f, served, now, s.stall_timeout_s):
                swarm.finish(f, error="no_workers", message=f"no node serves {req.model!r} any more")
                swarm.dispatcher.withdraw(f)
            elif now > f.deadline:
                swarm.finish(f, error="timeout", message=f"the request did not finish within "
                             f"{s.request_timeout_s:.0f} s")  # fmt: skip
                swarm.dispatcher.withdraw(f)
        swarm.dispatcher.dispatch()

    async def _run(self) -> None:
        last_save = 0.0
        collector, registry = Collector(), self.swarm.registry
        try:
            while True:
                await asyncio.sleep(SWEEP_S)
                try:
                    self.sweep()
                    collector.tick(len(registry.conns), registry.departures, time.monotonic())
                    if time.monotonic() - last_save > SAVE_S:
                        last_save = time.monotonic()
                        if due := self.records_due(last_save):
                            await asyncio.to_thread(self.swarm.store.save_nodes, due)
                except Exception:  # housekeeping must outlive one bad round
                    log.exception("housekeeping failed")
        finally:
            collector.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="housekeeping")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # the last word on every node, on the way out
            await asyncio.to_thread(self.swarm.store.save_nodes, self.swarm.registry.records(local=True))
