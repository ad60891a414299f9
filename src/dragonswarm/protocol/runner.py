"""Messages between the node and a runner child process: one JSON object per line.

Node -> runner: `run` (a job), `cancel` (stop a job between two tokens), `exit`.
Runner -> node: `ready` once loaded, then per job `start`, `text`..., then `done` or
`error`; `fatal` if the model cannot be loaded at all.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson


class RunJob(TypedDict):
    op: Literal["run"]
    id: str
    prompt: NotRequired[str]
    messages: NotRequired[list[dict[str, str]]]
    prefix: NotRequired[str]  # continue after this text (failover)
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    threads: int


class Event(TypedDict, total=False):
    ev: Literal["ready", "start", "text", "done", "error", "fatal"]
    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    code: str
    message: str
    n_ctx: int
    chat_template: bool


def encode(message: dict[str, Any] | RunJob) -> bytes:
    return orjson.dumps(message) + b"\n"


def decode(line: bytes) -> Any:
    return orjson.loads(line)
