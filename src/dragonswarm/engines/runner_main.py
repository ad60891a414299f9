"""Entry point of a runner child process: one loaded GGUF model serving several sequences at once.

This is the only module that imports `llama_cpp`. It speaks `protocol.runner` over a
private copy of stdout (fd 1 itself is pointed at stderr, so anything llama.cpp prints
cannot corrupt the protocol) and reads jobs from stdin. A reader thread receives `run`,
`cancel` and `threads` while jobs run.

One llama.cpp context holds `parallel` sequences (slots). Jobs join and leave between two
decode steps (continuous batching): each step evaluates one token for every stream that is
generating and, in what is left of the batch, a chunk of the prompts being read
(`engines/batching.py` decides). Each job has its own llama.cpp sampler chain (logit bias,
penalties, grammar, top-k/top-p/min-p, temperature, seed), stop strings and cancel flag;
each sequence keeps the KV cache of what it evaluated, so the next prompt that starts the
same way only evaluates what is new.
"""

from __future__ import annotations

import ctypes
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import orjson
from pydantic import ValidationError

from dragonswarm.engines.batching import Want, pick_sequence, plan_step, shared_prefix
from dragonswarm.engines.chat_templates import chat_template
from dragonswarm.engines.grammars import json_grammar, tool_call_grammar
from dragonswarm.engines.textstream import TextStream
from dragonswarm.governor.policy import gpu_layers
from dragonswarm.protocol.events import TokenLogprob
from dragonswarm.protocol.runner import TOOL_CALL_OPEN, Generation, RunJob, decode, encode

PROGRESS_EVERY_S = 1.0  # while reading a prompt: often enough for any stall timeout, rare enough to cost nothing
PENALTY_LAST_N = 64  # tokens the repeat/presence/frequency penalties look back over, as llama.cpp's default


class JobError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


N_BATCH = 512  # tokens one decode step may hold, as llama-cpp-python's default


@dataclass(eq=False)
class Seq:
    """One sequence of the context (a slot): what its KV cells hold, and the job using it."""

    id: int
    tokens: list[int] = field(default_factory=list)  # evaluated, in order: its prompt cache
    used_at: float = 0.0
    job: Job | None = None


@dataclass(eq=False)
class Job:
    """One generation in flight on a sequence."""

    id: str
    gen: Generation
    seq: Seq
    chain: Any
    grammar: Any
    todo: list[int]  # tokens to evaluate before the next token is sampled
    batchable: int  # of `todo`, the leading ones that may be read in one batch (the rest: one at a time)
    max_tokens: int
    n_prompt: int
    cached: int
    stream: TextStream
    held: list[int] = field(default_factory=list)  # tokens whose text is still held back
    pending: list[TokenLogprob] = field(default_factory=list)  # ... their logprobs
    count: int = 0  # tokens generated
    read: int = 0  # prompt tokens evaluated so far
    reading: bool = True  # still reading its prompt
    progress_at: float = 0.0  # when its last progress event went out
    logits_at: int = -1  # its row in the last step's logits, when it asked for one


class Runner:
    def __init__(self, out: BinaryIO, model_path: str, n_ctx: int, threads: int, gpu_budget: int | None = None,
                 parallel: int = 1):  # fmt: skip
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log lines only when they are errors

        self._lib = llama_cpp
        self.out = out
        # Layers on the GPU: none without offload support; within the node's budget where it has
        # one (NVIDIA, read through NVML); else all that llama.cpp can, as it does on its own (-1).
        self.gpu_layers = 0
        if llama_cpp.llama_supports_gpu_offload():
            self.gpu_layers = (
                -1 if gpu_budget is None else _layers_within(llama_cpp, model_path, gpu_budget, n_ctx * parallel)
            )
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if self.gpu_layers == -1 else self.gpu_layers
        self.model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
        # One context, `parallel` sequences of `n_ctx` tokens each in one unified KV cache, with
        # flash attention where llama.cpp has it (as llama-server): on 2 cores, decoding 4 and 8
        # sequences together went up to a third faster than with a cache per sequence and plain
        # attention, one sequence alone no slower within the noise.
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        self.context = LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.n_ctx = n_ctx  # per sequence
        self.seqs = [Seq(i) for i in range(parallel)]
        self.jobs: list[Job] = []  # in flight, in order of arrival
        self.threads = threads
        self.wanted_threads = threads  # set by the command reader when the share in force changes
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)
        # llama_token_data, laid out as llama.h has it: reused for every grammar-held token.
        self._cand = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.cancelled: set[str] = set()
        self._progress_lock = threading.Lock()
        self._in_step: list[Job] = []  # the jobs in flight while a prompt step is decoded
        self._read_since = 0  # prompt tokens read since the streams last had a step
        self.metadata = self.model.metadata()
        self.template = chat_template(self.metadata)
        self.formatter = self._chat_formatter()
        fim = (llama_cpp.llama_vocab_fim_pre(self.vocab), llama_cpp.llama_vocab_fim_suf(self.vocab),
               llama_cpp.llama_vocab_fim_mid(self.vocab))  # fmt: skip
        self.fim = fim if min(fim) >= 0 else None
        # Tools are only offered where the model's own template teaches it a call format we parse.
        self.tools = bool(self.template and "tools" in self.template and TOOL_CALL_OPEN in self.template)
        # While prompts are read, llama.cpp asks this between two operations of its graph.
        self._abort = llama_cpp.ggml_abort_callback(self._abort_check)

    def _chat_formatter(self) -> Any:
        if not self.template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token_id: int) -> str:
            return self.model.token_get_text(token_id) if token_id != -1 else ""

        return Jinja2ChatFormatter(
            template=self.template,
            eos_token=text(self.model.token_eos()),
            bos_token=text(self.model.token_bos()),
        )

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(encode(message))

    def piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[: max(n, 0)]

    def tokenize(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        return self.model.tokenize(text.encode(), add_bos=bos, special=special) if text else []

    def prompt_tokens(self, gen: Generation) -> tuple[list[int], list[str]]:
        """The prompt as tokens, and stop strings implied by the template."""
        if any(not 0 <= t < self.n_vocab for t in gen.prefix_ids):
            raise JobError("invalid_request", f"prefix_ids names a token beyond this model's vocabulary "
                           f"({self.n_vocab} tokens)")  # fmt: skip
        text, bos, stops = self._prompt_text(gen)
        if text is None:  # fill-in-the-middle: built from the model's FIM tokens
            return self._fim_tokens(gen), stops
        return self.tokenize(text, bos=bos) or [self.model.token_bos()], stops

    def _prompt_text(self, gen: Generation) -> tuple[str | None, bool, list[str]]:
        """The prompt's text (None for fill-in-the-middle), whether a BOS goes first, and stops."""
        if gen.messages is not None:
            if self.formatter is None:
                raise JobError("invalid_request", "this model has no chat template; use /v1/completions", "messages")
            if gen.tools and not self.tools:
                raise JobError("unsupported_parameter", "this model's chat template has no tool calling", "tools")
            try:
                result = self.formatter(messages=gen.messages, tools=gen.tools or None)
            except Exception as exc:  # the template's own checks (raise_exception) and Jinja errors
                raise JobError("invalid_request", f"the model's chat template refused the messages: {exc}",
                               "messages") from None  # fmt: skip
            stops = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
            return result.prompt, not result.added_special, stops
        if gen.suffix is not None:
            return None, False, []
        return gen.prompt or "", self.add_bos, []

    def _fim_tokens(self, gen: Generation) -> list[int]:
        if self.fim is None:
            raise JobError("unsupported_parameter", "this model has no fill-in-the-middle tokens; "
                           "suffix needs a model trained for it", "suffix")  # fmt: skip
        pre, suf, mid = self.fim
        bos = [self.model.token_bos()] if self.add_bos else []
        return [*bos, pre, *self.tokenize(gen.prompt or ""), suf, *self.tokenize(gen.suffix or ""), mid]

    def sampler(self, gen: Generation) -> tuple[Any, Any]:
        """A llama.cpp sampler chain for this job, and its grammar if any (the caller frees both).

        The grammar stays out of the chain: applied to every candidate it costs about as much
        as the model itself on a 150k-token vocabulary. `sample` consults it only when the
        chain's pick breaks it, as llama.cpp's server does."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            if gen.logit_bias:
                biases = [(int(t), b) for t, b in gen.logit_bias.items()]
                if any(t >= self.n_vocab for t, _ in biases):
                    raise JobError("invalid_request", f"logit_bias names a token id beyond this model's "
                                   f"vocabulary ({self.n_vocab} tokens)", "logit_bias")  # fmt: skip
                array = (lib.llama_logit_bias * len(biases))(*[lib.llama_logit_bias(t, b) for t, b in biases])
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(biases), array))
            if gen.repeat_penalty != 1.0 or gen.frequency_penalty or gen.presence_penalty:
                penalties = lib.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, gen.repeat_penalty,
                                                             gen.frequency_penalty, gen.presence_penalty)  # fmt: skip
                lib.llama_sampler_chain_add(chain, penalties)
            grammar, param = self.grammar(gen)
            rule = None
            if grammar is not None and gen.tools and gen.tool_choice == "auto":
                # Free to answer in words or to call: the grammar holds a call to its schema
                # once the model opens one (llama.cpp's lazy grammar), and nothing before.
                trigger = (ctypes.c_char_p * 1)(TOOL_CALL_OPEN.encode())
                rule = lib.llama_sampler_init_grammar_lazy_patterns(self.vocab, grammar.encode(), b"root", trigger, 1,
                                                                    None, 0)  # fmt: skip
            elif grammar is not None:
                rule = lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if grammar is not None and not rule:
                raise JobError("invalid_request", "the schema could not be turned into a grammar", param)
            if gen.temperature == 0.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
                return chain, rule
            if gen.top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(gen.top_k))
            if gen.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(gen.top_p, 1))
            if gen.min_p > 0.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(gen.min_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(gen.temperature))
            seed = gen.seed if gen.seed is not None else random.getrandbits(32)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed % 2**32))
            return chain, rule
        except BaseException:
            lib.llama_sampler_free(chain)
            raise

    def sample(self, chain: Any, grammar: Any, row: int) -> int:
        """The next token from the chain for the logits of batch row `row`, held to the
        grammar; accepted into both."""
        lib = self._lib
        if grammar is None:
            return int(lib.llama_sampler_sample(chain, self.ctx, row))  # also accepts it
        candidates = self._candidates(row)
        lib.llama_sampler_apply(chain, ctypes.byref(candidates))
        token = int(self._cand["id"][candidates.selected])
        if not self._allows(grammar, token):  # rarely: sample again from what the grammar allows
            candidates = self._candidates(row)
            lib.llama_sampler_apply(grammar, ctypes.byref(candidates))
            lib.llama_sampler_apply(chain, ctypes.byref(candidates))
            token = int(self._cand["id"][candidates.selected])
        lib.llama_sampler_accept(grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _logits(self, row: int) -> Any:
        """The model's logits after batch row `row` (a view, valid until the next decode)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))

    def _candidates(self, row: int) -> Any:
        """Every token with its logit after batch row `row`, as llama.cpp's samplers take them."""
        lib = self._lib
        logits = self._logits(row)
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        data = cand.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        return lib.llama_token_data_array(data, self.n_vocab, -1, False)

    def _allows(self, grammar: Any, token: int) -> bool:
        """The grammar stage would let `token` through now."""
        lib = self._lib
        data = (lib.llama_token_data * 1)(lib.llama_token_data(token, 0.0, 0.0))
        candidates = lib.llama_token_data_array(data, 1, -1, False)
        lib.llama_sampler_apply(grammar, ctypes.byref(candidates))
        return bool(data[0].logit != float("-inf"))

    def grammar(self, gen: Generation) -> tuple[str | None, str | None]:
        """The GBNF the output must follow, if any, and the request field it comes from."""
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            if gen.tools:
                many = gen.tool_choice == "auto"
                return tool_call_grammar(gen.tools, gen.tool_name, json_schema_to_gbnf, many), "tools"
            if gen.json_schema is not None:
                return json_grammar(gen.json_schema, json_schema_to_gbnf), "response_format"
        except Exception as exc:  # llama.cpp's converter raises plain Exceptions for schemas it cannot follow
            param = "tool_choice" if gen.tools else "response_format"
            raise JobError("invalid_request", f"unusable JSON schema: {exc}", param) from None
        return None, None

    # Jobs in and out. Everything below runs on the main thread, between two decode steps.

    def free_seqs(self) -> list[Seq]:
        return [seq for seq in self.seqs if seq.job is None]

    def admit(self, job_id: str, gen: Generation) -> None:
        """Take a job onto a free sequence: check it, build its sampler chain, keep what that
        sequence's cache shares with the prompt, and say `start`. Raises JobError."""
        lib = self._lib
        tokens, template_stops = self.prompt_tokens(gen)
        prefix = gen.prefix_ids  # a failover's answer so far: evaluated, then continued
        tokens += prefix
        n_ctx, n_prompt = self.n_ctx, len(tokens)
        if n_prompt >= n_ctx:
            raise JobError("context_length_exceeded",
                           f"the prompt has {n_prompt} tokens but the model's context is {n_ctx} tokens")  # fmt: skip
        max_tokens = gen.max_tokens
        if gen.fit_context:
            max_tokens = min(max_tokens, n_ctx - n_prompt)
        elif n_prompt + max_tokens > n_ctx:
            raise JobError(
                "context_length_exceeded",
                f"the model's context is {n_ctx} tokens, but {n_prompt + max_tokens} were requested "
                f"({n_prompt} in the prompt, {max_tokens} for the completion)",
            )
        chain, grammar = self.sampler(gen)
        try:
            for token in prefix:  # the grammar and the penalties have seen the prefix too
                if grammar is not None and not self._allows(grammar, token):
                    # llama.cpp aborts the process on a token its grammar rejects: never accept one.
                    # Another worker would fail the same way: this is the request's end, not the worker's.
                    raise JobError("unsupported_parameter", "the answer so far cannot be continued under its "
                                   "grammar on another worker", "response_format")  # fmt: skip
                lib.llama_sampler_accept(chain, token)
                if grammar is not None:
                    lib.llama_sampler_accept(grammar, token)
        except BaseException:
            _free_samplers(lib, chain, grammar)
            raise
        free = self.free_seqs()
        seq = free[pick_sequence([(s.tokens, s.used_at) for s in free], tokens if gen.cache_prompt else [])]
        cached = self._keep(seq, tokens, gen.cache_prompt)
        todo = tokens[cached:]
        # At temperature 0 the answer is determined: a failover's prefix is read as it was
        # written, one token at a time, to continue it exactly; otherwise a batch is as good
        # and much faster.
        singly_from = max(0, n_prompt - len(prefix) - cached) if gen.temperature == 0.0 else len(todo)
        job = Job(id=job_id, gen=gen, seq=seq, chain=chain, grammar=grammar, todo=todo,
                  batchable=min(singly_from, len(todo)), max_tokens=max_tokens, n_prompt=n_prompt, cached=cached,
                  stream=TextStream(gen.stop + template_stops), progress_at=time.monotonic())  # fmt: skip
        seq.job = job
        self.jobs.append(job)
        self.send({"ev": "start", "id": job_id, "prompt_tokens": n_prompt, "cached_tokens": cached})

    def _keep(self, seq: Seq, tokens: list[int], enabled: bool) -> int:
        """Keep the KV cells of the longest prefix `tokens` shares with what the sequence
        holds; return its length. At least one token is always evaluated again, for fresh logits."""
        keep = shared_prefix(seq.tokens, tokens[:-1]) if enabled else 0
        if keep < len(seq.tokens) and not self._lib.llama_memory_seq_rm(self.memory, seq.id, keep, -1):
            # The model may refuse a partial removal (some recurrent or sliding-window caches): start over.
            self._lib.llama_memory_seq_rm(self.memory, seq.id, -1, -1)
            keep = 0
        del seq.tokens[keep:]
        return keep

    def step(self) -> None:
        """One decode step, of prompts or of a token for each job that generates (`plan_step`
        decides); then each job whose evaluation caught up samples its next token.

        A failover's answer so far goes in one token per step, as it was generated: llama.cpp's
        arithmetic differs between a batch and a single token (other kernels, other rounding),
        so read as a batch it could turn a greedy continuation onto another path. Other
        streams in the same step change the arithmetic too: a continuation is exact where the
        stream ran alone on its worker, and nearly so beside others (tests/test_batching.py).
        """
        lib = self._lib
        self._take_threads()
        for job in [j for j in self.jobs if self.is_cancelled(j.id)]:
            self.finish(job, "cancelled")
        jobs = list(self.jobs)
        if not jobs:
            return
        counts = plan_step([Want(len(j.todo), j.batchable) for j in jobs], N_BATCH, read_since=self._read_since)
        batch, n = self.batch, 0
        for job, count in zip(jobs, counts, strict=True):
            job.logits_at = -1
            pos = len(job.seq.tokens)
            for k in range(count):
                batch.token[n] = job.todo[k]
                batch.pos[n] = pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = job.seq.id
                batch.logits[n] = False
                n += 1
            if count and count == len(job.todo):
                batch.logits[n - 1] = True
                job.logits_at = n - 1
        batch.n_tokens = n
        # At a small share one prompt chunk can take longer than the node waits for a cancel
        # before it kills the runner: while prompts are read, llama.cpp asks the cancel flags
        # between two operations of its graph and stops within one. Not for steps of single
        # tokens: a Python call per operation would cost every token time, and a cancel is
        # seen between two steps there anyway.
        self._in_step = jobs
        read = sum(count for job, count in zip(jobs, counts, strict=True) if job.batchable)
        self._read_since = self._read_since + read if read else 0
        prompt_step = read > 0
        if prompt_step:
            lib.llama_set_abort_callback(self.ctx, self._abort, None)
        try:
            rc = lib.llama_decode(self.ctx, batch)
        finally:
            if prompt_step:
                lib.llama_set_abort_callback(self.ctx, lib.ggml_abort_callback(), None)  # a null callback: none
        if rc == 2:  # aborted for a cancel: drop whatever cells the step left, finish at the next step
            for job in jobs:
                lib.llama_memory_seq_rm(self.memory, job.seq.id, len(job.seq.tokens), -1)
            return
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        for job, count in zip(jobs, counts, strict=True):
            if count:
                job.seq.tokens.extend(job.todo[:count])
                del job.todo[:count]
                job.batchable = max(0, job.batchable - count)
                if job.reading:
                    job.read += count
        for job in jobs:
            if job.reading or prompt_step:  # a stream paused by a prompt step is alive too
                self.progress(job)
            if job.logits_at >= 0:
                self.advance(job)

    def _abort_check(self, _data: Any) -> bool:
        """llama.cpp's abort callback (on its worker threads, while the main thread waits in
        `llama_decode`): a job was cancelled, in this step or paused by it. Its prompt work is
        redone at the next step; a cancel that waited for the chunk could outlast the node's
        patience and cost every stream its runner."""
        jobs = self._in_step
        for job in jobs:
            self.progress(job)  # one chunk can take minutes at a small share: all still alive
        return any(self.is_cancelled(job.id) for job in jobs)

    def progress(self, job: Job) -> None:
        """Tell the node a job's prompt is being read (at most once a second): a job that says
        nothing for the stall timeout is taken for hung and moved to another worker."""
        now = time.monotonic()
        if now - job.progress_at < PROGRESS_EVERY_S:
            return
        with self._progress_lock:  # llama.cpp's worker threads may all call in at once
            if now - job.progress_at < PROGRESS_EVERY_S:
                return
            job.progress_at = now
            self.send({"ev": "progress", "id": job.id, "prompt_done": job.read})

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self.cancelled or "*" in self.cancelled

    def _take_threads(self) -> None:
        """Between two steps: take up the thread count the node wants now."""
        wanted = self.wanted_threads
        if wanted != self.threads:
            self.threads = wanted
            self._lib.llama_set_n_threads(self.ctx, wanted, wanted)
            self.send({"ev": "threads", "n": wanted})

    def advance(self, job: Job) -> None:
        """Sample a job's next token from the last step's logits; send its text; finish it at a stop."""
        row = job.logits_at
        job.reading = False
        token = self.sample(job.chain, job.grammar, row)
        if self._lib.llama_vocab_is_eog(self.vocab, token):
            self.finish(job, "stop")
            return
        job.count += 1
        job.held.append(token)
        if job.gen.logprobs is not None:
            job.pending.append(self.logprob(token, job.gen.logprobs, row))
        text, whole = job.stream.feed(self.piece(token))
        if whole:
            self._send_text(job, text, whole - (job.count - len(job.held)))
        if job.stream.stopped:
            self.finish(job, "stop")
        elif job.count >= job.max_tokens:
            self.finish(job, "length")
        else:
            job.todo = [token]

    def finish(self, job: Job, reason: str) -> None:
        """End a job: the text still held back, then `done`; its sequence keeps its cache."""
        tail = job.stream.flush()
        if (tail or job.held) and reason != "cancelled":
            self._send_text(job, tail, len(job.held))
        self.release(job)
        self.send({"ev": "done", "id": job.id, "finish_reason": reason, "prompt_tokens": job.n_prompt,
                   "cached_tokens": job.cached, "completion_tokens": job.count})  # fmt: skip

    def fail(self, job: Job, code: str, message: str) -> None:
        """End a job with an error; its sequence's cache is dropped, as it may hold half a step."""
        self.release(job)
        self._lib.llama_memory_seq_rm(self.memory, job.seq.id, -1, -1)
        job.seq.tokens.clear()
        self.send({"ev": "error", "id": job.id, "code": code, "message": message})

    def release(self, job: Job) -> None:
        _free_samplers(self._lib, job.chain, job.grammar)
        job.chain = job.grammar = None
        job.seq.job = None
        job.seq.used_at = time.monotonic()
        self.jobs.remove(job)
        self.cancelled.discard(job.id)

    def logprob(self, token: int, top: int, row: int) -> TokenLogprob:
        """The token's log-probability under the model (before any sampling), and the `top` most likely."""
        logits = self._logits(row)
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        best = np.argpartition(-logits, top)[:top] if 0 < top < self.n_vocab else np.arange(0)
        best = best[np.argsort(-logits[best])]
        text, logprob, raw = _entry(self.piece(token), float(logits[token]) - log_total)
        top_entries = [_entry(self.piece(int(t)), float(logits[t]) - log_total) for t in best]
        return TokenLogprob(token=text, logprob=logprob, bytes=raw, top=top_entries)

    def _send_text(self, job: Job, text: str, n: int) -> None:
        """Send `text` with the first `n` held tokens it is made of (and their logprobs)."""
        message: dict[str, Any] = {"ev": "text", "id": job.id, "text": text, "ids": job.held[:n],
                                   "completion_tokens": job.count}  # fmt: skip
        del job.held[:n]
        if job.pending:
            message["logprobs"] = job.pending[:n]
            del job.pending[:n]
        self.send(message)


def _free_samplers(lib: Any, chain: Any, grammar: Any) -> None:
    if chain is not None:
        lib.llama_sampler_free(chain)
    if grammar is not None:
        lib.llama_sampler_free(grammar)


def _layers_within(llama_cpp: Any, model_path: str, budget: int, n_ctx: int) -> int:
    """Layers of the model that fit the node's GPU budget, from the file's own metadata."""
    if budget <= 0:
        return 0
    meta = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False).metadata
    arch = meta.get("general.architecture", "")
    n_layers = int(meta.get(f"{arch}.block_count", 0))
    return gpu_layers(n_layers, os.path.getsize(model_path), budget, n_ctx)


def _entry(piece: bytes, logprob: float) -> tuple[str, float, list[int]]:
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:  # part of a character: named by its bytes, as OpenAI does
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in piece)
    return text, logprob, list(piece)


def _read_commands(runner_ref: list[Runner], jobs: queue.Queue[RunJob | None]) -> None:
    for line in sys.stdin.buffer:
        message = decode(line)
        op = message.get("op")
        if op == "cancel" and runner_ref:
            runner_ref[0].cancelled.add(message["id"])
        elif op == "threads" and runner_ref:
            runner_ref[0].wanted_threads = max(1, int(message["n"]))
        elif op == "run":
            jobs.put(message)
        elif op == "exit":
            break
    # Parent gone or asked us to exit: stop the job in flight too.
    if runner_ref:
        runner_ref[0].cancelled.add("*")
    jobs.put(None)


def _die_with_parent() -> None:
    """Ask Linux to kill us if the node dies, so no runner is ever orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _admit(runner: Runner, job: RunJob) -> None:
    job_id = job["id"]
    try:
        runner.admit(job_id, Generation.model_validate(job["gen"]))
        return
    except JobError as exc:
        runner.send({"ev": "error", "id": job_id, "code": exc.code, "message": exc.message, "param": exc.param})
    except ValidationError as exc:
        runner.send({"ev": "error", "id": job_id, "code": "invalid_request", "message": str(exc.errors()[0]["msg"])})
    except Exception as exc:  # a bad job must not take the model down with it
        runner.send({"ev": "error", "id": job_id, "code": "internal_error", "message": str(exc)})
    runner.cancelled.discard(job_id)


def serve(runner: Runner, jobs: queue.Queue[RunJob | None]) -> None:
    """Take jobs onto free sequences between two steps, and step while any runs: waiting
    for a job only when none runs. Returns when the node asks the runner to exit."""
    waiting: deque[RunJob] = deque()  # sent beyond the free sequences: they start as others end
    while True:
        while len(runner.jobs) < len(runner.seqs):
            if waiting:
                _admit(runner, waiting.popleft())
                continue
            idle = not runner.jobs
            try:
                job = jobs.get(block=idle)
            except queue.Empty:
                break
            if job is None:
                return
            _admit(runner, job)
            if idle:
                # Requests sent together arrive a moment apart: let the reader thread pass on
                # the rest, so that their prompts are read in this first step too.
                time.sleep(0.002)
        while not jobs.empty() and len(waiting) < 1024:
            job = jobs.get_nowait()
            if job is None:
                return
            waiting.append(job)
        if not runner.jobs:
            continue
        try:
            runner.step()
        except Exception as exc:  # a step that fails ends the jobs in it, not the model
            for failed in list(runner.jobs):
                runner.fail(failed, "internal_error", f"the model failed: {exc}")


def main() -> None:
    _die_with_parent()
    config = orjson.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    runner_ref: list[Runner] = []
    jobs: queue.Queue[RunJob | None] = queue.Queue()
    try:
        runner = Runner(out, config["model_path"], config["n_ctx"], config["threads"], config.get("gpu_budget"),
                        config.get("parallel", 1))  # fmt: skip
    except Exception as exc:  # any load failure is reported, not raised: the node decides
        out.write(encode({"ev": "fatal", "message": f"cannot load model: {exc}"}))
        sys.exit(3)
    runner_ref.append(runner)
    threading.Thread(target=_read_commands, args=(runner_ref, jobs), daemon=True).start()
    runner.send({"ev": "ready", "n_ctx": runner.n_ctx, "parallel": len(runner.seqs),
                 "chat_template": runner.formatter is not None, "fim": runner.fim is not None,
                 "tools": runner.tools, "gpu_layers": runner.gpu_layers})  # fmt: skip
    serve(runner, jobs)


if __name__ == "__main__":
    main()
