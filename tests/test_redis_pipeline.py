"""`Pipelined`, the batching of many requests' Redis calls, against a real Redis: each call gets
its own answer, a call that may not run twice never does, and one that may is sent again when
its answer was lost. A lost answer is made by a real TCP proxy in front of Redis that passes a
pipeline on and then drops the connection instead of passing the reply back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.asyncio

from dragonswarm.store.redis import async_client
from dragonswarm.store.redis_pipeline import Pipelined, sent_again

T = TypeVar("T")

INCR = "return redis.call('INCR', KEYS[1])"  # not repeatable: each run counts
ECHO = "return 'echo:' .. ARGV[1]"


def test_what_goes_again_after_lost_scripts() -> None:
    # refused: Redis had lost the call's script; repeatable: it may run twice.
    assert sent_again([False, False], [True, False]) == []
    assert sent_again([True, False, True], [False, False, False]) == [0, 2]  # the one that ran keeps its answer
    assert sent_again([False, True, False, False], [True, False, True, False]) == [1, 2]  # order kept behind
    assert sent_again([True, False], [True, True]) == [0, 1]  # an admission, then its cancel


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


@contextlib.asynccontextmanager
async def pipelined(url: str, *scripts: str) -> AsyncIterator[tuple[Pipelined, list[Any], redis.asyncio.Redis]]:
    client = async_client(url)
    registered = [client.register_script(text) for text in scripts]
    calls = Pipelined(client, registered, "test calls")
    try:
        yield calls, registered, client
    finally:
        await calls.close()
        await client.aclose()


def test_each_call_of_a_batch_gets_its_own_answer_when_scripts_were_lost(redis_url: str) -> None:
    """Redis holds INCR but not ECHO (as after a restart, one script loaded again since): the
    batch's ECHOs are refused, and the INCRs behind them run at once. Each call must get its
    own answer, the non-repeatable INCR must have run once, and the repeatable one, sent again
    to keep its place behind the refused ECHO, twice."""

    async def body() -> None:
        async with pipelined(redis_url, INCR, ECHO) as (calls, (incr, echo), client):
            await client.script_flush()
            await client.script_load(INCR)
            answers = [
                calls.submit(echo, [], ["a"], repeatable=True),
                calls.submit(incr, ["once"], [], repeatable=False),
                calls.submit_command("SET", "plain", "v", repeatable=True),
                calls.submit(incr, ["again"], [], repeatable=True),
                calls.submit(echo, [], ["b"], repeatable=False),
                calls.submit_command("GET", "plain", repeatable=True),
            ]
            got = await asyncio.gather(*answers)
            assert got[0] == "echo:a" and got[4] == "echo:b" and got[2] is True and got[5] == "v"
            assert got[1] == 1  # ran in the first round, and not again
            assert got[3] == 2  # ran in the first round, and again behind the refused ECHO
            assert (await client.get("once"), await client.get("again")) == ("1", "2")

    run(body)


async def _proxy(target: tuple[str, int], drop: asyncio.Event) -> asyncio.Server:
    """A TCP proxy to `target` that, while `drop` is set, forwards what the client sends and then
    closes the client's connection instead of passing Redis's reply back (once, then clears it)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool,
                   client: asyncio.StreamWriter) -> None:  # fmt: skip
        try:
            while data := await reader.read(65536):
                if replies and drop.is_set():
                    drop.clear()
                    client.transport.abort()  # the command ran; its answer is lost
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(client_r, redis_w, False, client_w), pipe(redis_r, client_w, True, client_w))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_call_whose_answer_was_lost_is_sent_again_only_if_it_may_run_twice(redis_url: str) -> None:
    async def body() -> None:
        parts = urlsplit(redis_url)
        drop = asyncio.Event()
        server = await _proxy((parts.hostname or "127.0.0.1", parts.port or 6379), drop)
        port = server.sockets[0].getsockname()[1]
        via = urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}"))
        try:
            async with pipelined(via, INCR) as (calls, (incr,), client):
                assert await calls.submit_command("PING", repeatable=True) is True  # connected through the proxy
                assert await calls.call(incr, ["warm"], [], repeatable=True) == 1
                drop.set()
                once = calls.submit(incr, ["count"], [], repeatable=False)
                lookup = calls.submit_command("INCR", "lookup", repeatable=True)  # as a lookup; INCR counts its runs
                assert await lookup == 2  # its first run's answer was lost; it ran again
                with pytest.raises(redis.ConnectionError):
                    await once  # it ran, but nobody can know that: failed, not sent again
                assert await client.get("count") == "1"
                assert await calls.call(incr, ["count"], [], repeatable=False) == 2  # and the next goes on
        finally:
            server.close()

    run(body)


def test_closing_answers_the_calls_made_and_refuses_new_ones(redis_url: str) -> None:
    async def body() -> None:
        async with pipelined(redis_url, INCR) as (calls, (incr,), client):
            made = [calls.submit(incr, ["closing"], [], repeatable=False) for _ in range(50)]
            await calls.close()
            assert sorted(await asyncio.gather(*made)) == list(range(1, 51))
            with pytest.raises(redis.ConnectionError, match="closed"):
                await calls.call(incr, ["closing"], [], repeatable=True)
            assert await client.get("closing") == "50"

    run(body)
