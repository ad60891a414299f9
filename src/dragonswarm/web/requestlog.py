"""One log line per API request, and its id: on the orchestrator and on the node.

Every request to `/v1/...` gets an id, returned as `X-Request-Id`. The handlers fill in
what they learn on the way (`facts(request)`: the key's name, the model, the nodes, the
tokens, when the first token went out), and when the response has been sent, to its last
byte for a stream, one line is logged:

    request 5f0c... key=alice model=qwen2.5-coder-0.5b fragments=1 nodes=w1 tokens=39+80
        ttft=0.412s duration=2.871s status=200

Never a prompt, an answer or a key: only names and numbers. The same figures feed the
metrics (`on_end`), so the log and `/metrics` cannot disagree.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dragonswarm.protocol.events import Event

FACTS = "dragon_facts"  # where a request's facts live in its ASGI scope's state


@dataclass
class RequestFacts:
    """What one request was and did, as far as its handler got."""

    id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    key: str | None = None  # the key's (or node's) name, never the key
    model: str | None = None
    fragments: int = 0
    nodes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None  # monotonic: when the first generated token went out
    last_token: float | None = None
    cache: str | None = None  # the orchestrator's response cache: "hit" or "miss" when it was looked in
    error: str | None = None  # an error code, also when it came inside a stream already begun
    status: int = 0  # the HTTP status sent
    ended: float = 0.0

    @property
    def inference(self) -> bool:
        return self.model is not None

    def token(self, count: int, now: float) -> None:
        """`count` generated tokens went out at `now`."""
        if count <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.completion_tokens += count

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    def tpot(self) -> float | None:
        """Seconds per output token after the first (vLLM's time per output token)."""
        if self.first_token is None or self.last_token is None or self.completion_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.completion_tokens - 1)

    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def outcome(self) -> str:
        """The HTTP status, or the error code when an error ended a stream already under way."""
        return self.error if self.error and self.status < 400 else str(self.status)

    def line(self) -> str:
        parts = [f"request {self.id} {self.method} {self.path}"]
        if self.key:
            parts.append(f"key={self.key}")
        if self.model:
            parts.append(f"model={self.model}")
        if self.fragments:
            parts.append(f"fragments={self.fragments} nodes={','.join(self.nodes) or '-'}")
        if self.inference:
            parts.append(f"tokens={self.prompt_tokens}+{self.completion_tokens}")
            ttft = self.ttft()
            parts.append(f"ttft={ttft:.3f}s" if ttft is not None else "ttft=-")
        if self.cache:
            parts.append(f"cache={self.cache}")
        parts.append(f"duration={self.duration():.3f}s status={self.status}")
        if self.error:
            parts.append(f"error={self.error}")
        return " ".join(parts)


def facts(request: Request) -> RequestFacts:
    """This request's facts, for its handler to fill in (a detached record outside the middleware)."""
    found = request.scope.get("state", {}).get(FACTS)
    if isinstance(found, RequestFacts):
        return found
    return RequestFacts(id=new_request_id(), method=request.method, path=request.url.path)


async def observed(events: AsyncGenerator[tuple[int, Event]], told: RequestFacts
                   ) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
    """Pass a request's events through, noting its tokens, first token and error in `told`."""
    try:
        async for index, event in events:
            match event["ev"]:
                case "start":
                    told.prompt_tokens += event.get("prompt_tokens", 0)
                case "text":
                    told.token(len(event.get("ids", ())), time.monotonic())
                case "error":
                    told.error = event.get("code") or "error"
            yield index, event
    finally:
        await events.aclose()


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestLog:
    """ASGI middleware: the id, the `X-Request-Id` header, and the line once the response is out."""

    def __init__(self, app: ASGIApp, logger: logging.Logger, on_end: Callable[[RequestFacts], None] | None = None):
        self.app = app
        self.log = logger
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)  # pages, health and metrics: no line each
            return
        record = RequestFacts(id=new_request_id(), method=scope["method"], path=scope["path"])
        scope.setdefault("state", {})[FACTS] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.ended = time.monotonic()
            if not record.status:  # the client left before any answer
                record.status, record.error = 499, record.error or "client_gone"
            self.log.info("%s", record.line())
            if self.on_end is not None:
                try:
                    self.on_end(record)
                except Exception:  # metrics must never break a request
                    self.log.exception("recording the request's metrics failed")
