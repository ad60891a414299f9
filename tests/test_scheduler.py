"""Scheduling decisions, tested with plain values: placement, the fair queue, model choice, local-first."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonswarm.scheduler.fairqueue import FairQueue, QueueFull, admission_room, fair_share
from dragonswarm.scheduler.local import serve_locally
from dragonswarm.scheduler.models import looks_like_code, pick_model
from dragonswarm.scheduler.placement import RTT_UNKNOWN, NodeState, PlacementIndex, choose, rank, rtt_bucket

MODELS = ("gemma", "qwen-coder", "llama", "phi")


def node(name: str, **changes: Any) -> NodeState:
    """An idle, live, cold node serving model "m" with room for two fragments, changed as asked."""
    base = NodeState(name=name, models=frozenset({"m"}), loaded=frozenset(), capacity=2, assigned=0,
                     owner_busy=False, load=0.0, live=True)  # fmt: skip
    return replace(base, **changes)


# --- rank and the reference choose ---------------------------------------------------------------


def test_rank_key() -> None:
    assert rank(node("a", loaded=frozenset({"m"}), assigned=1, load=0.37, rtt_ms=3.0), "m") == (0, 1, 0, 3, 0)
    assert rank(node("a", assigned=0, load=0.0, rtt_ms=60.0), "m") == (1, 0, 0, 0, 3)
    assert rank(node("a", remote=True, load=0.0, rtt_ms=60.0), "m") == (1, 0, 1, 0, 3)
    # Load buckets saturate at 9, whatever the machine reports.
    assert rank(node("a", load=0.95), "m") == (1, 0, 0, 9, RTT_UNKNOWN)
    assert rank(node("a", load=1.0), "m") == (1, 0, 0, 9, RTT_UNKNOWN)
    assert rank(node("a", load=3.0), "m") == (1, 0, 0, 9, RTT_UNKNOWN)


def test_a_replica_takes_its_own_nodes_first_and_the_others_newest_filed_first() -> None:
    """Two replicas reaching for the same freed node cost the loser a round trip through Redis
    (`node_busy`): the holder takes its own longest-free node first, so another replica takes the
    node its holder reaches for last. At 300 users on two replicas, 429 of 1,501 runs bounced so."""
    index = PlacementIndex()
    for name in ("r1", "r2", "r3"):
        index.update(node(name, remote=True))
    assert index.choose("m") == "r3"
    index.update(node("here", load=0.5))  # a busier machine of our own still comes first among equals
    assert index.choose("m") == "here"
    assert index.choose("m", {"here"}) == "r3"
    assert index.choose("m", {"here", "r3"}) == "r2"
    index.update(node("r1", remote=True, loaded=frozenset({"m"})))  # a warm runner outranks all of it
    assert index.choose("m") == "r1"


@pytest.mark.parametrize(
    ("rtt_ms", "bucket"),
    [(0.0, 0), (0.3, 0), (4.99, 0), (5.0, 1), (19.9, 1), (20.0, 2), (49.0, 2), (99.0, 3), (150.0, 4),
     (499.0, 5), (500.0, 6), (30_000.0, 6), (-1.0, 0), (None, RTT_UNKNOWN)],
)  # fmt: skip
def test_rtt_bucket(rtt_ms: float | None, bucket: int) -> None:
    assert rtt_bucket(rtt_ms) == bucket


def test_rtt_bucket_is_monotonic_and_unknown_is_last() -> None:
    buckets = [rtt_bucket(ms / 10) for ms in range(0, 20_000)]
    assert buckets == sorted(buckets)
    assert max(buckets) < rtt_bucket(None)


def test_lower_rtt_wins_among_equals() -> None:
    nodes = [node("far", rtt_ms=120.0), node("unmeasured"), node("near", rtt_ms=2.0), node("mid", rtt_ms=30.0)]
    assert choose("m", nodes) == "near"
    assert choose("m", nodes, exclude={"near"}) == "mid"
    assert choose("m", nodes, exclude={"near", "mid"}) == "far"
    assert choose("m", nodes, exclude={"near", "mid", "far"}) == "unmeasured"
    assert build(nodes).choose("m") == "near"


def test_rtt_never_outranks_warm_assigned_or_load() -> None:
    # A near node loses to any better earlier component: the round trip only breaks ties.
    near = {"rtt_ms": 1.0}
    far = {"rtt_ms": 400.0}
    assert choose("m", [node("near", **near), node("warm", loaded=frozenset({"m"}), **far)]) == "warm"
    assert choose("m", [node("near", assigned=1, **near), node("idle", **far)]) == "idle"
    assert choose("m", [node("near", load=0.5, **near), node("quiet", load=0.0, **far)]) == "quiet"
    # Jitter inside a bucket does not reorder: first seen wins, as with equal load.
    assert choose("m", [node("a", rtt_ms=9.0), node("b", rtt_ms=6.0)]) == "a"


def test_net_busy_is_never_chosen() -> None:
    best = {"loaded": frozenset({"m"}), "rtt_ms": 1.0}
    nodes = [node("saturated", net_busy=True, **best), node("ok", assigned=1, load=0.9, rtt_ms=450.0)]
    assert choose("m", nodes) == "ok"
    assert build(nodes).choose("m") == "ok"
    assert choose("m", nodes[:1]) is None and build(nodes[:1]).choose("m") is None
    assert not build(nodes).eligible("m", "saturated")


@pytest.mark.parametrize(
    "changes",
    [
        {"live": False},
        {"owner_busy": True},
        {"net_busy": True},
        {"models": frozenset({"other"})},
        {"assigned": 2},  # at capacity
        {"assigned": 3},  # over capacity
        {"capacity": 0},
    ],
)
def test_rank_ineligible(changes: dict[str, Any]) -> None:
    assert rank(node("a", **changes), "m") is None
    assert choose("m", [node("a", **changes)]) is None


def test_warm_before_cold() -> None:
    # Warm wins even against a cold node that is idle and less loaded.
    nodes = [node("cold", load=0.0), node("warm", loaded=frozenset({"m"}), assigned=1, load=0.8)]
    assert choose("m", nodes) == "warm"


def test_loaded_elsewhere_is_not_warm() -> None:
    nodes = [node("other-warm", models=frozenset({"m", "x"}), loaded=frozenset({"x"}), assigned=1),
             node("cold", assigned=0)]  # fmt: skip
    assert choose("m", nodes) == "cold"


def test_least_assigned_then_least_loaded() -> None:
    nodes = [node("busy", assigned=1, load=0.0), node("loaded", assigned=0, load=0.5), node("idle", load=0.1)]
    assert choose("m", nodes) == "idle"
    assert choose("m", nodes[:2]) == "loaded"


def test_ties_first_seen() -> None:
    assert choose("m", [node("a", load=0.11), node("b", load=0.12)]) == "a"
    assert choose("m", [node("b", load=0.12), node("a", load=0.11)]) == "b"


def test_never_owner_busy_dead_excluded_or_full() -> None:
    best = {"loaded": frozenset({"m"})}
    nodes = [node("owner", owner_busy=True, **best), node("dead", live=False, **best),
             node("full", assigned=2, **best), node("excluded", **best), node("ok", assigned=1, load=0.9)]  # fmt: skip
    assert choose("m", nodes, exclude={"excluded"}) == "ok"
    assert choose("m", nodes, exclude={"excluded", "ok"}) is None
    assert choose("other", nodes) is None
    assert choose("m", []) is None


# --- PlacementIndex against the reference ----------------------------------------------------------


def random_node(rng: random.Random, name: str) -> NodeState:
    models = frozenset(rng.sample(MODELS, rng.randint(0, len(MODELS))))
    loaded = frozenset(m for m in models if rng.random() < 0.4)
    capacity = rng.randint(0, 3)
    return NodeState(name=name, models=models, loaded=loaded, capacity=capacity,
                     assigned=rng.randint(0, capacity + 1), owner_busy=rng.random() < 0.15,
                     load=rng.choice([0.0, 0.05, 0.1, 0.49, 0.5, 0.99, 1.0, rng.random()]),
                     live=rng.random() < 0.9, net_busy=rng.random() < 0.1,
                     rtt_ms=rng.choice([None, 0.2, 4.99, 5.0, 19.0, 80.0, 250.0, rng.random() * 600]),
                     remote=rng.random() < 0.3)  # fmt: skip


def assert_agrees(index: PlacementIndex, nodes: dict[str, NodeState], rng: random.Random) -> None:
    assert len(index) == len(nodes)
    for name, state in nodes.items():
        assert index.get(name) == state
    for model in (*MODELS, "unknown"):
        exclude = set(rng.sample(sorted(nodes), min(len(nodes), rng.randint(0, 3))))
        for excl in (set(), exclude):
            expected = choose(model, nodes.values(), excl)
            got = index.choose(model, excl)
            if expected is None:
                assert got is None
            else:
                assert got is not None and got not in excl
                assert rank(nodes[got], model) == rank(nodes[expected], model)


def build(nodes: Iterable[NodeState]) -> PlacementIndex:
    index = PlacementIndex()
    for n in nodes:
        index.update(n)
    return index


def test_index_agrees_on_random_node_sets() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        nodes = {f"n{i}": random_node(rng, f"n{i}") for i in range(rng.randint(0, 30))}
        assert_agrees(build(nodes.values()), nodes, rng)


def test_index_agrees_through_updates_and_removals() -> None:
    rng = random.Random(99)
    for _ in range(300):
        index = PlacementIndex()
        nodes: dict[str, NodeState] = {}
        names = [f"n{i}" for i in range(rng.randint(1, 25))]  # a small pool, so updates often replace
        for _ in range(40):
            name = rng.choice(names)
            roll = rng.random()
            if roll < 0.2:
                index.remove(name)
                nodes.pop(name, None)
            elif roll < 0.4 and name in nodes:
                # The orchestrator's common step: one more (or one fewer) fragment on a node; or a
                # heartbeat with a new round trip, or with the owner's traffic starting or stopping.
                old = nodes[name]
                state = rng.choice([replace(old, assigned=max(0, old.assigned + rng.choice((-1, 1)))),
                                    replace(old, rtt_ms=rng.choice([None, 1.0, 30.0, 700.0])),
                                    replace(old, net_busy=not old.net_busy)])  # fmt: skip
                index.update(state)
                nodes[name] = state
            else:
                state = random_node(rng, name)
                index.update(state)
                nodes[name] = state
            assert_agrees(index, nodes, rng)


def test_index_basics() -> None:
    index = PlacementIndex()
    assert index.choose("m") is None
    index.remove("nobody")  # unknown: no-op
    index.update(node("a"))
    index.update(node("b", loaded=frozenset({"m"})))
    assert len(index) == 2 and index.choose("m") == "b"
    index.update(node("b", owner_busy=True))  # replaced, now ineligible but still known
    assert len(index) == 2 and index.get("b") is not None and index.choose("m") == "a"
    assert index.choose("m", exclude=["a"]) is None
    index.remove("a")
    assert len(index) == 1 and index.get("a") is None and index.choose("m") is None


# --- FairQueue ---------------------------------------------------------------------------------------


def drain(q: FairQueue[str]) -> list[str]:
    out = []
    while (got := q.pop(lambda _: True)) is not None:
        out.append(got[1])
    return out


def test_push_all_or_nothing_per_user() -> None:
    q: FairQueue[str] = FairQueue(max_total=10, max_per_user=3)
    q.push_all("a", ["a1", "a2"])
    with pytest.raises(QueueFull) as info:
        q.push_all("a", ["a3", "a4"])
    assert info.value.retry_after >= 1 and info.value.message
    assert len(q) == 2 and q.waiting("a") == 2  # nothing of the refused batch went in
    q.push_all("a", ["a3"])  # exactly at the bound is fine
    q.push_all("b", ["b1", "b2", "b3"])  # the bound is per user
    assert q.waiting("a") == 3 and q.waiting("b") == 3 and q.users() == 2


def test_push_all_or_nothing_total() -> None:
    q: FairQueue[int] = FairQueue(max_total=5, max_per_user=5)
    q.push_all("a", [1, 2, 3])
    with pytest.raises(QueueFull):
        q.push_all("b", [4, 5, 6])
    assert len(q) == 3 and q.waiting("b") == 0 and q.users() == 1
    q.push_all("b", [4, 5])
    assert len(q) == 5
    with pytest.raises(QueueFull):
        q.push_all("c", [7])
    q.push_all("c", [])  # nothing asked, nothing refused


def test_round_robin_and_fifo() -> None:
    q: FairQueue[str] = FairQueue(max_total=100, max_per_user=100)
    q.push_all("a", ["a1", "a2", "a3"])
    q.push_all("b", ["b1"])
    q.push_all("c", ["c1", "c2"])
    assert drain(q) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert len(q) == 0 and q.users() == 0


def test_flood_does_not_starve() -> None:
    q: FairQueue[str] = FairQueue(max_total=1000, max_per_user=500)
    q.push_all("a", [f"a{i}" for i in range(100)])
    assert q.pop(lambda _: True) == ("a", "a0")
    q.push_all("b", ["b0"])
    popped = [q.pop(lambda _: True) for _ in range(2)]
    assert ("b", "b0") in popped
    # B pushing again after being emptied joins at the back: it cannot jump ahead of A twice in a row.
    q.push_all("b", ["b1"])
    q.push_all("a", ["late"])
    users = [got[0] for got in (q.pop(lambda _: True) for _ in range(4)) if got]
    assert users.count("b") == 1 and users.count("a") == 3


def test_many_users_interleave() -> None:
    q: FairQueue[tuple[str, int]] = FairQueue(max_total=1000, max_per_user=100)
    for user in "abcd":
        q.push_all(user, [(user, i) for i in range(10 if user == "a" else 2)])
    first = [got[0] for got in (q.pop(lambda _: True) for _ in range(8)) if got]
    assert sorted(first) == sorted("abcd" * 2)


def test_can_take_skips() -> None:
    q: FairQueue[str] = FairQueue(max_total=100, max_per_user=100)
    q.push_all("a", ["a:x", "a:y"])
    q.push_all("b", ["b:x"])
    only_y = lambda item: item.endswith(":y")  # noqa: E731
    # A's first item cannot be taken, its second can: FIFO bends around what cannot run now.
    assert q.pop(only_y) == ("a", "a:y")
    assert q.pop(only_y) is None
    assert len(q) == 2
    # B was passed over while nothing of it could be taken; it is served before A comes round again.
    assert q.pop(lambda _: True) == ("b", "b:x")
    assert q.pop(lambda _: True) == ("a", "a:x")
    assert q.pop(lambda _: True) is None


def test_remove() -> None:
    q: FairQueue[object] = FairQueue(max_total=100, max_per_user=100)
    marker = object()
    q.push_all("a", ["x", marker, "y"])
    q.push_all("b", [["z"]])
    assert q.remove(marker) is True  # identity
    assert q.remove(["z"]) is True  # equality, a different list; B is now empty and leaves the rotation
    assert q.remove("nope") is False
    assert len(q) == 2 and q.waiting("a") == 2 and q.users() == 1
    assert [got[1] for got in (q.pop(lambda _: True) for _ in range(3)) if got] == ["x", "y"]


def flood(q: FairQueue[str], users: str, batch: int) -> None:
    """Each user pushes `batch` items in turn until no one can push any more."""
    pushed = True
    while pushed:
        pushed = False
        for user in users:
            try:
                q.push_all(user, [user] * batch)
                pushed = True
            except QueueFull:
                pass


@pytest.mark.parametrize(("max_total", "max_per_user", "batch"), [(1024, 256, 8), (1024, 256, 1), (100, 100, 1),
                                                                  (100, 100, 7), (12, 12, 1), (40, 5, 2)])  # fmt: skip
def test_four_flooding_keys_cannot_turn_a_fifth_away(max_total: int, max_per_user: int, batch: int) -> None:
    q: FairQueue[str] = FairQueue(max_total, max_per_user)
    flood(q, "abcd", batch)
    assert all(q.waiting(u) > 0 for u in "abcd")
    with pytest.raises(QueueFull):
        q.push_all("a", ["a"] * batch)  # the flooders are refused...
    share = fair_share(max_total, max_per_user, 5)
    assert q.room("e") == share  # ... while the newcomer finds its whole share free
    q.push_all("e", ["e"] * min(batch, share))
    # Served round robin as work drains, the flooders refill what is served; still they cannot
    # take the newcomer's room again.
    for _ in range(3):
        for _ in range(5):
            q.pop(lambda _: True)
        flood(q, "abcd", batch)
        assert q.room("f") >= fair_share(max_total, max_per_user, q.users() + 1)


def test_a_lone_key_can_use_much_of_the_queue() -> None:
    q: FairQueue[str] = FairQueue(max_total=1024, max_per_user=256)
    flood(q, "a", 1)
    assert q.waiting("a") == 256  # the per-key bound, as before
    q = FairQueue(max_total=1024, max_per_user=1024)
    flood(q, "a", 8)
    assert q.waiting("a") == 512  # with no per-key bound: all but a second key's share
    q.push_all("b", ["b"] * 8)  # which a second key then finds


def test_a_keys_share_shrinks_as_keys_wait() -> None:
    q: FairQueue[str] = FairQueue(max_total=100, max_per_user=100)
    for user in "abcd":
        q.push_all(user, [user])
    assert q.room("a") == 100 // 4 - 1
    with pytest.raises(QueueFull, match="at most 25 while 4 users share the queue"):
        q.push_all("a", ["a"] * 25)
    q.push_all("a", ["a"] * 24)
    assert q.room("e") == 100 // 5  # a newcomer would share with five
    with pytest.raises(QueueFull):
        q.push_all("e", ["e"] * 21)


def test_admission_room_plain_values() -> None:
    # (own share left, room in the queue) for: held, total, users waiting after the push, max_total, max_per_user
    assert admission_room(0, 0, 1, 100, 30) == (30, 100)  # a lone newcomer: its per-key bound
    assert admission_room(10, 10, 1, 100, 100) == (90, 40)  # waiting already: leaves a second key's 50 free
    assert admission_room(0, 90, 2, 100, 100) == (50, 10)  # a newcomer may use that room
    assert admission_room(30, 90, 4, 100, 100) == (0, 0)  # over its share (won while fewer waited): nothing more
    assert admission_room(0, 0, 500, 100, 100) == (1, 100)  # never less than one item each


@settings(max_examples=200, deadline=None)
@given(max_total=st.integers(5, 300), max_per_user=st.integers(1, 300),
       ops=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 8)), max_size=200))  # fmt: skip
def test_waiting_keys_never_take_a_newcomers_room(max_total: int, max_per_user: int,
                                                  ops: list[tuple[str, int]]) -> None:  # fmt: skip
    q: FairQueue[str] = FairQueue(max_total, max_per_user)
    for user, size in ops:
        if size == 0:  # a worker took something
            q.pop(lambda _: True)
            continue
        was_waiting = q.waiting(user) > 0
        try:
            q.push_all(user, [user] * size)
        except QueueFull:
            continue
        assert len(q) <= max_total and q.waiting(user) <= max_per_user
        if was_waiting:
            assert q.room("newcomer") == fair_share(max_total, max_per_user, q.users() + 1)


# --- pick_model ----------------------------------------------------------------------------------------

SERVED = {"gemma": {"chat"}, "coder": {"code"}, "coder2": {"code", "chat"}, "plain": set()}


@pytest.mark.parametrize(
    "text",
    [
        "```python\nprint(1)\n```",
        "def add(a, b):\n    return a + b",
        "import os\nos.listdir('.')",
        "int main() { return 0; }",
        "#include <stdio.h>",
        "Why does my javascript throw here?",
        "fix this bug please",
        "It fails to compile",
        "How do I write a C++ template?",
        "const x = 1",
        "items.map(x => x * 2)",
    ],
)
def test_looks_like_code(text: str) -> None:
    assert looks_like_code(text)


@pytest.mark.parametrize(
    "text",
    ["", "Hello! How are you today?", "Write me a poem about the sea.", "let me know what you think",
     "What is the capital of France?", "Please decode this riddle for me."],
)  # fmt: skip
def test_looks_like_prose(text: str) -> None:
    assert not looks_like_code(text)


def test_pick_model_concrete() -> None:
    assert pick_model("coder", "hello", SERVED) == "coder"
    assert pick_model("plain", "def f(): pass", SERVED) == "plain"
    assert pick_model("missing", "hello", SERVED) is None
    assert pick_model("missing", "hello", {}) is None


def test_pick_model_auto() -> None:
    assert pick_model("auto", "def f(x):\n    return x", SERVED) == "coder"  # first tagged code
    assert pick_model("auto", "Tell me a story", SERVED) == "gemma"  # first tagged chat
    assert pick_model("auto", "Tell me a story", {"coder": {"code"}, "coder2": {"code"}}) == "coder"  # no chat
    assert pick_model("auto", "fix this bug", {"gemma": {"chat"}, "other": {"chat"}}) == "gemma"  # no code
    assert pick_model("auto", "fix this bug", {"plain": set(), "plain2": ["x"]}) == "plain"  # no tags: first
    assert pick_model("auto", "hello", {}) is None


# --- serve_locally ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_model", [True, False])
@pytest.mark.parametrize("busy", [True, False])
@pytest.mark.parametrize("owner_busy", [True, False])
@pytest.mark.parametrize("linked", [True, False])
def test_serve_locally(has_model: bool, busy: bool, owner_busy: bool, linked: bool) -> None:
    expected = not linked or (has_model and not busy and not owner_busy)
    assert serve_locally(has_model=has_model, busy=busy, owner_busy=owner_busy, linked=linked) is expected


def test_serve_locally_cases() -> None:
    # Spelled out, so the truth table above is not only checked against its own formula.
    assert serve_locally(has_model=False, busy=True, owner_busy=True, linked=False)
    assert serve_locally(has_model=True, busy=False, owner_busy=False, linked=True)
    assert not serve_locally(has_model=False, busy=False, owner_busy=False, linked=True)
    assert not serve_locally(has_model=True, busy=True, owner_busy=False, linked=True)
    assert not serve_locally(has_model=True, busy=False, owner_busy=True, linked=True)


def test_admission_counts_what_other_replicas_hold_waiting() -> None:
    queue: FairQueue[str] = FairQueue(max_total=4, max_per_user=4)
    queue.elsewhere = {"a": 4}  # user a already holds the whole queue on another replica
    with pytest.raises(QueueFull):
        queue.push_all("a", ["x"])
    queue.elsewhere = {"z": 3}
    with pytest.raises(QueueFull, match="queue is full: 3 waiting"):
        queue.push_all("a", ["x", "y"])
    queue.push_all("a", ["x"])  # the one place left
    queue.elsewhere = {}
    queue.push_all("a", ["y"])  # the other replica's queue drained
    assert queue.by_user() == {"a": 2}
