"""The swarm at work: queue fragments fairly, place them, merge their events, move them
when a worker fails, and end every one by its deadline.

Decisions are the scheduler's pure functions (placement index, fair queue); this
module only carries them out. Everything runs on one event loop, so the bookkeeping
needs no locks; messages to nodes go through each connection's outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

from dragonswarm.errors import ModelNotFound, NoCapacity, NoWorkers, Overloaded
from dragonswarm.orchestrator.fragments import Fragment, Request
from dragonswarm.orchestrator.registry import NodeConn, Registry, model_key
from dragonswarm.protocol.runner import Event, Generation
from dragonswarm.protocol.swarm import Cancel, Heartbeat, JobEvent, ProtocolError, dump
from dragonswarm.scheduler.affinity import CacheAffinity
from dragonswarm.scheduler.fairqueue import FairQueue, QueueFull
from dragonswarm.scheduler.placement import NodeState
from dragonswarm.scheduler.ratelimit import RateLimiter
from dragonswarm.settings import OrchestratorSettings
from dragonswarm.store.base import Store

log = logging.getLogger("dragonswarm.orchestrator")

# Errors that are the request's fault: moving the fragment to another worker would not help.
CLIENT_ERRORS = {"context_length_exceeded", "invalid_request", "unsupported_parameter"}
CLOSE_STALE = 4000  # WebSocket close code for a node whose heartbeats stopped
CLOSE_REVOKED = 4003  # ... for a node an admin revoked


class Swarm:
    def __init__(self, settings: OrchestratorSettings, store: Store):
        self.settings = settings
        self.store = store
        self.registry = Registry(settings.stale_after_s)
        self.queue: FairQueue[Fragment] = FairQueue(settings.max_queue, settings.max_queue_per_user)
        self.retries: deque[Fragment] = deque()  # fragments moving after a failure go first
        # Per process for now: with several replicas (the Redis store) the buckets move there.
        self.limiter = RateLimiter(settings.rate_rpm, settings.rate_tpm)
        self.requests: set[Request] = set()
        self.affinity = CacheAffinity()
        self._tasks: list[asyncio.Task[None]] = []

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
        deadline = time.monotonic() + self.settings.fragment_timeout_s
        req.fragments = [Fragment(req, i, gen, deadline) for i, gen in enumerate(gens)]
        if origin and any(c.name != origin for c in serving):
            for f in req.fragments:
                f.exclude.add(origin)  # it handed the request over because it could not run it
        if origin and self._choose(req.fragments[0], set()) is None:
            # An owner's request is only worth moving to a worker that is free now; queued
            # here, it would wait while its own machine could already be serving it.
            raise NoCapacity("no worker can take this request now; serve it locally")
        try:
            self.queue.push_all(req.user, req.fragments)
        except QueueFull as exc:
            raise Overloaded(exc.message, retry_after=exc.retry_after) from None
        self.requests.add(req)
        self.dispatch()
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
                self.queue.remove(f)
                with contextlib.suppress(ValueError):
                    self.retries.remove(f)
            else:
                self._abandon(f)

    # Placement

    def dispatch(self) -> None:
        """Place every waiting fragment that some worker can take now."""
        full: set[str] = set()  # models with no free node in this pass: skip their fragments fast
        for f in list(self.retries):  # moved fragments first, any that fit (not only the head)
            if self._place(f, full):
                self.retries.remove(f)
        while (item := self.queue.pop(lambda f: self._choose(f, full) is not None)) is not None:
            self._place(item[1], full)

    def _exclude(self, f: Fragment, key: str) -> set[str]:
        if not f.exclude:
            return f.exclude
        # Exclusion is a preference: if every node that serves the model is excluded
        # (say the only worker failed once), trying one of them again beats failing.
        serving = {c.name for c in self.registry.serving_file(key)}
        return f.exclude if serving - f.exclude else set()

    def _choose(self, f: Fragment, full: set[str]) -> tuple[str, str] | None:
        """(node, model file) for the fragment: the node whose cache holds the longest prefix
        of its prompt if that node is free, else the placement index's best. Once a request
        has a model file, every fragment of it stays on that file."""
        req = f.request
        index = self.registry.index
        for sha in [req.sha256] if req.sha256 else self.registry.files(req.model):
            key = model_key(req.model, sha)
            if key in full:
                continue
            exclude = self._exclude(f, key)
            for holder in self.affinity.holders(key, f.keys):
                state = index.get(holder)
                # Only a warm runner still holds its cache: a reloaded model starts empty.
                if holder not in exclude and index.eligible(key, holder) and state and key in state.loaded:
                    return holder, sha
            name = index.choose(key, exclude)
            if name is not None:
                return name, sha
            if not f.exclude:
                full.add(key)  # nobody at all can take this model file now
        return None

    def _place(self, f: Fragment, full: set[str]) -> bool:
        chosen = self._choose(f, full)
        if chosen is None:
            return False
        name, sha = chosen
        f.request.sha256 = sha
        conn = self.registry.conns[name]
        self.affinity.record(name, model_key(f.request.model, sha), f.keys)
        f.node = conn
        f.last_event = time.monotonic()
        conn.jobs[f.job_id] = f
        req = f.request
        if name not in req.nodes:
            req.nodes.append(name)
        if f.attempt == 0 and name not in req.first_nodes:
            req.first_nodes.append(name)
        conn.send(dump(f.message()))
        self.registry.refresh(conn)
        log.debug("fragment %s attempt %d -> %s", f.id, f.attempt, name)
        return True

    def _release(self, conn: NodeConn, job_id: str) -> None:
        conn.jobs.pop(job_id, None)
        conn.draining.pop(job_id, None)
        conn.finished.append(job_id)
        self.registry.refresh(conn)
        self.dispatch()

    def _abandon(self, f: Fragment) -> None:
        """Detach a fragment from its worker and cancel it there; the worker stays counted
        busy until it says done."""
        conn, job_id = f.node, f.job_id
        f.node = None
        if conn is None:
            return
        if conn.jobs.pop(job_id, None) is not None and self.registry.conns.get(conn.name) is conn:
            conn.draining[job_id] = time.monotonic()
            conn.send(dump(Cancel(job=job_id)))

    def _fail_over(self, f: Fragment, reason: str) -> None:
        """Move a fragment to another worker, continuing after the text already streamed."""
        failed = f.node.name if f.node else "?"
        self._abandon(f)
        f.exclude.add(failed)
        f.attempt += 1
        f.base_tokens = f.tokens
        f.base_chars = f.chars
        f.idle_events = 0
        if f.attempt >= self.settings.max_attempts:
            self._finish(f, error="runner_failed", message=f"{f.attempt} workers failed this request; last: {reason}")
            return
        if f.remaining_tokens() <= 0:
            self._emit_done(f, "length")
            return
        log.warning("fragment %s moves off %s (%s) after %d tokens", f.id, failed, reason, f.tokens)
        self.retries.append(f)
        self.dispatch()

    # Events from nodes

    def on_event(self, conn: NodeConn, ev: JobEvent) -> None:
        if ev.job in conn.draining:
            if ev.ev in ("done", "error"):
                self._release(conn, ev.job)
            return
        f = conn.jobs.get(ev.job)
        if f is None:
            if ev.job in conn.finished:
                return  # a late answer to a Cancel that crossed the job's own `done`
            raise ProtocolError(f"event for job {ev.job!r}, which this node does not hold")
        f.last_event = time.monotonic()
        if ev.ev in ("text", "done") and (over := f.overrun(ev)):
            raise ProtocolError(over)  # a worker sending more than it was asked for is cut off
        match ev.ev:
            case "start":
                f.cached_tokens = ev.cached_tokens or 0
                if f.prompt_tokens is None:
                    f.prompt_tokens = ev.prompt_tokens or 0
                    self._emit(f, {"ev": "start", "prompt_tokens": f.prompt_tokens})
            case "text":
                if ev.text or ev.logprobs:
                    f.text.append(ev.text or "")
                    f.chars += len(ev.text or "")
                    f.tokens = f.base_tokens + (ev.completion_tokens or 0)
                    event: Event = {"ev": "text", "text": ev.text or ""}
                    if ev.logprobs:
                        event["logprobs"] = [lp.model_dump() for lp in ev.logprobs]  # type: ignore[misc]
                    self._emit(f, event)
            case "done":
                conn.served += 1
                self._release(conn, ev.job)
                if ev.finish_reason == "cancelled":  # the node stopped it, not us: move it
                    self._fail_over(f, "cancelled by the node")
                    return
                f.tokens = f.base_tokens + (ev.completion_tokens or 0)
                self._emit_done(f, ev.finish_reason or "stop")
            case "error":
                self._release(conn, ev.job)
                if ev.code in CLIENT_ERRORS:
                    self._finish(f, error=ev.code or "invalid_request", message=ev.message or "invalid request",
                                 param=ev.param)  # fmt: skip
                else:
                    self._fail_over(f, f"{ev.code}: {ev.message}")

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

    def _finish(self, f: Fragment, *, error: str, message: str, param: str | None = None) -> None:
        f.finished = True
        self._abandon(f)
        event: Event = {"ev": "error", "code": error, "message": message}
        if param:
            event["param"] = param
        self._emit(f, event)

    # Nodes

    def on_heartbeat(self, conn: NodeConn, hb: Heartbeat) -> None:
        before = self.registry.index.get(conn.name)
        self.registry.heartbeat(conn, hb)
        now = time.monotonic()
        for job_id in hb.running:  # loading a model or reading a long prompt sends no events
            if (f := conn.jobs.get(job_id)) is not None:
                f.last_event = now
        after = self.registry.index.get(conn.name)
        if (self.retries or len(self.queue)) and _has_room(after) and not _has_room(before):
            self.dispatch()  # it just got room: waiting work may fit

    def node_left(self, conn: NodeConn) -> None:
        """A connection closed (or was replaced): every fragment it ran moves on."""
        if not self.registry.leave(conn) and not conn.jobs:
            return
        with contextlib.suppress(Exception):  # the store being down must not stop failover
            record = conn.record(time.monotonic(), self.settings.stale_after_s)
            self.store.save_nodes([dataclasses.replace(record, state="gone")])
        self.affinity.forget(conn.name)
        for f in list(conn.jobs.values()):
            if not f.finished:
                self._fail_over(f, "connection lost")
        conn.jobs.clear()
        conn.draining.clear()
        self.dispatch()

    def _orphaned(self, f: Fragment, now: float) -> bool:
        """Queued for a model (file) that no connected node serves any more, for a while."""
        req = f.request
        if f.node is not None or (self.registry.serving_file(model_key(req.model, req.sha256)) if req.sha256
                                  else self.registry.serving(req.model)):  # fmt: skip
            f.orphaned_since = None
            return False
        f.orphaned_since = f.orphaned_since or now
        return now - f.orphaned_since > self.settings.stall_timeout_s

    # Housekeeping: deadlines, stalls, stale nodes, saving the registry

    def sweep(self) -> None:
        now = time.monotonic()
        s = self.settings
        for conn in list(self.registry.conns.values()):
            if conn.gone(now, s.stale_after_s, s.gone_after_s):  # by the cadence its last heartbeat allowed
                conn.close(CLOSE_STALE, "no heartbeat")
                self.node_left(conn)
                continue
            self.registry.recheck(conn, now)  # live -> stale shows in placement
            for f in list(conn.jobs.values()):
                if now - f.last_event > s.stall_timeout_s:
                    self._fail_over(f, f"no progress for {s.stall_timeout_s:.0f} s")
            for job_id, since in list(conn.draining.items()):
                if now - since > s.stall_timeout_s:  # it never said done: stop counting it busy
                    log.warning("node %s never finished cancelled job %s", conn.name, job_id)
                    self._release(conn, job_id)
        for f in self._unfinished():
            if self._orphaned(f, now):
                self._finish(f, error="no_workers", message=f"no node serves {f.request.model!r} any more")
                self.queue.remove(f)
                with contextlib.suppress(ValueError):
                    self.retries.remove(f)
            elif now > f.deadline:
                self._finish(f, error="timeout", message=f"the request did not finish within "
                             f"{s.fragment_timeout_s:.0f} s")  # fmt: skip
                self.queue.remove(f)
                with contextlib.suppress(ValueError):
                    self.retries.remove(f)
        self.dispatch()

    def _unfinished(self) -> list[Fragment]:
        return [f for req in self.requests for f in req.fragments if not f.finished]

    async def _housekeeping(self) -> None:
        last_save = 0.0
        while True:
            await asyncio.sleep(0.5)
            try:
                self.sweep()
                if time.monotonic() - last_save > 2.0:
                    last_save = time.monotonic()
                    await asyncio.to_thread(self.store.save_nodes, self.registry.records())
            except Exception:  # housekeeping must outlive one bad round
                log.exception("housekeeping failed")

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            self.store.save_nodes(self.registry.records())

    def status(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "retrying": len(self.retries), "users_waiting": self.queue.users()}


def _has_room(node: NodeState | None) -> bool:
    return node is not None and node.live and not (node.owner_busy or node.net_busy) and node.assigned < node.capacity
