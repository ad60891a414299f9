"""The node <-> orchestrator messages, and the status table: plain values."""

from __future__ import annotations

import pytest

from dragonswarm.protocol.runner import Generation
from dragonswarm.protocol.swarm import (
    VERSION,
    Heartbeat,
    Hello,
    JobEvent,
    Logprob,
    ModelInfo,
    ProtocolError,
    RunFragment,
    dump,
    parse_node_message,
    parse_orchestrator_message,
)
from dragonswarm.status import nodes_table

SHA = "ab" * 32


def hello(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"type": "hello", "v": VERSION, "name": "w1", "models": [{"name": "tiny", "sha256": SHA}],
                               "share": 0.1, "local_share": 0.8, "cpus": 2, "ram_total": 1 << 30}  # fmt: skip
    return base | over


def test_round_trip() -> None:
    messages = [
        Hello(v=VERSION, name="w-1.a", models=[ModelInfo(name="m", sha256=SHA, tags=["code"])], share=0.1,
              local_share=0.8,
              cpus=4, ram_total=10, capacity=1),
        Heartbeat(cpu_total=0.5, cpu_ours=0.1, owner_load=0.4, owner_busy=True, ram_available=1, share_in_force=0.1,
                  local_busy=0, loaded=["m"]),
        JobEvent(job="j-0", ev="progress", prompt_done=512),
        JobEvent(job="j-0", ev="text", text="héllo", ids=[5, 6, 7], completion_tokens=3),
        JobEvent(job="j-0", ev="text", text="a", logprobs=[Logprob(token="a", logprob=-0.5, bytes=[97],
                                                                   top=[("a", -0.5, [97]), ("b", -1.5, [98])])]),
        JobEvent(job="j-0", ev="done", finish_reason="stop", prompt_tokens=9, cached_tokens=7, completion_tokens=1),
    ]
    for message in messages:
        assert parse_node_message(dump(message)) == message
    gen = Generation(messages=[{"role": "user", "content": "hi"}], prefix_ids=[11, 12], max_tokens=5, temperature=0.0,
                     top_k=3, logit_bias={"7": -100.0}, json_schema={"type": "object"}, logprobs=2,
                     tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")  # fmt: skip
    run = RunFragment(job="j-1", model="m", sha256=SHA, gen=gen)
    assert parse_orchestrator_message(dump(run)) == run
    with pytest.raises(ProtocolError):  # a model file is named by its sha256, nothing else
        parse_orchestrator_message(dump(run).replace(SHA, "latest"))


@pytest.mark.parametrize("raw, fragment", [
    ("not json", "not valid JSON"),
    ('{"type": "launch_missiles"}', "type"),
    ('{"no": "type"}', "type"),
    ('[1, 2]', "invalid message"),
])  # fmt: skip
def test_garbage_is_a_protocol_error(raw: str, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        parse_node_message(raw)


@pytest.mark.parametrize("over", [
    {"name": "../../etc"},  # names become labels and log fields: a strict pattern
    {"name": ""},
    {"share": 1.5},
    {"v": "1"},  # strict: no "1" for 1
    {"models": [{"name": "m", "sha256": SHA}] * 65},
    {"models": [{"name": "m"}]},  # a model without its identity
    {"extra": "field"},  # unknown fields are refused, not ignored
])  # fmt: skip
def test_bad_hello_is_refused(over: dict[str, object]) -> None:
    import orjson

    with pytest.raises(ProtocolError):
        parse_node_message(orjson.dumps(hello(**over)))


def test_oversized_event_text_is_refused() -> None:
    with pytest.raises(ProtocolError):
        parse_node_message(dump(JobEvent(job="j", ev="text")).replace('"ev"', f'"text":"{"x" * 70000}","ev"'))


def test_nodes_table() -> None:
    nodes = [
        {"name": "w1", "state": "live", "models": [{"name": "tiny"}], "loaded": ["tiny"], "share": 0.1,
         "cpu_total": 0.25, "owner_busy": False, "running": 1, "served": 7, "last_seen": 100.0},
        {"name": "gone-node", "state": "gone", "last_seen": 0.0},
    ]  # fmt: skip
    lines = nodes_table(nodes, now=101.0).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "MODELS", "SHARE", "CPU", "OWNER", "RUNNING", "SERVED", "LAST", "SEEN"]
    assert lines[1].split() == ["w1", "live", "tiny*", "10%", "25%", "idle", "1", "7", "1s", "ago"]
    assert lines[2].split()[:3] == ["gone-node", "gone", "-"]
    assert nodes_table([]) == "no nodes have joined this swarm"
