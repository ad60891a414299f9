"""The response cache: its rules as plain values, its two backends (a real SQLite file, a real
Redis), and the orchestrator answering from it, end to end on both backends with real nodes
running llama.cpp on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from tests.conftest import NodeProcess, OrchestratorProcess, wait_until

from dragonswarm.orchestrator.auth import Caller
from dragonswarm.orchestrator.cache import (
    SHARED_SCOPE,
    ResponseCache,
    complete,
    decode,
    encode,
    entry_key,
    request_digest,
    wanted,
)
from dragonswarm.orchestrator.fragments import Request
from dragonswarm.orchestrator.metrics import Metrics
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest
from dragonswarm.scheduler.split import chat_generations, completion_generations
from dragonswarm.settings import Limits
from dragonswarm.status import keys_table
from dragonswarm.store import rediskeys
from dragonswarm.store.base import KeyRecord
from dragonswarm.store.responses import ResponseStore, open_responses
from dragonswarm.store.responses_sqlite import SqliteResponses

Start = Callable[..., Any]
LIMITS = Limits(max_n=8, max_prompts=16, max_tokens=4096, max_prompt_chars=100_000, default_max_tokens=64)


# --- the rules, as plain values ---------------------------------------------------------------


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tiny", "prompt": "hello", **fields})


@pytest.mark.parametrize(("fields", "key_allows", "cached"), [
    ({"temperature": 0}, True, True),
    ({}, True, False),  # OpenAI's default temperature is 1: every answer is a fresh draw
    ({"temperature": 0.7}, True, False),
    ({"temperature": 0.7, "seed": 7}, True, True),  # a fixed seed determines the draw
    ({"temperature": 0, "cache": False}, True, False),
    ({"temperature": 0, "cache_prompt": False}, True, False),
    ({"temperature": 0, "seed": 1}, False, False),  # the key opted out
])  # fmt: skip
def test_only_a_determined_answer_nobody_asked_to_compute_afresh_is_cached(
        fields: dict[str, Any], key_allows: bool, cached: bool) -> None:  # fmt: skip
    assert wanted(completion(**fields), key_allows) is cached


def digest(**fields: Any) -> str:
    return request_digest(completion_generations(completion(temperature=0, **fields), LIMITS))


def test_the_key_covers_what_changes_the_answer_and_nothing_else() -> None:
    base = digest(max_tokens=8)
    # Only the reply's shape, or how it is computed: the same events answer them all.
    for shape in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}},
                  {"echo": True}, {"user": "alice"}, {"metadata": {"a": "b"}}):  # fmt: skip
        assert digest(max_tokens=8, **shape) == base, shape
    # What the workers are asked to do.
    for change in ({"max_tokens": 9}, {"prompt": "hello!"}, {"seed": 3}, {"stop": ["x"]}, {"n": 2},
                   {"logprobs": 2}, {"top_k": 5}, {"suffix": "end"}):  # fmt: skip
        assert digest(**{"max_tokens": 8, **change}) != base, change
    # The server's defaults are filled in: no max_tokens is the default's, whatever it is.
    no_limit = ChatCompletionRequest.model_validate({"model": "tiny", "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    at_64 = no_limit.model_copy(update={"max_tokens": 64})
    at_32 = Limits(8, 16, 4096, 100_000, 32)
    assert request_digest(chat_generations(no_limit, LIMITS)) != request_digest(chat_generations(at_64, LIMITS))
    assert request_digest(chat_generations(no_limit, LIMITS)) != request_digest(chat_generations(no_limit, at_32))
    # chat and text completions never share an answer
    chat = ChatCompletionRequest.model_validate({"model": "tiny", "temperature": 0, "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
    assert request_digest(chat_generations(chat, LIMITS)) != base


def test_an_entry_is_per_model_file_and_scope() -> None:
    sha_a, sha_b, d = "a" * 64, "b" * 64, digest()
    keys = {entry_key(sha, scope, d) for sha in (sha_a, sha_b) for scope in ("key-1", "key-2", "node-w1", SHARED_SCOPE)}
    assert len(keys) == 8
    assert entry_key(sha_a, "key-1", d) == entry_key(sha_a, "key-1", d) and len(entry_key(sha_a, "key-1", d)) == 64


def test_only_a_complete_answer_is_kept() -> None:
    start: Event = {"ev": "start", "prompt_tokens": 3}
    text: Event = {"ev": "text", "text": "hi", "ids": [5]}
    done: Event = {"ev": "done", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1}
    error: Event = {"ev": "error", "code": "runner_failed", "message": "x"}
    assert complete([(0, start), (0, text), (0, done)], 1)
    assert not complete([(0, start), (0, text)], 1)  # cut short
    assert not complete([(0, start), (0, done), (1, start)], 2)  # one choice of two
    assert not complete([(0, start), (0, done), (1, error)], 2)
    assert complete([(1, start), (0, start), (1, done), (0, done)], 2)
    events = [(0, start), (0, text), (0, done)]
    assert decode(encode(events)) == events
    with pytest.raises(ValueError):
        decode(b'{"not": "events"}')


def test_keys_list_shows_which_keys_opted_out() -> None:
    table = keys_table([KeyRecord(1, "a", "user", "dsk_aaaaaaaa", 0.0), KeyRecord(2, "b", "user", "dsk_bbbbbbbb", 0.0,
                                                                                  cache=False)], 1.0)  # fmt: skip
    header, first, second = table.splitlines()
    assert header.split()[-1] == "CACHE" and first.split()[-1] == "on" and second.split()[-1] == "off"


# --- the backends ------------------------------------------------------------------------------


def use(store: ResponseStore, work: Callable[[ResponseStore], Any]) -> Any:
    """Run `work` against a backend on an event loop of its own, then close the backend."""

    async def main() -> Any:
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture
def open_backend(tmp_path: Path, state_redis: str | None) -> Callable[..., ResponseStore]:
    def make(ttl_s: float = 3600.0, max_bytes: int = 1 << 20) -> ResponseStore:
        return open_responses(tmp_path / "home", state_redis, ttl_s, max_bytes)

    return make


def test_a_backend_keeps_and_replaces_answers(open_backend: Callable[..., ResponseStore]) -> None:
    async def work(store: ResponseStore) -> None:
        assert await store.get("k1") is None
        await store.put("k1", b"first")
        await store.put("k2", b"second")
        await store.put("k1", b"first, again")
        assert await store.get("k1") == b"first, again" and await store.get("k2") == b"second"

    use(open_backend(), work)
    assert use(open_backend(), lambda s: s.get("k1")) == b"first, again"  # kept across a restart


def test_an_answer_expires_after_the_ttl(open_backend: Callable[..., ResponseStore]) -> None:
    store = open_backend(ttl_s=0.05)
    use(store, lambda s: s.put("k", b"soon gone"))
    wait_until(lambda: use(open_backend(ttl_s=0.05), lambda s: s.get("k")) is None, 30, "the answer to expire")


def test_the_sqlite_file_is_private_and_bounded_oldest_out_first(tmp_path: Path) -> None:
    path = tmp_path / "home" / "responses.db"

    async def work(store: ResponseStore) -> list[bytes | None]:
        for i in range(6):
            await store.put(f"k{i}", bytes([i]) * 300)  # 1,800 bytes for a bound of 1,000
        await store.get("k3")  # reading an answer does not keep it longer: the oldest go first
        await store.put("k6", b"x" * 300)
        await store.put("huge", b"x" * 1001)  # more than the bound alone: not kept, nothing pushed out
        return [await store.get(f"k{i}") for i in range(7)] + [await store.get("huge")]

    found = use(SqliteResponses(path, 3600.0, 1000), work)
    assert found == [None] * 4 + [bytes([4]) * 300, bytes([5]) * 300, b"x" * 300, None]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_the_redis_answers_are_named_by_rediskeys_and_expire(redis_url: str, tmp_path: Path) -> None:
    use(open_responses(tmp_path, redis_url, 90.0, 1), lambda s: s.put("abc", b"x" * 10))  # no size bound in Redis
    with redis.Redis.from_url(redis_url) as client:
        assert client.keys(rediskeys.PREFIX + "*") == [rediskeys.response("abc").encode()]
        assert 0 < client.pttl(rediskeys.response("abc")) <= 90_000
    assert not (tmp_path / "responses.db").exists()


# --- the cache over a real backend, fed plain events ------------------------------------------------

START: Event = {"ev": "start", "prompt_tokens": 2}
TEXT: Event = {"ev": "text", "text": "ok", "ids": [7, 8]}
DONE: Event = {"ev": "done", "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 2}


async def produced(*events: Event) -> Any:
    """What the swarm would yield for one choice: these events, in order."""
    for event in events:
        yield 0, event


def test_only_an_answer_that_went_out_whole_is_kept_and_a_hit_needs_no_file_known(tmp_path: Path) -> None:
    caller = Caller(lane="key-1")
    body = completion(temperature=0, max_tokens=4)
    gens = completion_generations(body, LIMITS)

    async def ask(cache: ResponseCache, files: list[str], *events: Event, stop_after: int | None = None
                  ) -> tuple[str, list[tuple[int, Event]]]:  # fmt: skip
        lookup = cache.lookup(caller, body, "tiny", gens)
        assert lookup is not None
        req = Request(user=caller.lane, model="tiny", origin=None, sha256="f" * 64)
        got = []
        answer = cache.answer(lookup, req, files, produced(*events))
        async for item in answer:
            got.append(item)
            if stop_after is not None and len(got) == stop_after:
                await answer.aclose()  # the client went away
                break
        return lookup.state, got

    async def work(store: ResponseStore) -> None:
        cache = ResponseCache(store, Metrics())
        assert (await ask(cache, ["f" * 64], START, TEXT, stop_after=2))[0] == "miss"  # cut short: not kept
        assert (await ask(cache, ["f" * 64], START, {"ev": "error", "code": "timeout", "message": "x"}))[0] == "miss"
        state, first = await ask(cache, ["f" * 64], START, TEXT, DONE)
        assert state == "miss" and first == [(0, START), (0, TEXT), (0, DONE)]
        assert await ask(cache, ["f" * 64]) == ("hit", first)
        assert await ask(cache, []) == ("hit", first)  # no node: the file the name was last served by
        assert (await ask(cache, ["e" * 64]))[0] == "miss"  # the name now stands for another file

    use(SqliteResponses(tmp_path / "responses.db", 3600.0, 1 << 20), work)


# --- end to end ---------------------------------------------------------------------------------


def post(orch: OrchestratorProcess, path: str, body: dict[str, Any], key: str = "user") -> httpx.Response:
    with orch.client(key) as c:
        r = c.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r


def stream(orch: OrchestratorProcess, path: str, body: dict[str, Any],
           key: str = "user") -> tuple[httpx.Headers, list[dict[str, Any]]]:  # fmt: skip
    with orch.client(key) as c, c.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return r.headers, [json.loads(line) for line in lines[:-1]]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                   for c in chunks if c["choices"])  # fmt: skip


def cache_of(r: httpx.Response) -> str:
    assert r.headers["x-dragon-cache"] == r.json()["dragon"]["cache"]
    return r.headers["x-dragon-cache"]


ASK = {"prompt": "once upon a time", "max_tokens": 12, "temperature": 0}


def test_a_repeated_request_is_answered_from_the_cache_as_a_body_or_a_stream(
        swarm: Start, state_redis: str | None) -> None:  # fmt: skip
    orch = swarm(1, redis=state_redis)
    first = post(orch, "/v1/completions", ASK)
    assert cache_of(first) == "miss" and first.json()["dragon"]["nodes"] == ["w1"]
    again = post(orch, "/v1/completions", ASK)
    assert cache_of(again) == "hit"
    assert again.json()["dragon"] == {"nodes": [], "fragments": 1, "cache": "hit"}
    assert again.json()["choices"] == first.json()["choices"] and again.json()["usage"] == first.json()["usage"]
    assert again.json()["id"] != first.json()["id"]  # a new answer, made of the same events

    # A non-streamed first answer, replayed as a stream (with its usage)
    headers, chunks = stream(orch, "/v1/completions", {**ASK, "stream_options": {"include_usage": True}})
    assert headers["x-dragon-cache"] == "hit"
    assert streamed_text(chunks) == first.json()["choices"][0]["text"]
    assert chunks[-1]["usage"] == first.json()["usage"] and chunks[-1]["dragon"]["cache"] == "hit"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"

    # ... and the reverse: a streamed first answer, replayed as a body; chat, with two choices
    chat = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 10, "temperature": 0.9,
            "seed": 11, "n": 2}  # fmt: skip
    headers, chunks = stream(orch, "/v1/chat/completions", chat)
    assert headers["x-dragon-cache"] == "miss" and chunks[-1]["dragon"]["cache"] == "miss"
    texts = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                     if c["choices"] and c["choices"][0]["index"] == i) for i in range(2)]  # fmt: skip
    body = post(orch, "/v1/chat/completions", chat)
    assert cache_of(body) == "hit"
    assert [c["message"]["content"] for c in body.json()["choices"]] == texts
    assert post(orch, "/v1/chat/completions", {**chat, "seed": 12}).headers["x-dragon-cache"] == "miss"


def test_what_is_never_cached(swarm: Start, state_redis: str | None, tmp_path: Path) -> None:
    orch = swarm(1, redis=state_redis)
    for fields in ({"temperature": 0.8}, {"cache": False}, {"cache_prompt": False}):
        body = {**ASK, **fields}
        first, second = post(orch, "/v1/completions", body), post(orch, "/v1/completions", body)
        assert cache_of(first) == cache_of(second) == "off", fields
        assert second.json()["dragon"]["nodes"] == ["w1"]  # computed again
    # `cache: false` neither read nor wrote the cache: the same request without it is a miss
    assert cache_of(post(orch, "/v1/completions", ASK)) == "miss"
    assert cache_of(post(orch, "/v1/completions", ASK)) == "hit"

    # A key made with --no-cache, while the orchestrator runs
    where = ["--redis", state_redis] if state_redis else ["--home", str(orch.home)]
    made = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "create", "--role", "user", "--name",
                           "fresh", "--no-cache", *where], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0 and "no response cache" in made.stderr, made.stderr
    orch.keys["fresh"] = made.stdout.strip()
    for _ in range(2):
        assert cache_of(post(orch, "/v1/completions", ASK, key="fresh")) == "off"


def metric(orch: OrchestratorProcess, name: str) -> float:
    with orch.client("admin") as c:
        text = c.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_one_keys_answers_are_not_anothers(swarm: Start, state_redis: str | None) -> None:
    orch = swarm(1, redis=state_redis)
    assert cache_of(post(orch, "/v1/completions", ASK)) == "miss"
    assert cache_of(post(orch, "/v1/completions", ASK, key="user2")) == "miss"
    assert cache_of(post(orch, "/v1/completions", ASK, key="user2")) == "hit"
    assert metric(orch, "dragon:response_cache_hits_total") == 1
    assert metric(orch, "dragon:response_cache_misses_total") == 2


def test_a_shared_cache_answers_every_key(swarm: Start, state_redis: str | None) -> None:
    orch = swarm(1, "--cache-shared", redis=state_redis)
    first = post(orch, "/v1/completions", ASK)
    other = post(orch, "/v1/completions", ASK, key="user2")
    assert cache_of(first) == "miss" and cache_of(other) == "hit"
    assert other.json()["choices"] == first.json()["choices"]


def test_no_response_cache_turns_it_off(swarm: Start) -> None:
    orch = swarm(1, "--no-response-cache")
    for _ in range(2):
        assert cache_of(post(orch, "/v1/completions", ASK)) == "off"
    assert not (orch.home / "responses.db").exists()


def test_an_answer_expires_after_the_cache_ttl(swarm: Start, state_redis: str | None) -> None:
    orch = swarm(1, "--cache-ttl", "5s", redis=state_redis)
    assert cache_of(post(orch, "/v1/completions", ASK)) == "miss"
    assert cache_of(post(orch, "/v1/completions", ASK)) == "hit"  # kept for 5 s: asked again at once
    wait_until(lambda: cache_of(post(orch, "/v1/completions", ASK)) == "miss", 60, "the answer to expire",
               interval=0.5)  # fmt: skip


@pytest.fixture
def one_node(start_orchestrator: Start, start_node: Start, tiny_model: Path,
             state_redis: str | None) -> Iterator[tuple[OrchestratorProcess, NodeProcess]]:  # fmt: skip
    orch = start_orchestrator(redis=state_redis)
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    yield orch, node


def test_a_hit_needs_no_node(one_node: tuple[OrchestratorProcess, NodeProcess]) -> None:
    orch, node = one_node
    first = post(orch, "/v1/completions", ASK)
    node.stop()
    wait_until(lambda: orch.nodes()["w1"]["state"] == "gone", 60, "the node to be gone")
    with orch.client() as c:
        nobody = c.post("/v1/completions", json={"model": "tiny", **ASK, "prompt": "something new"})
    assert nobody.status_code == 503 and nobody.json()["error"]["code"] == "no_workers"
    again = post(orch, "/v1/completions", ASK)
    assert cache_of(again) == "hit" and again.json()["choices"] == first.json()["choices"]
    headers, chunks = stream(orch, "/v1/completions", ASK)
    assert headers["x-dragon-cache"] == "hit" and streamed_text(chunks) == first.json()["choices"][0]["text"]
    assert "cache=hit" in orch.log()  # the request's log line says where its answer came from


def test_replicas_share_their_answers_through_redis(start_orchestrator: Start, start_node: Start, tiny_model: Path,
                                                    redis_url: str) -> None:  # fmt: skip
    a = start_orchestrator(redis=redis_url)
    b = start_orchestrator(redis=redis_url, replica_of=a)
    start_node("--name", "w-a", "--model", f"tiny={tiny_model}", swarm=a)
    a.wait_live("w-a")
    b.wait_live("w-a")  # B knows the model's file from the node it sees through Redis
    first = post(a, "/v1/completions", ASK)
    # B's own keys are keys of the same store: A's user key is valid on B, and its scope is the same.
    b.keys["user"] = a.keys["user"]
    again = post(b, "/v1/completions", ASK)
    assert cache_of(first) == "miss" and cache_of(again) == "hit"
    assert again.json()["choices"] == first.json()["choices"]
