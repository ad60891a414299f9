"""From an OpenAI request to fragments: one runner job per (prompt, choice).

Pure functions, tested with plain values. The node runs the jobs in order on its own
runner; the orchestrator places each on a worker of its own, in parallel.
"""

from __future__ import annotations

import uuid

from dragonswarm.errors import InvalidRequest
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams
from dragonswarm.protocol.runner import RunJob
from dragonswarm.settings import Limits


def _job(req: SamplingParams, choice: int) -> RunJob:
    # With a seed, choice j samples with seed+j: reproducible, yet the n choices differ.
    seed = None if req.seed is None else (req.seed + choice) % 2**32
    return RunJob(op="run", id=uuid.uuid4().hex, max_tokens=req.max_tokens, temperature=req.temperature,
                  top_p=req.top_p, stop=req.stop_list(), seed=seed, threads=1)  # fmt: skip


def check_limits(req: SamplingParams, prompts: int, chars: int, limits: Limits) -> None:
    if req.n > limits.max_n:
        raise InvalidRequest(f"n={req.n} is more than this server allows ({limits.max_n})", param="n")
    if prompts > limits.max_prompts:
        raise InvalidRequest(f"{prompts} prompts are more than this server allows ({limits.max_prompts})",
                             param="prompt")  # fmt: skip
    if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens={req.max_tokens} is more than this server allows ({limits.max_tokens})",
                             param="max_tokens")  # fmt: skip
    if chars > limits.max_prompt_chars:
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise InvalidRequest(f"the {where} has {chars} characters, more than this server allows "
                             f"({limits.max_prompt_chars})", param=where)  # fmt: skip


def completion_jobs(req: CompletionRequest, limits: Limits) -> list[RunJob]:
    """One job per (prompt, choice); job i is choice i in OpenAI's order (prompt-major)."""
    prompts = req.prompts()
    check_limits(req, len(prompts), sum(len(p) for p in prompts), limits)
    jobs = []
    for prompt in prompts:
        for j in range(req.n):
            job = _job(req, j)
            job["prompt"] = prompt
            jobs.append(job)
    return jobs


def chat_jobs(req: ChatCompletionRequest, limits: Limits) -> list[RunJob]:
    messages = req.template_messages()
    check_limits(req, 1, sum(len(m["content"]) for m in messages), limits)
    jobs = []
    for j in range(req.n):
        job = _job(req, j)
        job["messages"] = messages
        jobs.append(job)
    return jobs


def prompt_text(req: SamplingParams) -> str:
    """The text that says what the request is about, for choosing a model by task."""
    if isinstance(req, CompletionRequest):
        return "\n".join(req.prompts())
    if isinstance(req, ChatCompletionRequest):
        users = [m.text() for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].text()
    return ""


def token_estimate(jobs: list[RunJob], default_max_tokens: int) -> int:
    """An upper bound on a request's tokens before running it: prompt characters (a token
    is at least one character) plus the most each choice may generate."""
    total = 0
    for job in jobs:
        chars = len(job.get("prompt", "")) + sum(len(m["content"]) for m in job.get("messages", []))
        total += chars + (job["max_tokens"] or default_max_tokens)
    return total
