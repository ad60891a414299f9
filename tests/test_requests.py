"""Pure decisions around a request, with plain values: OpenAI fields into generations,
tool calls out of text, grammars, and prompt-cache affinity."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from dragonswarm.engines.grammars import JSON_OBJECT, json_grammar, tool_call_grammar
from dragonswarm.errors import InvalidRequest, UnsupportedParameter
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest
from dragonswarm.protocol.runner import Generation
from dragonswarm.scheduler.affinity import CacheAffinity, prefix_keys
from dragonswarm.scheduler.split import chat_generations, completion_generations, token_estimate
from dragonswarm.settings import Limits
from dragonswarm.web.tool_calls import ToolCallStream, parse_tool_calls

LIMITS = Limits(max_n=4, max_prompts=4, max_tokens=1000, max_prompt_chars=10_000, default_max_tokens=300)
TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}  # fmt: skip


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})  # fmt: skip


def test_every_sampling_field_reaches_the_generation() -> None:
    (gen,) = chat_generations(chat(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=1.0,
                            frequency_penalty=-1.0, repeat_penalty=1.3, logit_bias={"5": -100}, seed=3, stop="x",
                            max_completion_tokens=9, logprobs=True, top_logprobs=4, cache_prompt=False),
                       LIMITS)  # fmt: skip
    assert (gen.temperature, gen.top_p, gen.top_k, gen.min_p) == (0.5, 0.9, 7, 0.1)
    assert (gen.presence_penalty, gen.frequency_penalty, gen.repeat_penalty) == (1.0, -1.0, 1.3)
    assert gen.logit_bias == {"5": -100} and gen.seed == 3 and gen.stop == ["x"]
    assert gen.max_tokens == 9 and not gen.fit_context and gen.logprobs == 4 and not gen.cache_prompt
    (gen,) = completion_generations(CompletionRequest.model_validate({"model": "m", "prompt": "p", "suffix": "s",
                                                               "logprobs": 0}), LIMITS)  # fmt: skip
    assert gen.suffix == "s" and gen.logprobs == 0 and gen.max_tokens == 16  # OpenAI's default for completions


def test_no_limit_gets_the_default_and_is_charged_for_it() -> None:
    (gen,) = chat_generations(chat(), LIMITS)
    assert gen.max_tokens == 300 and gen.fit_context
    assert token_estimate([gen]) == len("hi") + 300
    with pytest.raises(InvalidRequest) as caught:
        chat_generations(chat(max_completion_tokens=1001), LIMITS)
    assert caught.value.param == "max_completion_tokens"


def test_formats_and_tools_map_to_the_generation() -> None:
    (gen,) = chat_generations(chat(response_format={"type": "json_object"}), LIMITS)
    assert gen.json_schema == {"type": "object"}
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    (gen,) = chat_generations(chat(response_format=fmt), LIMITS)
    assert gen.json_schema == schema
    (gen,) = chat_generations(chat(tools=[TOOL]), LIMITS)
    assert gen.tools and gen.tool_choice == "auto" and gen.tool_name is None
    (gen,) = chat_generations(chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "add"}}), LIMITS)
    assert gen.tool_choice == "required" and gen.tool_name == "add"
    (gen,) = chat_generations(chat(tools=[TOOL], tool_choice="none", response_format={"type": "json_object"}),
                              LIMITS)  # fmt: skip
    assert gen.tools is None and gen.json_schema == {"type": "object"}  # tools not offered at all


@pytest.mark.parametrize("fields, param", [
    ({"mirostat": 1}, "mirostat"),
    ({"functions": []}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_generations(chat(**fields), LIMITS)
    assert caught.value.param == param
    if param in ("mirostat", "functions"):
        assert isinstance(caught.value, UnsupportedParameter)


@pytest.mark.parametrize("fields, param", [
    ({"echo": True, "logprobs": 1}, "echo"),  # the prompt's own logprobs: not computed
    ({"echo": True, "suffix": "s"}, "echo"),
    ({"best_of": 2}, "best_of"),
])  # fmt: skip
def test_completion_combinations_refused(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        completion_generations(CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields}), LIMITS)
    assert caught.value.param == param


def test_logit_bias_keys_are_ascii_token_ids() -> None:
    from pydantic import ValidationError

    for bad in ({"²": 1}, {"x": 1}, {"-1": 1}):
        with pytest.raises(ValidationError):
            chat(logit_bias=bad)


def test_fields_without_effect_pass() -> None:
    chat_generations(chat(user="u", metadata={"k": "v"}, store=False, service_tier="auto"), LIMITS)


def test_tool_calls_are_parsed_and_nothing_is_lost() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"add"})
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", {"a": 1})]
    two = '<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>\n<tool_call>{"name": "b"}</tool_call>'
    content, calls = parse_tool_calls(two, {"a", "b"})
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 2}, {}]
    for broken in ('<tool_call>{"name": "add", "argu', "<tool_call>not json</tool_call>",
                   '<tool_call>{"name": "a"}</tool_call> and then prose'):  # fmt: skip
        assert parse_tool_calls(broken, {"a", "add"}) == (broken, [])
    assert parse_tool_calls("plain", {"add"}) == ("plain", [])
    # A bare call object, as small models often write it, naming an offered tool.
    for bare in ('{"name": "add", "arguments": {"a": 1}}', '```json\n{"name": "add", "arguments": {"a": 1}}\n```'):
        content, calls = parse_tool_calls(bare, {"add"})
        assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    for not_a_call in ('{"name": "sub", "arguments": {}}', '{"name": "add", "a": 1}', '{"name": "add"} and more'):
        assert parse_tool_calls(not_a_call, {"add"}) == (not_a_call, [])


def test_tool_call_stream_holds_only_what_may_be_a_call() -> None:
    s = ToolCallStream({"add"})
    assert s.feed("Hello <tool") == "Hello "  # maybe the start of a call: held
    assert s.feed("kit>") == "<toolkit>"  # it was not
    assert s.feed(" ok <tool_c") == " ok "
    assert s.feed('all>{"name": "add", "arguments": {}}</tool_call>') == ""
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "add"
    s = ToolCallStream({"add"})
    assert s.feed("no calls") == "no calls" and s.finish() == ("", [])
    s = ToolCallStream({"add"})
    s.feed('<tool_call>{"name": "a", "argum')
    assert s.finish() == ('<tool_call>{"name": "a", "argum', [])  # cut short: handed back as text
    s = ToolCallStream({"add"})  # an answer that starts like a bare call is held to the end
    assert s.feed("  {") == "" and s.feed('"name": "add", "arguments": {}}') == ""
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "add"
    s = ToolCallStream({"add"})
    assert s.feed("``") == "" and s.feed("x`` is code") == "``x`` is code"  # not a fence after all


def test_grammars() -> None:
    assert json_grammar({"type": "object"}, json_schema_to_gbnf) == JSON_OBJECT
    assert "root ::=" in json_grammar({"type": "integer"}, json_schema_to_gbnf)
    grammar = tool_call_grammar([TOOL], None, json_schema_to_gbnf)
    assert grammar.startswith('root ::= "<tool_call>\\n" dragon-call "\\n</tool_call>"')
    assert grammar.count("root ::=") == 1 and "dragon-call ::=" in grammar
    with pytest.raises(ValueError):
        tool_call_grammar([TOOL], "sub", json_schema_to_gbnf)


def gen(**fields: Any) -> Generation:
    return Generation(max_tokens=1, **fields)


def test_prefix_keys_grow_with_the_conversation() -> None:
    one = [{"role": "user", "content": "a"}]
    two = [*one, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    k1, k2 = prefix_keys(gen(messages=one)), prefix_keys(gen(messages=two))
    assert len(k1) == 1 and len(k2) == 3 and k2[0] == k1[0]
    assert prefix_keys(gen(messages=[{"role": "user", "content": "x"}]))[0] != k1[0]
    text = "x" * 600
    keys = prefix_keys(gen(prompt=text))
    assert len(keys) == 2
    assert prefix_keys(gen(prompt=text))[:2] == prefix_keys(gen(prompt=text + "y" * 300))[:2]
    fim = prefix_keys(gen(prompt=text, suffix="s"))  # an IDE's fill-in-the-middle shares the code before
    assert len(fim) == 2 and fim == prefix_keys(gen(prompt=text, suffix="other")) and fim[0] not in keys


def test_affinity_follows_what_each_node_holds_last() -> None:
    aff = CacheAffinity()
    a, b = [b"1"], [b"1", b"2"]
    aff.record("w1", "m", a)
    assert list(aff.holders("m", b)) == ["w1"]
    aff.record("w2", "m", b)
    assert list(aff.holders("m", b)) == ["w2", "w2"]  # longest prefix first
    aff.record("w2", "m", [b"9"])  # w2's cache now holds something else
    assert list(aff.holders("m", b)) == []  # w1's record of "1" was taken over by w2, then dropped
    aff.record("w1", "m", a)
    aff.forget("w1")
    assert list(aff.holders("m", a)) == [] and len(aff) == 1
    assert list(aff.holders("other", [b"9"])) == []
