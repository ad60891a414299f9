"""The bundled code model where the answer must make sense: Qwen2.5-Coder-0.5B-Instruct on
one node, asked what an IDE and an app would ask, through the official client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from tests.conftest import NodeProcess, _healthy, free_port, wait_until

CODER = "qwen2.5-coder-0.5b"
NOCACHE = {"cache_prompt": False}


@pytest.fixture(scope="module")
def coder(coder_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    home = tmp_path_factory.mktemp("coder-home")
    log_path = home / "node.log"
    port = free_port()
    with log_path.open("wb") as log:
        args = ["node", "--home", str(home), "--no-bundled-model", "--api-port", str(port), "--local-share", "1.0",
                "--model", f"{CODER}={coder_model}:code,chat"]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "dragonswarm.cli", *args], stdout=log, stderr=subprocess.STDOUT)
    node = NodeProcess(proc, port, home, log_path)
    try:
        wait_until(lambda: _healthy(node), 60, "the node to answer /health")
        client = node.openai()
        yield client
    finally:
        node.stop()


def test_writes_working_code(coder: openai.OpenAI) -> None:
    out = coder.chat.completions.create(model=CODER, temperature=0, max_tokens=300, extra_body=NOCACHE, messages=[
        {"role": "user", "content": "Write a Python function is_palindrome(s) that returns True when the string s "
                                    "reads the same forwards and backwards. Reply with one code block."}])  # fmt: skip
    text = out.choices[0].message.content or ""
    block = re.search(r"```(?:python)?\n(.*?)```", text, re.DOTALL)
    assert block, text
    scope: dict[str, object] = {}
    exec(block.group(1), scope)  # the model's own code, run on the cases it was asked about
    is_palindrome = scope["is_palindrome"]
    assert callable(is_palindrome)
    assert is_palindrome("racecar") and is_palindrome("abba") and not is_palindrome("python")


def test_fill_in_the_middle(coder: openai.OpenAI) -> None:
    out = coder.completions.create(model=CODER, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(2, 3))\n",
                                   max_tokens=16, temperature=0, extra_body=NOCACHE)  # fmt: skip
    assert out.choices[0].text.strip().startswith("return a + b"), out.choices[0].text


def test_json_object_and_schema(coder: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Describe the Python language as JSON with keys name and year."}]
    out = coder.chat.completions.create(model=CODER, messages=ask, max_tokens=80, temperature=0,  # type: ignore[arg-type]
                                        response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["name", "year"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "language", "schema": schema}}
    out = coder.chat.completions.create(model=CODER, messages=ask, max_tokens=80, temperature=0,  # type: ignore[arg-type]
                                        response_format=fmt)  # fmt: skip
    data = json.loads(out.choices[0].message.content or "")
    jsonschema.validate(data, schema)
    assert data["name"].lower() == "python"


def test_tool_call_under_the_models_own_template(coder: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]  # fmt: skip
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    for choice in ("auto", "required"):
        out = coder.chat.completions.create(model=CODER, messages=ask, tools=tools, tool_choice=choice,  # type: ignore[arg-type]
                                            max_tokens=60, temperature=0)  # fmt: skip
        calls = out.choices[0].message.tool_calls
        assert calls and out.choices[0].finish_reason == "tool_calls", (choice, out.choices[0].message)
        assert calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_second_turn_reads_only_what_is_new(coder: openai.OpenAI) -> None:
    history = [{"role": "system", "content": "You are a terse assistant. " * 30},
               {"role": "user", "content": "Name one sorting algorithm."}]  # fmt: skip
    first = coder.chat.completions.create(model=CODER, messages=history, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "And another?"}]  # fmt: skip
    second = coder.chat.completions.create(model=CODER, messages=history, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert second.usage and first.usage
    details = second.usage.prompt_tokens_details
    assert details and details.cached_tokens >= first.usage.prompt_tokens
