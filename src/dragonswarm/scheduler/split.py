"""From an OpenAI request to fragments: one `Generation` per (prompt, choice).

Pure functions, tested with plain values. The node runs them in order on its own
runner; the orchestrator places each on a worker of its own, in parallel. Every field
of the request ends up in the generation, or the request is refused here with a 400
naming the field: nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any

from dragonswarm.errors import InvalidRequest, UnsupportedParameter
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingParams
from dragonswarm.protocol.runner import Generation
from dragonswarm.settings import Limits


def _generation(req: SamplingParams, choice: int, limits: Limits, **fields: Any) -> Generation:
    # With a seed, choice j samples with seed+j: reproducible, yet the n choices differ.
    seed = None if req.seed is None else (req.seed + choice) % 2**32
    asked = req.completion_limit()
    return Generation(
        max_tokens=asked or limits.default_max_tokens, fit_context=asked is None,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty, logit_bias=req.logit_bias, seed=seed, stop=req.stop_list(),
        cache_prompt=req.cache_prompt, **fields,
    )  # fmt: skip


def check_fields(req: SamplingParams) -> None:
    """Refuse what this server does not do, naming the field (OpenAI's own answer to it)."""
    for name in req.extra_fields():
        raise UnsupportedParameter(f"the parameter {name!r} is not supported by this server", param=name)
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, req.n):
            raise UnsupportedParameter("best_of other than n is not supported: ask for n choices and pick one",
                                       param="best_of")  # fmt: skip
        if req.echo and req.logprobs is not None:
            raise UnsupportedParameter("echo with logprobs (the prompt's own logprobs) is not supported",
                                       param="echo")  # fmt: skip
        if req.echo and req.suffix is not None:
            raise InvalidRequest("echo and suffix cannot be used together", param="echo")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if (req.max_tokens is not None and req.max_completion_tokens is not None
                and req.max_tokens != req.max_completion_tokens):  # fmt: skip
            raise InvalidRequest("max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                                 param="max_completion_tokens")  # fmt: skip
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise InvalidRequest("response_format of type json_schema needs a json_schema", param="response_format")
        choice = req.tool_choice
        if choice is not None and choice != "none" and not req.tools:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        if not isinstance(choice, str) and choice is not None:
            names = {t.function.name for t in req.tools or []}
            if choice.function.name not in names:
                raise InvalidRequest(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                     param="tool_choice")  # fmt: skip
        if req.tools and choice != "none" and fmt is not None and fmt.type != "text":
            raise UnsupportedParameter("tools and a JSON response_format together are not supported",
                                       param="response_format")  # fmt: skip


def check_limits(req: SamplingParams, prompts: int, chars: int, limits: Limits) -> None:
    if req.n > limits.max_n:
        raise InvalidRequest(f"n={req.n} is more than this server allows ({limits.max_n})", param="n")
    if prompts > limits.max_prompts:
        raise InvalidRequest(f"{prompts} prompts are more than this server allows ({limits.max_prompts})",
                             param="prompt")  # fmt: skip
    asked = req.completion_limit()
    if asked is not None and asked > limits.max_tokens:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise InvalidRequest(f"{param}={asked} is more than this server allows ({limits.max_tokens})",
                             param=param)  # fmt: skip
    if chars > limits.max_prompt_chars:
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise InvalidRequest(f"the {where} has {chars} characters, more than this server allows "
                             f"({limits.max_prompt_chars})", param=where)  # fmt: skip


def completion_generations(req: CompletionRequest, limits: Limits) -> list[Generation]:
    """One generation per (prompt, choice); generation i is choice i in OpenAI's order (prompt-major)."""
    check_fields(req)
    prompts = req.prompts()
    check_limits(req, len(prompts), sum(len(p) for p in prompts) + len(req.suffix or ""), limits)
    return [_generation(req, j, limits, prompt=prompt, suffix=req.suffix, logprobs=req.logprobs)
            for prompt in prompts for j in range(req.n)]  # fmt: skip


def chat_generations(req: ChatCompletionRequest, limits: Limits) -> list[Generation]:
    check_fields(req)
    messages = req.template_messages()
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
    chars = sum(len(m["content"]) for m in messages) + sum(len(str(t)) for t in tools)
    check_limits(req, 1, chars, limits)
    fields: dict[str, Any] = {"messages": messages, "logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    if tools:
        fields["tools"] = tools
        choice = req.tool_choice
        if choice == "required" or (choice is not None and not isinstance(choice, str)):
            fields["tool_choice"] = "required"
            fields["tool_name"] = None if isinstance(choice, str) else choice.function.name
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        fields["json_schema"] = {"type": "object"}
    elif fmt is not None and fmt.json_schema is not None:
        fields["json_schema"] = fmt.json_schema.schema_
    return [_generation(req, j, limits, **fields) for j in range(req.n)]


def prompt_text(req: SamplingParams) -> str:
    """The text that says what the request is about, for choosing a model by task."""
    if isinstance(req, CompletionRequest):
        return "\n".join(req.prompts())
    if isinstance(req, ChatCompletionRequest):
        users = [m.text() for m in req.messages if m.role == "user"]
        return users[-1] if users else req.messages[-1].text()
    return ""


def token_estimate(gens: list[Generation]) -> int:
    """An upper bound on a request's tokens before running it: prompt characters (a token
    is at least one character) plus the most each choice may generate."""
    total = 0
    for gen in gens:
        chars = len(gen.prompt or "") + len(gen.suffix or "") + sum(len(m["content"]) for m in gen.messages or [])
        total += chars + gen.max_tokens
    return total
