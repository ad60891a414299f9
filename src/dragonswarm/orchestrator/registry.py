"""The live nodes: one `NodeConn` per WebSocket, and the placement index fed from them.

Only what is truly per-process lives here (open connections, what they are running).
What outlives a connection (node names, first/last seen, last figures) is written to
the store, so `dragon status` and a restarted orchestrator still know it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.swarm import Heartbeat, Hello
from dragonswarm.scheduler.placement import NodeState, PlacementIndex, streams_within_floor
from dragonswarm.store.base import NodeRecord


def model_key(name: str, sha256: str) -> str:
    """A model as placement knows it: its name and its file, so that two different files
    served under one name never share a request."""
    return f"{name}@{sha256}"


@dataclass(eq=False)
class NodeConn:
    """One connected node, as the orchestrator sees it."""

    hello: Hello
    send: Callable[[str], None]  # queue a message for the node (never blocks)
    close: Callable[[int, str], None]  # end the connection with a WebSocket close code
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat | None = None
    jobs: set[str] = field(default_factory=set)  # the attempts (job ids) it runs for us
    # Jobs we cancelled or gave up on (-> when): the node holds its runner until it says done.
    draining: dict[str, float] = field(default_factory=dict)
    finished: deque[str] = field(default_factory=lambda: deque(maxlen=256))  # recently ended job ids
    served: int = 0  # fragments it finished
    tokens: int = 0  # tokens it generated that were relayed
    cut_off: str | None = None  # why we ended this connection, when it broke the protocol (kept in its record)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    cadence: Cadence = field(default_factory=Cadence)  # the reporting periods its `welcome` allowed
    # With replicas (`federation`): the replica holding this node's connection (None: this one),
    # the jobs it runs here for other replicas, and, for a node held elsewhere, the work its
    # holder and the other replicas have placed on it.
    replica: str | None = None
    foreign: set[str] = field(default_factory=set)
    others: int = 0
    remote_live: bool = True  # a remote node's state, as its holder last published it
    # A remote node's hello and heartbeat as last read (JSON values): the same again is not parsed
    # again (most of what a holder publishes is its work starting and ending). For a local node,
    # its heartbeat as last published.
    read_as: tuple[dict[str, Any], dict[str, Any] | None] | None = field(default=None, repr=False)
    _published_hb: tuple[Heartbeat, dict[str, Any]] | None = field(default=None, repr=False)
    _dumped: tuple[Heartbeat, dict[str, Any]] | None = field(default=None, repr=False)
    _slack: tuple[Heartbeat | None, float] | None = field(default=None, repr=False)
    # When it turns stale if nothing more is heard (monotonic; `seen` and `Registry.refresh` keep
    # it): housekeeping picks out the few nodes past it with one comparison each.
    stale_at: float = 0.0
    _cpu: tuple[int, float, float] | None = field(default=None, repr=False)  # its figures in `SwarmCpu`

    @property
    def name(self) -> str:
        return self.hello.name

    @cached_property  # `hello` never changes for a connection
    def keys(self) -> dict[str, str]:
        """Model name -> its placement key."""
        return {m.name: model_key(m.name, m.sha256) for m in self.hello.models}

    @cached_property
    def n_ctx(self) -> dict[str, int]:
        """Placement key -> the context that model runs with here (0: not said)."""
        return {model_key(m.name, m.sha256): m.n_ctx for m in self.hello.models}

    @cached_property
    def models(self) -> frozenset[str]:
        return frozenset(self.keys.values())

    def age(self, now: float) -> float:
        return now - self.last_seen

    def slack(self) -> float:
        """How many heartbeat periods this node may stay silent, by its last heartbeat (`Cadence.slack`).
        Kept per heartbeat: time alone is read for every node twice a second, beats come far less often."""
        hb = self.heartbeat
        if self._slack is None or self._slack[0] is not hb:
            self._slack = (hb, self.cadence.slack(hb))
        return self._slack[1]

    def seen(self, now: float, stale_after: float) -> None:
        """Heard from it at `now` (a heartbeat, an event, or its holder's word for a remote node)."""
        self.last_seen = now
        self.stale_at = now + stale_after * self.slack()

    def state(self, now: float, stale_after: float) -> str:
        """`stale_after` is for a node beating every `heartbeat_s`; a quiet one may be silent longer.
        A node held by another replica is what its holder says (which drops it when it goes)."""
        if self.replica is not None:
            return "live" if self.remote_live else "stale"
        return "live" if self.age(now) <= stale_after * self.slack() else "stale"

    def gone(self, now: float, stale_after: float, gone_after: float) -> bool:
        """Silent for so long that its connection is taken for dead: the margin past stale is
        `gone_after - stale_after`, after the silence its last heartbeat allowed."""
        return self.age(now) > gone_after + stale_after * (self.slack() - 1)

    def placement_state(self, now: float, stale_after: float, floor_tps: float = 0.0) -> NodeState:
        hb = self.heartbeat
        held = len(self.jobs) + len(self.draining) + len(self.foreign) + self.others
        # What we placed there we know exactly; what the owner runs comes with heartbeats.
        # A machine serving its owner is not given work for others.
        busy = held + (hb.local_busy if hb else 0)
        loaded = hb.loaded if hb else [m.name for m in self.hello.models if m.loaded]
        capacity = streams_within_floor(self.hello.capacity, hb.stream_tps if hb else None, hb.streams if hb else 0.0,
                                        floor_tps)  # fmt: skip
        return NodeState(
            name=self.name,
            models=self.models,
            loaded=frozenset(self.keys[n] for n in loaded if n in self.keys),
            capacity=capacity,
            assigned=busy,
            # Paused lending, or the owner's own requests running (work for others would share the
            # owner's model process): as if busy.
            owner_busy=(hb.owner_busy or hb.lending_paused or hb.local_busy > 0) if hb else False,
            load=hb.cpu_total if hb else 0.0,
            live=self.state(now, stale_after) == "live",
            net_busy=hb.net_busy if hb else False,
            rtt_ms=hb.rtt_ms if hb else None,
            remote=self.replica is not None,
        )

    @cached_property
    def _hello_info(self) -> dict[str, Any]:
        # Dumped once: every node's record is built every 2 s, and the models' dump was most of it.
        return {
            "models": [m.model_dump() for m in self.hello.models],
            "share": self.hello.share,
            "local_share": self.hello.local_share,
            "cpus": self.hello.cpus,
            "ram_total": self.hello.ram_total,
            "capacity": self.hello.capacity,  # as granted: what the node claimed, within policy
        }

    @cached_property  # `hello` never changes for a connection
    def hello_json(self) -> dict[str, Any]:
        """Its hello as JSON values, as replicas publish it."""
        return self.hello.model_dump(mode="json")

    def heartbeat_json(self) -> dict[str, Any] | None:
        """Its last heartbeat as JSON values (dumped once per heartbeat), as replicas publish it."""
        hb = self.heartbeat
        if hb is None:
            return None
        if self._published_hb is None or self._published_hb[0] is not hb:
            self._published_hb = (hb, hb.model_dump(mode="json"))
        return self._published_hb[1]

    def _heartbeat_info(self, hb: Heartbeat) -> dict[str, Any]:
        # A quiet node's heartbeat outlives a few records: dump it once.
        if self._dumped is None or self._dumped[0] is not hb:
            self._dumped = (hb, hb.model_dump(exclude={"type", "running"}))
        return self._dumped[1]

    def record(self, now: float, stale_after: float) -> NodeRecord:
        info: dict[str, Any] = {**self._hello_info, "running": len(self.jobs), "served": self.served,
                                "tokens": self.tokens}
        if self.cut_off:
            info["cut_off"] = self.cut_off
        if self.replica:
            info["replica"] = self.replica
        if self.replica or self.foreign:  # with replicas: the work the others placed there, as last known
            info["running_elsewhere"] = len(self.foreign) + self.others
        if self.heartbeat:
            info.update(self._heartbeat_info(self.heartbeat))
        last_seen = time.time() - self.age(now)
        return NodeRecord(self.name, self.joined, last_seen, self.state(now, stale_after), info)


class SwarmCpu:
    """The swarm's CPU, weighted by each machine's cores, kept as running sums: each node's last
    report replaces its previous one, and a node that leaves takes its figures along. (Summing
    ten thousand reports for the dashboard's chart took about 40 ms of the loop every second.)
    A stale node counts with its last report until it is let go."""

    def __init__(self) -> None:
        self.cores = self.total = self.ours = 0.0
        self.nodes = 0

    def count(self, conn: NodeConn) -> None:
        """Count `conn`'s latest heartbeat instead of what was counted for it (if anything)."""
        hb = conn.heartbeat
        figures = (conn.hello.cpus or 1, hb.cpu_total, hb.cpu_ours) if hb else None
        if figures != conn._cpu:
            self.drop(conn)
            if figures is not None:
                cores, total, ours = figures
                self.cores += cores
                self.total += total * cores
                self.ours += ours * cores
                self.nodes += 1
                conn._cpu = figures

    def drop(self, conn: NodeConn) -> None:
        if conn._cpu is not None:
            cores, total, ours = conn._cpu
            self.cores -= cores
            self.total -= total * cores
            self.ours -= ours * cores
            self.nodes -= 1
            conn._cpu = None
            if not self.nodes:  # no drift left behind by the floating-point sums
                self.cores = self.total = self.ours = 0.0

    def use(self) -> tuple[float, float]:
        """All use, and ours, as fractions of the swarm's cores."""
        if self.cores <= 0:
            return 0.0, 0.0
        return max(0.0, self.total / self.cores), max(0.0, self.ours / self.cores)


class Registry:
    def __init__(self, stale_after: float, floor_tps: float = 0.0):
        self.stale_after = stale_after
        self.floor_tps = floor_tps  # tokens/s each stream on a node must keep (`streams_within_floor`)
        self.conns: dict[str, NodeConn] = {}
        self.cpu = SwarmCpu()
        self.departures = 0  # connections that have left, ever
        self.index = PlacementIndex()
        # The model index is updated per join and leave, never rebuilt: with ten thousand
        # nodes a rebuild costs about 11 ms, and a reconnect storm paid it once per node.
        # Dicts serve as ordered sets, so a leave costs O(1) however many nodes serve the model.
        self._serving: dict[str, dict[NodeConn, None]] = {}  # model -> connected nodes that serve it
        self._by_file: dict[str, dict[NodeConn, None]] = {}  # model key -> connected nodes that hold that file
        self._files: dict[str, list[str]] = {}  # model -> its files' sha256, the most widely held first
        self._tags: dict[str, list[str]] = {}  # model -> the union of its tags
        self._tag_counts: dict[str, dict[str, int]] = {}  # model -> tag -> how many of its nodes give it
        self._contexts: dict[str, Counter[int]] = {}  # model -> context size -> how many of its files run with it
        # Called with a node of this replica whose load changed (work placed or ended, its owner busy
        # or not): with replicas, `federation` tells the others at once rather than at its next
        # publication, so a node freed here is not left idle for half a second by the others.
        self.on_load: Callable[[NodeConn], None] | None = None
        # ... and with any change to what is published of a node of this replica (it joined, left,
        # reported, its work or its state changed): only those are published again, not all of them.
        self.on_change: Callable[[NodeConn], None] | None = None

    def join(self, conn: NodeConn) -> None:
        """Add a node (a connection it replaces has already left: see `ws._serve`)."""
        old = self.conns.pop(conn.name, None)
        if old is not None:  # it should have left already; it must not linger in the model index
            self._unindex(old)
            self.cpu.drop(old)
        self.conns[conn.name] = conn
        self._index(conn)
        self.refresh(conn)

    def claimed(self, name: str, now: float) -> bool:
        """A live connection to this replica already speaks for this name (one held by another
        replica is replaced: the node has moved here)."""
        old = self.conns.get(name)
        return old is not None and old.replica is None and old.state(now, self.stale_after) == "live"

    def leave(self, conn: NodeConn) -> bool:
        if self.conns.get(conn.name) is not conn:
            return False  # already replaced by a newer connection of the same node
        del self.conns[conn.name]
        self._changed(conn)
        self.departures += 1
        self.cpu.drop(conn)
        self.index.remove(conn.name)
        self._unindex(conn)
        return True

    def _index(self, conn: NodeConn) -> None:
        for name, (shas, tags) in offered(conn).items():
            if name not in self._serving:
                self._serving[name], self._files[name], self._tags[name], self._tag_counts[name] = {}, [], [], {}
            self._serving[name][conn] = None
            for sha in shas:
                holders = self._by_file.setdefault(model_key(name, sha), {})
                if not holders:
                    self._files[name].append(sha)
                holders[conn] = None
            counts = self._tag_counts[name]
            for tag in tags:
                if tag not in counts:
                    counts[tag] = 0
                    self._tags[name].append(tag)
                counts[tag] += 1
            self._sort_files(name)
        for m in conn.hello.models:
            self._contexts.setdefault(m.name, Counter())[m.n_ctx] += 1

    def _unindex(self, conn: NodeConn) -> None:
        for m in conn.hello.models:
            contexts = self._contexts[m.name]
            contexts[m.n_ctx] -= 1
            if not contexts[m.n_ctx]:
                del contexts[m.n_ctx]
            if not contexts:
                del self._contexts[m.name]
        for name, (shas, tags) in offered(conn).items():
            serving = self._serving[name]
            del serving[conn]
            for sha in shas:
                key = model_key(name, sha)
                holders = self._by_file[key]
                del holders[conn]
                if not holders:
                    del self._by_file[key]
                    self._files[name].remove(sha)
            if not serving:
                del self._serving[name], self._files[name], self._tags[name], self._tag_counts[name]
                continue
            counts = self._tag_counts[name]
            for tag in tags:
                counts[tag] -= 1
                if not counts[tag]:
                    del counts[tag]
                    self._tags[name].remove(tag)
            self._sort_files(name)

    def _sort_files(self, model: str) -> None:
        # A model has one file or a few: sorting them again is cheaper than keeping counts sorted.
        # Ties go by sha256, so the order does not depend on the order nodes came and went.
        self._files[model].sort(key=lambda sha: (-len(self._by_file[model_key(model, sha)]), sha))

    def heartbeat(self, conn: NodeConn, hb: Heartbeat) -> None:
        conn.heartbeat = hb
        conn.last_seen = time.monotonic()
        self.refresh(conn)

    def refresh(self, conn: NodeConn) -> None:
        """What placement reads of a node changed (a heartbeat, work placed or ended): show it."""
        if self.conns.get(conn.name) is conn:
            conn.seen(conn.last_seen, self.stale_after)  # its last beat may have changed the period allowed
            self.cpu.count(conn)
            before = self.index.get(conn.name)
            state = conn.placement_state(time.monotonic(), self.stale_after, self.floor_tps)
            self.index.update(state)
            self._changed(conn)
            if (self.on_load is not None and conn.replica is None and before is not None
                    and (before.assigned, before.owner_busy) != (state.assigned, state.owner_busy)):  # fmt: skip
                self.on_load(conn)

    def recheck(self, conn: NodeConn, now: float) -> None:
        """Show a node that went live -> stale (or back) in placement. Only time changes that;
        everything else comes with a `refresh`, so the sweep over every node updates just the
        few whose state flipped (at 10,000 nodes a full refresh took about 120 ms, twice a second)."""
        placed = self.index.get(conn.name)
        live = conn.state(now, self.stale_after) == "live"
        if self.conns.get(conn.name) is conn and (placed is None or placed.live != live):
            self.index.update(conn.placement_state(now, self.stale_after, self.floor_tps))
            self._changed(conn)

    def _changed(self, conn: NodeConn) -> None:
        if self.on_change is not None and conn.replica is None:  # another replica's node is its to publish
            self.on_change(conn)

    def serving(self, model: str) -> Collection[NodeConn]:
        """Connected nodes that can serve `model`, live or not, in the order they joined."""
        return self._serving.get(model, {}).keys()

    def serving_file(self, key: str) -> Collection[NodeConn]:
        """Connected nodes that hold this model file (a `model_key`), live or not, in the order they joined."""
        return self._by_file.get(key, {}).keys()

    def files(self, model: str) -> list[str]:
        """The sha256 of every file served under this name, the most widely held first."""
        return self._files.get(model, [])

    def largest_context(self, model: str) -> int:
        """The largest context any connected node runs `model` with (0: none said)."""
        return max(self._contexts.get(model, ()), default=0)

    def model_tags(self) -> Mapping[str, list[str]]:
        """Every model some node serves, with the union of its tags: models in the order they
        appeared (since they were last served by nobody), tags in the order they were first given."""
        return self._tags

    def states(self) -> dict[str, int]:
        """How many connected nodes are live, and how many stale."""
        now = time.monotonic()
        counts = {"live": 0, "stale": 0}
        for conn in self.conns.values():
            counts[conn.state(now, self.stale_after)] += 1
        return counts

    def records(self, local: bool = False) -> list[NodeRecord]:
        """Every node's record; `local`: only those connected to this replica."""
        now = time.monotonic()
        return [c.record(now, self.stale_after) for c in self.conns.values() if not (local and c.replica)]


def offered(conn: NodeConn) -> dict[str, tuple[list[str], list[str]]]:
    """What a node adds to the model index: model name -> (its files' sha256, its tags), each
    once, in the order the node listed them (a name may come with several files)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for m in conn.hello.models:
        shas, tags = out.setdefault(m.name, ([], []))
        if m.sha256 not in shas:
            shas.append(m.sha256)
        tags.extend(t for t in m.tags if t not in tags)
    return out
