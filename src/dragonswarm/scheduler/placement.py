"""Where a fragment (one unit of work for one model) runs: a rank per node, and an index to choose fast.

`choose` is the reference: one pass over every node. `PlacementIndex` keeps the same ranks filed in
buckets, so a decision walks the few distinct ranks instead of thousands of nodes.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Collection, Iterable
from dataclasses import dataclass

Rank = tuple[int, int, int, int, int]

# Round-trip time buckets, in ms: a LAN, a city, a country, a continent, across an ocean, a bad link.
# Coarse, so that jitter within a path's range does not reorder nodes and the index keeps few ranks.
RTT_EDGES_MS = (5.0, 20.0, 50.0, 100.0, 200.0, 500.0)
RTT_UNKNOWN = len(RTT_EDGES_MS) + 1  # not measured yet: after every measured one


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the orchestrator knows about one node, as far as placement cares."""

    name: str
    models: frozenset[str]  # models the node can serve
    loaded: frozenset[str]  # models with a warm (loaded) runner
    capacity: int  # fragments it may run at once
    assigned: int  # fragments the orchestrator has placed on it now
    owner_busy: bool  # the machine's owner is using it: never place work there
    load: float  # machine CPU in use, 0..1
    live: bool  # heartbeats are fresh
    # The owner's traffic fills the node's link: every fragment streams its answer back over it.
    net_busy: bool = False
    rtt_ms: float | None = None  # round trip node <-> orchestrator; None until measured
    # Held by another replica (`orchestrator/federation`): a Redis hop away, and its holder places its
    # own work there from a fresher view. Among equals a replica takes its own nodes first.
    remote: bool = False


def streams_within_floor(capacity: int, stream_tps: float | None, measured_at: float, floor_tps: float) -> int:
    """Fragments a node may run at once so that each stream keeps at least `floor_tps` tokens/s.

    A node's streams share one model process (continuous batching): each added stream makes
    every stream slower. Judged from the node's own measurement (`stream_tps` per stream while
    it ran `measured_at` streams on average), taking the aggregate as flat: batching only adds
    to it, so the real rate is at least this. One stream is always allowed, and a node that
    has measured nothing yet gets one until it has. A floor of 0 turns this off."""
    if floor_tps <= 0:
        return capacity
    if not stream_tps or measured_at <= 0:
        return 1
    return max(1, min(capacity, int(stream_tps * max(1.0, measured_at) / floor_tps)))


def rtt_bucket(rtt_ms: float | None) -> int:
    """0 for the nearest nodes, up to `RTT_UNKNOWN` for nodes not measured yet."""
    if rtt_ms is None:
        return RTT_UNKNOWN
    # An edge value goes to the bucket above it: "< 5 ms" is bucket 0. A bogus negative reads as 0.
    return bisect_right(RTT_EDGES_MS, max(0.0, rtt_ms))


def rank(node: NodeState, model: str) -> Rank | None:
    """None if the node cannot take a fragment of `model` now; else a sort key, lower is better."""
    if not node.live or node.owner_busy or node.net_busy or model not in node.models or node.assigned >= node.capacity:
        return None
    # Coarse load buckets: small load differences are noise, and few distinct keys keep the index fast.
    # Clamped at 0 too, so a bogus negative reading cannot jump the queue.
    bucket = max(0, min(9, int(node.load * 10)))
    # The round trip comes last: tokens stream back sooner from a nearer node, but a warm runner or a
    # free machine saves far more than the few milliseconds between buckets.
    return (0 if model in node.loaded else 1, node.assigned, int(node.remote), bucket, rtt_bucket(node.rtt_ms))


def choose(model: str, nodes: Iterable[NodeState], exclude: Collection[str] = ()) -> str | None:
    """Reference single pass: the eligible node with the lowest rank (ties: first seen; the index
    may pick another of the same rank, another replica's newest filed)."""
    best: Rank | None = None
    best_name: str | None = None
    for node in nodes:
        if node.name in exclude:
            continue
        key = rank(node, model)
        if key is not None and (best is None or key < best):
            best, best_name = key, node.name
    return best_name


class _Buckets:
    """The eligible nodes for one model, filed by rank; `keys` lists the non-empty ranks in order."""

    __slots__ = ("buckets", "keys")

    def __init__(self) -> None:
        # A dict per rank keeps insertion order (ties go to the longest-filed node) and O(1) removal.
        self.buckets: dict[Rank, dict[str, None]] = {}
        self.keys: list[Rank] = []

    def add(self, key: Rank, name: str) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = {}
            insort(self.keys, key)
        bucket[name] = None

    def discard(self, key: Rank, name: str) -> None:
        bucket = self.buckets[key]
        del bucket[name]
        if not bucket:
            del self.buckets[key]
            del self.keys[bisect_left(self.keys, key)]

    def first(self, exclude: Collection[str]) -> str | None:
        for key in self.keys:
            bucket = self.buckets[key]
            # Another replica's nodes, newest filed first: their holder takes the longest-free first,
            # and two replicas reaching for the same freed node cost the loser a round trip (`node_busy`).
            for name in reversed(bucket) if key[2] else bucket:
                if name not in exclude:
                    return name
        return None


class PlacementIndex:
    """Incremental index for fast placement over thousands of nodes: choose() costs O(buckets), not O(nodes)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeState] = {}
        self._filed: dict[str, dict[str, Rank]] = {}  # node name -> model -> the rank it is filed under
        self._models: dict[str, _Buckets] = {}

    def update(self, node: NodeState) -> None:
        """Insert the node, or replace the one with its name."""
        name = node.name
        old = self._filed.get(name, {})
        new: dict[str, Rank] = {}
        for model in node.models:
            key = rank(node, model)
            if key is not None:
                new[model] = key
        for model, key in old.items():
            if new.get(model) != key:
                self._unfile(model, key, name)
        for model, key in new.items():
            # An unchanged rank keeps its place in the bucket, so a heartbeat does not reorder ties.
            if old.get(model) != key:
                self._models.setdefault(model, _Buckets()).add(key, name)
        self._nodes[name] = node
        if new:
            self._filed[name] = new
        else:
            self._filed.pop(name, None)

    def remove(self, name: str) -> None:
        """Forget the node; an unknown name is a no-op."""
        if self._nodes.pop(name, None) is None:
            return
        for model, key in self._filed.pop(name, {}).items():
            self._unfile(model, key, name)

    def get(self, name: str) -> NodeState | None:
        """The node's last known state, eligible or not."""
        return self._nodes.get(name)

    def __len__(self) -> int:
        return len(self._nodes)

    def choose(self, model: str, exclude: Collection[str] = ()) -> str | None:
        """A node of the best rank for `model`, not in `exclude` (pass a set when it is large); None if none."""
        buckets = self._models.get(model)
        return None if buckets is None else buckets.first(exclude)

    def eligible(self, model: str, name: str) -> bool:
        """The node can take a fragment of `model` now (whatever its rank)."""
        return model in self._filed.get(name, {})

    def _unfile(self, model: str, key: Rank, name: str) -> None:
        buckets = self._models[model]
        buckets.discard(key, name)
        if not buckets.keys:
            # Models come and go with nodes; drop empty ones so churn does not grow the index.
            del self._models[model]
