"""The response cache: an answer the request itself determines, kept and replayed.

A request determines its answer when it samples greedily (temperature 0) or from a fixed
seed: the same model file, given the same generations, writes the same tokens. Such an
answer is kept as the events the swarm produced (`start`, `text`, `done` per choice) under
a key made of
- the model file's sha256: a name may stand for another file tomorrow, with other answers;
- the generations, which are the request normalised: every field that changes the events,
  with the server's defaults filled in, and nothing else. What only shapes the reply
  (`stream`, `stream_options`, `echo`, `parallel_tool_calls`, `user`, `cache`...) is not
  in them: the reply is rebuilt from the request at hand;
- the scope: the caller (its key, or the node handing its owner's request over), so one
  key never sees what another asked or was told; one scope for all with `--cache-shared`.

A hit goes through the same `respond()` as a fresh answer, so it takes the shape asked for
now: a stream for a streamed request, one body otherwise, however it was first produced.
Only complete answers are kept (every choice done, no error, the client still there).

Decisions are pure functions of plain values (`wanted`, `request_digest`, `entry_key`,
`complete`); `ResponseCache` carries them out over a backend of `store/responses.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

from dragonswarm.errors import StoreUnavailable
from dragonswarm.orchestrator.auth import Caller
from dragonswarm.orchestrator.fragments import Request
from dragonswarm.orchestrator.metrics import Metrics
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.openai import SamplingParams
from dragonswarm.protocol.runner import Generation
from dragonswarm.store.responses import ResponseStore

log = logging.getLogger("dragonswarm.orchestrator")

Events = AsyncGenerator[tuple[int, Event]]
CacheState = Literal["hit", "miss", "off"]

# The version of what a key covers and of the stored events: changing either changes this,
# and every answer kept before becomes a miss instead of a wrong answer.
FORMAT = 1
SHARED_SCOPE = "*"  # --cache-shared: one scope for every caller (lanes are "key-N" and "node-NAME")
KEPT = frozenset({"start", "text", "done"})  # what a replay needs; `progress` never reaches a request
# Fields of a generation that change how it is computed, not what it answers.
NOT_IN_KEY = frozenset({"cache_prompt", "prefix_ids"})


def wanted(body: SamplingParams, key_allows: bool) -> bool:
    """Whether a request's answer may come from the cache and go to it: only an answer the
    request determines, and never when the client asks for a fresh computation (`cache` or
    `cache_prompt` false) or its key opted out."""
    determined = body.temperature == 0 or body.seed is not None
    return determined and body.cache and body.cache_prompt and key_allows


def request_digest(gens: Sequence[Generation]) -> str:
    """The sha256 of the generations as canonical JSON (keys sorted): the request, normalised."""
    dumped = [gen.model_dump(mode="json", exclude=set(NOT_IN_KEY)) for gen in gens]
    return hashlib.sha256(orjson.dumps(dumped, option=orjson.OPT_SORT_KEYS)).hexdigest()


def entry_key(sha256: str, scope: str, digest: str) -> str:
    """Where an answer is kept: the model file, the scope and the request's digest, hashed."""
    return hashlib.sha256(f"{FORMAT}\n{sha256}\n{scope}\n{digest}".encode()).hexdigest()


def complete(events: Sequence[tuple[int, Event]], n: int) -> bool:
    """Every one of the `n` choices done, and no error: the only answers worth keeping."""
    if any(event["ev"] == "error" for _, event in events):
        return False
    return {index for index, event in events if event["ev"] == "done"} == set(range(n))


def encode(events: Sequence[tuple[int, Event]]) -> bytes:
    return orjson.dumps(events)


def decode(raw: bytes) -> list[tuple[int, Event]]:
    """The events of a kept answer; ValueError if they are not what `encode` wrote."""
    items = orjson.loads(raw)
    if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
        raise ValueError("not a list of (choice, event) pairs")
    return [(int(index), event) for index, event in items]


@dataclass
class Lookup:
    """One request's use of the cache: what its answer is kept under, and whether it was found."""

    model: str
    scope: str
    digest: str
    n: int  # choices
    state: CacheState = "miss"  # "hit" once the answer came from the cache


class ResponseCache:
    """The orchestrator's response cache over a backend (SQLite for one process, Redis for replicas)."""

    def __init__(self, backend: ResponseStore, metrics: Metrics, shared: bool = False) -> None:
        self.backend = backend
        self.metrics = metrics
        self.shared = shared
        # The model files last served under each name: with no node connected the registry knows
        # none, and an answer is still the one the name last stood for. One entry per name.
        self._files: dict[str, list[str]] = {}

    def lookup(self, caller: Caller, body: SamplingParams, model: str, gens: Sequence[Generation]) -> Lookup | None:
        """The request's use of the cache, or None when it has none (see `wanted`)."""
        key_allows = caller.key is None or caller.key.cache
        if not wanted(body, key_allows):
            return None
        scope = SHARED_SCOPE if self.shared else caller.lane
        return Lookup(model, scope, request_digest(gens), len(gens))

    async def answer(self, lookup: Lookup, req: Request, files: Sequence[str], run: Events) -> Events:
        """The kept answer if there is one under any of `files` (the model's, most held first),
        else `run`'s events, kept once they have all gone out complete."""
        async with contextlib.aclosing(run) as events:
            found = await self._find(lookup, files)
            if found is not None:
                lookup.state = "hit"
                self.metrics.cache_hit(lookup.model)
                for item in found:
                    yield item
                return
            self.metrics.cache_miss(lookup.model)
            kept: list[tuple[int, Event]] = []
            async for index, event in events:
                if event["ev"] in KEPT:
                    kept.append((index, event))
                yield index, event
        # Written before the answer's last byte goes out: a client that asks again once it has
        # its answer finds it.
        if req.sha256 is not None and complete(kept, lookup.n):
            await self._keep(entry_key(req.sha256, lookup.scope, lookup.digest), kept)

    async def _find(self, lookup: Lookup, files: Sequence[str]) -> list[tuple[int, Event]] | None:
        if files:
            self._files[lookup.model] = list(files)
        for sha in files or self._files.get(lookup.model, ()):
            try:
                raw = await self.backend.get(entry_key(sha, lookup.scope, lookup.digest))
            except StoreUnavailable:  # the answer can still be computed: a miss, logged by the backend
                return None
            if raw is None:
                continue
            try:
                return decode(raw)
            except ValueError:
                log.warning("a cached answer does not decode; computing it again")
        return None

    async def _keep(self, key: str, events: list[tuple[int, Event]]) -> None:
        # The answer is out either way; a failed write only means the next request computes it again.
        with contextlib.suppress(StoreUnavailable):  # the backend logged why
            await self.backend.put(key, encode(events))

    async def close(self) -> None:
        await self.backend.close()
