"""From an OpenAI request to fragments: one runner job per (prompt, choice).

Pure functions, tested with plain values. The node runs the jobs in order on its own
runner; the orchestrator places each on a worker of its own, in parallel.
"""

from __future__ import annotations

import uuid

from dragonswarm.errors import InvalidRequest
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams
from dragonswarm.protocol.runner import RunJob


def _job(req: SamplingParams, choice: int) -> RunJob:
    # With a seed, choice j samples with seed+j: reproducible, yet the n choices differ.
    seed = None if req.seed is None else (req.seed + choice) % 2**32
    return RunJob(op="run", id=uuid.uuid4().hex, max_tokens=req.max_tokens, temperature=req.temperature,
                  top_p=req.top_p, stop=req.stop_list(), seed=seed, threads=1)  # fmt: skip


def check_limits(n: int, prompts: int, max_n: int, max_prompts: int) -> None:
    if n > max_n:
        raise InvalidRequest(f"n={n} is more than this server allows ({max_n})", param="n")
    if prompts > max_prompts:
        raise InvalidRequest(f"{prompts} prompts are more than this server allows ({max_prompts})", param="prompt")


def completion_jobs(req: CompletionRequest, max_n: int, max_prompts: int) -> list[RunJob]:
    """One job per (prompt, choice); job i is choice i in OpenAI's order (prompt-major)."""
    prompts = req.prompts()
    check_limits(req.n, len(prompts), max_n, max_prompts)
    jobs = []
    for prompt in prompts:
        for j in range(req.n):
            job = _job(req, j)
            job["prompt"] = prompt
            jobs.append(job)
    return jobs


def chat_jobs(req: ChatCompletionRequest, max_n: int) -> list[RunJob]:
    check_limits(req.n, 1, max_n, 1)
    messages = req.template_messages()
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
