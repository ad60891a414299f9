"""The live nodes: one `NodeConn` per WebSocket, and the placement index fed from them.

Only what is truly per-process lives here (open connections, what they are running).
What outlives a connection (node names, first/last seen, last figures) is written to
the store, so `dragon status` and a restarted orchestrator still know it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dragonswarm.protocol.swarm import Heartbeat, Hello
from dragonswarm.scheduler.placement import NodeState, PlacementIndex
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
    served: int = 0
    left: asyncio.Event = field(default_factory=asyncio.Event)

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

    def state(self, now: float, stale_after: float) -> str:
        return "live" if self.age(now) <= stale_after else "stale"

    def placement_state(self, now: float, stale_after: float) -> NodeState:
        hb = self.heartbeat
        held = len(self.jobs) + len(self.draining)
        # What we placed there we know exactly; what the owner runs comes with heartbeats.
        # A machine serving its owner is not given work for others.
        busy = held + (hb.local_busy if hb else 0)
        loaded = hb.loaded if hb else [m.name for m in self.hello.models if m.loaded]
        return NodeState(
            name=self.name,
            models=self.models,
            loaded=frozenset(self.keys[n] for n in loaded if n in self.keys),
            capacity=self.hello.capacity,
            assigned=busy,
            owner_busy=hb.owner_busy if hb else False,
            load=hb.cpu_total if hb else 0.0,
            live=self.state(now, stale_after) == "live",
            net_busy=hb.net_busy if hb else False,
            rtt_ms=hb.rtt_ms if hb else None,
        )

    def record(self, now: float, stale_after: float) -> NodeRecord:
        info: dict[str, Any] = {
            "models": [m.model_dump() for m in self.hello.models],
            "share": self.hello.share,
            "local_share": self.hello.local_share,
            "cpus": self.hello.cpus,
            "ram_total": self.hello.ram_total,
            "capacity": self.hello.capacity,  # as granted: what the node claimed, within policy
            "running": len(self.jobs),
            "served": self.served,
        }
        if self.heartbeat:
            info.update(self.heartbeat.model_dump(exclude={"type", "running"}))
        last_seen = time.time() - self.age(now)
        return NodeRecord(self.name, self.joined, last_seen, self.state(now, stale_after), info)


class Registry:
    def __init__(self, stale_after: float):
        self.stale_after = stale_after
        self.conns: dict[str, NodeConn] = {}
        self.index = PlacementIndex()
        self._serving: dict[str, list[NodeConn]] = {}  # model -> connected nodes that serve it
        self._by_file: dict[str, list[NodeConn]] = {}  # model key -> connected nodes that hold that file
        self._files: dict[str, list[str]] = {}  # model -> its files' sha256, the most widely held first
        self._tags: dict[str, list[str]] = {}  # model -> the union of its tags

    def join(self, conn: NodeConn) -> None:
        """Add a node (a connection it replaces has already left: see `ws._serve`)."""
        self.conns[conn.name] = conn
        self._index_models()
        self.refresh(conn)

    def claimed(self, name: str, now: float) -> bool:
        """A live connection already speaks for this name."""
        old = self.conns.get(name)
        return old is not None and old.state(now, self.stale_after) == "live"

    def leave(self, conn: NodeConn) -> bool:
        if self.conns.get(conn.name) is not conn:
            return False  # already replaced by a newer connection of the same node
        del self.conns[conn.name]
        self.index.remove(conn.name)
        self._index_models()
        return True

    def _index_models(self) -> None:
        # Rebuilt on join and leave (rare), so that the per-request lookups below are O(1).
        self._serving = {}
        self._by_file = {}
        self._tags = {}
        for conn in self.conns.values():
            for m in conn.hello.models:
                self._serving.setdefault(m.name, []).append(conn)
                self._by_file.setdefault(model_key(m.name, m.sha256), []).append(conn)
                known = self._tags.setdefault(m.name, [])
                known.extend(t for t in m.tags if t not in known)
        files: dict[str, dict[str, int]] = {}
        for key, conns in self._by_file.items():
            name, _, sha = key.rpartition("@")
            files.setdefault(name, {})[sha] = len(conns)
        self._files = {name: sorted(counts, key=lambda sha: -counts[sha]) for name, counts in files.items()}

    def heartbeat(self, conn: NodeConn, hb: Heartbeat) -> None:
        conn.heartbeat = hb
        conn.last_seen = time.monotonic()
        self.refresh(conn)

    def refresh(self, conn: NodeConn) -> None:
        if self.conns.get(conn.name) is conn:
            self.index.update(conn.placement_state(time.monotonic(), self.stale_after))

    def serving(self, model: str) -> list[NodeConn]:
        """Connected nodes that can serve `model`, live or not."""
        return self._serving.get(model, [])

    def serving_file(self, key: str) -> list[NodeConn]:
        """Connected nodes that hold this model file (a `model_key`), live or not."""
        return self._by_file.get(key, [])

    def files(self, model: str) -> list[str]:
        """The sha256 of every file served under this name, the most widely held first."""
        return self._files.get(model, [])

    def model_tags(self) -> Mapping[str, list[str]]:
        """Every model some node serves, with the union of its tags, in join order."""
        return self._tags

    def records(self) -> list[NodeRecord]:
        now = time.monotonic()
        return [c.record(now, self.stale_after) for c in self.conns.values()]
