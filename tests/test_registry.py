"""The registry's model index, updated per join and leave: plain values, checked against a
from-scratch rebuild after random sequences of joins and leaves."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonswarm.orchestrator.registry import NodeConn, Registry, model_key
from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.swarm import VERSION, Heartbeat, Hello, ModelInfo

NAMES = ["w0", "w1", "w2", "w3", "w4", "w5"]
MODELS = ["tiny", "coder", "chat"]
SHAS = ["a" * 64, "b" * 64, "c" * 64]
TAGS = ["code", "chat", "fim"]


def conn(name: str, models: list[tuple[str, str, list[str]]] | list[tuple[str, str, list[str], int]]) -> NodeConn:
    """A connection whose hello lists `models`: (name, sha256, tags[, context size])."""
    hello = Hello(v=VERSION, name=name, share=0.5, local_share=1.0, cpus=2, ram_total=1,
                  models=[ModelInfo(name=m[0], sha256=m[1], tags=m[2], n_ctx=m[3] if len(m) > 3 else 0)
                          for m in models])  # fmt: skip
    return NodeConn(hello=hello, send=lambda _: None, close=lambda _code, _reason: None)


def rebuild(conns: list[NodeConn]) -> dict[str, Any]:
    """The index as the registry used to rebuild it on every join and leave (each node once per
    model and file), with the files' order made explicit: most widely held first, ties by sha256."""
    serving: dict[str, list[NodeConn]] = {}
    by_file: dict[str, list[NodeConn]] = {}
    tags: dict[str, set[str]] = {}
    for c in conns:
        for m in c.hello.models:
            for holders in (serving.setdefault(m.name, []), by_file.setdefault(model_key(m.name, m.sha256), [])):
                if c not in holders:
                    holders.append(c)
            tags.setdefault(m.name, set()).update(m.tags)
    files = {name: sorted({key.rpartition("@")[2] for key in by_file if key.rpartition("@")[0] == name},
                          key=lambda sha, name=name: (-len(by_file[model_key(name, sha)]), sha))  # type: ignore[misc]
             for name in serving}  # fmt: skip
    return {"serving": serving, "by_file": by_file, "tags": tags, "files": files}


def check(reg: Registry) -> None:
    want = rebuild(list(reg.conns.values()))
    for name in MODELS:
        assert list(reg.serving(name)) == want["serving"].get(name, [])
        assert reg.files(name) == want["files"].get(name, [])
        for sha in SHAS:
            key = model_key(name, sha)
            assert list(reg.serving_file(key)) == want["by_file"].get(key, [])
    tags = reg.model_tags()
    assert set(tags) == set(want["serving"])  # nothing lingers once its last node left
    for name, given_tags in tags.items():
        assert len(given_tags) == len(set(given_tags)) and set(given_tags) == want["tags"][name]
    assert {n for n in NAMES if reg.index.get(n)} == set(reg.conns)
    for name in MODELS:  # the largest context, as a scan of every connection finds it
        assert reg.largest_context(name) == max((m.n_ctx for c in reg.conns.values() for m in c.hello.models
                                                 if m.name == name), default=0)  # fmt: skip


model_lists = st.lists(st.tuples(st.sampled_from(MODELS), st.sampled_from(SHAS),
                                 st.lists(st.sampled_from(TAGS), max_size=3), st.sampled_from([0, 256, 1024])),
                       max_size=4)  # fmt: skip
steps = st.lists(st.tuples(st.sampled_from(["join", "replace", "leave", "leave-old"]), st.sampled_from(NAMES),
                           model_lists), max_size=40)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(steps)
def test_incremental_index_equals_a_rebuild(ops: list[tuple[str, str, list[tuple[str, str, list[str], int]]]]) -> None:
    reg = Registry(stale_after=3.5)
    old: list[NodeConn] = []  # connections that left or were replaced: leaving again must change nothing
    for op, name, models in ops:
        current = reg.conns.get(name)
        if op == "join":  # as ws._serve does it: a connection it replaces leaves first
            if current is not None:
                assert reg.leave(current)
                old.append(current)
            reg.join(conn(name, models))
        elif op == "replace" and current is not None:  # join without the leave: the old one must not linger
            reg.join(conn(name, models))
            old.append(current)
        elif op == "leave" and current is not None:
            assert reg.leave(current)
            old.append(current)
        elif op == "leave-old" and old:
            assert not reg.leave(old[-1])
        check(reg)


def test_files_most_widely_held_first_and_lookups_follow_leaves() -> None:
    reg = Registry(stale_after=3.5)
    a, b, c = (conn(n, [("tiny", sha, ["code"])]) for n, sha in (("w0", SHAS[1]), ("w1", SHAS[0]), ("w2", SHAS[1])))
    for x in (a, b, c):
        reg.join(x)
    assert reg.files("tiny") == [SHAS[1], SHAS[0]]
    assert list(reg.serving("tiny")) == [a, b, c]
    reg.leave(c)
    assert reg.files("tiny") == [SHAS[0], SHAS[1]]  # one node each: ties by sha256
    reg.leave(a)
    reg.leave(b)
    assert reg.files("tiny") == [] and not reg.serving("tiny") and dict(reg.model_tags()) == {}


def test_tags_are_the_union_of_the_remaining_nodes() -> None:
    reg = Registry(stale_after=3.5)
    a = conn("w0", [("coder", SHAS[0], ["code", "fim"])])
    b = conn("w1", [("coder", SHAS[0], ["code"]), ("chat", SHAS[2], ["chat"])])
    reg.join(a)
    reg.join(b)
    assert dict(reg.model_tags()) == {"coder": ["code", "fim"], "chat": ["chat"]}
    reg.leave(a)
    assert dict(reg.model_tags()) == {"coder": ["code"], "chat": ["chat"]}


def test_recheck_updates_placement_only_when_live_flips() -> None:
    reg = Registry(stale_after=3.5)
    a = conn("w0", [("tiny", SHAS[0], [])])
    reg.join(a)
    placed = reg.index.get("w0")
    assert placed is not None and placed.live
    reg.recheck(a, a.last_seen + 1.0)
    assert reg.index.get("w0") is placed  # nothing changed: nothing rebuilt
    reg.recheck(a, a.last_seen + 10.0)
    assert reg.index.get("w0") is not None and not reg.index.get("w0").live  # type: ignore[union-attr]
    assert reg.index.choose(model_key("tiny", SHAS[0])) is None
    reg.leave(a)
    reg.recheck(a, a.last_seen)  # a connection that left stays out
    assert reg.index.get("w0") is None


def test_a_record_follows_the_latest_heartbeat() -> None:
    from dragonswarm.protocol.swarm import Heartbeat

    a = conn("w0", [("tiny", SHAS[0], ["code"])])
    figures = {"cpu_total": 0.1, "cpu_ours": 0.0, "owner_load": 0.1, "owner_busy": False, "ram_available": 1,
               "share_in_force": 0.5, "local_busy": 0}  # fmt: skip
    a.heartbeat = Heartbeat.model_validate(figures)
    first = a.record(a.last_seen, 3.5).info
    assert first["cpu_total"] == 0.1 and first["models"][0]["tags"] == ["code"] and "running" in first
    a.heartbeat = Heartbeat.model_validate(figures | {"cpu_total": 0.7, "owner_busy": True})
    a.jobs.add("j")
    second = a.record(a.last_seen, 3.5).info
    assert (second["cpu_total"], second["owner_busy"], second["running"]) == (0.7, True, 1)
    assert first["cpu_total"] == 0.1  # an earlier record is not changed by a later one


def test_unchanged_records_are_resaved_spread_over_the_period() -> None:
    """Nodes that joined together are not all re-saved in one round (it held the loop for a
    second at 10,000): each round takes its share, a changed state always goes at once."""
    from types import SimpleNamespace

    from dragonswarm.orchestrator.housekeeping import RESAVE_S, SAVE_S, Housekeeping, resave_budget

    reg = Registry(stale_after=3.5)
    for i in range(300):
        reg.join(conn(f"n{i}", [("tiny", "a" * 64, [])]))
    keeper = Housekeeping(SimpleNamespace(registry=reg, settings=SimpleNamespace(stale_after_s=3.5)))  # type: ignore[arg-type]
    now = time.monotonic()
    assert len(keeper.records_due(now)) == 300  # never saved: all of them
    budget = resave_budget(300, SAVE_S, RESAVE_S)
    assert budget == math.ceil(300 * SAVE_S / RESAVE_S) + 1
    later = now + RESAVE_S + 0.1  # all old enough now, and all stale (no heartbeat since): a change
    assert len(keeper.records_due(later)) == 300
    n = math.ceil(300 / budget)
    rounds = [len(keeper.records_due(later + RESAVE_S + k * SAVE_S)) for k in range(n)]
    assert rounds == [budget] * (n - 1) + [300 - (n - 1) * budget]  # spread over the period, every one written
    back = reg.conns["n7"]
    at = later + RESAVE_S + (n - 1) * SAVE_S + 1  # no re-save due yet: the oldest is not RESAVE_S old
    assert at - (later + RESAVE_S) < RESAVE_S
    back.seen(at, 3.5)  # heard from again: live, a change saved at once
    assert [r.name for r in keeper.records_due(at)] == ["n7"]


def test_the_swarms_cpu_is_weighted_by_cores_and_follows_each_nodes_last_report() -> None:
    def beat(total: float, ours: float) -> Heartbeat:
        return Heartbeat(cpu_total=total, cpu_ours=ours, owner_load=total - ours, owner_busy=False, ram_available=1,
                         share_in_force=0.5, local_busy=0, loaded=[], running=[])  # fmt: skip

    reg = Registry(stale_after=3.5)
    assert reg.cpu.use() == (0.0, 0.0)
    small, big = conn("small", []), conn("big", [])
    big.hello = big.hello.model_copy(update={"cpus": 6})
    reg.join(small)
    reg.join(big)
    assert reg.cpu.use() == (0.0, 0.0)  # no figures before a first heartbeat
    reg.heartbeat(small, beat(1.0, 0.5))
    reg.heartbeat(big, beat(0.0, 0.0))
    assert reg.cpu.use() == pytest.approx((0.25, 0.125))  # 2 of 8 cores busy, 1 of them ours
    reg.heartbeat(small, beat(0.5, 0.0))  # a new report replaces the last, it does not add to it
    assert reg.cpu.use() == pytest.approx((0.125, 0.0))
    reg.leave(small)
    assert reg.cpu.use() == (0.0, 0.0) and reg.cpu.nodes == 1
    again = conn("big", [])  # the same node on a new connection: counted once
    reg.join(again)
    reg.heartbeat(again, beat(1.0, 1.0))
    assert reg.cpu.use() == (1.0, 1.0) and reg.cpu.nodes == 1


def test_the_sweep_looks_only_at_nodes_past_their_stale_time() -> None:
    """A node's `stale_at` follows its last heartbeat and the period that beat allows."""
    reg = Registry(stale_after=3.5)
    node = conn("n1", [])
    node.cadence = Cadence(heartbeat_s=1.0, idle_heartbeat_s=5.0)
    reg.join(node)
    now = time.monotonic()
    assert node.stale_at == pytest.approx(node.last_seen + 3.5, abs=0.01)  # no beat yet: the working period
    reg.heartbeat(node, Heartbeat(cpu_total=0.1, cpu_ours=0.0, owner_load=0.1, owner_busy=False, ram_available=1,
                                  share_in_force=0.5, local_busy=0, loaded=[], running=[]))  # fmt: skip
    assert node.stale_at == pytest.approx(now + 3.5 * 5, abs=0.5)  # quiet: five times as long
    node.seen(now + 10, 3.5)
    assert node.stale_at == pytest.approx(now + 10 + 3.5 * 5)
