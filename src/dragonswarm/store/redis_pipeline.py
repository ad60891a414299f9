"""Commands from many requests at once, sent to a shared Redis together (`Pipelined`).

Used where every request makes a call of its own on the event loop: rate-limit admissions
(`redis_limits.py`), and the key lookup and usage count of each request (`callers_redis.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from dragonswarm.store.redis import COMMAND_TIMEOUT_S

log = logging.getLogger("dragonswarm.store")

# How long closing waits for the calls already made to be answered: a command's own timeout.
CLOSE_WAIT_S = COMMAND_TIMEOUT_S


@dataclass
class _Call:
    command: tuple[str | int, ...]  # as redis-py's `execute_command` takes it
    answer: asyncio.Future[Any]
    repeatable: bool  # may run twice (see `Pipelined`)


def sent_again(refused: Sequence[bool], repeatable: Sequence[bool]) -> list[int]:
    """Which calls of a batch go again once the scripts Redis had lost are loaded: those it
    refused for a missing script, and, so that they still run in the batch's order (a cancel
    after its admission), every repeatable call behind the first refused one. A call that ran
    and may not run twice keeps its answer."""
    first = next((i for i, was in enumerate(refused) if was), len(refused))
    return [i for i in range(first, len(refused)) if refused[i] or repeatable[i]]


class Pipelined:
    """Commands and script calls from many requests at once, sent to Redis together.

    While one pipeline is out, the calls made meanwhile wait and go together in the next. A
    wave of requests costs a round trip per wave, not a connection and a round trip each: at
    1,000 users, each call queued for one of the pool's connections and then for the busy
    replica's loop to read its answer, and admission took up to 1.6 s in a wave. One pipeline
    at a time, so a call made alone goes at once. Each command stays atomic in Redis; only the
    round trips are shared.

    A call is `repeatable` when running it twice does no harm (a lookup; an admission, which
    Redis recognises by its member). When a pipeline's connection breaks, its calls may or may
    not have run: the repeatable ones go once more on a new connection, the others (a usage
    count) fail. That holds only because redis-py itself sends nothing again: a client with a
    `retry` of its own (as the federation's) must not be given to `Pipelined`. Closing waits for
    the calls already made, and refuses new ones."""

    def __init__(self, client: redis.asyncio.Redis, scripts: Sequence[AsyncScript], what: str) -> None:
        self._r = client
        self._scripts = scripts  # all loaded again when Redis has lost any (restarted)
        self._what = what  # for the log and the errors: what these calls are for
        self._waiting: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int], *,
               repeatable: bool) -> asyncio.Future[Any]:  # fmt: skip
        """The script's answer to come, or its error (a `redis.RedisError`)."""
        return self.submit_command("EVALSHA", script.sha, len(keys), *keys, *args, repeatable=repeatable)

    def submit_command(self, *command: str | int, repeatable: bool) -> asyncio.Future[Any]:
        """A command's answer to come (parsed as redis-py parses it), or its error."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            answer.set_exception(redis.ConnectionError(f"the {self._what} are closed"))
            return answer
        self._waiting.append(_Call(command, answer, repeatable))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name=f"redis-{self._what}")
        return answer

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int], *,
                   repeatable: bool) -> Any:  # fmt: skip
        return await self.submit(script, keys, args, repeatable=repeatable)

    async def _send(self) -> None:
        calls: list[_Call] = []
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                try:
                    results = await self._run(calls)
                except Exception as exc:  # a defect of ours: said in the log, the calls fail as Redis's
                    log.exception("the pipeline of %s failed", self._what)
                    results = [redis.RedisError(f"the {self._what} failed: {exc}")] * len(calls)
                for call, result in zip(calls, results, strict=True):
                    if call.answer.done():  # its request went away meanwhile
                        continue
                    if isinstance(result, Exception):
                        call.answer.set_exception(result)
                    else:
                        call.answer.set_result(result)
        except BaseException:  # cancelled with calls out or waiting: they fail, never hang
            for call in [*calls, *self._waiting]:
                if not call.answer.done():
                    call.answer.set_exception(redis.ConnectionError(f"the {self._what} were closed"))
            self._waiting = []
            raise

    async def _run(self, calls: list[_Call]) -> list[Any]:
        """Each call's answer, or its error, in order."""
        try:
            return await self._attempt(calls)
        except redis.ConnectionError as exc:
            # A pooled connection broke: the calls may have run. Once more, on a new connection,
            # those that may run twice.
            results: list[Any] = [exc] * len(calls)
            again = [i for i, call in enumerate(calls) if call.repeatable]
            if again:
                try:
                    answers = await self._attempt([calls[i] for i in again])
                except redis.RedisError as second:
                    answers = [second] * len(again)
                for i, answer in zip(again, answers, strict=True):
                    results[i] = answer
            return results
        except redis.RedisError as exc:
            return [exc] * len(calls)

    async def _attempt(self, calls: list[_Call]) -> list[Any]:
        """One pipeline of the calls (its failure raised, whether they ran or not), and the calls
        Redis refused for a lost script sent again once the scripts are loaded. Sending those
        fails them only (with its error, a broken connection too: not tried once more); the calls
        that ran keep their answers."""
        results = await self._pipeline(calls)
        refused = [isinstance(result, redis.exceptions.NoScriptError) for result in results]
        if not any(refused):
            return results
        # The first calls, or Redis lost its scripts (restarted): load them all, then send again.
        again = sent_again(refused, [call.repeatable for call in calls])
        try:
            for script in self._scripts:
                await self._r.script_load(script.script)
            answers = await self._pipeline([calls[i] for i in again])
        except redis.RedisError as exc:
            answers = [exc] * len(again)
        for i, answer in zip(again, answers, strict=True):
            if refused[i] or not isinstance(answer, Exception):  # one that ran keeps its answer
                results[i] = answer
        return results

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        async with self._r.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(*call.command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def close(self) -> None:
        """Refuse new calls, wait (up to `CLOSE_WAIT_S`) for those made to be answered, then stop."""
        self._closed = True
        if self._sender is None:
            return
        await asyncio.wait({self._sender}, timeout=CLOSE_WAIT_S)
        self._sender.cancel()
        await asyncio.gather(self._sender, return_exceptions=True)
