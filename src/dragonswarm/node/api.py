"""The node's OpenAI-compatible HTTP API: thin routes over `NodeService`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dragonswarm.errors import ContextLengthExceeded, DragonError, InvalidRequest, RunnerFailed
from dragonswarm.node.jobs import chat_jobs, completion_jobs
from dragonswarm.node.service import NodeService
from dragonswarm.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParams,
    Usage,
    full_response,
    model_card,
    new_id,
    now,
    stream_chunk,
    usage_chunk,
)
from dragonswarm.protocol.runner import Event, RunJob

router = APIRouter()

EVENT_ERRORS: dict[str, type[DragonError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "invalid_request": InvalidRequest,
    "runner_failed": RunnerFailed,
}


def service_of(request: Request) -> NodeService:
    service: NodeService = request.app.state.service
    return service


def error_from_event(event: Event) -> DragonError:
    cls = EVENT_ERRORS.get(event.get("code", ""), DragonError)
    return cls(event.get("message", "generation failed"))


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    slots = service_of(request).slots.values()
    data = [model_card(s.spec.name, s.created, tags=list(s.spec.tags), loaded=s.loaded) for s in slots]
    return {"object": "list", "data": data}


@router.get("/v1/node")
async def node_status(request: Request) -> dict[str, Any]:
    service = service_of(request)
    return {"governor": service.governor.status(), **service.status()}


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> Response:
    service = service_of(request)
    jobs = completion_jobs(body, service.settings.max_n, service.settings.max_prompts)
    echo = [p for p in body.prompts() for _ in range(body.n)] if body.echo else None
    return await _serve(request, service, "text", body, jobs, echo)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service = service_of(request)
    return await _serve(request, service, "chat", body, chat_jobs(body, service.settings.max_n), None)


async def _serve(request: Request, service: NodeService, kind: str, body: SamplingParams,
                 jobs: list[RunJob], echo: list[str] | None) -> Response:  # fmt: skip
    slot = service.slot(body.model)
    events = service.run_jobs(slot, jobs)
    try:
        # Waiting in the queue counts as work too: a client that leaves meanwhile frees
        # its place. Errors before any output become a 4xx/5xx response.
        first = await _unless_disconnected(request, anext(events))
        if first[1].get("ev") == "error":
            raise error_from_event(first[1])
    except BaseException:
        await events.aclose()
        raise
    rid, created = new_id("cmpl" if kind == "text" else "chatcmpl"), now()
    if body.stream:
        sse = _sse(kind, rid, created, body, first, events, echo, len(jobs))
        return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collect = _collect(kind, rid, created, body.model, first, events, echo, len(jobs))
    return JSONResponse(await _unless_disconnected(request, collect))


async def _collect(kind: str, rid: str, created: int, model: str, first: tuple[int, Event],
                   events: AsyncGenerator[tuple[int, Event]], echo: list[str] | None, n: int
                   ) -> dict[str, Any]:  # fmt: skip
    texts = [[e] if echo else [] for e in (echo or [""] * n)]
    finish = ["length"] * n
    usage = Usage()
    async with contextlib.aclosing(_chain(first, events)) as stream:
        async for index, event in stream:
            match event.get("ev"):
                case "text":
                    texts[index].append(event["text"])
                case "done":
                    finish[index] = event["finish_reason"]
                    usage.add(_usage(event))
                case "error":
                    raise error_from_event(event)
    return full_response(kind, rid, created, model, ["".join(t) for t in texts], finish, usage)


async def _sse(kind: str, rid: str, created: int, body: SamplingParams, first: tuple[int, Event],
               events: AsyncGenerator[tuple[int, Event]], echo: list[str] | None, n: int
               ) -> AsyncIterator[bytes]:  # fmt: skip
    usage = Usage()
    model = body.model
    started: set[int] = set()
    async with contextlib.aclosing(_chain(first, events)) as stream:
        try:
            async for index, event in stream:
                match event.get("ev"):
                    case "start":
                        started.add(index)
                        if kind == "chat" or echo:
                            text = echo[index] if echo else ""
                            yield _data(stream_chunk(kind, rid, created, model, index, text, None, first=True))
                    case "text":
                        yield _data(stream_chunk(kind, rid, created, model, index, event["text"], None))
                    case "done":
                        usage.add(_usage(event))
                        yield _data(stream_chunk(kind, rid, created, model, index, None, event["finish_reason"]))
                    case "error":
                        raise error_from_event(event)
        except DragonError as exc:  # the stream has started: the error is its last event
            yield _data(exc.to_dict())
            yield b"data: [DONE]\n\n"
            return
    if body.include_usage:
        yield _data(usage_chunk(kind, rid, created, model, usage))
    yield b"data: [DONE]\n\n"


async def _chain(first: tuple[int, Event], rest: AsyncGenerator[tuple[int, Event]]
                 ) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def _usage(event: Event) -> Usage:
    p, c = event.get("prompt_tokens", 0), event.get("completion_tokens", 0)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, but cancel it (freeing the runner) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DragonError):
            await task
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
