"""Coding benchmarks for the bundled code model, each beside its reference, in one run.

    .venv/bin/python -m bench.code_bench            # writes bench/results/code.{json,md}

Every system runs at the same CPU share, held the same way: our node at its default local
share (0.80), which its governor enforces with the project's CPU cap (a cgroup quota where
there is one), and the references in child processes held to 0.80 by this bench with that
same cap; all with the node's thread count.

1. Seconds per line of code over chat: coding tasks that ask for code only, streamed at
   temperature 0 to the node, to plain llama-cpp-python (a child process calling the library)
   and to `python -m llama_cpp.server`; systems alternate task by task and their order flips
   every round. For context, plain llama-cpp-python on the whole machine, uncapped, in the
   first round only.
2. Second-turn latency: time to first token of the next turn of a ~1,500-token chat, on
   the node with and without its prompt cache; plain llama-cpp-python as a reference.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.node_bench import N_CPUS, RESULTS, ROOT, LlamaServer, Node, Timing, settle, stream_completion
from bench.outputs import save
from dragonswarm.engines.models import bundled_coder
from dragonswarm.errors import ConfigError
from dragonswarm.governor.caps import CpuCap, open_cap
from dragonswarm.governor.cgroups import PERIOD_US
from dragonswarm.governor.policy import cfs_quota_us, duty_cycle, threads_for
from dragonswarm.settings import CODER_MODEL_NAME

N_CTX = 4096  # the node's default context, given to every system
SHARE = 0.8  # the node's default local share, given to every reference
PLAIN = "llama-cpp-python"
UNCAPPED = "llama-cpp-python, whole machine (uncapped)"
# As an IDE's generate-code command asks: code only, so that seconds per line measures code.
CODE_ONLY = "Reply with only the code, in one code block, no explanation."
TASKS = [
    "Write a Python function that parses an ISO 8601 date string into a datetime and raises ValueError on bad input.",
    "Write a JavaScript function debounce(fn, ms) that also returns a cancel() method.",
    "Write a SQL query for the top 5 customers by total order value in 2023, from customers(id, name) and "
    "orders(id, customer_id, total, created_at).",
    "Write a bash script that lists files over 100 MB under the directory given as its argument, largest first.",
    "Write a Python class for an LRU cache with O(1) get and put.",
    "Write a TypeScript function that validates a User object with a name, an email and an optional age.",
    "Write a Go function that reverses the order of the words in a string.",
    "Write a Rust function that returns the n-th Fibonacci number as a u128, iteratively.",
    "Write a Python function that merges overlapping intervals given as (start, end) tuples.",
    "Write a C function that tells whether a string is a palindrome, ignoring case and anything but letters.",
]
# The long chat's earlier turns, answered with these functions' source: a deterministic history
# (for a given Python version) without pasting a page of code here.
EARLIER_TURNS = [
    ("Write a Python function that removes the common leading whitespace from every line.", textwrap.dedent),
    ("Write a function that decodes a JSON string literal, handling escapes.", json.decoder.py_scanstring),  # type: ignore[attr-defined]
    ("Write the method that splits text into words and whitespace for wrapping.", textwrap.TextWrapper._split),
    ("Write a function that cleans up the indentation of a docstring.", inspect.cleandoc),
]
SYSTEM_PROMPT = "You are a senior software engineer. Answer with short, correct code and few words."
NEXT_TURN = "Now write a function that quotes a string for a POSIX shell, like shlex.quote, with tests."
FIRST_TURN_TOKENS = 64  # the answer that goes into the history; its length barely matters
SECOND_TURN_TOKENS = 8  # only the time to its first token is measured


@dataclass
class Answer:
    ttft: float
    total: float
    text: str
    usage: dict[str, Any] = field(default_factory=dict)  # as the server reported it, if it did


def stream_chat(base: str, model: str, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> Answer:
    """Time one streamed /v1/chat/completions request the way an OpenAI client sees it."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    first = end = 0.0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if piece := choice["delta"].get("content"):
                    end = time.perf_counter()
                    first = first or end
                    pieces.append(piece)
    return Answer(first - start, end - start, "".join(pieces), usage)


class CoderNode(Node):
    """node_bench's node, serving the coder GGUF under its bundled name."""

    def __init__(self, home: Path, model: Path):
        super().__init__(home, "--model", f"{CODER_MODEL_NAME}={model}:code,chat", "--no-bundled-model",
                         "--local-share", "0.8")  # fmt: skip

    def run(self, prompt: str, max_tokens: int) -> Timing:  # Node's warm-up calls this
        return stream_completion(self.base, CODER_MODEL_NAME, prompt, max_tokens)

    def chat(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> Answer:
        return stream_chat(self.base, CODER_MODEL_NAME, messages, max_tokens, **extra)


class ChatServer(LlamaServer):
    def chat(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> Answer:
        return stream_chat(f"http://127.0.0.1:{self.port}", "m", messages, max_tokens, **extra)


class PlainChat:
    """llama-cpp-python called directly, as a script would: no server in between. It runs in a
    child process (plain_chat_worker.py) so that it can be held to a CPU share like the node."""

    def __init__(self, model: Path, threads: int, name: str = PLAIN, rounds: int | None = None):
        self.name = name
        self.rounds = rounds  # None: every round of the lines benchmark
        args = [sys.executable, str(ROOT / "plain_chat_worker.py"), str(model), str(N_CTX), str(threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready: the model is loaded

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: its worker exited with {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def chat(self, messages: list[dict[str, str]], max_tokens: int, cache_prompt: bool = True) -> Answer:
        r = self._ask(op="chat", messages=messages, max_tokens=max_tokens, reset=not cache_prompt)
        return Answer(r["ttft"], r["total"], r["text"])

    def ram_cache(self, on: bool) -> None:
        """A fresh LlamaRAMCache, or none."""
        self._ask(op="ram_cache", on=on)

    def count_tokens(self, text: str) -> int:
        """One token count for every system's answer, whatever its server reports or streams."""
        tokens: int = self._ask(op="count", text=text)["tokens"]
        return tokens

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def open_share_cap() -> CpuCap:
    """The project's own CPU cap, as the node opens it: a cgroup quota, else affinity + duty cycle."""
    try:
        return open_cap("cgroup", list(range(N_CPUS)), N_CPUS)
    except ConfigError as exc:
        print(f"  no cgroup CPU control ({exc}); the references get affinity + duty cycle", flush=True)
        return open_cap("duty", list(range(N_CPUS)), N_CPUS)


def governor(system: Any) -> dict[str, Any]:
    """The node's share and owner load just after a run: a share below 0.80 means other programs
    on the machine made it yield during the run, and its numbers are not comparable."""
    if not isinstance(system, CoderNode):
        return {}
    gov = system.status()["governor"]
    return {"share_after": gov["share_in_force"], "owner_load_after": gov["owner_load"]}


def code_lines(text: str) -> int:
    """Lines between ``` fences (blank ones too, an unclosed block runs to the end); without
    a fence, every non-empty line."""
    inside, fenced, count = False, False, 0
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside, fenced = not inside, True
        elif inside:
            count += 1
    return count if fenced else sum(1 for line in text.splitlines() if line.strip())


def bench_lines(systems: list[Any], count_tokens: Callable[[str], int], rounds: int, n_tasks: int,
                max_tokens: int) -> dict[str, Any]:  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    for s in systems:  # one untimed chat each: page faults, template compilation
        s.chat([{"role": "user", "content": "Say hello."}], 4)
    for r in range(rounds):
        active = [s for s in systems if getattr(s, "rounds", None) is None or r < s.rounds]
        order = active if r % 2 == 0 else active[::-1]  # alternate to cancel drift
        for i, task in enumerate(TASKS[:n_tasks]):
            for s in order:
                settle(s)
                a = s.chat([{"role": "user", "content": f"{task} {CODE_ONLY}"}], max_tokens)
                tokens, lines = count_tokens(a.text), code_lines(a.text)
                runs[s.name].append({"round": r, "task": i, "ttft": a.ttft, "total": a.total, "tokens": tokens,
                                     "lines": lines, "reported_tokens": a.usage.get("completion_tokens"),
                                     "text": a.text, **governor(s)})  # fmt: skip
                print(f"  round {r + 1}/{rounds} task {i + 1} {s.name}: {tokens / a.total:.1f} tok/s, {lines} lines")
    result = {name: summarize_lines(rs) for name, rs in runs.items()}
    for name in result:
        result[name]["ratio_tokens_per_s"] = result[name]["tokens_per_s"] / result[PLAIN]["tokens_per_s"]
    same = sum(len({x["text"] for rs in runs.values() for x in rs if x["task"] == i}) == 1 for i in range(n_tasks))
    return {"rounds": rounds, "tasks": n_tasks, "max_tokens": max_tokens, "systems": result,
            "tasks_with_same_text": same, "runs": runs}  # fmt: skip


def summarize_lines(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over rounds of each round's totals: a task with few lines weighs in by its share."""
    per_round = []
    for r in sorted({x["round"] for x in runs}):
        rs = [x for x in runs if x["round"] == r]
        total, tokens, lines = (sum(x[k] for x in rs) for k in ("total", "tokens", "lines"))
        decode = sum(x["total"] - x["ttft"] for x in rs)
        per_round.append({"tokens_per_s": tokens / total, "decode_tokens_per_s": (tokens - len(rs)) / decode,
                          "s_per_line": total / max(1, lines), "tokens_per_line": tokens / max(1, lines),
                          "lines": lines, "tokens": tokens})  # fmt: skip
    out = {k: statistics.median(p[k] for p in per_round) for k in per_round[0]}
    out["ttft_ms"] = statistics.median(x["ttft"] for x in runs) * 1000
    return out


def long_chat() -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ask, obj in EARLIER_TURNS:
        messages += [{"role": "user", "content": ask},
                     {"role": "assistant", "content": f"```python\n{inspect.getsource(obj)}```"}]  # fmt: skip
    return [*messages, {"role": "user", "content": "Write a function that wraps text to a given width."}]


def bench_second_turn(node: CoderNode, plain: PlainChat, rounds: int) -> dict[str, Any]:
    """Each case sends the long chat, then at once the next turn with the first answer in its history."""
    cases: list[tuple[str, Any, dict[str, Any], bool]] = [  # name, system, second turn's options, LlamaRAMCache
        ("dragon node, prompt cache", node, {}, False),
        ("dragon node, cache_prompt false", node, {"cache_prompt": False}, False),
        ("llama-cpp-python, default (KV prefix of the last prompt)", plain, {}, False),
        ("llama-cpp-python, reset (no reuse)", plain, {"cache_prompt": False}, False),
        ("llama-cpp-python, reset + LlamaRAMCache", plain, {"cache_prompt": False}, True),
    ]
    history = long_chat()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in cases}
    for r in range(rounds):
        for name, system, options, ram_cache in cases if r % 2 == 0 else cases[::-1]:
            settle(system)
            if ram_cache:
                plain.ram_cache(True)
            first = system.chat(history, FIRST_TURN_TOKENS)
            answered = {"role": "assistant", "content": first.text}
            follow = [*history, answered, {"role": "user", "content": NEXT_TURN}]
            a = system.chat(follow, SECOND_TURN_TOKENS, **options)
            if ram_cache:
                plain.ram_cache(False)
            details = a.usage.get("prompt_tokens_details") or {}
            runs[name].append({"round": r, "ttft": a.ttft, "prompt_tokens": a.usage.get("prompt_tokens"),
                               "cached_tokens": details.get("cached_tokens"), "text": a.text,
                               **governor(system)})  # fmt: skip
            print(f"  round {r + 1}/{rounds} {name}: first token after {a.ttft * 1000:.0f} ms", flush=True)
    result: dict[str, Any] = {}
    for name, rs in runs.items():
        known = [x["cached_tokens"] for x in rs if x["cached_tokens"] is not None]
        result[name] = {"ttft_ms": statistics.median(x["ttft"] for x in rs) * 1000,
                        "prompt_tokens": rs[0]["prompt_tokens"],
                        "cached_tokens": statistics.median(known) if known else None}  # fmt: skip
    for name in result:  # each system's speed-up over itself without reuse
        base = "dragon node, cache_prompt false" if name.startswith("dragon") else "llama-cpp-python, reset (no reuse)"
        result[name]["speedup"] = result[base]["ttft_ms"] / result[name]["ttft_ms"]
    return {"rounds": rounds, "first_turn_tokens": FIRST_TURN_TOKENS, "cases": result, "runs": runs}


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def cap_description(mechanism: str, share: float, threads: int) -> str:
    """What holding a process tree to `share` with `mechanism` means on this machine."""
    if mechanism.startswith("cgroup"):
        return f"{mechanism} CPU quota, {cfs_quota_us(share, N_CPUS, PERIOD_US)} µs per {PERIOD_US} µs"
    if mechanism == "none":
        return "nothing"
    return f"{mechanism}, {threads} of {N_CPUS} cores, runs {duty_cycle(share, N_CPUS, threads):.0%} of the time"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    ln, st, setup = results["lines"], results["second_turn"], results["setup"]
    node, plain = ln["systems"]["dragon node"], ln["systems"][PLAIN]
    ratio = node["tokens_per_s"] / plain["tokens_per_s"]
    speedup = st["cases"]["dragon node, prompt cache"]["speedup"]
    prompt_tokens = st["cases"]["dragon node, prompt cache"]["prompt_tokens"]
    low = min(x["share_after"] for x in ln["runs"]["dragon node"])  # below 0.80: the node yielded to others
    yielded = "." if low >= setup["share"] else " — other programs on the machine made the node yield: rerun."
    out = [
        "# Code benchmark results",
        "",
        f"Machine: {results['machine']}. Model: {results['model']}. Command: `{results['command']}`.",
        "",
        "## Systems",
        "",
        "| system | process | share of the machine | held by | threads |",
        "|---|---|---|---|---|",
    ]
    for name, s in setup["systems"].items():
        share = "whole machine" if s["share"] is None else f"{s['share']:.2f}"
        out.append(f"| {name} | {s['process']} | {share} | {s['held_by']} | {s['threads']} |")
    out += [
        "",
        f"The references are held to the node's share with the project's own CPU cap "
        f"(`dragonswarm.governor.caps`, {setup['bench_mechanism']}), the mechanism the node's governor uses "
        f"({setup['node_mechanism']})"
        + ("" if setup["bench_mechanism"] == setup["node_mechanism"] else " — **not the same mechanism**")
        + ". The node's cap also holds the node process itself (HTTP, governor); the references' holds only "
        "them. llama-cpp-python and llama_cpp.server share one group, which is fair: they never run at once. "
        "Threads: the node's at share 0.80 on an idle machine, as its governor computes them (`threads_for`).",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| node tokens/s ≥ 0.97 × llama-cpp-python's at the same share ({setup['share']:.2f}) | {ratio:.3f}× "
        f"| {verdict(ratio >= 0.97)} |",
        f"| node ≤ 0.40 s per line of code | {node['s_per_line']:.3f} s | {verdict(node['s_per_line'] <= 0.40)} |",
        f"| node second turn with its prompt cache ≥ 5× faster to first token | {speedup:.1f}× "
        f"| {verdict(speedup >= 5)} |",
        "",
        f"Lowest share in force after a node run: {low:.2f}{yielded}",
        "",
        f"## Seconds per line of code over chat (rounds: {ln['rounds']}, tasks: {ln['tasks']}, "
        f"max {ln['max_tokens']} tokens, temperature 0, streamed)",
        "",
        f"| system | tokens/s | decode tokens/s | time to first token | s/line | tokens/line | lines | "
        f"ratio to {PLAIN} at {setup['share']:.2f} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in ln["systems"].items():
        out.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['ttft_ms']:.0f} ms "
                   f"| {r['s_per_line']:.3f} | {r['tokens_per_line']:.1f} | {r['lines']:.0f} "
                   f"| {r['ratio_tokens_per_s']:.3f} |")  # fmt: skip
    out += [
        "",
        f"Each task asks for code only (“{CODE_ONLY}”), as an IDE's generate-code command does. "
        "Tokens: each answer's text tokenized again with the model's tokenizer, one count for all systems. "
        "Lines: those between ``` fences, blank ones included (without a fence, the non-empty lines). Each "
        "round's total time is divided by its total tokens and lines; the table shows medians over rounds "
        f"(time to first token: over all answers). {ln['tasks_with_same_text']} of {ln['tasks']} tasks got "
        "the same text from every system in every round. Clients used their defaults, so each system "
        "reused the KV cache of the prefix shared with its previous prompt: the tasks differ, so that is "
        f"only the chat template's opening tokens, the same for all. {UNCAPPED}: context only, "
        f"first round only.",
        "",
        f"## Second-turn latency (rounds: {st['rounds']}, order flipped each round; "
        f"a chat of {prompt_tokens} prompt tokens)",
        "",
        "| case | time to first token | cached tokens | speed-up |",
        "|---|---|---|---|",
    ]
    for name, r in st["cases"].items():
        cached = "—" if r["cached_tokens"] is None else f"{r['cached_tokens']:.0f}"
        out.append(f"| {name} | {r['ttft_ms']:.0f} ms | {cached} | {r['speedup']:.1f}× |")
    out += [
        "",
        "The history is a system prompt and four earlier turns whose answers are standard-library "
        f"functions' source (deterministic for Python {platform.python_version()}); each case sends it, "
        f"gets a {st['first_turn_tokens']}-token answer, then sends the next turn with that answer in "
        "the history. Speed-up: against the same system without reuse. llama-cpp-python is the child "
        f"process at share {setup['share']:.2f}; it reuses the KV prefix of its previous prompt by default; "
        "`reset` turns that off (its `cache_prompt: false`), and with LlamaRAMCache the state comes back "
        "from the RAM cache after the reset.",
    ]
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=len(TASKS), choices=range(1, len(TASKS) + 1), metavar="N")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "code")
    args = parser.parse_args(argv)

    model = bundled_coder(Path.home() / ".dragonswarm" / "models").path  # reused across runs: no rebuild
    version = importlib.metadata.version("llama_cpp_python")
    results: dict[str, Any] = {
        "machine": f"{N_CPUS} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "model": f"{CODER_MODEL_NAME} (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), llama-cpp-python {version}",
        "command": "python -m bench.code_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="dragon-code-bench-") as home, contextlib.ExitStack() as stack:
        node = CoderNode(Path(home), model)
        stack.callback(node.close)
        gov = node.status()["governor"]
        share = gov["local_share"]
        # The node's threads at its share on an idle machine, as its governor computes them; its
        # live value drops while other programs load the machine, and the references get this one.
        threads = threads_for(share, gov["cpus"])
        cap = open_share_cap()
        stack.callback(cap.close)  # registered before the references: closed after they exit
        plain = PlainChat(model, threads)
        stack.callback(plain.close)
        server = ChatServer(model, N_CTX, threads)
        stack.callback(server.close)
        for proc in (plain.proc, server.proc):
            cap.attach(proc.pid, runner=True)
        cap.set_share(share, threads)
        uncapped = PlainChat(model, N_CPUS, UNCAPPED, rounds=1)
        stack.callback(uncapped.close)
        held = f"this bench: {cap_description(cap.name, share, threads)}"
        results["setup"] = {
            "share": share, "threads": threads, "node_mechanism": gov["mechanism"], "bench_mechanism": cap.name,
            "governor_at_start": gov,
            "systems": {
                node.name: {"process": "`dragon node --local-share 0.8`, its runner a child", "share": share,
                            "held_by": f"its governor: {cap_description(gov['mechanism'], share, threads)}",
                            "threads": threads},
                PLAIN: {"process": "a child calling the library (bench/plain_chat_worker.py)", "share": share,
                        "held_by": held, "threads": threads},
                server.name: {"process": "`python -m llama_cpp.server`", "share": share, "held_by": held,
                              "threads": threads},
                UNCAPPED: {"process": "another such child", "share": None, "held_by": "nothing (first round only)",
                           "threads": N_CPUS},
            },
        }  # fmt: skip
        print("lines...", flush=True)
        systems = [node, plain, server, uncapped]
        results["lines"] = bench_lines(systems, plain.count_tokens, args.rounds, args.tasks, args.max_tokens)
        uncapped.close()  # not needed any more: free its memory
        print("second turn...", flush=True)
        results["second_turn"] = bench_second_turn(node, plain, args.rounds)
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
