"""What to generate, and the messages between the node and a runner child process.

`Generation` is one choice's work, from the API down to llama.cpp: the node builds it
from an OpenAI request, the orchestrator sends it to a worker inside a `run` message,
and the runner carries it out. Defined once here, so no layer can drop a field.

Runner wire format, one JSON object per line. Node -> runner: `run` (a job: an id and a
`Generation`), `threads` (the thread count in force, taken up between two steps, also
mid-job), `cancel` (stop a job at its next check), `exit`. Runner -> node: `ready` once
loaded, then each job's `protocol.events.Event`s with its id (`progress` while it reads
the prompt, at most about once a second; `text` with the ids of the tokens its text is
made of); `threads` when it has changed its thread count; `fatal` if the model cannot be
loaded at all.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field

# The tool-call markup Qwen's and Hermes' chat templates teach their models.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class Generation(BaseModel):
    """One choice: the prompt (text, chat messages, or a fill-in-the-middle pair) and how to sample."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    suffix: str | None = None  # fill-in-the-middle: `prompt` is the text before, this the text after
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, for the chat template
    tool_choice: Literal["auto", "required"] = "auto"  # required: the output is forced into a call
    tool_name: str | None = None  # ... of this function
    json_schema: dict[str, Any] | None = None  # output must be JSON matching this schema ({}: any object)
    # Failover: the tokens of the answer so far, from a worker on the same model file. The
    # new worker evaluates them after the prompt and continues: the text goes on exactly
    # where it stopped, as if one worker had written it all.
    prefix_ids: list[int] = Field(default_factory=list, max_length=65536)
    max_tokens: int = Field(ge=1)
    fit_context: bool = False  # max_tokens is a default: shorten it to what the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias added to its logit
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=20)  # None: none; k: the sampled token's and k alternatives
    cache_prompt: bool = True  # reuse the KV cache of the longest prefix shared with the last prompt


class RunJob(TypedDict):
    op: Literal["run"]
    id: str
    gen: dict[str, Any]  # a Generation, dumped


class SetThreads(TypedDict):
    """The thread count in force changed: the runner takes it up between two steps, also mid-job."""

    op: Literal["threads"]
    n: int


class RunnerStatus(TypedDict, total=False):
    """What the runner says about itself, besides its jobs' events."""

    ev: Literal["ready", "fatal", "threads"]
    message: str  # on `fatal`: why the model could not be loaded
    n_ctx: int  # on `ready`: the context it runs with, and what it can do
    chat_template: bool
    fim: bool
    tools: bool
    gpu_layers: int  # on `ready`: layers offloaded to the GPU (0: all on the CPU)
    n: int  # on `threads`: the thread count the runner now computes with


def run_job(job_id: str, gen: Generation) -> RunJob:
    return RunJob(op="run", id=job_id, gen=gen.model_dump(exclude_defaults=True))


def encode(message: dict[str, Any] | RunJob | SetThreads) -> bytes:
    return orjson.dumps(message) + b"\n"


def decode(line: bytes) -> Any:
    return orjson.loads(line)
