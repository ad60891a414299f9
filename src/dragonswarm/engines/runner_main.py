"""Entry point of a runner child process: one loaded GGUF model, one job at a time.

This is the only module that imports `llama_cpp`. It speaks `protocol.runner` over a
private copy of stdout (fd 1 itself is pointed at stderr, so anything llama.cpp prints
cannot corrupt the protocol) and reads jobs from stdin. A reader thread receives
`cancel` while a job runs; the job checks it between prompt batches and between tokens.

Each job builds its own llama.cpp sampler chain (logit bias, penalties, grammar,
top-k/top-p/min-p, temperature) and keeps the KV cache of what it evaluated, so the
next prompt that starts the same way only evaluates what is new.
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
from typing import Any, BinaryIO

import numpy as np
import orjson
from pydantic import ValidationError

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


class Runner:
    def __init__(self, out: BinaryIO, model_path: str, n_ctx: int, threads: int, gpu_budget: int | None = None):
        import llama_cpp

        self._lib = llama_cpp
        self.out = out
        # Layers on the GPU: none without offload support; within the node's budget where it has
        # one (NVIDIA, read through NVML); else all that llama.cpp can, as it does on its own (-1).
        self.gpu_layers = 0
        if llama_cpp.llama_supports_gpu_offload():
            self.gpu_layers = -1 if gpu_budget is None else _layers_within(llama_cpp, model_path, gpu_budget, n_ctx)
        self.llm = llama_cpp.Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=self.gpu_layers,
            verbose=False,
        )
        self.threads = threads
        self.wanted_threads = threads  # set by the command reader when the share in force changes
        self.vocab = self.llm._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)
        # llama_token_data, laid out as llama.h has it: reused for every grammar-held token.
        self._cand = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.cancelled: set[str] = set()
        self._progress_at = 0.0  # when the last progress event went out
        self._progress_lock = threading.Lock()
        self.template = chat_template(self.llm.metadata)
        self.formatter = self._chat_formatter()
        fim = (llama_cpp.llama_vocab_fim_pre(self.vocab), llama_cpp.llama_vocab_fim_suf(self.vocab),
               llama_cpp.llama_vocab_fim_mid(self.vocab))  # fmt: skip
        self.fim = fim if min(fim) >= 0 else None
        # Tools are only offered where the model's own template teaches it a call format we parse.
        self.tools = bool(self.template and "tools" in self.template and TOOL_CALL_OPEN in self.template)

    def _chat_formatter(self) -> Any:
        if not self.template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token_id: int) -> str:
            return self.llm._model.token_get_text(token_id) if token_id != -1 else ""

        return Jinja2ChatFormatter(
            template=self.template,
            eos_token=text(self.llm.token_eos()),
            bos_token=text(self.llm.token_bos()),
        )

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(encode(message))

    def piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[: max(n, 0)]

    def tokenize(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=special) if text else []

    def prompt_tokens(self, gen: Generation) -> tuple[list[int], list[str]]:
        """The prompt as tokens, and stop strings implied by the template."""
        if any(not 0 <= t < self.n_vocab for t in gen.prefix_ids):
            raise JobError("invalid_request", f"prefix_ids names a token beyond this model's vocabulary "
                           f"({self.n_vocab} tokens)")  # fmt: skip
        text, bos, stops = self._prompt_text(gen)
        if text is None:  # fill-in-the-middle: built from the model's FIM tokens
            return self._fim_tokens(gen), stops
        return self.tokenize(text, bos=bos) or [self.llm.token_bos()], stops

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
        bos = [self.llm.token_bos()] if self.add_bos else []
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

    def sample(self, chain: Any, grammar: Any) -> int:
        """The next token from the chain, held to the grammar; accepted into both."""
        lib = self._lib
        if grammar is None:
            return int(lib.llama_sampler_sample(chain, self.llm._ctx.ctx, -1))  # also accepts it
        candidates = self._candidates()
        lib.llama_sampler_apply(chain, ctypes.byref(candidates))
        token = int(self._cand["id"][candidates.selected])
        if not self._allows(grammar, token):  # rarely: sample again from what the grammar allows
            candidates = self._candidates()
            lib.llama_sampler_apply(grammar, ctypes.byref(candidates))
            lib.llama_sampler_apply(chain, ctypes.byref(candidates))
            token = int(self._cand["id"][candidates.selected])
        lib.llama_sampler_accept(grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _logits(self) -> Any:
        """The model's logits for the next position (a view, valid until the next decode)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.n_vocab,))

    def _candidates(self) -> Any:
        """Every token with its logit for the next position, as llama.cpp's samplers take them."""
        lib = self._lib
        logits = self._logits()
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

    def reuse_cache(self, tokens: list[int], enabled: bool) -> int:
        """Keep the KV cache of the longest prefix this prompt shares with what was evaluated
        last; return its length. At least one token is always evaluated again, for fresh logits."""
        llm = self.llm
        n = min(llm.n_tokens, len(tokens) - 1)
        keep = 0
        if enabled and n > 0:
            differ = np.flatnonzero(llm.input_ids[:n] != np.asarray(tokens[:n], dtype=llm.input_ids.dtype))
            keep = int(differ[0]) if differ.size else n
        # The model may refuse a partial removal (some recurrent or sliding-window caches): start over.
        if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
            return keep
        llm.reset()  # type: ignore[no-untyped-call]
        return 0

    def evaluate(self, job_id: str, tokens: list[int], singly_from: int) -> bool:
        """Evaluate tokens a batch at a time, and those from `singly_from` on one at a time;
        False if the job was cancelled meanwhile.

        One at a time is how they were evaluated when they were generated: llama.cpp's
        arithmetic differs between a batch and a single token (other kernels, other
        rounding, logits apart by up to about 1), so a failover's answer so far, read as a
        batch, can turn a greedy continuation onto another path. Read token by token, it
        continues exactly as the first worker would have.

        At a small share one batch can take minutes, longer than the node waits for a
        cancel before it kills the runner: while the prompt is read, llama.cpp asks this
        job's cancel flag between two operations of its graph, and stops within one. Not
        while generating: a Python call per operation would cost every token time, and a
        cancel is seen between two tokens there anyway.
        """
        lib, ctx = self._lib, self.llm._ctx.ctx
        done = 0

        def check(_data: Any) -> bool:
            self.progress(job_id, done)  # a batch can take minutes at a small share: still reading
            return self.is_cancelled(job_id)

        abort = lib.ggml_abort_callback(check)
        lib.llama_set_abort_callback(ctx, abort, None)
        try:
            i = 0
            while i < len(tokens):
                done = i
                self.progress(job_id, done)
                if self.checkpoint(job_id):
                    return False
                step = 1 if i >= singly_from else min(self.llm.n_batch, singly_from - i)
                try:
                    self.llm.eval(tokens[i : i + step])
                    i += step
                except RuntimeError:  # llama_decode returned 2: aborted, the batch's cache cells undone
                    if self.is_cancelled(job_id):
                        return False
                    raise
            return True
        finally:
            lib.llama_set_abort_callback(ctx, lib.ggml_abort_callback(), None)  # a null callback: none

    def progress(self, job_id: str, done: int) -> None:
        """Tell the node the prompt is being read (at most once a second): a job that says
        nothing for the stall timeout is taken for hung and moved to another worker."""
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY_S:
            return
        with self._progress_lock:  # llama.cpp's worker threads may all call in at once
            if now - self._progress_at < PROGRESS_EVERY_S:
                return
            self._progress_at = now
            self.send({"ev": "progress", "id": job_id, "prompt_done": done})

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self.cancelled or "*" in self.cancelled

    def checkpoint(self, job_id: str) -> bool:
        """Between two steps: take up the thread count the node wants now; True if the job was cancelled."""
        wanted = self.wanted_threads
        if wanted != self.threads:
            self.threads = wanted
            self._lib.llama_set_n_threads(self.llm._ctx.ctx, wanted, wanted)
            self.send({"ev": "threads", "n": wanted})
        return self.is_cancelled(job_id)

    def logprob(self, token: int, top: int) -> TokenLogprob:
        """The token's log-probability under the model (before any sampling), and the `top` most likely."""
        logits = self._logits()
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        best = np.argpartition(-logits, top)[:top] if 0 < top < self.n_vocab else np.arange(0)
        best = best[np.argsort(-logits[best])]
        text, logprob, raw = _entry(self.piece(token), float(logits[token]) - log_total)
        top_entries = [_entry(self.piece(int(t)), float(logits[t]) - log_total) for t in best]
        return TokenLogprob(token=text, logprob=logprob, bytes=raw, top=top_entries)

    def run(self, job_id: str, gen: Generation) -> None:
        lib, llm = self._lib, self.llm
        tokens, template_stops = self.prompt_tokens(gen)
        prefix = gen.prefix_ids  # a failover's answer so far: evaluated, then continued
        tokens += prefix
        n_ctx = llm.n_ctx()
        n_prompt = len(tokens)
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
            cached = self.reuse_cache(tokens, gen.cache_prompt)
            self.send({"ev": "start", "id": job_id, "prompt_tokens": n_prompt, "cached_tokens": cached})
            # At temperature 0 the answer is determined: a failover's prefix is read as it was
            # written, to continue it exactly; otherwise a batch is as good and much faster.
            singly_from = max(0, n_prompt - len(prefix) - cached) if gen.temperature == 0.0 else n_prompt
            finish, count = self.generate(job_id, gen, chain, grammar, tokens[cached:], singly_from, max_tokens,
                                          template_stops)  # fmt: skip
        finally:
            lib.llama_sampler_free(chain)
            if grammar is not None:
                lib.llama_sampler_free(grammar)
        self.cancelled.discard(job_id)
        self.send({"ev": "done", "id": job_id, "finish_reason": finish, "prompt_tokens": n_prompt,
                   "cached_tokens": cached, "completion_tokens": count})  # fmt: skip

    def generate(self, job_id: str, gen: Generation, chain: Any, grammar: Any, todo: list[int], singly_from: int,
                 max_tokens: int, template_stops: list[str]) -> tuple[str, int]:  # fmt: skip
        """Evaluate the rest of the prompt, then sample until a stop; returns (finish reason, tokens)."""
        lib = self._lib
        stream = TextStream(gen.stop + template_stops)
        held: list[int] = []  # tokens whose text is still held back
        pending: list[TokenLogprob] = []  # ... their logprobs
        finish, count = "length", 0
        if not self.evaluate(job_id, todo, singly_from):
            return "cancelled", 0
        while True:
            if self.checkpoint(job_id):
                finish = "cancelled"
                break
            token = self.sample(chain, grammar)
            if lib.llama_vocab_is_eog(self.vocab, token):
                finish = "stop"
                break
            count += 1
            held.append(token)
            if gen.logprobs is not None:
                pending.append(self.logprob(token, gen.logprobs))
            text, whole = stream.feed(self.piece(token))
            if whole:
                self._send_text(job_id, text, count, held, pending, whole - (count - len(held)))
            if stream.stopped:
                finish = "stop"
                break
            if count >= max_tokens:
                break
            self.llm.eval([token])
        tail = stream.flush()
        if (tail or held) and finish != "cancelled":
            self._send_text(job_id, tail, count, held, pending, len(held))
        return finish, count

    def _send_text(self, job_id: str, text: str, count: int, held: list[int], pending: list[TokenLogprob],
                   n: int) -> None:  # fmt: skip
        """Send `text` with the first `n` held tokens it is made of (and their logprobs)."""
        message: dict[str, Any] = {"ev": "text", "id": job_id, "text": text, "ids": held[:n],
                                   "completion_tokens": count}  # fmt: skip
        del held[:n]
        if pending:
            message["logprobs"] = pending[:n]
            del pending[:n]
        self.send(message)


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


def _run_one(runner: Runner, job: RunJob) -> None:
    job_id = job["id"]
    try:
        runner.run(job_id, Generation.model_validate(job["gen"]))
    except JobError as exc:
        runner.send({"ev": "error", "id": job_id, "code": exc.code, "message": exc.message, "param": exc.param})
    except ValidationError as exc:
        runner.send({"ev": "error", "id": job_id, "code": "invalid_request", "message": str(exc.errors()[0]["msg"])})
    except Exception as exc:  # a bad job must not take the model down with it
        runner.send({"ev": "error", "id": job_id, "code": "internal_error", "message": str(exc)})
    finally:
        runner.cancelled.discard(job_id)


def main() -> None:
    _die_with_parent()
    config = orjson.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    runner_ref: list[Runner] = []
    jobs: queue.Queue[RunJob | None] = queue.Queue()
    try:
        runner = Runner(out, config["model_path"], config["n_ctx"], config["threads"], config.get("gpu_budget"))
    except Exception as exc:  # any load failure is reported, not raised: the node decides
        out.write(encode({"ev": "fatal", "message": f"cannot load model: {exc}"}))
        sys.exit(3)
    runner_ref.append(runner)
    threading.Thread(target=_read_commands, args=(runner_ref, jobs), daemon=True).start()
    runner.send({"ev": "ready", "n_ctx": runner.llm.n_ctx(), "chat_template": runner.formatter is not None,
                 "fim": runner.fim is not None, "tools": runner.tools, "gpu_layers": runner.gpu_layers})  # fmt: skip
    while (job := jobs.get()) is not None:
        if "*" in runner.cancelled:
            break
        _run_one(runner, job)


if __name__ == "__main__":
    main()
