"""The swarm at work: a request's fragments from admission to their last event.

It hands fragments to the `Dispatcher` (queue and placement), starts each on its node,
merges the nodes' events into each request's one stream, and moves a fragment to another
worker when its worker fails, continuing after the tokens already streamed. What time
alone decides (stalls, deadlines, silent nodes) is `Housekeeping`'s. Everything runs on
one event loop, so the bookkeeping needs no locks; messages to nodes go through each
connection's outbox, and the store is written from threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator

from dragonswarm.errors import ContextLengthExceeded, ModelNotFound, NoCapacity, NoWorkers
from dragonswarm.orchestrator.dispatcher import Dispatcher
from dragonswarm.orchestrator.fragments import Fragment, Request
from dragonswarm.orchestrator.metrics import Metrics
from dragonswarm.orchestrator.registry import NodeConn, Registry, model_key
from dragonswarm.protocol.events import Event, error_event
from dragonswarm.protocol.runner import Generation
from dragonswarm.protocol.swarm import Cancel, Heartbeat, JobEvent, ProtocolError, dump
from dragonswarm.scheduler.fairqueue import FairQueue
from dragonswarm.scheduler.placement import NodeState
from dragonswarm.settings import OrchestratorSettings
from dragonswarm.store.base import NodeRecord, Store

log = logging.getLogger("dragonswarm.orchestrator")

# Errors that are the request's fault: moving the fragment to another worker would not help.
NODE_BUSY = "node_busy"  # a replica refused another's run: the node it holds is full (`federation`)
CLIENT_ERRORS = {"context_length_exceeded", "invalid_request", "unsupported_parameter"}
CLOSE_STALE = 4000  # WebSocket close code for a node whose heartbeats stopped
CLOSE_REVOKED = 4003  # ... for a node an admin revoked
CLOSE_FORGOTTEN = 4004  # ... for a node whose name an admin freed


class Swarm:
    def __init__(self, settings: OrchestratorSettings, store: Store, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics or Metrics()
        self.registry = Registry(settings.stale_after_s, settings.min_stream_tps)
        queue: FairQueue[Fragment] = FairQueue(settings.max_queue, settings.max_queue_per_user)
        self.dispatcher = Dispatcher(self.registry, queue, self._start)
        self.requests: set[Request] = set()
        self.running: dict[str, Fragment] = {}  # job id (a fragment's attempt) -> fragment, while a node holds it
        self._saves: set[asyncio.Task[None]] = set()  # node records being written

    # Requests

    async def run(self, req: Request, gens: list[Generation]) -> AsyncGenerator[tuple[int, Event]]:
        """Queue a request's fragments; yield (choice index, event) as workers produce them."""
        model, origin = req.model, req.origin
        serving = self.registry.serving(model)
        if not serving:
            known = ", ".join(sorted(self.registry.model_tags())) or "none"
            if self.registry.conns:
                raise ModelNotFound(f"no node in the swarm serves {model!r} (models: {known})", param="model")
            raise NoWorkers("no node has joined the swarm yet; start one with 'dragon node --orchestrator ...'")
        _check_context(model, gens, self.registry.largest_context(model))
        deadline = time.monotonic() + self.settings.request_timeout_s
        req.fragments = [Fragment(req, i, gen, deadline) for i, gen in enumerate(gens)]
        if origin and any(c.name != origin for c in serving):
            for f in req.fragments:
                f.exclude.add(origin)  # it handed the request over because it could not run it
        if origin and not self.dispatcher.free_now(req.fragments[0]):
            # An owner's request is only worth moving to a worker that is free now; queued
            # here, it would wait while its own machine could already be serving it.
            raise NoCapacity("no worker can take this request now; serve it locally")
        self.dispatcher.queue_all(req.user, req.fragments)
        self.requests.add(req)
        try:
            remaining = len(req.fragments)
            while remaining:
                index, event = await req.out.get()
                yield index, event
                if event["ev"] == "done":
                    remaining -= 1
                elif event["ev"] == "error":
                    return
        finally:
            self._close(req)

    def _close(self, req: Request) -> None:
        """The request ended (answered, failed, or its client left): free what it holds."""
        req.closed = True
        self.requests.discard(req)
        for f in req.fragments:
            if f.finished:
                continue
            f.finished = True
            if f.node is None:
                self.dispatcher.withdraw(f)
            else:
                self._abandon(f)

    # Placement

    def _start(self, f: Fragment, conn: NodeConn) -> None:
        """Run a placed fragment on its node."""
        f.placed_on(conn, time.monotonic())
        conn.jobs.add(f.job_id)
        self.running[f.job_id] = f
        req = f.request
        if conn.name not in req.nodes:
            req.nodes.append(conn.name)
        if f.attempt == 0 and conn.name not in req.first_nodes:
            req.first_nodes.append(conn.name)
        conn.send(dump(f.message()))
        self.registry.refresh(conn)
        log.debug("fragment %s attempt %d -> %s", f.id, f.attempt, conn.name)

    def release(self, conn: NodeConn, job_id: str) -> None:
        """The node is done with a job (or we stopped waiting for it to say so): its runner is free."""
        conn.jobs.discard(job_id)
        self.running.pop(job_id, None)
        conn.draining.pop(job_id, None)
        conn.finished.append(job_id)
        self.registry.refresh(conn)
        self.dispatcher.dispatch()

    def _abandon(self, f: Fragment) -> None:
        """Detach a fragment from its worker and cancel it there; the worker stays counted
        busy until it says done."""
        conn, job_id = f.node, f.job_id
        f.node = None
        if conn is None:
            return
        self.running.pop(job_id, None)
        if job_id in conn.jobs:
            conn.jobs.discard(job_id)
            if self.registry.conns.get(conn.name) is conn:
                conn.draining[job_id] = time.monotonic()
                conn.send(dump(Cancel(job=job_id)))

    def fail_over(self, f: Fragment, cause: str, reason: str, *, counts: bool = True) -> None:
        """Move a fragment to another worker, continuing after the tokens already streamed.
        One that does not count (a context too small) is not held against the attempts.
        `cause` is one of `metrics.FAILOVER_CAUSES`; `reason` says it in words."""
        failed = f.node.name if f.node else "?"
        self.metrics.failover(cause)
        self._abandon(f)
        f.exclude.add(failed)
        f.next_attempt()
        if not counts:
            f.free_attempts += 1
        if f.attempt - f.free_attempts >= self.settings.max_attempts:
            self.finish(f, error="runner_failed", message=f"{f.attempt} workers failed this request; last: {reason}")
            return
        if f.remaining_tokens() <= 0:
            self._emit_done(f, "length")
            return
        # A node found busy by its holder is placement at work, not a failure: no warning each time.
        (log.info if cause == "node_busy" else log.warning)("fragment %s moves off %s (%s) after %d tokens", f.id,
                                                             failed, reason, f.tokens)  # fmt: skip
        self.dispatcher.retry(f)

    # Events from nodes

    def on_event(self, conn: NodeConn, ev: JobEvent) -> None:
        if ev.job in conn.draining:
            if ev.ev in ("done", "error"):
                self.release(conn, ev.job)
            return
        f = self.running.get(ev.job) if ev.job in conn.jobs else None
        if f is None:
            if ev.job in conn.finished:
                return  # a late answer to a Cancel that crossed the job's own `done`
            raise ProtocolError(f"event for job {ev.job!r}, which this node does not hold")
        now = time.monotonic()
        if over := f.overrun(ev, now):
            raise ProtocolError(over)  # a worker sending more than it was asked for is cut off
        f.last_progress = now  # every event is progress: `overrun` bounds those that add nothing
        match ev.ev:
            case "start":
                f.cached_tokens = ev.cached_tokens or 0
                if f.prompt_tokens is None:
                    f.prompt_tokens = ev.prompt_tokens or 0
                    f.min_ctx = f.prompt_tokens + (1 if f.gen.fit_context else f.gen.max_tokens)
                    self._emit(f, {"ev": "start", "prompt_tokens": f.prompt_tokens})
            case "text":
                f.ids.extend(ev.ids or ())
                conn.tokens += len(ev.ids or ())
                self._emit(f, ev.event())
            case "done":
                conn.served += 1
                self.release(conn, ev.job)
                if ev.finish_reason == "cancelled":  # the node stopped it, not us: move it
                    self.fail_over(f, "cancelled_by_node", "cancelled by the node")
                    return
                self._emit_done(f, ev.finish_reason or "stop")  # the tokens counted are those relayed
            case "error":
                self.release(conn, ev.job)
                if ev.code == "context_length_exceeded" and self._needs_more_context(f, conn):
                    self.fail_over(f, "context_too_small", f"its context is too small: {ev.message}", counts=False)
                elif ev.code == NODE_BUSY:
                    # Another replica's node, fuller than our last view of it (another replica placed
                    # work there meanwhile): count it busy until its holder publishes it again, and
                    # place the fragment elsewhere, not held against its attempts.
                    conn.others += 1
                    self.registry.refresh(conn)
                    self.fail_over(f, "node_busy", ev.message or "the node is busy", counts=False)
                elif ev.code in CLIENT_ERRORS:
                    self.finish(f, error=ev.code or "invalid_request", message=ev.message or "invalid request",
                                 param=ev.param)  # fmt: skip
                else:
                    self.fail_over(f, "runner_error", f"{ev.code}: {ev.message}")

    def _needs_more_context(self, f: Fragment, conn: NodeConn) -> bool:
        """A worker's context could not hold the fragment: True if another can, and it was
        marked to need more than that worker's (else the request's own error stands)."""
        key = model_key(f.request.model, f.request.sha256 or "")
        f.min_ctx = max(f.min_ctx, conn.n_ctx.get(key, 0) + 1)
        return any(c.n_ctx.get(key, 0) >= f.min_ctx for c in self.registry.serving_file(key))

    def _emit(self, f: Fragment, event: Event) -> None:
        if not f.request.closed:
            f.request.out.put_nowait((f.index, event))

    def _emit_done(self, f: Fragment, finish_reason: str) -> None:
        f.finished = True
        f.node = None
        if f.prompt_tokens is None:  # finished without ever starting (no tokens left after failover)
            f.prompt_tokens = 0
            self._emit(f, {"ev": "start", "prompt_tokens": 0})
        # A continuation's cache counts its prefix too; the client's prompt is the first worker's.
        cached = min(f.cached_tokens, f.prompt_tokens)
        self._emit(f, {"ev": "done", "finish_reason": finish_reason, "prompt_tokens": f.prompt_tokens,
                       "cached_tokens": cached, "completion_tokens": f.tokens})  # fmt: skip

    def finish(self, f: Fragment, *, error: str, message: str, param: str | None = None) -> None:
        f.finished = True
        self._abandon(f)
        self._emit(f, error_event(error, message, param))

    # Nodes

    def on_heartbeat(self, conn: NodeConn, hb: Heartbeat) -> None:
        before = self.registry.index.get(conn.name)
        self.registry.heartbeat(conn, hb)
        after = self.registry.index.get(conn.name)
        d = self.dispatcher
        if (d.retries or len(d.queue)) and _has_room(after) and not _has_room(before):
            d.dispatch()  # it just got room: waiting work may fit

    def node_left(self, conn: NodeConn) -> None:
        """A connection closed (or was replaced): every fragment it ran moves on."""
        if not self.registry.leave(conn) and not conn.jobs:
            return
        if conn.replica is None:  # a node held by another replica is that replica's to record
            record = conn.record(time.monotonic(), self.settings.stale_after_s)
            self.save_later([dataclasses.replace(record, state="gone")])
        self.dispatcher.affinity.forget(conn.name)
        for job_id in list(conn.jobs):
            f = self.running.get(job_id)
            if f is not None and not f.finished:
                self.fail_over(f, "connection_lost", "connection lost")
        conn.jobs.clear()
        conn.draining.clear()
        self.dispatcher.dispatch()

    def save_later(self, records: list[NodeRecord]) -> None:
        """Write node records from a thread: the store may wait on a lock, the event loop must not."""

        async def save() -> None:
            try:
                await asyncio.to_thread(self.store.save_nodes, records)
            except Exception:  # the store being down must not stop failover
                log.exception("saving node records failed")

        task = asyncio.get_running_loop().create_task(save())
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    def unfinished(self) -> list[Fragment]:
        return [f for req in self.requests for f in req.fragments if not f.finished]

    async def close(self) -> None:
        await asyncio.gather(*self._saves, return_exceptions=True)

    def status(self) -> dict[str, int]:
        return self.dispatcher.status()


def _check_context(model: str, gens: list[Generation], largest: int) -> None:
    """Refuse before any work what no worker's context can hold: the answer alone, plus
    at least one prompt token, must fit the largest context a node runs the model with."""
    asked = max((g.max_tokens for g in gens if not g.fit_context), default=0)
    if largest and asked >= largest:
        raise ContextLengthExceeded(f"max_tokens is {asked}, but the largest context any node runs {model!r} "
                                    f"with is {largest} tokens, prompt included", param="max_tokens")  # fmt: skip


def _has_room(node: NodeState | None) -> bool:

    return node is not None and node.live and not (node.owner_busy or node.net_busy) and node.assigned < node.capacity
