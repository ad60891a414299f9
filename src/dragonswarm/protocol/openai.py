"""OpenAI-compatible request and response shapes.

Requests are validated strictly (no "5" for 5). Every field either changes the answer
as OpenAI documents, or is known to change nothing (`user`, `metadata`, ...); any other
field is kept in `model_extra` and refused by `unsupported_fields` with a 400 naming it,
as OpenAI itself does: a field silently ignored would be a wrong answer with a 200.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dragonswarm.protocol.events import TokenLogprob

Stop = Annotated[list[str], Field(max_length=4)]
# Accepted and without effect on the output: bookkeeping fields clients send.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Fields shared by both endpoints. `top_k`, `min_p`, `repeat_penalty` and `cache_prompt`
    are llama.cpp's server extensions, sent by clients through `extra_body`; `cache` is this
    project's own: `false` asks the orchestrator for a fresh answer, not one from its response
    cache (a node has no such cache, so it has nothing to skip)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)  # 1.0: off
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=1024)
    n: int = Field(1, ge=1)
    stop: str | Stop | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_prompt: bool = True
    cache: bool = True

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(k.isascii() and k.isdigit() and len(k) < 10 for k in value):
            raise ValueError("logit_bias keys must be token ids (digit strings)")
        return value

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

    def completion_limit(self) -> int | None:
        """The most tokens each choice may generate, as the client asked (None: not said)."""
        return self.max_tokens

    def extra_fields(self) -> list[str]:
        """Fields this server does not know: each would be silently ignored."""
        return [k for k in self.model_extra or {} if k not in NO_EFFECT]


class CompletionRequest(SamplingParams):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle: the text after the completion
    logprobs: int | None = Field(None, ge=0, le=20)  # the sampled token's and this many alternatives
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (Hugging Face's convention: a call's
        arguments as an object, so the template writes them as the model was trained)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)  # the current name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the model's chat template."""
        return [m.template_message() for m in self.messages]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not evaluated again


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.prompt_tokens_details.cached_tokens += other.prompt_tokens_details.cached_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def model_card(name: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "dragonswarm", **extra}


# Response shapes. Kind "text" is /v1/completions, kind "chat" is /v1/chat/completions.


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs` object for these tokens."""
    content = [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e["top"]]}
               for e in entries]  # fmt: skip
    return {"content": content, "refusal": None}


class TextOffsets:
    """Where each token starts in the answer's text, in characters. A token may carry part of
    a character, so the count follows the bytes through a UTF-8 decoder, across chunks."""

    def __init__(self, start: int = 0):
        self.at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, raw: list[int]) -> int:
        at = self.at
        self.at += len(self._decoder.decode(bytes(raw)))
        return at


def text_logprobs(entries: list[TokenLogprob], offsets: TextOffsets) -> dict[str, Any]:
    """Completions' legacy `logprobs` object for these tokens, the next ones of `offsets`."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: lp for t, lp, _ in e["top"]} for e in entries],
            "text_offset": [offsets.next(e["bytes"]) for e in entries]}  # fmt: skip


def tool_call_delta(index: int, call: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, **call}


def stream_chunk(kind: str, rid: str, created: int, model: str, index: int, text: str | None,
                 finish_reason: str | None, first: bool = False, logprobs: dict[str, Any] | None = None,
                 tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk for one choice."""
    if kind == "text":
        choice: dict[str, Any] = {"text": text or "", "index": index, "logprobs": logprobs,
                                  "finish_reason": finish_reason}  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    if tool_calls:
        delta["tool_calls"] = [tool_call_delta(i, c) for i, c in enumerate(tool_calls)]
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    obj = "text_completion" if kind == "text" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage.model_dump()}  # fmt: skip


def text_choice(index: int, text: str, finish: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, content: str | None, finish: str, logprobs: dict[str, Any] | None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def full_response(kind: str, rid: str, created: int, model: str, choices: list[dict[str, Any]],
                  usage: Usage) -> dict[str, Any]:  # fmt: skip
    """A whole, non-streamed response with every choice."""
    obj = "text_completion" if kind == "text" else "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage.model_dump()}  # fmt: skip
