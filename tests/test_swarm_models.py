"""The swarm and its model files: a model is known by its sha256, one request's fragments
stay on one file, and a conversation's next turn goes to the worker whose cache holds it."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
from tests.conftest import NodeProcess, OrchestratorProcess

from dragonswarm.devtools.tiny_model import write_tiny_model
from dragonswarm.engines.models import sha256_file


def test_fragments_stay_on_one_model_file(start_orchestrator: Callable[..., OrchestratorProcess],
                                          start_node: Callable[..., NodeProcess], tiny_model: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    other = write_tiny_model(tmp_path / "other.gguf", seed=5)  # same name in the swarm, another file
    orch = start_orchestrator()
    for name, path in (("w1", tiny_model), ("w2", tiny_model), ("w3", other)):
        start_node("--name", name, "--model", f"tiny={path}", swarm=orch)
    orch.wait_live("w1", "w2", "w3")
    ours, theirs = sha256_file(tiny_model), sha256_file(other)
    with orch.client() as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert card["files"] == [{"sha256": ours, "nodes": 2}, {"sha256": theirs, "nodes": 1}]
        assert orch.nodes()["w3"]["models"][0]["sha256"] == theirs
        body = {"model": "tiny", "prompt": "same file", "n": 3, "max_tokens": 40, "temperature": 0,
                "cache_prompt": False}  # fmt: skip
        out = c.post("/v1/completions", json=body, timeout=120).json()
    # Three greedy choices on one file are one text; a fragment on the other file would differ.
    assert len({choice["text"] for choice in out["choices"]}) == 1
    assert set(out["dragon"]["nodes"]) <= {"w1", "w2"}, out["dragon"]


def test_next_turn_goes_to_the_worker_that_holds_it(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(3)
    talks = {t: [{"role": "user", "content": f"conversation {t}: " + "a long opening question " * 20}]
             for t in ("A", "B")}  # fmt: skip

    def turn(talk: str) -> dict[str, Any]:
        with orch.client() as c:
            body = {"model": "tiny", "messages": talks[talk], "max_tokens": 300, "temperature": 0}
            out: dict[str, Any] = c.post("/v1/chat/completions", json=body, timeout=120).json()
        talks[talk] += [out["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        return out

    with ThreadPoolExecutor(2) as pool:  # at once, so they land on two workers
        first = dict(zip("AB", pool.map(turn, "AB"), strict=True))
    assert first["A"]["dragon"]["nodes"] != first["B"]["dragon"]["nodes"]
    # One after the other, so placement alone would send both to the same (first) worker.
    for talk in ("B", "A"):
        second = turn(talk)
        assert second["dragon"]["nodes"] == first[talk]["dragon"]["nodes"], talk
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first[talk]["usage"]["prompt_tokens"], (talk, cached)


def test_failover_keeps_the_schema_and_the_logprobs(start_orchestrator: Callable[..., OrchestratorProcess],
                                                    start_node: Callable[..., NodeProcess],
                                                    tiny_model: Path) -> None:  # fmt: skip
    """A worker killed mid-answer: the next one continues under the same grammar, so the
    whole answer still parses and matches the schema, with one logprob per token."""
    orch = start_orchestrator()
    workers = {name: start_node("--name", name, "--model", f"tiny={tiny_model}", swarm=orch) for name in ("w1", "w2")}
    orch.wait_live("w1", "w2")
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"},
                                                      "minItems": 150}}, "required": ["xs"]}  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "numbers"}], "max_tokens": 3000,
            "temperature": 0, "stream": True, "logprobs": True, "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            # No whitespace: the tiny model's byte vocabulary tokenizes a space as the bytes of "▁"
            # (SentencePiece's space), so text with spaces does not tokenize back to what it generated.
            "logit_bias": {str(3 + ord(c)): -100 for c in " \n\t"}}  # fmt: skip
    events: list[dict[str, Any]] = []
    with orch.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        first = response.headers["x-dragon-nodes"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if len(events) == 30:
                    workers[first].proc.send_signal(signal.SIGKILL)
    assert not any("error" in e for e in events), [e for e in events if "error" in e]
    deltas = [e["choices"][0] for e in events if e.get("choices")]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    jsonschema.validate(json.loads(text), schema)
    logprobs = [t for d in deltas if d.get("logprobs") for t in d["logprobs"]["content"]]
    assert len(logprobs) == events[-1]["usage"]["completion_tokens"]
    assert events[-1]["dragon"]["nodes"] == [first, ({"w1", "w2"} - {first}).pop()]
