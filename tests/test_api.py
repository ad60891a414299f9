"""The node's OpenAI-compatible API through the official `openai` client, real engine."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import pytest
from tests.conftest import NodeProcess

# Exact-text comparisons run without the prompt cache: reusing a cached prefix changes how
# the prompt is batched, and so the last bits of the logits (see README, "Prompt cache").
NOCACHE = {"cache_prompt": False}


@pytest.fixture
def client(tiny_node: NodeProcess) -> openai.OpenAI:
    return tiny_node.openai()


def test_models_lists_served_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]


def test_completion_non_streaming(client: openai.OpenAI, count_tokens: Callable[[str], int]) -> None:
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, extra_body=NOCACHE)
    assert out.object == "text_completion"
    assert len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text
    assert out.usage is not None
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == count_tokens("Hello")
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="stream me", max_tokens=20, temperature=0,
                                      extra_body=NOCACHE)
    chunks = list(client.completions.create(model="tiny", prompt="stream me", max_tokens=20, temperature=0,
                                            extra_body=NOCACHE,
                                            stream=True))  # fmt: skip
    assert len(chunks) > 2, "tokens must arrive as separate chunks"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_ends_with_done_and_usage(tiny_node: NodeProcess, count_tokens: Callable[[str], int]) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with tiny_node.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    n = count_tokens("x")
    assert usage_chunk["usage"] == {"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    runs = [client.completions.create(model="tiny", prompt="same", max_tokens=40, temperature=0,
                                      extra_body=NOCACHE).choices[0].text
            for _ in range(3)]  # fmt: skip
    assert runs[0] == runs[1] == runs[2]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        out = client.completions.create(model="tiny", prompt="s", max_tokens=40, temperature=1.0, seed=seed)
        return out.choices[0].text

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_n_and_prompt_lists_are_indexed_in_order(client: openai.OpenAI) -> None:
    prompts = ["alpha", "beta"]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=8, temperature=0, extra_body=NOCACHE)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0,
                                         extra_body=NOCACHE).choices[0].text
               for p in prompts]  # fmt: skip
    assert [c.text for c in out.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert out.usage is not None and out.usage.completion_tokens == 32


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=6, temperature=0,
                                       extra_body=NOCACHE, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    whole = client.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=6, temperature=0,
                                      extra_body=NOCACHE)
    assert texts == {c.index: c.text for c in whole.choices}


def test_stop_sequence_cuts_output(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="stop test", max_tokens=60, temperature=0,
                                     extra_body=NOCACHE).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3
    out = client.completions.create(model="tiny", prompt="stop test", max_tokens=60, temperature=0,
                                    extra_body=NOCACHE, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(model="tiny", prompt="stop test", max_tokens=60, temperature=0,
                                         extra_body=NOCACHE,
                                         stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_chat_completion_uses_the_model_template(client: openai.OpenAI, count_tokens: Callable[[str], int]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                         extra_body=NOCACHE)  # type: ignore[arg-type]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content
    # The tiny model's template: <s> then "<|role|>content\n" per message, then "<|assistant|>".
    templated = "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert out.usage is not None and out.usage.prompt_tokens == count_tokens(templated)
    raw = client.completions.create(model="tiny", prompt=templated, max_tokens=10, temperature=0, extra_body=NOCACHE)
    assert out.choices[0].message.content == raw.choices[0].text


def test_chat_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                           extra_body=NOCACHE)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15,
                                                  # type: ignore[arg-type]
                                                 temperature=0, extra_body=NOCACHE, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_node_status_reports_resources_and_mechanism(tiny_node: NodeProcess) -> None:
    httpx.post(tiny_node.api + "/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, timeout=60)
    status = tiny_node.status()
    gov = status["governor"]
    assert gov["mechanism"] in ("cgroup-v1", "cgroup-v2", "affinity+duty-cycle")
    assert gov["local_share"] == 0.8 and gov["share"] == 0.1
    assert gov["cpus"] >= 1 and gov["ram_total"] > gov["ram_available"] > 0
    model = status["models"][0]
    assert model["name"] == "tiny" and model["loaded"] is True and model["runner_pid"] > 0
