"""The orchestrator's HTTP API: the node's OpenAI API for thin clients, plus the registry."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dragonswarm.errors import InvalidRequest, NotFound, Overloaded, RateLimited
from dragonswarm.orchestrator.accounting import Accounting
from dragonswarm.orchestrator.auth import Caller, inference, require
from dragonswarm.orchestrator.cache import CacheState, Lookup, ResponseCache
from dragonswarm.orchestrator.federation import Federation
from dragonswarm.orchestrator.fragments import Request as SwarmRequest
from dragonswarm.orchestrator.limits import Limiter
from dragonswarm.orchestrator.registry import model_key
from dragonswarm.orchestrator.swarm import CLOSE_FORGOTTEN, CLOSE_REVOKED, Swarm
from dragonswarm.orchestrator.usage import read_usage, since_param
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams, model_card
from dragonswarm.protocol.runner import Generation
from dragonswarm.scheduler.models import pick_model
from dragonswarm.scheduler.ratelimit import Charge, Refusal
from dragonswarm.scheduler.split import chat_generations, completion_generations, prompt_text, token_estimate
from dragonswarm.store.base import KeyRecord
from dragonswarm.web.replies import Reply, respond
from dragonswarm.web.requestlog import RequestFacts, facts, observed

log = logging.getLogger("dragonswarm.orchestrator")

router = APIRouter()

Inference = Annotated[Caller, Depends(inference)]
Admin = Annotated[KeyRecord, Depends(require("admin", what="read the registry"))]


def swarm_of(request: Request) -> Swarm:
    swarm: Swarm = request.app.state.swarm
    return swarm


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request, key: Inference) -> dict[str, Any]:
    registry = swarm_of(request).registry
    created = int(request.app.state.started)
    data = [model_card(name, created, tags=tags, nodes=len(registry.serving(name)),
                       files=[{"sha256": sha, "nodes": len(registry.serving_file(model_key(name, sha)))}
                              for sha in registry.files(name)])
            for name, tags in registry.model_tags().items()]  # fmt: skip
    return {"object": "list", "data": data}


@router.get("/v1/nodes")
async def list_nodes(request: Request, key: Admin, summary: bool = False) -> Response:
    swarm = swarm_of(request)
    loop = request.app.state.loop_lag.summary()
    if summary:  # counts only: with 10,000 nodes the full list holds the event loop for seconds
        return _json({"object": "summary", "states": swarm.registry.states(), "queue": swarm.status(), "loop": loop})
    live = {r.name: r for r in swarm.registry.records()}
    stored = {r.name: r for r in await asyncio.to_thread(swarm.store.list_nodes) if r.name not in live}
    data = []
    for record in sorted([*live.values(), *stored.values()], key=lambda r: r.name):
        state = record.state if record.name in live else "gone"
        data.append({"name": record.name, "state": state, "first_seen": record.first_seen,
                     "last_seen": record.last_seen, **record.info})  # fmt: skip
    return _json({"object": "list", "data": data, "queue": swarm.status(), "loop": loop})


def _json(body: dict[str, Any]) -> Response:
    """JSON by orjson straight away: FastAPI's own encoder walks every value in Python, which
    for ten thousand nodes' records held the event loop for seconds."""
    return Response(orjson.dumps(body), media_type="application/json")


@router.post("/v1/nodes/{name}/revoke")
async def revoke_node(request: Request, name: str, key: Admin) -> dict[str, Any]:
    """Revoke a node for good: its connection is cut now, its work moves, it cannot rejoin."""
    swarm = swarm_of(request)
    if not await asyncio.to_thread(swarm.store.revoke_identity, name):
        raise NotFound(f"no node named {name!r} was ever admitted", param="name")
    return {"name": name, "revoked": True, "was_connected": _cut(request, name, CLOSE_REVOKED, "revoked")}


@router.post("/v1/nodes/{name}/forget")
async def forget_node(request: Request, name: str, key: Admin) -> dict[str, Any]:
    """Free a name: its credential and record are deleted, its connection (if any) is cut. A
    machine that lost its credential (reinstalled, or a new machine taking the name) may then
    join with the node key; the machine that held it, if it still runs, rejoins the same way."""
    swarm = swarm_of(request)
    if not await asyncio.to_thread(swarm.store.forget_identity, name):
        raise NotFound(f"no node named {name!r} is known", param="name")
    return {"name": name, "forgotten": True, "was_connected": _cut(request, name, CLOSE_FORGOTTEN, "forgotten")}


def _cut(request: Request, name: str, code: int, reason: str) -> bool:
    """End a node's connection now, if it has one (at the replica holding it); its work moves on."""
    swarm = swarm_of(request)
    conn = swarm.registry.conns.get(name)
    if conn is None:
        return False
    federation: Federation | None = request.app.state.federation
    if conn.replica is not None and federation is not None:
        federation.cut(conn, code, reason)
        return True
    conn.close(code, reason)
    swarm.node_left(conn)
    return True


@router.get("/v1/usage")
async def usage(request: Request, key: Annotated[KeyRecord, Depends(require("admin", what="read usage"))],
                since: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Requests and tokens per key (`data`) and per node's hand-offs (`nodes`), in all and per model
    (read only): since the store was made, or from the hour holding `since` (unix seconds) on, 35
    days back at most (the answer's `since` says where it starts)."""
    start = since_param(since)  # parsed here, not by FastAPI: its 400 would name the param "query"
    return await asyncio.to_thread(read_usage, swarm_of(request).store, start, time.time())  # a store may be remote


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest, caller: Inference) -> Response:
    return await _serve(request, caller, body, completion_generations(body, swarm_of(request).settings.limits))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest, caller: Inference) -> Response:
    return await _serve(request, caller, body, chat_generations(body, swarm_of(request).settings.limits))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request, caller: Inference) -> Response:
    raise NotFound("this server does not serve embeddings: it runs generative models only", code="not_supported")


async def _serve(request: Request, caller: Caller, body: SamplingParams, gens: list[Generation]) -> Response:
    swarm = swarm_of(request)
    model = pick_model(body.model, prompt_text(body), swarm.registry.model_tags()) or body.model
    told = facts(request)
    told.key, told.model = caller.name, model
    estimate = token_estimate(gens)
    limiter: Limiter = request.app.state.limiter
    charge = await limiter.admit(caller.lane, estimate)
    if isinstance(charge, Refusal):
        if charge.wait is None:  # bigger than the limit itself: no wait would help, so no Retry-After
            raise InvalidRequest(charge.reason, code="request_too_large")
        swarm.metrics.refused(caller.name, "rate")
        raise RateLimited(charge.reason, retry_after=max(1, math.ceil(charge.wait)))
    # A node handing its owner's request over is the request's origin: it is kept off that node.
    req = SwarmRequest(user=caller.lane, model=model, origin=caller.node)
    cache: ResponseCache | None = request.app.state.cache
    lookup = cache.lookup(caller, body, model, gens) if cache else None
    reply = Reply.for_request(body, model, len(gens))
    reply.headers = lambda: {"X-Dragon-Nodes": ",".join(req.first_nodes), "X-Dragon-Cache": _cache_state(lookup)}
    reply.route = lambda: _route(req, lookup, len(gens))
    events = swarm.run(req, gens)
    if cache and lookup:
        events = cache.answer(lookup, req, swarm.registry.files(model), events)
    try:
        metered = _metered(swarm, request.app.state.accounting, caller, req, told, charge, lookup, events)
        return await respond(request, reply, metered)
    except Overloaded:
        swarm.metrics.refused(caller.name, "queue")
        raise


def _cache_state(lookup: Lookup | None) -> CacheState:
    return lookup.state if lookup else "off"


def _route(req: SwarmRequest, lookup: Lookup | None, fragments: int) -> dict[str, object]:
    """The `dragon` object: the nodes that worked on the answer, or none when it came from the cache."""
    if lookup and lookup.state == "hit":
        return {"nodes": [], "fragments": fragments, "cache": "hit"}
    return {**req.route(), "cache": _cache_state(lookup)}


async def _metered(swarm: Swarm, accounting: Accounting, caller: Caller, req: SwarmRequest, told: RequestFacts,
                   charge: Charge, lookup: Lookup | None,
                   events: AsyncGenerator[tuple[int, Event]]) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
    """Pass events through; once the request ends, record the usage (the key's, or for a hand-off
    its node's) and give back the tokens charged at admission but not used. Counted as the work
    goes (prompts as they start, each token relayed), so a stream cut short costs what it used.
    The same counts go to the request's log line and the metrics. An answer from the cache counts
    for the caller as the answer it is (its usage says so too), but as no tokens generated."""
    began = False
    model = req.model
    watched = observed(events, told)
    accounting.begin()
    try:
        async for index, event in watched:
            began = True
            if event["ev"] == "text" and not (lookup and lookup.state == "hit"):
                swarm.metrics.tokens(model, len(event.get("ids", ())))
            yield index, event
    finally:
        # Counted as they went out: what was not is not the caller's. Written first, in a task of its
        # own, which finishes even when this request is being cancelled (`Accounting`).
        work = accounting.start(caller, model, charge, began, told.prompt_tokens, told.completion_tokens)
        try:
            await watched.aclose()  # and the swarm's own stream with it
        finally:
            told.fragments, told.nodes = len(req.fragments), list(req.nodes)
            told.cache = lookup.state if lookup else None
            await asyncio.shield(work)  # the request's log line comes after its accounting
