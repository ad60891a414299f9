"""Entry point of a runner child process: one loaded GGUF model, one job at a time.

This is the only module that imports `llama_cpp`. It speaks `protocol.runner` over a
private copy of stdout (fd 1 itself is pointed at stderr, so anything llama.cpp prints
cannot corrupt the protocol) and reads jobs from stdin. A reader thread receives
`cancel` while a job runs; the generation loop checks it between tokens.
"""

from __future__ import annotations

import ctypes
import os
import queue
import random
import signal
import sys
import threading
from typing import Any, BinaryIO

import orjson

from dragonswarm.engines.chat_templates import chat_template
from dragonswarm.engines.textstream import TextStream
from dragonswarm.protocol.runner import RunJob, decode, encode


class Runner:
    def __init__(self, out: BinaryIO, model_path: str, n_ctx: int, threads: int):
        import llama_cpp

        self._lib = llama_cpp
        self.out = out
        self.llm = llama_cpp.Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
            verbose=False,
        )
        self.threads = threads
        self.vocab = self.llm._model.vocab
        self._piece_buf = ctypes.create_string_buffer(256)
        self.cancelled: set[str] = set()
        self.formatter = self._chat_formatter()

    def _chat_formatter(self) -> Any:
        template = chat_template(self.llm.metadata)
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(token_id: int) -> str:
            return self.llm._model.token_get_text(token_id) if token_id != -1 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=text(self.llm.token_eos()),
            bos_token=text(self.llm.token_bos()),
        )

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(encode(message))

    def piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[: max(n, 0)]

    def prompt_tokens(self, job: RunJob) -> tuple[list[int], list[str]]:
        """The job's prompt as tokens, and stop strings implied by the chat template.

        A `prefix` (text a failed worker already streamed) is appended after the
        template, so generation continues the same assistant turn.
        """
        if "messages" in job:
            if self.formatter is None:
                raise JobError("invalid_request", "this model has no chat template; use /v1/completions")
            result = self.formatter(messages=job["messages"])
            stops = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
            text = result.prompt + job.get("prefix", "")
            tokens = self.llm.tokenize(text.encode(), add_bos=not result.added_special, special=True)
            return tokens, stops
        text = job.get("prompt", "") + job.get("prefix", "")
        return self.llm.tokenize(text.encode(), add_bos=True, special=True), []

    def run(self, job: RunJob) -> None:
        job_id = job["id"]
        tokens, template_stops = self.prompt_tokens(job)
        n_ctx = self.llm.n_ctx()
        n_prompt = len(tokens)
        if n_prompt >= n_ctx:
            raise JobError(
                "context_length_exceeded",
                f"the prompt has {n_prompt} tokens but the model's context is {n_ctx} tokens",
            )
        max_tokens = job["max_tokens"]
        if max_tokens is None:
            max_tokens = n_ctx - n_prompt
        elif n_prompt + max_tokens > n_ctx:
            raise JobError(
                "context_length_exceeded",
                f"the model's context is {n_ctx} tokens, but {n_prompt + max_tokens} were requested "
                f"({n_prompt} in the prompt, {max_tokens} for the completion)",
            )
        if job["threads"] != self.threads:
            self.threads = job["threads"]
            self._lib.llama_set_n_threads(self.llm._ctx.ctx, self.threads, self.threads)

        self.send({"ev": "start", "id": job_id, "prompt_tokens": n_prompt})
        seed = job["seed"]
        self.llm.set_seed(seed if seed is not None else random.getrandbits(32))
        # No KV-prefix reuse between jobs: evaluating only the tail of a cached prompt
        # changes batch shapes, hence logits, hence greedy output, and then the answer to
        # a request would depend on the request before it. Determinism at temperature 0
        # is promised, so every job evaluates its whole prompt (see bench/results/node.md).
        self.llm.reset()  # type: ignore[no-untyped-call]
        stream = TextStream(job["stop"] + template_stops)
        finish, count = "length", 0
        for token in self.llm.generate(
            tokens, top_k=0, top_p=job["top_p"], min_p=0.0, temp=job["temperature"], repeat_penalty=1.0
        ):
            if job_id in self.cancelled or "*" in self.cancelled:
                finish = "cancelled"
                break
            if self._lib.llama_vocab_is_eog(self.vocab, token):
                finish = "stop"
                break
            count += 1
            text = stream.feed(self.piece(token))
            if text:
                self.send({"ev": "text", "id": job_id, "text": text, "completion_tokens": count})
            if stream.stopped:
                finish = "stop"
                break
            if count >= max_tokens:
                break
        tail = stream.flush()
        if tail and finish != "cancelled":
            self.send({"ev": "text", "id": job_id, "text": tail, "completion_tokens": count})
        self.cancelled.discard(job_id)
        self.send(
            {
                "ev": "done",
                "id": job_id,
                "finish_reason": finish,
                "prompt_tokens": n_prompt,
                "completion_tokens": count,
            }
        )


class JobError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _read_commands(runner_ref: list[Runner], jobs: queue.Queue[RunJob | None]) -> None:
    for line in sys.stdin.buffer:
        message = decode(line)
        op = message.get("op")
        if op == "cancel" and runner_ref:
            runner_ref[0].cancelled.add(message["id"])
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


def main() -> None:
    _die_with_parent()
    config = orjson.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    runner_ref: list[Runner] = []
    jobs: queue.Queue[RunJob | None] = queue.Queue()
    try:
        runner = Runner(out, config["model_path"], config["n_ctx"], config["threads"])
    except Exception as exc:  # any load failure is reported, not raised: the node decides
        out.write(encode({"ev": "fatal", "message": f"cannot load model: {exc}"}))
        sys.exit(3)
    runner_ref.append(runner)
    threading.Thread(target=_read_commands, args=(runner_ref, jobs), daemon=True).start()
    runner.send({"ev": "ready", "n_ctx": runner.llm.n_ctx(), "chat_template": runner.formatter is not None})
    while (job := jobs.get()) is not None:
        if "*" in runner.cancelled:
            break
        try:
            runner.run(job)
        except JobError as exc:
            runner.send({"ev": "error", "id": job["id"], "code": exc.code, "message": exc.message})
        except Exception as exc:  # a bad job must not take the model down with it
            runner.send({"ev": "error", "id": job["id"], "code": "internal_error", "message": str(exc)})


if __name__ == "__main__":
    main()
