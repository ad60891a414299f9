"""OpenAI-compatible request and response shapes (the subset the node serves).

Requests are validated strictly (no "5" for 5) and unknown fields are ignored, as
OpenAI-compatible servers do, so the official client works unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Stop = Annotated[list[str], Field(max_length=4)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | Stop | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingParams):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as plain dicts for the model's chat template."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def model_card(name: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "dragonswarm", **extra}


# Response shapes. Kind "text" is /v1/completions, kind "chat" is /v1/chat/completions.


def stream_chunk(kind: str, rid: str, created: int, model: str, index: int, text: str | None,
                 finish_reason: str | None, first: bool = False) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk for one choice."""
    if kind == "text":
        choice: dict[str, Any] = {"text": text or "", "index": index, "logprobs": None,
                                  "finish_reason": finish_reason}  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    obj = "text_completion" if kind == "text" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage.model_dump()}  # fmt: skip


def full_response(kind: str, rid: str, created: int, model: str, texts: list[str],
                  finish_reasons: list[str], usage: Usage) -> dict[str, Any]:  # fmt: skip
    """A whole, non-streamed response with every choice."""
    choices: list[dict[str, Any]] = []
    for i, (text, finish) in enumerate(zip(texts, finish_reasons, strict=True)):
        if kind == "text":
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": finish})
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": finish})  # fmt: skip
    obj = "text_completion" if kind == "text" else "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage.model_dump()}  # fmt: skip
