"""The node's OpenAI-compatible HTTP API: thin routes over `NodeService`.

Local first: a request runs here when the model is here, its runner is free and the
owner's other programs leave room; otherwise, when the node is linked to a swarm, it
is handed to the orchestrator and its answer streamed back unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from dragonswarm.errors import NotFound
from dragonswarm.node.handoff import Handoff
from dragonswarm.node.lending import Lending
from dragonswarm.node.link import SwarmLink
from dragonswarm.node.service import NodeService
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams, model_card
from dragonswarm.protocol.runner import Generation
from dragonswarm.scheduler.local import serve_locally
from dragonswarm.scheduler.models import pick_model
from dragonswarm.scheduler.split import chat_generations, completion_generations, prompt_text
from dragonswarm.web.replies import Reply, respond, unless_disconnected
from dragonswarm.web.requestlog import facts, observed

router = APIRouter()


def service_of(request: Request) -> NodeService:
    service: NodeService = request.app.state.service
    return service


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    slots = service_of(request).slots.values()
    data = [model_card(s.spec.name, s.created, tags=list(s.spec.tags), loaded=s.loaded, sha256=s.sha256)
            for s in slots]  # fmt: skip
    return {"object": "list", "data": data}


@router.get("/v1/node")
async def node_status(request: Request) -> dict[str, Any]:
    node: dict[str, Any] = request.app.state.overview()
    return node


class LendingSwitch(BaseModel):
    """`POST /v1/node/lending`: the owner pauses or resumes lending this machine to the swarm."""

    model_config = ConfigDict(extra="forbid", strict=True)

    paused: bool


@router.post("/v1/node/lending")
async def switch_lending(request: Request, body: LendingSwitch) -> dict[str, Any]:
    lending: Lending = request.app.state.lending
    link: SwarmLink | None = request.app.state.link
    lending.set(body.paused)
    # What runs for others now finishes: the owner sees how much is still to finish.
    return {**lending.status(), "fragments_running": link.running if link else 0}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> Response:
    service = service_of(request)
    gens = completion_generations(body, service.settings.limits)
    return await _serve(request, body, gens, Reply.for_request(body, "", len(gens)))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service = service_of(request)
    gens = chat_generations(body, service.settings.limits)
    return await _serve(request, body, gens, Reply.for_request(body, "", len(gens)))


@router.post("/v1/embeddings", response_model=None)
async def embeddings(request: Request) -> Response:
    raise NotFound("this server does not serve embeddings: it runs generative models only", code="not_supported")


async def _serve(request: Request, body: SamplingParams, gens: list[Generation], reply: Reply) -> Response:
    service = service_of(request)
    link: SwarmLink | None = request.app.state.link
    handoff: Handoff | None = request.app.state.handoff
    tags = {name: slot.spec.tags for name, slot in service.slots.items()}
    model = pick_model(body.model, prompt_text(body), tags)
    slot = service.slots.get(model) if model else None
    if slot is not None and link is not None and not service.governor.active["local"]:
        # Owner first: work this machine does for others gives way (it moves to another worker).
        link.preempt(slot.spec.name)
    local = serve_locally(
        has_model=slot is not None,
        busy=slot is not None and slot.full and service.governor.active["local"] > 0,
        owner_busy=service.governor.owner_busy,
        linked=link is not None and link.connected,
    )
    told = facts(request)
    told.key, told.model = "owner", model or body.model
    if not local and handoff is not None:
        forwarded: Response | None = await unless_disconnected(request, handoff.forward(request, slot is not None))
        if forwarded is not None:  # its tokens are in the orchestrator's log line, under the same route
            told.nodes = ["swarm:" + forwarded.headers.get("x-dragon-nodes", "?")]
            return forwarded
        # The orchestrator is unreachable or full: serve what we can here.
    slot = service.slot(model or body.model)  # raises 404 model_not_found
    name = service.settings.name
    reply.model = slot.spec.name
    reply.headers = lambda: {"X-Dragon-Nodes": name}
    reply.route = lambda: {"nodes": [name], "fragments": 1}
    told.model, told.fragments, told.nodes = slot.spec.name, len(gens), [name]
    return await respond(request, reply, observed(service.run_jobs(slot, gens), told))
