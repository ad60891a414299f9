"""Response cache (issue 12): time to first token of a repeated temperature-0 request, answered
from the orchestrator's response cache against computed by a worker.

    .venv/bin/python -m bench.cache_bench [--rounds 20] [--backends sqlite redis]  # bench/results/cache.{json,md}

Per backend (the orchestrator's own SQLite file, or a local Redis with `--redis`): one TLS
orchestrator and one node serving the bundled code model (qwen2.5-coder-0.5b) with a share
of 0.8 for others' work. One coding question over streamed chat, at temperature 0; first
asked once, so its answer is in the cache and its prompt in the worker's KV cache. Then,
each round, in an order that flips every round, the same request three ways:

- cached: as is, answered from the response cache (`X-Dragon-Cache: hit`);
- computed, warm: with `"cache": false`, so the worker computes it, its prompt already in its
  KV cache (the best a worker does for a repeated request);
- computed, cold: with `"cache_prompt": false`, which turns off the response cache too (the
  client asks for a fresh computation), and the worker reads the whole prompt again.

Time to first token: from sending the request to the first chunk with content, over one
keep-alive connection (the TLS handshake paid once, as an IDE's client does). For scale, each
round also times an authenticated `GET /v1/models` on that connection: what any request costs. A cached answer
must say `hit` and be the first answer's text exactly; a computed one must say `off`. Whether a
computed text equals the first is counted, not required: with its prompt taken from the KV
cache, llama.cpp batches it otherwise, and the last bits of the logits may change a greedy
answer (README, "Prompt cache"); the cache replays one answer, always the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.outputs import RESULTS, save, scratch
from bench.swarm_procs import CpuWatch, Orchestrator, Processes, quiet_machine, start_node, start_orchestrator
from dragonswarm.engines.models import bundled_coder
from dragonswarm.settings import CODER_MODEL_NAME
from dragonswarm.store.redis_server import start_local_redis

SHARE = 0.8
MAX_TOKENS = 48
TARGET = 20.0  # computed median TTFT / cached median TTFT
QUESTION = [{"role": "system", "content": "You are a senior software engineer. Answer with short, correct code."},
            {"role": "user", "content": "Write a Python function that merges overlapping intervals given as "
                                        "(start, end) tuples, with a docstring."}]  # fmt: skip
KINDS = {"cached": {}, "computed_warm": {"cache": False}, "computed_cold": {"cache_prompt": False}}
EXPECTED = {"cached": "hit", "computed_warm": "off", "computed_cold": "off"}


def ask(client: httpx.Client, orch: Orchestrator, extra: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: its time to first content, whole time, text and cache state."""
    body = {"model": CODER_MODEL_NAME, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, **extra}  # fmt: skip
    pieces: list[str] = []
    start = time.perf_counter()
    first = 0.0
    with client.stream("POST", orch.api + "/chat/completions", json=body, headers=orch.auth()) as response:
        response.raise_for_status()
        state = response.headers.get("x-dragon-cache", "?")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream ended in an error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                if piece := choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(piece)
    return {"ttft_s": first - start, "total_s": time.perf_counter() - start, "text": "".join(pieces), "cache": state}


def floor(client: httpx.Client, orch: Orchestrator) -> float:
    """Seconds for an authenticated `GET /v1/models`: a key lookup and a small JSON answer."""
    start = time.perf_counter()
    client.get(orch.api + "/models", headers=orch.auth()).raise_for_status()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1]}  # fmt: skip


def bench_backend(root: Path, model: Path, backend: str, rounds: int) -> dict[str, Any]:
    with Processes(root / backend) as procs:
        redis = start_local_redis(root / backend / "redis", persist=False) if backend == "redis" else None
        try:
            orch = start_orchestrator(procs, "orchestrator", redis=redis.url if redis else None)
            node = start_node(procs, orch, "worker", f"{CODER_MODEL_NAME}={model}", SHARE, 0.8)
            orch.wait_live([node.name], procs)
            node.settle()
            with httpx.Client(timeout=600, verify=orch.verify) as client:
                reference = ask(client, orch, {})  # computes the answer, and keeps it
                if reference["cache"] != "miss":
                    raise RuntimeError(f"the first request was not a miss: {reference['cache']}")
                per_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
                floors: list[float] = []
                checks_failed = 0
                quiet_machine()
                loadavg_before = os.getloadavg()
                watch = CpuWatch()
                for i in range(rounds):
                    order = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))
                    floors.append(floor(client, orch))
                    for kind in order:
                        run = ask(client, orch, KINDS[kind])
                        run["same_text"] = run["text"] == reference["text"]
                        run["ok"] = run["cache"] == EXPECTED[kind] and (run["same_text"] or kind != "cached")
                        checks_failed += not run["ok"]
                        per_kind[kind].append(run)
                loadavg_after = os.getloadavg()
                others = watch.other_fraction()
        finally:
            procs.close()  # the orchestrator first, then the Redis it writes to
            if redis:
                redis.stop()
    ttft = {kind: summary([r["ttft_s"] for r in runs]) for kind, runs in per_kind.items()}
    warm = ttft["computed_warm"]["median"] / ttft["cached"]["median"]
    cold = ttft["computed_cold"]["median"] / ttft["cached"]["median"]
    return {"backend": backend, "rounds": rounds, "reference_ttft_s": reference["ttft_s"],
            "answer_chars": len(reference["text"]), "ttft_s": ttft, "models_get_s": summary(floors),
            "total_s": {kind: summary([r["total_s"] for r in runs]) for kind, runs in per_kind.items()},
            "speedup_warm": warm, "speedup_cold": cold, "checks_failed": checks_failed,
            "pass_warm": warm >= TARGET and checks_failed == 0, "pass_cold": cold >= TARGET and checks_failed == 0,
            "same_text": {kind: sum(r["same_text"] for r in runs) for kind, runs in per_kind.items()},
            "loadavg_before": loadavg_before, "loadavg_after": loadavg_after, "other_cpu_fraction": others,
            "per_run": {kind: [{k: v for k, v in r.items() if k != "text"} for r in runs]
                        for kind, runs in per_kind.items()}}  # fmt: skip


def ms(value: float) -> str:
    return f"{value * 1000:.1f}" if value < 1 else f"{value * 1000:.0f}"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    rows = []
    for b in results["backends"]:
        t = b["ttft_s"]
        rows.append(
            f"| {b['backend']} | **{ms(t['cached']['median'])}** / {ms(t['cached']['p90'])} ms | "
            f"{ms(t['computed_warm']['median'])} / {ms(t['computed_warm']['p90'])} ms | "
            f"{ms(t['computed_cold']['median'])} / {ms(t['computed_cold']['p90'])} ms | "
            f"**{b['speedup_warm']:.0f}×** / **{b['speedup_cold']:.0f}×** | "
            f"{'met' if b['pass_warm'] else 'not met'} / {'met' if b['pass_cold'] else 'not met'} | "
            f"{b['checks_failed']} | "
            f"{b['loadavg_before'][0]:.1f} → {b['loadavg_after'][0]:.1f} | {b['other_cpu_fraction']:.0%} |")
    totals = [f"{b['backend']}: cached {ms(b['total_s']['cached']['median'])} ms, computed (warm) "
              f"{ms(b['total_s']['computed_warm']['median'])} ms" for b in results["backends"]]  # fmt: skip
    lines = [
        "# Response cache benchmark results", "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. {results['date']}.", "",
        f"One TLS orchestrator and one node serving the bundled {CODER_MODEL_NAME} (share {SHARE} for others' "
        f"work); one coding question over streamed chat, temperature 0, {MAX_TOKENS} tokens, asked once first so "
        "that its answer is cached. Then per round, in an order that flips every round: the same request answered "
        "from the response cache (cached), computed by the worker with `\"cache\": false` and its prompt in the "
        "worker's KV cache (computed, warm), and with `\"cache_prompt\": false`, the prompt read again (computed, "
        "cold). Time to first token: request sent → first chunk with content, on one keep-alive connection.", "",
        "| backend | cached TTFT median / p90 | computed, warm | computed, cold | speed-up of the medians, "
        f"against warm / cold | target ≥ {TARGET:g}×, warm / cold | failed checks | load average (1 min) | CPU taken "
        "by other programs |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Rounds per backend: {results['backends'][0]['rounds']}. Checks per request: `X-Dragon-Cache` says `hit` "
        "for a cached answer, `off` for a computed one, and a cached answer is the first answer's text exactly. "
        f"Whole answer, medians: {'; '.join(totals)}. Per-request values in cache.json.", "",
        "For scale, an authenticated `GET /v1/models` on the same connection (a key lookup and a small JSON "
        "answer), median: " + "; ".join(f"{b['backend']}: {ms(b['models_get_s']['median'])} ms"
                                        for b in results["backends"]) + ". "
        "A hit takes the same connection, HTTP server and key lookup as that request, and does more, so the "
        "computed (warm) median over that request's is about the most any cache could reach against warm "
        "here: " + "; ".join(
            f"{b['backend']}: {b['ttft_s']['computed_warm']['median'] / b['models_get_s']['median']:.1f}×"
            for b in results["backends"]) + ".", "",
        "Computed texts equal to the first answer (not a check: a prompt taken from the KV cache is batched "
        "otherwise, and the last bits of the logits may change a greedy answer): "
        + "; ".join(f"{b['backend']}: warm {b['same_text']['computed_warm']} of {b['rounds']}, cold "
                    f"{b['same_text']['computed_cold']} of {b['rounds']}" for b in results["backends"]) + ".",
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "redis"], default=["sqlite", "redis"])
    parser.add_argument("--out", type=Path, default=RESULTS / "cache")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dragon-cache-bench-"))
    model = bundled_coder(Path.home() / ".dragonswarm" / "models").path  # reused across runs: no rebuild
    results: dict[str, Any] = {
        "machine": f"{psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": " ".join(["python -m bench.cache_bench", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": CODER_MODEL_NAME, "share": SHARE,
        "max_tokens": MAX_TOKENS, "target": TARGET,
    }  # fmt: skip
    with scratch(root):
        results["backends"] = [bench_backend(root, model, backend, args.rounds) for backend in args.backends]
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
