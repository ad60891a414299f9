"""The one event type of a generation's course, from the runner up to the API's answer.

A runner writes events (one JSON object per line, with its job's `id`); the node's service
yields them to its own API and to the swarm link; the link carries each one to the
orchestrator inside a `protocol.swarm.JobEvent` (the same fields, plus the job); the
orchestrator merges them per choice; `web.replies` turns them into OpenAI responses.

A course: `progress`... (a model loading, a prompt being read), `start`, `text`..., then
`done` or `error`.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class TokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]  # the most likely tokens at this step


class Event(TypedDict, total=False):
    ev: Literal["progress", "start", "text", "done", "error"]
    id: str  # the job, where several share one stream (the runner's pipe)
    prompt_done: int  # on `progress`: prompt tokens read so far
    text: str
    ids: list[int]  # on `text`: the tokens whose text `text` is, exactly
    logprobs: list[TokenLogprob]  # on `text`: one per token in it, when asked for
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # on `start` and `done`: prompt tokens taken from the KV cache
    completion_tokens: int  # on `text`: so far; on `done`: in all
    code: str  # on `error`, with `message` and the request field it is about (`param`)
    message: str
    param: str


def error_event(code: str, message: str, param: str | None = None) -> Event:
    """The `error` event that ends a generation's course."""
    event: Event = {"ev": "error", "code": code, "message": message}
    if param:
        event["param"] = param
    return event
