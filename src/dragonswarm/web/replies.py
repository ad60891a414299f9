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
    UnsupportedParameter,
)
from dragonswarm.protocol.events import Event, TokenLogprob
from dragonswarm.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    PromptTokensDetails,
    SamplingParams,
    TextOffsets,
    Usage,
    chat_choice,
    chat_logprobs,
    full_response,
    new_id,
    now,
    stream_chunk,
    text_choice,
    text_logprobs,
    usage_chunk,
)
from dragonswarm.web.errors import ClientGone
from dragonswarm.web.tool_calls import ToolCallStream, parse_tool_calls

Events = AsyncGenerator[tuple[int, Event]]

EVENT_ERRORS: dict[str, type[DragonError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "invalid_request": InvalidRequest,
    "unsupported_parameter": UnsupportedParameter,
    "model_not_found": ModelNotFound,
    "runner_failed": RunnerFailed,
    "runner_stalled": RunnerFailed,  # a 503 like a crash: the runner was hung and is being restarted
    "timeout": Timeout,
    "no_workers": NoWorkers,
}


def error_from_event(event: Event) -> DragonError:
    code = event.get("code", "")
    cls = EVENT_ERRORS.get(code, DragonError)
    return cls(event.get("message", "generation failed"), param=event.get("param"), code=code or None)


@dataclass
class Reply:
    """What a response needs besides its events."""

    kind: str  # "text" (/v1/completions) or "chat"
    model: str
    n: int  # choices in all
    stream: bool
    include_usage: bool = False
    echo: list[str] | None = None  # per choice, for `echo` on completions
    logprobs: bool = False  # the events carry logprobs: put them in the answer
    tools: frozenset[str] = frozenset()  # the tools offered: parse calls to them out of the text
    parallel_tool_calls: bool = True  # False: only the first call counts
    # Read once the first event is in: the route (`X-Dragon-Nodes`, `dragon` object) is known by then.
    headers: Callable[[], dict[str, str]] | None = None
    route: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def for_request(cls, body: SamplingParams, model: str, n: int) -> Reply:
        """What the request asked of the answer's shape; `n` is the number of choices in all."""
        if isinstance(body, CompletionRequest):
            echo = [p for p in body.prompts() for _ in range(body.n)] if body.echo else None
            return cls("text", model, n, body.stream, body.include_usage, echo, logprobs=body.logprobs is not None)
        if isinstance(body, ChatCompletionRequest):
            offered = body.tools if body.tool_choice != "none" else None
            tools = frozenset(t.function.name for t in offered or [])
            return cls("chat", model, n, body.stream, body.include_usage, logprobs=body.logprobs, tools=tools,
                       parallel_tool_calls=body.parallel_tool_calls)  # fmt: skip
        return cls("chat", model, n, body.stream, body.include_usage)


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
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(reply.n)]
    finish = ["length"] * reply.n
    usage = Usage()
    async with contextlib.aclosing(events) as stream:
        async for index, event in stream:
            match event.get("ev"):
                case "text":
                    texts[index].append(event.get("text", ""))
                    logprobs[index].extend(event.get("logprobs", ()))
                case "done":
                    finish[index] = event["finish_reason"]
                    usage.add(_usage(event))
                case "error":
                    raise error_from_event(event)
    choices = []
    for i in range(reply.n):
        text = "".join(texts[i])
        if reply.kind == "text":
            lp = text_logprobs(logprobs[i], TextOffsets(len(echo[i]) if echo else 0)) if reply.logprobs else None
            choices.append(text_choice(i, text, finish[i], lp))
            continue
        content, calls = parse_tool_calls(text, reply.tools) if reply.tools else (text, [])
        calls = calls if reply.parallel_tool_calls else calls[:1]
        lp = chat_logprobs(logprobs[i]) if reply.logprobs else None
        choices.append(chat_choice(i, content, _tool_finish(finish[i], calls), lp, calls))
    body = full_response(reply.kind, rid, created, reply.model, choices, usage)
    if reply.route:
        body["dragon"] = reply.route()
    return body


def _tool_finish(finish: str, calls: list[dict[str, Any]]) -> str:
    return "tool_calls" if calls and finish == "stop" else finish


async def _sse(reply: Reply, rid: str, created: int, events: Events) -> AsyncIterator[bytes]:
    kind, model = reply.kind, reply.model
    usage = Usage()
    done = 0
    offsets = [TextOffsets(len(e)) for e in reply.echo] if reply.echo else [TextOffsets() for _ in range(reply.n)]
    calls = [ToolCallStream(reply.tools) for _ in range(reply.n)] if reply.tools else None

    def chunk(index: int, text: str | None, finish: str | None = None, first: bool = False,
              entries: list[TokenLogprob] | None = None, tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        logprobs = None
        if reply.logprobs and entries is not None:
            logprobs = chat_logprobs(entries) if kind == "chat" else text_logprobs(entries, offsets[index])
        return _data(stream_chunk(kind, rid, created, model, index, text, finish, first, logprobs, tool_calls))

    async with contextlib.aclosing(events) as stream:
        try:
            async for index, event in stream:
                match event.get("ev"):
                    case "start":
                        if kind == "chat" or reply.echo:
                            yield chunk(index, reply.echo[index] if reply.echo else "", first=True)
                    case "text":
                        text = calls[index].feed(event.get("text", "")) if calls else event.get("text", "")
                        entries = event.get("logprobs")
                        if text or entries:
                            yield chunk(index, text, entries=entries or [])
                    case "done":
                        usage.add(_usage(event))
                        done += 1
                        finish = event["finish_reason"]
                        if calls:
                            rest, found = calls[index].finish()
                            found = found if reply.parallel_tool_calls else found[:1]
                            if rest or found:
                                yield chunk(index, rest or None, tool_calls=found)
                            finish = _tool_finish(finish, found)
                        last = stream_chunk(kind, rid, created, model, index, None, finish)
                        if done == reply.n and reply.route and not reply.include_usage:
                            last["dragon"] = reply.route()  # the final chunk names the route
                        yield _data(last)
                    case "error":
                        raise error_from_event(event)
        except DragonError as exc:  # the stream has started: the error is its last event
            yield _data(exc.to_dict())
            yield b"data: [DONE]\n\n"
            return
    if reply.include_usage:
        final = usage_chunk(kind, rid, created, model, usage)
        if reply.route:
            final["dragon"] = reply.route()
        yield _data(final)
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
    cached = PromptTokensDetails(cached_tokens=event.get("cached_tokens", 0))
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=cached)


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
