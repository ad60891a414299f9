"""From a stream of (choice index, runner event) to an OpenAI response: one JSON body,
or SSE chunks. The node and the orchestrator both answer through `respond()`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dragonswarm.errors import (
    ContextLengthExceeded,
    DragonError,
    InvalidRequest,
    ModelNotFound,
    NoWorkers,
    RunnerFailed,
    Timeout,
)
from dragonswarm.protocol.openai import Usage, full_response, new_id, now, stream_chunk, usage_chunk
from dragonswarm.protocol.runner import Event
from dragonswarm.web.errors import ClientGone

Events = AsyncGenerator[tuple[int, Event]]

EVENT_ERRORS: dict[str, type[DragonError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "invalid_request": InvalidRequest,
    "model_not_found": ModelNotFound,
    "runner_failed": RunnerFailed,
    "timeout": Timeout,
    "no_workers": NoWorkers,
}


def error_from_event(event: Event) -> DragonError:
    cls = EVENT_ERRORS.get(event.get("code", ""), DragonError)
    return cls(event.get("message", "generation failed"))


@dataclass
class Reply:
    """What a response needs besides its events."""

    kind: str  # "text" (/v1/completions) or "chat"
    model: str
    n: int  # choices in all
    stream: bool
    include_usage: bool = False
    echo: list[str] | None = None  # per choice, for `echo` on completions
    # Read once the first event is in: the route (`X-Dragon-Nodes`, `dragon` object) is known by then.
    headers: Callable[[], dict[str, str]] | None = None
    route: Callable[[], dict[str, Any]] | None = None


async def respond(request: Request, reply: Reply, events: Events) -> Response:
    """Answer with `events`; errors before any output become a 4xx/5xx response."""
    try:
        # Waiting in a queue counts as work too: a client that leaves meanwhile frees its place.
        first = await unless_disconnected(request, anext(events))
        if first[1].get("ev") == "error":
            raise error_from_event(first[1])
    except BaseException:
        await events.aclose()
        raise
    rid, created = new_id("cmpl" if reply.kind == "text" else "chatcmpl"), now()
    headers = reply.headers() if reply.headers else {}
    chained = _chain(first, events)
    if reply.stream:
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(_sse(reply, rid, created, chained), media_type="text/event-stream", headers=headers)
    body = await unless_disconnected(request, _collect(reply, rid, created, chained))
    return JSONResponse(body, headers=headers)


async def _collect(reply: Reply, rid: str, created: int, events: Events) -> dict[str, Any]:
    echo = reply.echo
    texts = [[e] for e in echo] if echo else [[] for _ in range(reply.n)]
    finish = ["length"] * reply.n
    usage = Usage()
    async with contextlib.aclosing(events) as stream:
        async for index, event in stream:
            match event.get("ev"):
                case "text":
                    texts[index].append(event["text"])
                case "done":
                    finish[index] = event["finish_reason"]
                    usage.add(_usage(event))
                case "error":
                    raise error_from_event(event)
    body = full_response(reply.kind, rid, created, reply.model, ["".join(t) for t in texts], finish, usage)
    if reply.route:
        body["dragon"] = reply.route()
    return body


async def _sse(reply: Reply, rid: str, created: int, events: Events) -> AsyncIterator[bytes]:
    kind, model = reply.kind, reply.model
    usage = Usage()
    done = 0
    async with contextlib.aclosing(events) as stream:
        try:
            async for index, event in stream:
                match event.get("ev"):
                    case "start":
                        if kind == "chat" or reply.echo:
                            text = reply.echo[index] if reply.echo else ""
                            yield _data(stream_chunk(kind, rid, created, model, index, text, None, first=True))
                    case "text":
                        yield _data(stream_chunk(kind, rid, created, model, index, event["text"], None))
                    case "done":
                        usage.add(_usage(event))
                        done += 1
                        chunk = stream_chunk(kind, rid, created, model, index, None, event["finish_reason"])
                        if done == reply.n and reply.route and not reply.include_usage:
                            chunk["dragon"] = reply.route()  # the final chunk names the route
                        yield _data(chunk)
                    case "error":
                        raise error_from_event(event)
        except DragonError as exc:  # the stream has started: the error is its last event
            yield _data(exc.to_dict())
            yield b"data: [DONE]\n\n"
            return
    if reply.include_usage:
        chunk = usage_chunk(kind, rid, created, model, usage)
        if reply.route:
            chunk["dragon"] = reply.route()
        yield _data(chunk)
    yield b"data: [DONE]\n\n"


async def _chain(first: tuple[int, Event], rest: Events) -> Events:
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


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, but cancel it (freeing whatever it holds) if the client goes away."""
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
