"""The registry's model index, updated per join and leave: plain values, checked against a
from-scratch rebuild after random sequences of joins and leaves."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dragonswarm.orchestrator.registry import NodeConn, Registry, model_key
from dragonswarm.protocol.swarm import VERSION, Hello, ModelInfo

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
    assert budget == 21
    later = now + RESAVE_S + 0.1  # all old enough now, and all stale (no heartbeat since): a change
    assert len(keeper.records_due(later)) == 300
    rounds = [len(keeper.records_due(later + RESAVE_S + k * SAVE_S)) for k in range(15)]
    assert rounds == [budget] * 14 + [300 - 14 * budget]  # spread over the period, and every one written
