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
from collections import deque

from dragonswarm.orchestrator.collector import Collector
from dragonswarm.orchestrator.fragments import Fragment
from dragonswarm.orchestrator.looplag import LoopLag
from dragonswarm.orchestrator.registry import NodeConn, model_key
from dragonswarm.orchestrator.swarm import CLOSE_STALE, Swarm
from dragonswarm.store.base import NodeRecord

log = logging.getLogger("dragonswarm.orchestrator")

SWEEP_S = 0.5
SAVE_S = 2.0
# A node's record is saved when its state changes, else at most this often: with ten thousand
# nodes, saving every record every 2 s (JSON and SQLite in a thread that holds the GIL) stalled
# the event loop for seconds.
RESAVE_S = 120.0
SAVES_PER_ROUND = 1_000  # records built and written per round, at most (the rest wait a round)
# A node kills a runner that ignores a cancel after 5 s, and gives it 3 s to exit: wait that
# long for its `done` before counting the node free again (else its frozen runner gets new work).
DRAIN_GRACE_S = 15.0


def stalled(f: Fragment, now: float, stall_s: float) -> bool:
    """On a worker, and no progress from it (a token, a prompt batch, its model loading) for the stall timeout."""
    return f.node is not None and now - f.last_progress > stall_s


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
        self._turn: deque[tuple[str, float]] = deque()  # (node, when saved), oldest first; superseded entries skipped

    def records_due(self, now: float) -> list[NodeRecord]:
        registry, stale_after, saved = self.swarm.registry, self.swarm.settings.stale_after_s, self._saved
        due: list[NodeRecord] = []

        def save(name: str, conn: NodeConn) -> None:
            record = conn.record(now, stale_after)
            due.append(record)
            saved[name] = (now, record.state)
            self._turn.append((name, now))

        # A state can change only for a node never saved, one past its stale time, or one saved
        # stale (it may be back): one comparison per node finds those (a state for each took
        # ~30 ms at 10,000 nodes). At most `SAVES_PER_ROUND`: the rest are still due next round.
        # (A node held by another replica is that replica's to save.)
        for name, conn in [(n, c) for n, c in registry.conns.items() if c.replica is None
                           and (c.stale_at < now or (s := saved.get(n)) is None or s[1] != "live")]:  # fmt: skip
            if len(due) >= SAVES_PER_ROUND:
                break
            last = saved.get(name)
            if last is None or last[1] != conn.state(now, stale_after):
                save(name, conn)
        # The unchanged are re-saved oldest first, a share each round, so that all are written
        # every `RESAVE_S`: nodes that joined together fall due together, and are spread out.
        budget = min(resave_budget(len(registry.conns), SAVE_S, RESAVE_S), SAVES_PER_ROUND - len(due))
        while budget > 0 and self._turn:
            name, at = self._turn[0]
            last, held = saved.get(name), registry.conns.get(name)
            if last is None or last[0] != at or held is None or held.replica is not None:
                self._turn.popleft()  # saved again since, or gone: a later entry stands for it, or none
            elif now - at < RESAVE_S:
                break  # the oldest is not due yet: nor is any after it
            else:
                self._turn.popleft()
                save(name, held)
                budget -= 1
        if len(saved) > len(registry.conns):  # gone: saved by `node_left`
            for name in [n for n in saved if n not in registry.conns]:
                del saved[name]
        return due

    def sweep(self) -> None:
        swarm, s, now = self.swarm, self.swarm.settings, time.monotonic()
        # Heartbeats that arrived while this loop was busy are still unread: a node is not let
        # go for our own lateness (that turns a busy minute into a reconnect storm).
        late = self.loop_lag.worst_since(now - s.gone_after_s) if self.loop_lag else 0.0
        # Only a node silent past stale, or running our work, has anything for time alone to decide:
        # picking those out is one comparison per node (a full pass took ~50 ms at 10,000 nodes).
        for conn in [c for c in swarm.registry.conns.values() if c.stale_at < now or c.jobs or c.draining]:
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
