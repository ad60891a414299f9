"""Several streams on one model process: aggregate tokens/s and time to first token at 1, 2,
4 and 8 concurrent streams, for each engine, in one run.

    .venv/bin/python -m bench.batching_bench [--llama-server PATH]   # writes bench/results/batching.{json,md}
    .venv/bin/python -m bench.batching_bench --users                 # writes bench/results/batching-users.{json,md}

Engines, each with the machine's cores as threads (share 1.0, uncapped), the same model
file, greedy decoding, `cache_prompt` off, distinct prompts:

1. this change's runner (`engines/runner_main.py`) with 8 sequences (continuous batching);
2. the runner before it (commit `BEFORE_COMMIT`, from `git archive`, same venv): one job at
   a time, the others queued in it, as every node ran until now;
3. plain llama-cpp-python (`Llama.create_completion`, streamed) in a child process: one
   stream at a time, as the library can do no more (its issue #771);
4. llama.cpp's own server (`llama-server -np 8`), where `--llama-server` names a binary
   built from the llama.cpp tree that the llama-cpp-python sdist ships;
5. llama.cpp's batch API alone (`RAW_CHILD`, in a child process, the runner's context
   settings): k sequences' prompts read, then `MAX_TOKENS` greedy decode steps of all k
   timed, and nothing else. The ceiling a runner could reach here: no requests coming and
   going, no prompts between the steps, no process reading the tokens. The issue's table
   was measured this way.

Each of k streams sends `ROUNDS` requests back to back. Aggregate tokens/s = all completion
tokens / wall time; time to first token is per request, from sending it to its first text.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.outputs import RESULTS, save
from dragonswarm.engines.models import bundled_coder, bundled_gemma
from dragonswarm.engines.runner import RunnerProcess
from dragonswarm.protocol.runner import Generation, run_job
from dragonswarm.settings import default_home

REPO = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "e7e608e"  # the last commit whose runner served one job at a time
STREAMS = (1, 2, 4, 8)
ROUNDS = 2
# Time to first token under load: 4 streams sending requests back to back, started this far
# apart (about a quarter of one request's time among 4 streams), so that requests arrive
# while the others generate, as a steady load's do, not all in one instant.
STAGGER_S = 2.0
MAX_TOKENS = 96
N_CTX = 2048  # per sequence
THREADS = os.cpu_count() or 1
PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Sort a list of dicts by a key, then group them\ndef sort_and_group(items, key):\n",
    "import json\n\n\ndef load_config(path):\n",
    "function debounce(fn, ms) {\n",
    "-- top 5 customers by order value in 2023\nSELECT",
    "def is_prime(n: int) -> bool:\n",
    "async def fetch_all(urls):\n",
]


class Request:
    def __init__(self) -> None:
        self.ttft = 0.0
        self.tokens = 0


async def runner_stream(runner: RunnerProcess, prompt: str, out: Request) -> None:
    gen = Generation(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, cache_prompt=False, logprobs=None)
    start = time.monotonic()
    async for event in runner.run(run_job(uuid.uuid4().hex, gen), 120, time.monotonic() + 600):
        if event["ev"] == "text" and not out.ttft:
            out.ttft = time.monotonic() - start
        if event["ev"] == "done":
            out.tokens = int(event.get("completion_tokens", 0))
        if event["ev"] == "error":
            raise RuntimeError(event.get("message"))


async def http_stream(url: str, body: dict[str, Any], out: Request, client: httpx.AsyncClient) -> None:
    """llama-server's /completion, streamed: its last event has the token count."""
    start = time.monotonic()
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("content") and not out.ttft:
                out.ttft = time.monotonic() - start
            if data.get("stop"):
                out.tokens = int(data.get("tokens_predicted", 0))


async def measure(k: int, one: Callable[[str, Request], Awaitable[None]], stagger_s: float = 0.0,
                  rounds: int = ROUNDS) -> dict[str, Any]:  # fmt: skip
    """k streams, each sending `rounds` requests back to back; stream i starts `i * stagger_s` late."""
    requests: list[Request] = []

    async def client(i: int) -> None:
        await asyncio.sleep(i * stagger_s)
        for r in range(rounds):
            req = Request()
            requests.append(req)
            await one(PROMPTS[(i + r * k) % len(PROMPTS)], req)

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(k)))
    wall = time.monotonic() - start
    ttfts = sorted(r.ttft for r in requests)
    tokens = sum(r.tokens for r in requests)
    print(f"  {k} streams{' (staggered)' if stagger_s else ''}: {tokens / wall:.1f} tokens/s, TTFT p50 "
          f"{statistics.median(ttfts) * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms", file=sys.stderr)  # fmt: skip
    return {"streams": k, "requests": len(requests), "stagger_s": stagger_s, "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "per_stream_tokens_per_s": round(tokens / wall / k, 1),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1), "ttft_max_ms": round(ttfts[-1] * 1000, 1)}


async def bench_runner(model: Path, parallel: int, env: dict[str, str] | None, log: Path, streams: tuple[int, ...],
                       under_load: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    runner = RunnerProcess("m", model, N_CTX, THREADS, log, Counter(), env=env, parallel=parallel)
    await runner.start()
    try:
        await runner_stream(runner, "warm up", Request())
        one: Callable[[str, Request], Awaitable[None]] = lambda p, r: runner_stream(runner, p, r)  # noqa: E731
        rows = [await measure(k, one) for k in streams]
        if under_load:
            rows += [await measure(1, one, rounds=4), await measure(4, one, STAGGER_S, rounds=4)]
        return rows
    finally:
        await runner.stop()


PLAIN_CHILD = """
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]),
            n_threads_batch=int(sys.argv[3]), verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    start = time.monotonic(); first = 0.0; n = 0
    prompt = line.rstrip("\\n").encode().decode("unicode_escape")
    for chunk in llm.create_completion(prompt, max_tokens=int(sys.argv[4]), temperature=0.0, stream=True):
        n += 1
        first = first or time.monotonic() - start
    llm.reset()
    print(json.dumps({"ttft": first, "tokens": n}), flush=True)
"""


RAW_CHILD = """
import json, sys, time
import numpy as np
import llama_cpp as L
path, n_ctx, threads, steps, nseq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
prompts = json.loads(sys.argv[6])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
vocab = L.llama_model_get_vocab(model)
n_vocab = L.llama_vocab_n_tokens(vocab)
params = L.llama_context_default_params()
params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx * nseq, nseq, True
params.n_batch = params.n_ubatch = 512
params.n_threads = params.n_threads_batch = threads
params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
ctx = L.llama_init_from_model(model, params)
batch = L.llama_batch_init(512, 0, 1)
def put(i, token, pos, seq, logits):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
    batch.seq_id[i][0] = seq
for k in json.loads(sys.argv[7]):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    last, pos = [], []
    for seq in range(k):
        text = prompts[seq % len(prompts)].encode()
        buf = (L.llama_token * 512)()
        n = L.llama_tokenize(vocab, text, len(text), buf, 512, True, True)
        for i in range(n):
            put(i, buf[i], i, seq, i == n - 1)
        batch.n_tokens = n
        assert L.llama_decode(ctx, batch) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        last.append(int(logits.argmax()))
        pos.append(n)
    start = time.perf_counter()
    for _ in range(steps):
        for seq in range(k):
            put(seq, last[seq], pos[seq], seq, True)
            pos[seq] += 1
        batch.n_tokens = k
        assert L.llama_decode(ctx, batch) == 0
        for seq in range(k):
            last[seq] = int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, seq), shape=(n_vocab,)).argmax())
    wall = time.perf_counter() - start
    print(json.dumps({"streams": k, "tokens": k * steps, "wall_s": round(wall, 2),
                      "tokens_per_s": round(k * steps / wall, 1)}), flush=True)
"""


async def bench_raw(model: Path, streams: tuple[int, ...]) -> list[dict[str, Any]]:
    """llama.cpp's batch API alone: k sequences decoded together, greedy, nothing else timed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RAW_CHILD, str(model), str(N_CTX), str(THREADS), str(MAX_TOKENS), str(max(streams)),
        json.dumps(PROMPTS), json.dumps(list(streams)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout
    rows = []
    for _ in streams:
        row = json.loads(await proc.stdout.readline())
        row["per_stream_tokens_per_s"] = round(row["tokens_per_s"] / row["streams"], 1)
        print(f"  {row['streams']} sequences: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        rows.append(row)
    await proc.wait()
    return rows


async def bench_plain(model: Path, streams: tuple[int, ...]) -> list[dict[str, Any]]:
    """Plain llama-cpp-python in a child process: one stream at a time, the rest wait their turn."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PLAIN_CHILD, str(model), str(N_CTX), str(THREADS), str(MAX_TOKENS),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdin and proc.stdout
    await proc.stdout.readline()
    lock = asyncio.Lock()

    async def one(prompt: str, out: Request) -> None:
        assert proc.stdin and proc.stdout
        start = time.monotonic()
        async with lock:
            waited = time.monotonic() - start  # behind the other streams: a client sees it as time to first token
            proc.stdin.write(prompt.encode("unicode_escape") + b"\n")
            answer = json.loads(await proc.stdout.readline())
        out.tokens = answer["tokens"]
        out.ttft = waited + answer["ttft"]

    try:
        return [await measure(k, one) for k in streams]
    finally:
        proc.kill()
        await proc.wait()


async def bench_llama_server(binary: Path, model: Path, streams: tuple[int, ...], log: Path) -> list[dict[str, Any]]:
    port = 18000 + os.getpid() % 1000
    with log.open("wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), "--port", str(port), "-t", str(THREADS), "-tb",
                                 str(THREADS), "-np", str(max(streams)), "-c", str(N_CTX * max(streams)),
                                 "--no-webui"], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # A new connection per request: llama-server closes idle ones, and a reused closed one fails.
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(600):
                try:
                    if (await client.get(url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)

            async def one(prompt: str, out: Request) -> None:
                body = {"prompt": prompt, "n_predict": MAX_TOKENS, "temperature": 0.0, "cache_prompt": False,
                        "stream": True}  # fmt: skip
                await http_stream(url + "/completion", body, out, client)

            await one("warm up", Request())
            rows = [await measure(k, one) for k in streams]
            return [*rows, await measure(1, one, rounds=4), await measure(4, one, STAGGER_S, rounds=4)]
    finally:
        proc.terminate()
        proc.wait()


def before_source(root: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_COMMIT, "src"], check=True,
                          capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root / "before", filter="data")
    return root / "before" / "src"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    models_dir = default_home() / "models"
    models = {"qwen2.5-coder-0.5b": bundled_coder(models_dir).path, "gemma3-270m": bundled_gemma(models_dir).path}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results: dict[str, Any] = {"machine": machine,
                               "source": source(), "before": BEFORE_COMMIT,
                               "threads": THREADS, "max_tokens": MAX_TOKENS, "rounds": ROUNDS, "n_ctx": N_CTX,
                               "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before_env = dict(os.environ, PYTHONPATH=str(before_source(root)))
        for name, path in models.items():
            if args.model and name != args.model:
                continue
            print(f"{name}: slots", file=sys.stderr)
            entry = {"slots": await bench_runner(path, max(STREAMS), None, root / "slots.log", STREAMS, True)}
            print(f"{name}: one at a time ({BEFORE_COMMIT})", file=sys.stderr)
            entry["before"] = await bench_runner(path, 1, before_env, root / "before.log", STREAMS)
            print(f"{name}: plain llama-cpp-python", file=sys.stderr)
            entry["plain"] = await bench_plain(path, (1, 4))
            print(f"{name}: llama.cpp's batch API alone", file=sys.stderr)
            entry["raw"] = await bench_raw(path, STREAMS)
            if args.llama_server:
                print(f"{name}: llama-server", file=sys.stderr)
                entry["llama_server"] = await bench_llama_server(Path(args.llama_server), path, STREAMS,
                                                                 root / "server.log")  # fmt: skip
            results["models"][name] = entry
    return results


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def source() -> str:
    """The commit measured, and whether the working tree had changes on top of it."""
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")


LABELS = {"slots": "this change: slots (8 sequences)", "before": f"one at a time ({BEFORE_COMMIT})",
          "plain": "plain llama-cpp-python", "llama_server": "llama.cpp's llama-server -np 8",
          "raw": "llama.cpp's batch API alone, decode steps only (the ceiling)"}  # fmt: skip


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Several streams on one model process (continuous batching)", "",
             f"Machine: {results['machine']}. Source: {results['source']}. Threads: {results['threads']} (share "
             f"1.0). Greedy, {results['max_tokens']} tokens at most per request, {results['rounds']} requests per "
             f"stream back to back, distinct prompts, prompt cache off. Measured by `python -m bench.batching_bench`.",
             ""]  # fmt: skip
    for name, entry in results["models"].items():
        lines += [f"## {name}", "", "| engine | streams | tokens/s in all | × 1 stream | per stream | "
                  "TTFT p50 / max (ms) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for engine, rows in entry.items():
            base = rows[0]["tokens_per_s"] or 1.0
            for row in rows[: len(STREAMS) if engine != "plain" else 2]:
                ttft = f"{row['ttft_p50_ms']} / {row['ttft_max_ms']}" if "ttft_p50_ms" in row else "–"
                lines.append(f"| {LABELS[engine]} | {row['streams']} | {row['tokens_per_s']} | "
                             f"{row['tokens_per_s'] / base:.2f} | {row['per_stream_tokens_per_s']} | "
                             f"{ttft} |")  # fmt: skip
        lines += ["", f"Time to first token under load: 4 streams sending {entry['slots'][-1]['requests'] // 4} "
                  f"requests each back to back, started {STAGGER_S} s apart, against one stream alone:", "",
                  "| engine | alone p50 / max (ms) | under 4 streams p50 / max (ms) | max ÷ alone max |",
                  "|---|---|---|---|"]  # fmt: skip
        for engine in ("slots", "llama_server"):
            if engine in entry and len(entry[engine]) > len(STREAMS):
                alone, load = entry[engine][-2], entry[engine][-1]
                lines.append(f"| {LABELS[engine]} | {alone['ttft_p50_ms']} / {alone['ttft_max_ms']} | "
                             f"{load['ttft_p50_ms']} / {load['ttft_max_ms']} | "
                             f"{load['ttft_max_ms'] / max(alone['ttft_max_ms'], 1e-9):.2f} |")  # fmt: skip
        slots = {row["streams"]: row for row in entry["slots"][: len(STREAMS)]}
        gain = slots[4]["tokens_per_s"] / max(slots[1]["tokens_per_s"], 1e-9)
        gain_before = slots[4]["tokens_per_s"] / max(entry["before"][0]["tokens_per_s"], 1e-9)
        alone, load = entry["slots"][-2], entry["slots"][-1]
        ttft = load["ttft_max_ms"] / max(alone["ttft_max_ms"], 1e-9)
        lines += ["", f"Slots at 4 streams: **{gain:.2f}×** the tokens/s of one stream on the same runner, "
                  f"**{gain_before:.2f}×** that of the one-at-a-time runner (target ≥ 1.5×); time to first token "
                  f"under 4 streams, worst against worst alone: **{ttft:.2f}×** (target ≤ 2×).", ""]  # fmt: skip
        if "raw" in entry:
            raw = {row["streams"]: row["tokens_per_s"] for row in entry["raw"]}
            share_4, share_1 = slots[4]["tokens_per_s"] / raw[4], slots[1]["tokens_per_s"] / raw[1]
            lines += [f"llama.cpp's batch API alone, in the same run: **{raw[4] / max(raw[1], 1e-9):.2f}×** at 4 "
                      f"sequences (decode steps only); the runner's slots reach {share_4:.0%} of its 4-sequence "
                      f"rate and {share_1:.0%} of its 1-sequence rate.", ""]  # fmt: skip
        lines.append("")
    path.write_text("\n".join(lines))


# Many users through a whole swarm (`bench.swarm_bench`'s clients part): `dragon up --workers 3`
# on the tiny model, 200 streaming clients with a key each, owner detection off (on one machine
# the clients would be the nodes' busy owner); one sequence per model against the default slots.
USER_SWARMS = {"one sequence per model (--parallel 1)": {"DRAGON_OWNER_NOISE": "1.0", "DRAGON_PARALLEL": "1"},
               "slots (--parallel by default)": {"DRAGON_OWNER_NOISE": "1.0"}}  # fmt: skip


def run_users(clients: int, bursts: int) -> dict[str, Any]:
    from bench.swarm_bench import bench_clients
    from dragonswarm.devtools.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = write_tiny_model(root / "tiny.gguf")
        out = bench_clients(root, tiny, clients, 16, bursts, swarms=USER_SWARMS, distinct_keys=True)
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "source": source(), **out}  # fmt: skip


def write_users_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Many users, with and without slots", "",
             f"Machine: {results['machine']}. Source: {results['source']}. `dragon up --workers "
             f"{results['workers']}` ({results['nodes_in_swarm']} nodes) on the tiny model; {results['clients']} "
             f"streaming clients at once, each with its own user key, {results['bursts']} bursts, "
             f"{results['max_tokens']} tokens each; owner detection off. Measured by "
             "`python -m bench.batching_bench --users`.", "",
             "| swarm | requests | errors | requests served per minute | TTFT p50 / p99 (ms) | one client alone, "
             "TTFT (ms) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in results["swarms"].items():
        ttft = r["ttft_ms"]
        lines.append(f"| {label} | {r['requests']} | {r['errors']} | {r['requests_per_min']:.0f} | "
                     f"{ttft['p50']:.0f} / {ttft['p99']:.0f} | {r['alone']['ttft_ms']:.0f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", metavar="PATH", help="also measure this llama-server binary")
    parser.add_argument("--model", choices=["qwen2.5-coder-0.5b", "gemma3-270m"], help="only this model")
    parser.add_argument("--users", action="store_true", help="the many-users swarm comparison instead")
    parser.add_argument("--clients", type=int, default=200, help="with --users: clients at once (default 200)")
    parser.add_argument("--bursts", type=int, default=2, help="with --users: bursts per swarm (default 2)")
    parser.add_argument("--out", help="results name under bench/results/ (default batching, batching-users)")
    args = parser.parse_args(argv)
    if args.users:
        save(run_users(args.clients, args.bursts), RESULTS / (args.out or "batching-users"), write_users_markdown)
    else:
        save(asyncio.run(run(args)), RESULTS / (args.out or "batching"), write_markdown)


if __name__ == "__main__":
    main()
