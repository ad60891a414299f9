"""Every OpenAI field honoured or refused, never ignored: on the node and through the
orchestrator, streamed and not, with the official client. Tiny random models keep it fast;
`tt` is one whose template teaches tool calls and whose vocabulary has FIM tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from tests.conftest import Api, NodeProcess, OrchestratorProcess

NOCACHE = {"cache_prompt": False}
HI = [{"role": "user", "content": "hi"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
]  # fmt: skip


def test_limits_every_client_sends(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    client = api.openai()
    for limit in ({"max_completion_tokens": 7}, {"max_tokens": 7}):
        out = client.chat.completions.create(model="tiny", messages=HI, **limit)  # type: ignore[call-overload]
        assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model="tiny", messages=HI, stream=True,  # type: ignore[call-overload]
                                                     stream_options={"include_usage": True}, **limit))  # fmt: skip
        assert chunks[-1].usage.completion_tokens == 7
    bad = api.post("/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 5, "max_completion_tokens": 6})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_completion_tokens"


def test_no_limit_gets_the_default_cap(start_node: Callable[..., NodeProcess], tiny_model: Path,
                                       start_orchestrator: Callable[..., OrchestratorProcess]) -> None:  # fmt: skip
    node = start_node("--model", f"tiny={tiny_model}", "--default-max-tokens", "33")
    out = node.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI}).json()
    assert out["usage"]["completion_tokens"] == 33 and out["choices"][0]["finish_reason"] == "length"
    # Through the orchestrator its own cap holds, lower than the worker's default.
    orch = start_orchestrator("--default-max-tokens", "21")
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    with orch.client() as c:
        for body in ({"model": "tiny", "messages": HI}, {"model": "tiny", "prompt": "x", "max_tokens": None}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            out = c.post(path, json=body).json()
            assert out["usage"]["completion_tokens"] == 21, out


def test_sampling_fields_change_the_answer(api: Api) -> None:
    client = api.openai()

    def text(extra: dict[str, Any] | None = None, **fields: Any) -> str:
        return client.completions.create(model="tiny", prompt="sample", max_tokens=24,
                                         extra_body={**NOCACHE, **(extra or {})}, **fields).choices[0].text  # fmt: skip

    greedy = text(temperature=0)
    # Cut to the single most likely token, sampling at any temperature is greedy.
    assert text(temperature=1.5, seed=1, extra={"top_k": 1}) == greedy
    assert text(temperature=1.5, seed=2, extra={"min_p": 1.0}) == greedy
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert text(temperature=1.0, seed=7) != text(temperature=1.0, seed=8)
    assert text(temperature=0, presence_penalty=2.0) != greedy
    assert text(temperature=0, frequency_penalty=2.0) != greedy
    assert text(temperature=0, extra={"repeat_penalty": 3.0}) != greedy
    # Token 3 + 0x41 is the byte "A" in the tiny model's byte vocabulary.
    assert text(temperature=0, logit_bias={str(3 + 0x41): 100}) == "A" * 24
    assert text(temperature=0, logit_bias={str(3 + 0x41): -100}) == greedy.replace("A", "") or "A" not in greedy
    bad = api.post("/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"999999": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def test_logprobs_in_openai_shapes(api: Api) -> None:
    client = api.openai()
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body=NOCACHE)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the sampled token is the most likely
    streamed = [e for c in client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True,
                                                          extra_body=NOCACHE)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    text = client.completions.create(model="tiny", prompt="lp", max_tokens=5, temperature=0, logprobs=2,
                                     extra_body=NOCACHE).choices[0]  # fmt: skip
    lp = text.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    # Offsets count characters of the text, also where a token holds only part of one.
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text.text)
    no = client.completions.create(model="tiny", prompt="lp", max_tokens=3)
    assert no.choices[0].logprobs is None
    bad = api.post("/chat/completions", {"model": "tiny", "messages": HI, "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_streamed_equals_whole_for_every_field(api: Api) -> None:
    """Each field gives the same answer streamed as whole (the stream path drops nothing)."""
    client = api.openai()
    cases: list[dict[str, Any]] = [
        {"model": "tiny", "prompt": "s", "temperature": 1.5, "seed": 3, "extra_body": {**NOCACHE, "top_k": 2}},
        {"model": "tiny", "prompt": "s", "temperature": 0.9, "seed": 4, "extra_body": {**NOCACHE, "min_p": 0.2}},
        {"model": "tiny", "prompt": "s", "temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 1.0,
         "extra_body": {**NOCACHE, "repeat_penalty": 1.3}},
        {"model": "tiny", "prompt": "s", "temperature": 0, "logit_bias": {str(3 + 0x41): 5}, "extra_body": NOCACHE},
        {"model": "tt", "prompt": "def f(", "suffix": "\n    return x\n", "temperature": 0, "extra_body": NOCACHE},
    ]  # fmt: skip
    for case in cases:
        whole = client.completions.create(max_tokens=12, **case).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(max_tokens=12, stream=True, **case)
                           if c.choices)  # fmt: skip
        assert streamed == whole, case
    lp = client.completions.create(model="tiny", prompt="lp", max_tokens=6, temperature=0, logprobs=2,
                                   extra_body=NOCACHE).choices[0].logprobs  # fmt: skip
    chunks = [c.choices[0].logprobs for c in client.completions.create(model="tiny", prompt="lp", max_tokens=6,
                                                                        temperature=0, logprobs=2, stream=True,
                                                                        extra_body=NOCACHE)
              if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["n", "ok", "color"], "additionalProperties": False}  # fmt: skip


def test_json_schema_output_parses_and_matches(api: Api) -> None:
    client = api.openai()
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2, 3):
        out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=200, seed=seed,
                                             response_format=fmt)  # type: ignore[call-overload]  # fmt: skip
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    events = api.stream("/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 200,
                                              "temperature": 0, "response_format": fmt})  # fmt: skip
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    jsonschema.validate(json.loads(text), SCHEMA)
    bad = api.post("/chat/completions", {"model": "tiny", "messages": HI, "response_format": {"type": "xml"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    bad = api.post("/chat/completions", {"model": "tiny", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}}})
    assert bad.status_code == 400, bad.text


def test_tool_calls(api: Api) -> None:
    client = api.openai()
    out = client.chat.completions.create(model="tt", messages=HI, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                         max_tokens=300, temperature=0)  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, repr(choice.message.content)
    (call,) = choice.message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_")
    named = client.chat.completions.create(model="tt", messages=HI, tools=TOOLS, max_tokens=300, temperature=0,  # type: ignore[arg-type]
                                           tool_choice={"type": "function", "function": {"name": "add"}})  # fmt: skip
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    # Streamed: the call arrives whole in one delta, then finish_reason tool_calls.
    chunks = list(client.chat.completions.create(model="tt", messages=HI, tools=TOOLS, max_tokens=300,  # type: ignore[arg-type]
                                                 temperature=0, stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "add"}}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(streamed) == 1 and streamed[0].function.name == "add" and streamed[0].index == 0
    assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
    assert not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The conversation goes on with the call and its result in the history.
    follow = client.chat.completions.create(model="tt", max_tokens=5, temperature=0, tools=TOOLS,  # type: ignore[arg-type]
                                            messages=[*HI, named.choices[0].message.model_dump(exclude_none=True),
                                                      {"role": "tool", "tool_call_id": call.id,
                                                       "content": "3"}])  # fmt: skip
    assert follow.usage.completion_tokens >= 1
    # tool_choice none: the tools are not offered at all.
    plain = client.chat.completions.create(model="tt", messages=HI, tools=TOOLS, tool_choice="none", max_tokens=5)  # type: ignore[arg-type]
    assert plain.choices[0].message.tool_calls is None
    # A model whose template has no tool calling: refused, not ignored.
    bad = api.post("/chat/completions", {"model": "tiny", "messages": HI, "tools": TOOLS})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_parameter"
    assert bad.json()["error"]["param"] == "tools"
    nope = {"type": "function", "function": {"name": "nope"}}
    bad = api.post("/chat/completions", {"model": "tt", "messages": HI, "tools": TOOLS, "tool_choice": nope})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_suffix_fills_the_middle(api: Api) -> None:
    client = api.openai()
    out = client.completions.create(model="tt", prompt="def f(", suffix="\n    return x\n", max_tokens=6,
                                    temperature=0, extra_body=NOCACHE)  # fmt: skip
    plain = client.completions.create(model="tt", prompt="def f(", max_tokens=6, temperature=0, extra_body=NOCACHE)
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens + len("\n    return x\n")  # suffix and FIM tokens
    assert out.choices[0].text != plain.choices[0].text
    bad = api.post("/completions", {"model": "tiny", "prompt": "def f(", "suffix": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_parameter"
    assert bad.json()["error"]["param"] == "suffix"


@pytest.mark.parametrize("field, value", [
    ("mirostat", 2), ("functions", [{"name": "f"}]), ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"), ("web_search_options", {}),
])  # fmt: skip
def test_unknown_fields_are_refused_by_name(api: Api, field: str, value: Any) -> None:
    r = api.post("/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 2, field: value})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": f"the parameter {field!r} is not supported by this server",
                                 "type": "invalid_request_error", "code": "unsupported_parameter", "param": field}


def test_fields_without_effect_are_accepted(api: Api) -> None:
    body = {"model": "tiny", "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": False,
            "service_tier": "auto", "parallel_tool_calls": True}  # fmt: skip
    assert api.post("/chat/completions", {**body, "messages": HI}).status_code == 200
    body.pop("parallel_tool_calls")
    assert api.post("/completions", {**body, "prompt": "x", "best_of": 1}).status_code == 200
    bad = api.post("/completions", {"model": "tiny", "prompt": "x", "best_of": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of"


def test_embeddings_answer_a_clear_error(api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        api.openai().embeddings.create(model="tiny", input="x")
    assert caught.value.body["code"] == "not_supported"  # type: ignore[index]


def test_second_turn_reuses_the_cache(api: Api) -> None:
    client = api.openai()
    history = [{"role": "user", "content": "a long first question " * 20}]
    first = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and a follow-up"}]  # fmt: skip
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
    off = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                         extra_body=NOCACHE)  # fmt: skip
    assert off.usage.prompt_tokens_details.cached_tokens == 0
