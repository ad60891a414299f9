"""Node benchmarks, each side by side with its reference, measured in the same run.

    .venv/bin/python -m bench.node_bench            # writes bench/results/node.{json,md}

1. Speed: plain llama-cpp-python, `python -m llama_cpp.server` and our node at share
   1.0, alternately, on the same GGUF and threads: tokens/s and time to first token.
2. Seconds per generated line of Python code at the default share (0.80).
3. Share accuracy: CPU used by the node's process tree during 30 s of generation at
   shares 0.10, 0.25 and 0.80, as a fraction of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.outputs import save
from dragonswarm.engines.models import bundled_gemma

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
N_CPUS = psutil.cpu_count() or 1
CODE_PROMPT = (
    "# Python utilities for parsing and summarising web server log files.\n"
    "import re\nfrom collections import Counter\n\n\ndef parse_line(line):\n"
)


@dataclass
class Timing:
    ttft: float  # seconds from sending the request to the first text
    total: float  # seconds from sending the request to the last text
    tokens: int
    text: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / max(1e-9, self.total - self.ttft)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def stream_completion(base: str, model: str, prompt: str, max_tokens: int) -> Timing:
    """Time one streamed /v1/completions request the way an OpenAI client sees it."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    pieces: list[str] = []
    chunks = 0
    start = time.perf_counter()
    first = end = 0.0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text"):
                end = time.perf_counter()
                first = first or end
                pieces.append(choice["text"])
                chunks += 1
    return Timing(first - start, end - start, chunks, "".join(pieces))


class Plain:
    name = "llama-cpp-python"

    def __init__(self, model: Path, n_ctx: int, threads: int, fresh: bool = False):
        self.fresh = fresh
        if fresh:
            self.name = "llama-cpp-python, no prompt cache"
        args = [sys.executable, str(ROOT / "plain_worker.py"), str(model), str(n_ctx), str(threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout and json.loads(self.proc.stdout.readline())["ready"]

    def run(self, prompt: str, max_tokens: int) -> Timing:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens, "fresh": self.fresh}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return Timing(r["first"] - r["start"], r["end"] - r["start"], r["tokens"], r["text"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class LlamaServer:
    name = "llama_cpp.server"

    def __init__(self, model: Path, n_ctx: int, threads: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx",
                                      str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                      "--port", str(self.port), "--model_alias", "m"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.port}/v1/models", self.proc)

    def run(self, prompt: str, max_tokens: int) -> Timing:
        return stream_completion(f"http://127.0.0.1:{self.port}", "m", prompt, max_tokens)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Node:
    name = "dragon node"

    def __init__(self, home: Path, *flags: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "dragonswarm.cli", "node", "--home", str(home),
                                      "--api-port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"
        wait_http(self.base + "/health", self.proc)
        self.run("warm up", 1)

    def run(self, prompt: str, max_tokens: int) -> Timing:
        return stream_completion(self.base, "gemma3-270m", prompt, max_tokens)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.base + "/v1/node").json()
        return data

    def settle(self) -> None:
        """Wait until the governor no longer sees the previous system's burst as the owner."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            gov = self.status()["governor"]
            if not gov["owner_busy"] and gov["share_in_force"] >= gov["local_share"]:
                return
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def settle(system: Any) -> None:
    """Start every timed run on a quiet machine, whichever system ran before it."""
    deadline = time.monotonic() + 30
    while psutil.cpu_percent(interval=0.3) > 10 and time.monotonic() < deadline:
        pass
    if hasattr(system, "settle"):
        system.settle()


def summarize(timings: list[Timing]) -> dict[str, float]:
    return {
        "tokens_per_s": statistics.median(t.tokens_per_s for t in timings),
        "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in timings),
        "ttft_ms": statistics.median(t.ttft for t in timings) * 1000,
        "tokens": statistics.median(t.tokens for t in timings),
    }


def bench_speed(model: Path, home: Path, rounds: int, max_tokens: int) -> dict[str, Any]:
    threads = N_CPUS
    systems: list[Any] = [Plain(model, 4096, threads), Plain(model, 4096, threads, fresh=True),
                          LlamaServer(model, 4096, threads), Node(home, "--local-share", "1.0")]  # fmt: skip
    timings: dict[str, list[Timing]] = {s.name: [] for s in systems}
    try:
        for s in systems:  # one untimed run each: caches, page faults
            s.run(CODE_PROMPT, 8)
        for r in range(rounds):
            order = systems if r % 2 == 0 else systems[::-1]  # alternate to cancel drift
            for s in order:
                settle(s)
                timings[s.name].append(s.run(CODE_PROMPT, max_tokens))
                print(f"  round {r + 1}/{rounds} {s.name}: {timings[s.name][-1].tokens_per_s:.1f} tok/s", flush=True)
    finally:
        for s in systems:
            s.close()
    texts = {name: t[0].text for name, t in timings.items()}
    for name, text in texts.items():
        print(f"  {name} wrote: {text[:120]!r}")
    result = {name: summarize(t) for name, t in timings.items()}
    plain = result["llama-cpp-python"]
    for name in result:
        result[name]["ratio_tokens_per_s"] = result[name]["tokens_per_s"] / plain["tokens_per_s"]
    return {"threads": threads, "max_tokens": max_tokens, "rounds": rounds, "systems": result,
            "same_text": len(set(texts.values())) == 1, "texts": texts}  # fmt: skip


def bench_lines(model: Path, home: Path, rounds: int) -> dict[str, Any]:
    """Seconds per generated line of code: our node at the default share, and the reference."""
    out: dict[str, Any] = {}
    for system in (Node(home), Plain(model, 4096, N_CPUS)):
        runs = []
        try:
            for _ in range(rounds):
                settle(system)
                t = system.run(CODE_PROMPT, 256)
                lines = max(1, t.text.count("\n"))
                runs.append({"s_per_line": t.total / lines, "lines": lines, "tokens": t.tokens,
                             "tokens_per_line": t.tokens / lines})  # fmt: skip
        finally:
            system.close()
        out[system.name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["dragon node"]["share"] = 0.80
    out["llama-cpp-python"]["share"] = 1.0
    return out


def tree_cpu(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_share(home: Path, shares: list[float], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for share in shares:
        node = Node(home, "--local-share", str(share))
        try:
            mechanism = node.status()["governor"]["mechanism"]
            cpu0, t0 = tree_cpu(node.proc.pid), time.monotonic()
            requests = 0
            while time.monotonic() - t0 < seconds:
                # Long generations back to back; the last one is cut off by the deadline.
                body = {"model": "gemma3-270m", "prompt": CODE_PROMPT, "max_tokens": 3000, "temperature": 0.7,
                        "stream": True}  # fmt: skip
                with httpx.stream("POST", node.base + "/v1/completions", json=body, timeout=600) as response:
                    for _ in response.iter_lines():
                        if time.monotonic() - t0 >= seconds:
                            break
                requests += 1
            used = tree_cpu(node.proc.pid) - cpu0
            wall = time.monotonic() - t0
        finally:
            node.close()
        fraction = used / (wall * N_CPUS)
        out[f"{share:.2f}"] = {"share": share, "cpu_fraction": fraction, "over_by": fraction - share,
                               "mechanism": mechanism, "seconds": wall, "requests": requests}  # fmt: skip
        print(f"  share {share:.2f}: used {fraction:.3f} of the machine ({mechanism})", flush=True)
    return out


def write_markdown(results: dict[str, Any], path: Path) -> None:
    sp = results["speed"]
    lines = [
        "# Node benchmark results",
        "",
        f"Machine: {results['machine']}. Model: {results['model']}. Command: `{results['command']}`.",
        "",
        f"## Speed ({sp['rounds']} alternating rounds, {sp['max_tokens']} tokens, {sp['threads']} threads, "
        f"same text from all: {sp['same_text']})",
        "",
        "| system | tokens/s | decode tokens/s | time to first token | ratio to llama-cpp-python |",
        "|---|---|---|---|---|",
    ]
    for name, r in sp["systems"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['ttft_ms']:.0f} ms "
                     f"| {r['ratio_tokens_per_s']:.3f} |")  # fmt: skip
    lines += ["", "## Seconds per generated line of Python", "",
              "| system | share | s/line | tokens/line | lines |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results["lines"].items():
        lines.append(f"| {name} | {r['share']:.2f} | {r['s_per_line']:.3f} | {r['tokens_per_line']:.1f} "
                     f"| {r['lines']:.0f} |")  # fmt: skip
    lines += ["", "## Share accuracy (node process tree CPU over 30 s of generation)", "",
              "| share | CPU used (fraction of machine) | over by | mechanism |", "|---|---|---|---|"]  # fmt: skip
    for r in results["share"].values():
        lines.append(f"| {r['share']:.2f} | {r['cpu_fraction']:.3f} | {r['over_by']:+.3f} | {r['mechanism']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--share-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "node")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="dragon-bench-"))
    model = bundled_gemma(home / "models").path
    results: dict[str, Any] = {
        "machine": f"{N_CPUS} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "model": "gemma3-270m (Gemma 3 270M Q4_K_M)",
        "command": "python -m bench.node_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("speed", lambda: bench_speed(model, home, args.rounds, args.max_tokens)),
        ("lines", lambda: bench_lines(model, home, max(2, args.rounds // 2))),
        ("share", lambda: bench_share(home, [0.10, 0.25, 0.80], args.share_seconds)),
    ]
    for name, step in steps:
        print(f"{name}...", flush=True)
        results[name] = step()
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
