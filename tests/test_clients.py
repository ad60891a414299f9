"""Clients nobody on this project wrote, against the node and through the orchestrator:
the official `openai` client (sync, async, streaming), `langchain-openai` (ChatOpenAI and
OpenAI: invoke, stream, batch) and `litellm`'s OpenAI-compatible provider. The limit a
client sets must hold, whatever field it sends it in."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from tests.conftest import Api

HI = [{"role": "user", "content": "hi"}]


def test_openai_sync_async_and_streaming(api: Api) -> None:
    client = api.openai()
    out = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=6)  # type: ignore[arg-type]
    assert out.usage and out.usage.completion_tokens == 6 and out.choices[0].message.role == "assistant"
    text = client.completions.create(model="tiny", prompt="x", max_tokens=5)
    assert text.usage and text.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 6

    async def run_async() -> list[int]:
        http = httpx.AsyncClient(verify=api.verify, timeout=120)
        async with openai.AsyncOpenAI(base_url=api.base, api_key=api.key, max_retries=0, http_client=http) as aclient:
            create = aclient.chat.completions.create
            calls = (create(model="tiny", messages=HI, max_tokens=n) for n in (3, 4))  # type: ignore[arg-type]
            outs = await asyncio.gather(*calls)
            stream = await aclient.completions.create(model="tiny", prompt="y", max_tokens=4, stream=True)
            pieces = [c.choices[0].text async for c in stream if c.choices]
            assert "".join(pieces)
            return [o.usage.completion_tokens for o in outs if o.usage]

    assert asyncio.run(run_async()) == [3, 4]
    assert [m.id for m in client.models.list()] == ["tiny", "tt"]


def test_langchain_openai(api: Api) -> None:
    from langchain_openai import ChatOpenAI, OpenAI

    http = httpx.Client(verify=api.verify, timeout=120)
    # langchain-openai 1.x sends max_tokens as max_completion_tokens for chat: the limit must hold.
    chat = ChatOpenAI(base_url=api.base, api_key=api.key, model="tiny", max_tokens=8, max_retries=0,  # type: ignore[arg-type]
                      http_client=http)  # fmt: skip
    reply = chat.invoke("hi")
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] == 8
    assert reply.response_metadata["finish_reason"] == "length"
    streamed = list(chat.stream("hi"))
    assert len(streamed) > 2 and sum(len(str(c.content)) for c in streamed) > 0
    batch = chat.batch(["a", "b", "c"])
    assert [m.usage_metadata["output_tokens"] for m in batch if m.usage_metadata] == [8, 8, 8]
    llm = OpenAI(base_url=api.base, api_key=api.key, model="tiny", max_tokens=5, max_retries=0,  # type: ignore[arg-type]
                 http_client=http)  # fmt: skip
    result = llm.generate(["one", "two"])
    assert result.llm_output and result.llm_output["token_usage"]["completion_tokens"] == 10
    assert isinstance(llm.invoke("x"), str) and len(list(llm.stream("x"))) >= 1
    assert len(llm.batch(["a", "b"])) == 2
    http.close()


def test_litellm_offline(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # litellm fetches a model price list at import unless told to use its bundled copy.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    if api.ca is not None:
        monkeypatch.setattr(litellm, "ssl_verify", str(api.ca))  # trust the swarm's own CA
    kwargs = {"model": "openai/tiny", "api_base": api.base, "api_key": api.key, "messages": HI, "max_tokens": 6}
    out = litellm.completion(**kwargs)
    assert out.usage.completion_tokens == 6
    chunks = list(litellm.completion(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
