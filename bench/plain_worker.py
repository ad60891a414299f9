"""The reference: plain llama-cpp-python in its own process, as a user would call it.

Reads one JSON request per line on stdin, answers one JSON timing per line on stdout.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp


def main() -> None:
    model_path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("fresh"):
            llm.reset()  # forget the previous prompt: no KV-prefix reuse (our node with cache_prompt: false)
        start = time.perf_counter()
        first = None
        tokens = 0
        text = []
        for chunk in llm.create_completion(req["prompt"], max_tokens=req["max_tokens"], temperature=0, stream=True):
            piece = chunk["choices"][0]["text"]
            if chunk["choices"][0]["finish_reason"] is None:
                tokens += 1  # one chunk per token in llama-cpp-python's stream
            if piece and first is None:
                first = time.perf_counter()
            text.append(piece)
        end = time.perf_counter()
        print(json.dumps({"start": start, "first": first, "end": end, "text": "".join(text), "tokens": tokens}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
