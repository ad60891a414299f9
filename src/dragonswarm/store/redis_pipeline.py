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

log = logging.getLogger("dragonswarm.store")


@dataclass
class _Call:
    command: tuple[str | int, ...]  # as redis-py's `execute_command` takes it
    answer: asyncio.Future[Any]


class Pipelined:
    """Commands and script calls from many requests at once, sent to Redis together.

    While one pipeline is out, the calls made meanwhile wait and go together in the next. A
    wave of requests costs a round trip per wave, not a connection and a round trip each: at
    1,000 users, each call queued for one of the pool's connections and then for the busy
    replica's loop to read its answer, and admission took up to 1.6 s in a wave. One pipeline
    at a time, so a call made alone goes at once. Each command stays atomic in Redis; only the
    round trips are shared.

    `repeatable`: whether a call may run twice, and so be sent again when it is not known to
    have run. Then a pipeline whose connection broke goes once more on a new connection, and
    a batch that met scripts Redis had lost goes again whole, in its order (a cancel must not
    run before its admission). Otherwise (a count) a broken pipeline fails, and only the calls
    refused for a lost script go again: the calls must then not depend on each other's order."""

    def __init__(self, client: redis.asyncio.Redis, scripts: Sequence[AsyncScript], what: str,
                 repeatable: bool = True) -> None:  # fmt: skip
        self._r = client
        self._scripts = scripts  # all loaded again when Redis has lost any (restarted)
        self._what = what  # for the log and the errors: what these calls are for
        self._repeatable = repeatable
        self._waiting: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> asyncio.Future[Any]:
        """The script's answer to come, or its error (a `redis.RedisError`)."""
        return self.submit_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def submit_command(self, *command: str | int) -> asyncio.Future[Any]:
        """A command's answer to come (parsed as redis-py parses it), or its error."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(command, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name=f"redis-{self._what}")
        return answer

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        return await self.submit(script, keys, args)

    async def command(self, *command: str | int) -> Any:
        return await self.submit_command(*command)

    async def _send(self) -> None:
        calls: list[_Call] = []
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                try:
                    results = await self._run(calls)
                except redis.RedisError as exc:
                    results = [exc] * len(calls)
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
        except BaseException:  # closed (cancelled) with calls out or waiting: they fail, never hang
            for call in [*calls, *self._waiting]:
                if not call.answer.done():
                    call.answer.set_exception(redis.ConnectionError(f"the {self._what} were closed"))
            self._waiting = []
            raise

    async def _run(self, calls: list[_Call]) -> list[Any]:
        try:
            return await self._pipeline(calls)
        except redis.ConnectionError:
            if not self._repeatable:
                raise
            # Once more on a new connection: a pooled one broke. Were the first sent and run,
            # the calls repeat harmlessly (`repeatable`).
            return await self._pipeline(calls)

    async def _pipeline(self, calls: list[_Call], reload: bool = True) -> list[Any]:
        async with self._r.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(*call.command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        if reload and any(isinstance(result, redis.exceptions.NoScriptError) for result in results):
            # The first calls, or Redis lost its scripts (restarted): load them all and send the
            # batch again (`repeatable`), or only the calls refused, the others keeping their answers.
            for script in self._scripts:
                await self._r.script_load(script.script)
            if self._repeatable:
                return await self._pipeline(calls, reload=False)
            again = [i for i, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
            rerun = await self._pipeline([calls[i] for i in again], reload=False)
            for i, result in zip(again, rerun, strict=True):
                results[i] = result
            return results
        return results

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
