"""Plain llama-cpp-python chat in its own process, so that the code bench can hold it to a CPU share.

    plain_chat_worker.py MODEL N_CTX THREADS

Reads one JSON request per line on stdin and answers one JSON line on stdout:
    {"op": "chat", "messages": [...], "max_tokens": N, "reset": bool} -> {"ttft", "total", "text"}
    {"op": "ram_cache", "on": bool} -> {}          a fresh LlamaRAMCache, or none
    {"op": "count", "text": "..."} -> {"tokens": N}
Times are taken here, as a script calling the library would see them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import llama_cpp
from llama_cpp.llama_cache import LlamaRAMCache


def chat(llm: llama_cpp.Llama, req: dict[str, Any]) -> dict[str, Any]:
    if req.get("reset"):
        # llama-cpp-python always reuses the KV prefix of its previous prompt; a reset is
        # its equivalent of the node's `cache_prompt: false`.
        llm.reset()  # type: ignore[no-untyped-call]
    pieces: list[str] = []
    start = time.perf_counter()
    first = end = 0.0
    stream: Any = llm.create_chat_completion(req["messages"], max_tokens=req["max_tokens"], temperature=0, stream=True)
    for chunk in stream:
        if piece := chunk["choices"][0]["delta"].get("content"):
            end = time.perf_counter()
            first = first or end
            pieces.append(piece)
    return {"ttft": first - start, "total": end - start, "text": "".join(pieces)}


def handle(llm: llama_cpp.Llama, req: dict[str, Any]) -> dict[str, Any]:
    if req["op"] == "chat":
        return chat(llm, req)
    if req["op"] == "ram_cache":
        llm.set_cache(LlamaRAMCache() if req["on"] else None)  # a fresh one: no state from earlier rounds
        return {}
    if req["op"] == "count":
        return {"tokens": len(llm.tokenize(req["text"].encode(), add_bos=False))}
    raise ValueError(f"unknown op {req['op']!r}")


def main() -> None:
    model_path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(llm, json.loads(line))), flush=True)
    llm.close()


if __name__ == "__main__":
    main()
