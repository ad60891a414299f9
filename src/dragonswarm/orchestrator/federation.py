"""Replicas of one swarm sharing one Redis: each holds its own nodes' connections and sees
every other replica's nodes, so a request sent to any replica can run on any node.

Each replica, twice a second, publishes the nodes connected to it (what placement reads:
their hello, last heartbeat, how busy they are) and reads what the others published. When
work on one of its nodes starts or ends, it also tells the other replicas at once, through
their event streams: a node freed here is taken by work waiting there within milliseconds,
not at the next publication (that half second was most of what replicas added to p99). A
node held by another replica appears here as a *remote* `NodeConn` (`conn.replica` names
its holder): placement, failover, stall detection and merging treat it like any other.
What is sent to it (`run`, `cancel`) goes into its holder's inbox stream; the holder
passes it to the node and relays the node's events for that job back into the requesting
replica's event stream, batched (all events of one loop turn in one entry), in order.
Two replicas may place work on one free node within the same half second: its holder, which
counts all of it, turns down a run the node has no room for (`node_busy`), and the requester
places it elsewhere at once, not counting it against the request's attempts.

So Redis carries control messages and batched events only for work that crosses replicas;
a request served by a node on its own replica never touches Redis.

When a replica stops refreshing its liveness key (it died, or lost Redis), the others drop
its nodes at once and the fragments they ran there move on; its nodes reconnect to another
replica (a node is given several orchestrator URLs). When a requesting replica dies, the
holders cancel what they ran for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.orchestrator.swarm import NODE_BUSY, Swarm
from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.swarm import Cancel, Heartbeat, Hello, JobEvent, ProtocolError, RunFragment, dump
from dragonswarm.scheduler.placement import NodeState
from dragonswarm.store import rediskeys as K
from dragonswarm.store.redis import async_client, client_options

log = logging.getLogger("dragonswarm.orchestrator")

PUBLISH_S = 0.5  # how often what changed of this replica's nodes is published, and the others' news read
RESYNC_S = 30.0  # how often every node list is written and read whole (news lost on the way heals)
# A replica just seen is read whole each round for this long: it tells us what changed only once
# it has seen us in turn (its next round), and what changed before that is in its list alone.
FIRST_READS_S = 3.0
KEEP_READ_MS = 10_000  # entries of our own streams are kept this long after they were read
BLOCK_MS = 1000  # a stream read waits this long for news
# Where this replica's stream readers start: at the beginning. Its streams are as new as its id,
# so nothing in them predates it; "$" (only what comes after the call) lost every entry added
# between two reads until a first one arrived, as a burst of runs did while the loop was busy.
STREAM_START = "0-0"
CUT = "dragon.cut"  # between replicas only: end this node's connection (never sent to a node)
FLUSH_S = 0.005
COMPLAIN_EVERY_S = 30.0  # events for another replica are gathered this long, then sent as one entry
# The format of what replicas write for each other (stream entries, node lists, inbox messages),
# said in each one's liveness key. A replica of another format is not shared with: what it writes
# would be misread, and it misreads ours: its runs come back `node_busy`. Replicas of one swarm are
# upgraded together. "1": every version before replicas said theirs (which still places runs here).
FORMAT = "2"


def federation_client(url: str) -> aioredis.Redis:
    """Our options, with room for the blocking stream reads (a read waits `BLOCK_MS` for news),
    and a command that fails on a broken connection tried once more on a new one. After Redis
    restarts, every idle connection in the pool is broken: each one's next command failed, and a
    relayed batch of events was lost with it (its request stalled for the stall timeout). A
    command tried twice may have been carried out twice: every message here is idempotent or
    recognised when it comes again (`Federation._news_or_events`, `Federation._take`)."""
    return async_client(url, socket_timeout=BLOCK_MS / 1000 + client_options()["socket_timeout"],
                        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                        retry_on_error=[RedisConnectionError])  # fmt: skip


@dataclass
class Foreign:
    """A job this replica's node runs for another replica."""

    replica: str
    node: str


def published(conn: NodeConn, live: bool, foreign_by: Mapping[str, int]) -> bytes:
    """What the other replicas need of a local node to place work on it. It changes only when
    the node reports, its state flips or its work changes: readers skip what they have seen."""
    return orjson.dumps({
        "hello": conn.hello_json,
        "hb": conn.heartbeat_json(),
        "live": live,  # as its holder sees it: the holder alone lets a silent node go
        "jobs": len(conn.jobs) + len(conn.draining),  # what this replica placed there
        "foreign": dict(foreign_by),  # ... and what it runs there for each other replica
        "cadence": [conn.cadence.heartbeat_s, conn.cadence.idle_heartbeat_s],
    })  # fmt: skip


def refusal(state: NodeState) -> str | None:
    """Why a holder turns down another replica's run on its node, or None. Two replicas may
    place work on one free node within the same half second; the holder, which counts every
    job there, runs the first and sends the others back to be placed elsewhere at once."""
    if not state.live:
        return f"node {state.name} is stale"
    if state.owner_busy:
        return f"node {state.name} is serving its owner"
    if state.assigned >= state.capacity:
        return f"node {state.name} is full ({state.assigned} of {state.capacity})"
    return None


@dataclass
class Federation:
    swarm: Swarm
    redis: aioredis.Redis
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    foreign: dict[str, Foreign] = field(default_factory=dict)  # job id -> who asked for it
    live_replicas: set[str] = field(default_factory=set)  # the others, as last read
    _outgoing: dict[str, list[list[str]]] = field(default_factory=dict)  # replica -> [node, event] pairs
    _flush: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sending: set[asyncio.Task[None]] = field(default_factory=set)  # messages on their way to inboxes
    _published: dict[str, bytes] = field(default_factory=dict)  # node -> what was last published
    _read: dict[tuple[str, str], str] = field(default_factory=dict)  # (replica, node) -> what was last read
    _news: set[str] = field(default_factory=set)  # our nodes whose load changed since the last flush
    _dirty: set[str] = field(default_factory=set)  # our nodes changed since the last publication
    _synced_at: float = float("-inf")  # when every node list was last written and read whole
    _first_seen: dict[str, float] = field(default_factory=dict)  # live replica -> when we first saw it
    # Replicas we took for dead, and when: if one comes back, it missed the news we sent meanwhile.
    _dropped: dict[str, float] = field(default_factory=dict)
    # News applied, counted; (replica, node) -> the count when news last touched it. A whole list read
    # is a snapshot from before its answer came: what news changed meanwhile is newer than it.
    _news_count: int = 0
    _touched: dict[tuple[str, str], int] = field(default_factory=dict)
    _sent: int = 0  # batches of events sent, numbered: a batch sent twice (a retried command) is read once
    _received: dict[str, int] = field(default_factory=dict)  # replica -> the number of its last batch read
    # Publishing is computing states, then writing them: one at a time, or an older state could
    # overwrite a newer one (the flusher's news and the periodic publication race otherwise).
    _publishing: asyncio.Lock = field(default_factory=asyncio.Lock)

    _foreign_formats: dict[str, str] = field(default_factory=dict)  # replica of another format -> it

    _failing_since: float | None = None
    _last_complaint: float | None = None

    def _trouble(self, what: str, exc: Exception) -> None:
        """Redis failed: said once, then every `COMPLAIN_EVERY_S` while it lasts (the loops retry
        several times a second; the log must not flood)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if self._last_complaint is None or now - self._last_complaint >= COMPLAIN_EVERY_S:
            self._last_complaint = now
            lasting = f" (failing for {now - self._failing_since:.0f} s)" if now > self._failing_since else ""
            log.error("%s failed: %s%s", what, exc, lasting)

    # --- this replica's nodes, run for others -----------------------------------------------------

    def owns(self, job: str) -> bool:
        """Is this a job one of our nodes runs for another replica?"""
        return job in self.foreign

    def relay(self, conn: NodeConn, ev: JobEvent, raw: str) -> None:
        """An event from our node for another replica's job: pass it on, in order."""
        job = self.foreign.get(ev.job)
        if job is None:
            return
        if ev.ev in ("done", "error"):
            del self.foreign[ev.job]
            conn.foreign.discard(ev.job)
            # A second `done` (one crossing a cancel) is then a late answer, not a protocol breach.
            conn.finished.append(ev.job)
            self.swarm.registry.refresh(conn)
            self.swarm.dispatcher.dispatch()
        self._send_event(job.replica, conn.name, raw)

    def node_left(self, conn: NodeConn) -> None:
        """Our node's connection closed: what it ran for others ends with an error they fail over on."""
        for job_id in list(conn.foreign):
            job = self.foreign.pop(job_id, None)
            if job is not None:
                self._send_event(job.replica, conn.name, dump(JobEvent(job=job_id, ev="error", code="node_gone",
                                                                         message="the node left its replica")))
        conn.foreign.clear()

    def _send_event(self, replica: str, node: str, raw: str) -> None:
        self._outgoing.setdefault(replica, []).append([node, raw])
        self._flush.set()

    def changed(self, conn: NodeConn) -> None:
        """What is published of one of our nodes changed (`Registry.on_change`)."""
        self._dirty.add(conn.name)

    def load_changed(self, conn: NodeConn) -> None:
        """Work on one of our nodes started or ended (`Registry.on_load`): tell the others with the next flush."""
        if self.live_replicas:
            self._news.add(conn.name)
            self._flush.set()

    def _states(self, names: set[str]) -> dict[str, bytes]:
        """What is published of these nodes of ours, now."""
        registry, now = self.swarm.registry, time.monotonic()
        states = {}
        for name in names:
            conn = registry.conns.get(name)
            if conn is not None and conn.replica is None:
                foreign_by = Counter(self.foreign[j].replica for j in conn.foreign if j in self.foreign)
                states[name] = published(conn, conn.state(now, registry.stale_after) == "live", foreign_by)
        return states

    def _tell_others(self, pipe: Any, kind: str, states: Mapping[str, bytes], gone: list[str],
                     to: set[str] | None = None) -> None:  # fmt: skip
        """Queue on `pipe` one entry for each other live replica's event stream (or those `to`):
        our nodes that changed (`kind` "load": work started or ended, sent at once; "changes": at
        publication) and those that left; or, `kind` "all", every node we hold (`states`), so
        that the reader drops those of ours it holds that are not in it."""
        entry = {"r": self.id, "k": kind, "s": orjson.dumps({n: v.decode() for n, v in states.items()}),
                 "g": orjson.dumps(gone)}  # fmt: skip
        for replica in self.live_replicas if to is None else to:
            pipe.xadd(K.events(replica), entry, maxlen=K.STREAM_MAXLEN, approximate=True)
            pipe.expire(K.events(replica), K.STREAM_TTL_S)

    async def _flusher(self) -> None:
        while True:
            await self._flush.wait()
            await asyncio.sleep(FLUSH_S)  # the rest of this burst joins the same entry
            self._flush.clear()
            batches, self._outgoing = self._outgoing, {}
            news, self._news = self._news, set()
            try:
                if batches:  # token events first, and never behind a publication
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for replica, events in batches.items():
                            self._sent += 1
                            pipe.xadd(K.events(replica), {"r": self.id, "q": self._sent, "e": orjson.dumps(events)},
                                      maxlen=K.STREAM_MAXLEN, approximate=True)  # fmt: skip
                            pipe.expire(K.events(replica), K.STREAM_TTL_S)  # a dead replica's stream goes
                        await pipe.execute()
                if news:  # after the events: a requester sees its job end before the node free
                    async with self._publishing:
                        # Sent even when the periodic publication has just written the same state: the
                        # others read that only at their next read, up to `PUBLISH_S` from now.
                        if states := self._states(news):
                            async with self.redis.pipeline(transaction=False) as pipe:
                                pipe.hset(K.replica_nodes(self.id), mapping=states)  # type: ignore[arg-type]
                                self._tell_others(pipe, "load", states, [])
                                await pipe.execute()
                            self._published.update(states)
            except RedisError as exc:  # the requesting replicas will see their fragments stall and move them
                self._trouble(f"relaying {sum(map(len, batches.values()))} events to other replicas", exc)
            except Exception:  # the relay must outlive one bad round: every crossing request depends on it
                log.exception("relaying events to other replicas failed")

    def _take(self, node: str, requester: str, raw: str) -> None:
        """A message for one of our nodes from another replica."""
        conn = self.swarm.registry.conns.get(node)
        message = orjson.loads(raw)
        job = message.get("job", "")
        if conn is None or conn.replica is not None:
            if message.get("type") == "run":
                self._send_event(requester, node, dump(JobEvent(job=job, ev="error", code="node_gone",
                                                                message=f"node {node} is not on this replica")))
            return
        if requester in self._foreign_formats:  # its messages may mean something else: not for our nodes
            if message.get("type") == "run":  # sent back as busy: placed elsewhere, not counted as an attempt
                self._send_event(requester, node, dump(JobEvent(job=job, ev="error", code=NODE_BUSY,
                                                                message="this replica runs another version")))
            return
        if message.get("type") == CUT:  # revoked or forgotten on another replica: cut here, where it is held
            log.warning("node %s cut off at replica %s's word: %s", node, requester, message.get("reason"))
            conn.close(int(message.get("code", 1008)), str(message.get("reason", ""))[:120])
            self.swarm.node_left(conn)
            return
        if message.get("type") == "run":
            RunFragment.model_validate(message)  # a replica is trusted, but a bad message stops here
            if job in self.foreign or job in conn.finished:
                # The same run written twice (a command retried after its answer was lost), or a run
                # that came after its own cancel (each message goes out on its own, and a retried one
                # may land last): run now, it would be an orphan that nobody reads, to its max_tokens.
                return
            state = conn.placement_state(time.monotonic(), self.swarm.registry.stale_after,
                                         self.swarm.registry.floor_tps)  # fmt: skip
            if why := refusal(state):  # placed from a view up to `PUBLISH_S` old: it may be taken since
                conn.finished.append(job)  # over for its sender: the same run written again must not start
                self._send_event(requester, node, dump(JobEvent(job=job, ev="error", code=NODE_BUSY, message=why)))
                return
            self.foreign[job] = Foreign(requester, node)
            conn.foreign.add(job)
            self.swarm.registry.refresh(conn)
        elif message.get("type") == "cancel" and job not in self.foreign:
            # Not run here (turned down, already over, or never arrived): answered as a node answers
            # a cancel for a job it does not hold. Passed on, the node's answer would be an event
            # for a job it does not hold, and this replica would cut off its own healthy node.
            # Remembered as ended: its run, if it is still on its way, must not start it.
            if job not in conn.finished:
                conn.finished.append(job)
            self._send_event(requester, node, dump(JobEvent(job=job, ev="done", finish_reason="cancelled")))
            return
        conn.send(raw)

    async def _follow(self, key: str, what: str, take: Callable[[dict[str, str]], None]) -> None:
        """Read one of this replica's streams (we are its only reader) and pass on each entry, in
        order. What was read is trimmed `KEEP_READ_MS` later: the other replicas' news of their
        nodes, a kilobyte a node, would otherwise fill Redis up to the streams' length cap."""
        last, trimmed = STREAM_START, 0
        while True:
            try:
                answer = await self.redis.xread({key: last}, block=BLOCK_MS, count=500)
            except RedisError as exc:
                self._trouble(f"reading this replica's {what}", exc)
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in _entries(answer):
                last = entry_id
                try:
                    take(fields)
                except Exception:
                    log.exception("an entry of this replica's %s was refused", what)
            read_ms = int(last.partition("-")[0])
            if read_ms - trimmed >= KEEP_READ_MS:
                trimmed = read_ms - KEEP_READ_MS
                try:
                    await self.redis.xtrim(key, minid=f"{trimmed}-0", approximate=True)
                except RedisError as exc:  # a Redis before 6.2 has no MINID; an ACL may forbid XTRIM
                    self._trouble(f"trimming this replica's {what}", exc)

    def _message(self, fields: dict[str, str]) -> None:
        self._take(fields["n"], fields["r"], fields["m"])

    # --- other replicas' nodes, run for us --------------------------------------------------------

    def cut(self, conn: NodeConn, code: int, reason: str) -> None:
        """End a remote node's connection at its holder (an admin revoked or forgot it here)."""
        self._forward(conn, orjson.dumps({"type": CUT, "code": code, "reason": reason}).decode())
        self.swarm.node_left(conn)

    def _forward(self, conn: NodeConn, text: str) -> None:
        """`conn.send` of a remote node: to its holder's inbox."""
        assert conn.replica is not None
        task = asyncio.get_running_loop().create_task(self._xadd_inbox(conn.replica, conn.name, text))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _xadd_inbox(self, replica: str, node: str, text: str) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(K.inbox(replica), {"n": node, "r": self.id, "m": text}, maxlen=K.STREAM_MAXLEN,
                          approximate=True)  # fmt: skip
                pipe.expire(K.inbox(replica), K.STREAM_TTL_S)
                await pipe.execute()
        except RedisError as exc:
            self._trouble(f"sending to node {node} on replica {replica}", exc)
            message = orjson.loads(text)
            if message.get("type") == "run":  # lost on the way: move it now, not after the stall timeout
                self._event(node, dump(JobEvent(job=message.get("job", ""), ev="error", code="node_gone",
                                                message="its replica could not be reached through Redis")),
                            from_holder=False)  # fmt: skip

    def _news_or_events(self, fields: dict[str, str]) -> None:
        if "s" in fields:
            states, gone = orjson.loads(fields["s"]), orjson.loads(fields.get("g", "[]"))
            if fields.get("k") == "all":  # every node it holds: ours of it that are not there left it
                registry = self.swarm.registry
                gone += [n for n, c in registry.conns.items() if c.replica == fields["r"] and n not in states]
            self._news_from(fields["r"], states, gone)
            return
        if "q" in fields:  # numbered by its sender: a batch written twice is read once
            number = int(fields["q"])
            if number <= self._received.get(fields["r"], 0):
                return
            self._received[fields["r"]] = number
        for node, raw in orjson.loads(fields["e"]):
            self._event(node, raw)

    def _news_from(self, replica: str, states: dict[str, str], gone: list[str]) -> None:
        """Another replica's nodes that changed or left: seen now, and waiting work placed on them."""
        if replica not in self.live_replicas:
            return  # not read yet (its whole list is read when it is first seen), or taken for gone
        now = time.monotonic()
        self._news_count += 1
        for name, raw_state in states.items():
            self._read[(replica, name)] = raw_state  # the same text its publication holds: not read twice
            self._touched[(replica, name)] = self._news_count
            try:
                self._remote(replica, name, orjson.loads(raw_state), now)
            except Exception:
                log.exception("node %s published by replica %s was not understood", name, replica)
        for name in gone:
            self._read.pop((replica, name), None)
            self._touched[(replica, name)] = self._news_count
            conn = self.swarm.registry.conns.get(name)
            if conn is not None and conn.replica == replica:
                self.swarm.node_left(conn)  # it left that replica
        self.swarm.dispatcher.dispatch()

    def _event(self, node: str, raw: str, from_holder: bool = True) -> None:
        conn = self.swarm.registry.conns.get(node)
        try:
            ev = JobEvent.model_validate_json(raw)
        except ValueError:
            log.warning("a relayed event from node %s did not parse", node)
            return
        if conn is None or conn.replica is None or (ev.job not in conn.jobs and ev.job not in conn.draining):
            return  # the node left, or the job was already given up
        conn.seen(time.monotonic(), self.swarm.registry.stale_after)
        try:
            self.swarm.on_event(conn, ev)
        except ProtocolError as exc:  # its holder cuts it off for its own work; we stop using it
            log.warning("node %s (on replica %s) broke the protocol: %s", node, conn.replica, exc)
            self.swarm.node_left(conn)
            return
        if from_holder and ev.ev == "error" and ev.code == "node_gone":
            # Its holder no longer has it (its news of that may have been lost): not placed there again.
            self._read.pop((conn.replica, node), None)
            self.swarm.node_left(conn)

    def _remote(self, replica: str, name: str, state: dict[str, Any], now: float) -> None:
        conn = self.swarm.registry.conns.get(name)
        if conn is not None and conn.replica is None:
            return  # it is connected here now: our own connection is the truth
        # Parsed only when changed: most of what a holder publishes is work starting and ending.
        read_as = conn.read_as if conn is not None and conn.replica == replica else None
        if read_as is None or read_as[0] != state["hello"]:
            hello = Hello.model_validate(state["hello"])
            if conn is None or conn.replica != replica or conn.hello != hello:
                if conn is not None:
                    self.swarm.node_left(conn)
                heartbeat_s, idle_s = state["cadence"]
                remote = NodeConn(hello=hello, send=lambda text: None, close=lambda code, reason: None,
                                  cadence=Cadence(heartbeat_s, idle_s), replica=replica)  # fmt: skip
                remote.send = lambda text: self._forward(remote, text)  # the holder cuts it, not us: no close
                self.swarm.registry.join(remote)
                conn, read_as = remote, None
        assert conn is not None
        conn.others = state["jobs"] + sum(n for r, n in state["foreign"].items() if r != self.id)
        if state["hb"] and (read_as is None or read_as[1] != state["hb"]):
            conn.heartbeat = Heartbeat.model_validate(state["hb"])
        conn.read_as = (state["hello"], state["hb"])
        conn.remote_live = bool(state["live"])
        conn.last_seen = now
        self.swarm.registry.refresh(conn)

    def _drop_replica(self, replica: str) -> None:
        self._dropped[replica] = time.monotonic()
        for key in [k for k in self._read if k[0] == replica]:
            del self._read[key]
        for key in [k for k in self._touched if k[0] == replica]:
            del self._touched[key]
        self._received.pop(replica, None)
        self._first_seen.pop(replica, None)
        for conn in [c for c in self.swarm.registry.conns.values() if c.replica == replica]:
            self.swarm.node_left(conn)
        for job_id in [j for j, f in self.foreign.items() if f.replica == replica]:  # nobody waits for these
            held = self.swarm.registry.conns.get(self.foreign[job_id].node)
            if held is not None and held.replica is None:
                held.send(dump(Cancel(job=job_id)))  # its `done` is relayed nowhere and ends the entry

    async def _publish_and_read(self) -> None:
        registry = self.swarm.registry
        now = time.monotonic()
        resync = now - self._synced_at >= RESYNC_S
        async with self._publishing:
            # Only the nodes that changed are published again (`Registry.on_change`): rebuilding every
            # entry took 29 µs a node, twice a second. Every `RESYNC_S` all of them are written again.
            dirty, self._dirty = self._dirty, set()
            names = {n for n, c in registry.conns.items() if c.replica is None} if resync else dirty
            fresh = self._states(names)
            changed = {n: v for n, v in fresh.items() if self._published.get(n) != v}
            gone = [n for n in (self._published if resync else dirty) if n in self._published and n not in fresh]
            written = fresh if resync else changed  # every `RESYNC_S` the whole list, else what changed
            queue = self.swarm.dispatcher.queue.by_user()
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.exists(K.replica_nodes(self.id))
                    pipe.sadd(K.REPLICAS, self.id)
                    if written:
                        pipe.hset(K.replica_nodes(self.id), mapping=written)  # type: ignore[arg-type]
                    if gone:
                        pipe.hdel(K.replica_nodes(self.id), *gone)
                    pipe.expire(K.replica_nodes(self.id), K.REPLICA_NODES_TTL_S)
                    if changed or gone:  # the others read these, not the whole hash
                        self._tell_others(pipe, "changes", changed, gone)
                    pipe.delete(K.replica_queue(self.id))
                    if queue:
                        pipe.hset(K.replica_queue(self.id), mapping=queue)  # type: ignore[arg-type]
                        pipe.expire(K.replica_queue(self.id), K.REPLICA_NODES_TTL_S)
                    pipe.smembers(K.REPLICAS)
                    answers = await pipe.execute()
            except BaseException:
                self._dirty |= dirty  # not published: published next time
                raise
            replicas = answers[-1]
            if not answers[0] and self._published and not resync:
                self._synced_at = float("-inf")  # our list is gone (a Redis restarted empty): write it all
            self._published.update(changed)
            for name in gone:
                self._published.pop(name, None)
        others = sorted(r for r in replicas if r != self.id)  # the client decodes answers
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in others:
                pipe.get(K.replica(r))
            formats = dict(zip(others, await pipe.execute(), strict=True))
        live = {r for r, f in formats.items() if f == FORMAT}
        for dead in [r for r, f in formats.items() if f is None]:
            await self.redis.srem(K.REPLICAS, dead)
        for r, f in formats.items():
            if f is not None and f != FORMAT and self._foreign_formats.get(r) != f:
                log.error("replica %s writes format %s through Redis, this one %s: they cannot share nodes or "
                          "work; upgrade every replica of the swarm to one version", r, f, FORMAT)  # fmt: skip
        self._foreign_formats = {r: f for r, f in formats.items() if f is not None and f != FORMAT}
        for lost in self.live_replicas - live - self._foreign_formats.keys():
            log.warning("replica %s stopped answering: its nodes and the work on them move", lost)
        for lost in self.live_replicas - live:
            self._drop_replica(lost)
        for r in live - self.live_replicas:
            self._first_seen[r] = now
        self.live_replicas = live
        # A replica we took for dead is back (it was slow, not gone): it never took us for dead, so it
        # will not read our whole list before its next resync, and it missed the news we sent meanwhile.
        self._dropped = {r: at for r, at in self._dropped.items() if now - at < RESYNC_S}  # resynced by then
        if back := live & self._dropped.keys():
            async with self._publishing, self.redis.pipeline(transaction=False) as pipe:  # no news half-sent
                self._tell_others(pipe, "all", self._published, [], to=back)
                await pipe.execute()
            for r in back:  # sent: a failed send is tried again next round
                del self._dropped[r]
        elsewhere: dict[str, int] = {}
        for r in sorted(live):
            for lane, count in (await self.redis.hgetall(K.replica_queue(r))).items():
                assert isinstance(lane, str)  # the client decodes answers
                elsewhere[lane] = elsewhere.get(lane, 0) + int(count)
        self.swarm.dispatcher.queue.elsewhere = elsewhere
        # A replica's whole node list is read when it is first seen and every `RESYNC_S`; in between,
        # what changed comes in its entries in our event stream (`_news_from`). Reading every list
        # twice a second cost Redis 2.9 MB/s out at 2,000 nodes, growing with nodes x replicas.
        for r in sorted(live):
            if resync or now - self._first_seen.get(r, now) < FIRST_READS_S:
                await self._read_all(r)
        if resync:
            self._synced_at = now
        now = time.monotonic()
        for r, name in self._read:  # a live holder still has them: its nodes stay as fresh as its key
            held = registry.conns.get(name)
            if held is not None and held.replica == r:
                held.seen(now, registry.stale_after)

    async def _read_all(self, r: str) -> None:
        """Another replica's whole node list, as it published it."""
        registry, since = self.swarm.registry, self._news_count
        nodes = await self.redis.hgetall(K.replica_nodes(r))
        now = time.monotonic()
        newer = {name for (replica, name), count in self._touched.items() if replica == r and count > since}
        for name, raw_state in nodes.items():
            assert isinstance(name, str) and isinstance(raw_state, str)  # the client decodes answers
            if name in newer:
                continue  # news read while this list was on its way is newer than it
            held = registry.conns.get(name)
            if held is not None and held.replica == r and self._read.get((r, name)) == raw_state:
                continue
            self._read[(r, name)] = raw_state
            try:
                self._remote(r, name, orjson.loads(raw_state), now)
            except Exception:
                log.exception("node %s published by replica %s was not understood", name, r)
        for key in [k for k in self._read if k[0] == r and k[1] not in nodes and k[1] not in newer]:
            del self._read[key]
        for conn in [c for c in registry.conns.values() if c.replica == r and c.name not in nodes
                     and c.name not in newer]:  # fmt: skip
            self.swarm.node_left(conn)  # it left that replica
        for key in [k for k in self._touched if k[0] == r and k[1] not in newer]:
            del self._touched[key]  # older than this list: it has them
        self.swarm.dispatcher.dispatch()

    async def _alive(self) -> None:
        """Say this replica is alive, on its own: reading the others' nodes can take longer than
        the key lives on a loaded replica, and the others then took it for dead and dropped its nodes."""
        while True:
            try:
                await self.redis.set(K.replica(self.id), FORMAT, ex=K.REPLICA_TTL_S)
            except RedisError as exc:
                self._trouble("saying this replica is alive", exc)
            await asyncio.sleep(PUBLISH_S)

    async def _publisher(self) -> None:
        while True:
            try:
                await self._publish_and_read()
            except RedisError as exc:
                self._trouble("sharing this replica's nodes through Redis", exc)
            except Exception:
                log.exception("sharing this replica's nodes failed")
            else:
                if self._failing_since is not None:
                    log.warning("Redis answers again: sharing work with the other replicas once more")
                    self._failing_since = self._last_complaint = None
            await asyncio.sleep(PUBLISH_S)

    # --- lifetime ---------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.swarm.registry.on_load = self.load_changed
        self.swarm.registry.on_change = self.changed
        jobs = {"alive": self._alive(), "publish": self._publisher(), "relay": self._flusher(),
                "inbox": self._follow(K.inbox(self.id), "inbox", self._message),
                "events": self._follow(K.events(self.id), "events", self._news_or_events)}  # fmt: skip
        for name, job in jobs.items():
            self._tasks.append(loop.create_task(job, name=f"federation-{name}"))
        log.info("replica %s sharing nodes and work through Redis", self.id)

    async def close(self) -> None:
        self.swarm.registry.on_load = self.swarm.registry.on_change = None
        await asyncio.gather(*self._sending, return_exceptions=True)  # a last cancel still goes out
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(K.replica(self.id), K.replica_nodes(self.id), K.replica_queue(self.id))
                pipe.srem(K.REPLICAS, self.id)
                await pipe.execute()
        await self.redis.aclose()


def _entries(answer: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """The entries of an XREAD answer, in order: (entry id, fields)."""
    for _, entries in answer or ():
        yield from entries
