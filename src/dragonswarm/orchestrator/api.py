"""The orchestrator's HTTP API: the node's OpenAI API for thin clients, plus the registry."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dragonswarm.errors import NotFound, RateLimited
from dragonswarm.orchestrator.auth import require
from dragonswarm.orchestrator.fragments import Request as SwarmRequest
from dragonswarm.orchestrator.registry import model_key
from dragonswarm.orchestrator.swarm import CLOSE_REVOKED, Swarm
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams, model_card
from dragonswarm.protocol.runner import Event, Generation
from dragonswarm.scheduler.fragments import chat_generations, completion_generations, prompt_text, token_estimate
from dragonswarm.scheduler.models import pick_model
from dragonswarm.store.base import KeyRecord
from dragonswarm.web.replies import Reply, respond

log = logging.getLogger("dragonswarm.orchestrator")

router = APIRouter()

Inference = Annotated[KeyRecord, Depends(require("user", "node", what="use the inference API"))]
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
async def list_nodes(request: Request, key: Admin, summary: bool = False) -> dict[str, Any]:
    swarm = swarm_of(request)
    loop = request.app.state.loop_lag.summary()
    if summary:  # counts only: with 10,000 nodes the full list holds the event loop for seconds
        return {"object": "summary", "states": swarm.registry.states(), "queue": swarm.status(), "loop": loop}
    live = {r.name: r for r in swarm.registry.records()}
    stored = {r.name: r for r in swarm.store.list_nodes() if r.name not in live}
    data = []
    for record in sorted([*live.values(), *stored.values()], key=lambda r: r.name):
        state = record.state if record.name in live else "gone"
        data.append({"name": record.name, "state": state, "first_seen": record.first_seen,
                     "last_seen": record.last_seen, **record.info})  # fmt: skip
    return {"object": "list", "data": data, "queue": swarm.status(), "loop": loop}


@router.post("/v1/nodes/{name}/revoke")
async def revoke_node(request: Request, name: str, key: Admin) -> dict[str, Any]:
    """Revoke a node for good: its connection is cut now, its work moves, it cannot rejoin."""
    swarm = swarm_of(request)
    if not swarm.store.revoke_identity(name):
        raise NotFound(f"no node named {name!r} was ever admitted", param="name")
    conn = swarm.registry.conns.get(name)
    if conn is not None:
        conn.close(CLOSE_REVOKED, "revoked")
        swarm.node_left(conn)
    return {"name": name, "revoked": True, "was_connected": conn is not None}


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest, key: Inference) -> Response:
    return await _serve(request, key, body, completion_generations(body, swarm_of(request).settings.limits))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest, key: Inference) -> Response:
    return await _serve(request, key, body, chat_generations(body, swarm_of(request).settings.limits))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request, key: Inference) -> Response:
    raise NotFound("this server does not serve embeddings: it runs generative models only", code="not_supported")


async def _serve(request: Request, key: KeyRecord, body: SamplingParams, gens: list[Generation]) -> Response:
    swarm = swarm_of(request)
    model = pick_model(body.model, prompt_text(body), swarm.registry.model_tags()) or body.model
    # Only a node may say which node handed the request over (it is kept off that node).
    origin = request.headers.get("x-dragon-origin") if key.role == "node" else None
    estimate = token_estimate(gens)
    wait = swarm.limiter.admit(str(key.id), estimate, time.monotonic())
    if wait:
        s = swarm.settings
        raise RateLimited(f"rate limit reached for this key ({s.rate_rpm} requests and {s.rate_tpm} tokens "
                          f"per minute); retry in {wait} s", retry_after=wait)  # fmt: skip
    req = SwarmRequest(user=f"key-{key.id}", model=model, origin=origin)
    reply = Reply.for_request(body, model, len(gens))
    reply.headers = lambda: {"X-Dragon-Nodes": ",".join(req.first_nodes)}
    reply.route = req.route
    return await respond(request, reply, _metered(swarm, key, model, estimate, swarm.run(req, gens)))


async def _metered(swarm: Swarm, key: KeyRecord, model: str, estimate: int,
                   events: AsyncGenerator[tuple[int, Event]]) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
    """Pass events through; once the request ends, record the key's usage and give back
    the tokens charged at admission but not used."""
    prompt = completion = 0
    try:
        async for index, event in events:
            if event["ev"] == "done":
                prompt += event.get("prompt_tokens", 0)
                completion += event.get("completion_tokens", 0)
            yield index, event
    finally:
        await events.aclose()
        swarm.limiter.refund(str(key.id), estimate - prompt - completion, time.monotonic())
        if prompt or completion:
            try:  # the answer is already out: accounting that fails must not break it
                swarm.store.record_usage(key.id, model, prompt, completion)
            except Exception:
                log.exception("recording usage failed")
