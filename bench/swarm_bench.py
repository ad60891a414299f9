"""Swarm benchmarks on real processes, each side by side with its reference, measured in the same run.

    .venv/bin/python -m bench.swarm_bench [--quick]     # writes bench/results/swarm.{json,md}

1. Hop overhead (Gemma 3 270M): one node at --share 0.8 --local-share 0.8, asked directly
   on its local API and through the orchestrator (which places the request on that same
   node), alternately: tokens/s and time to first token.
2. Fan-out (tiny model): a 4-prompt /v1/completions request through the orchestrator to a
   swarm of 1 worker and to a swarm of 4 workers, every worker at --share 0.25,
   alternately: wall time and completion tokens per CPU-second of the nodes.
3. Many clients (tiny model): `dragon up --workers 3` and N concurrent streaming clients
   (200; --quick: 50): errors and time to first token, beside one client alone; with the
   defaults, and again with owner detection off (see CLIENT_SWARMS).

Every part starts its own processes on free loopback ports in a temp dir and stops them,
also on failure. On one machine all of them share its cores with the benchmark itself,
and with whatever else runs there: every timed run waits for a quiet machine, and a run
during which other programs took more than OTHER_MAX of it is repeated (see `measured`).
Part 3 sends 2 bursts of 200 from one key by default: within the orchestrator's default
per-key limit of 600 requests a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from bench.outputs import save, scratch
from bench.swarm_procs import (
    CpuWatch,
    Processes,
    quiet_machine,
    start_node,
    start_orchestrator,
    start_up,
    tree_cpu,
    wait_until,
)
from bench.swarm_report import write_markdown
from dragonswarm.devtools.tiny_model import write_tiny_model
from dragonswarm.engines.models import bundled_gemma

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
N_CPUS = psutil.cpu_count() or 1
GEMMA = "gemma3-270m"
TINY = "tiny"
CODE_PROMPT = "def quicksort(arr):\n"
FANOUT_PROMPTS = ["def quicksort(arr):\n", "class LRUCache:\n", "def parse_csv(path):\n", "async def fetch(url):\n"]
HOP_TARGETS = {"ratio": 0.95, "added_ttft_ms": 10.0}
T = TypeVar("T")


@dataclass
class Streamed:
    """One streamed request as an OpenAI client sees it."""

    status: int
    nodes_header: str | None
    ttft: float  # request sent -> first text
    total: float  # request sent -> last text
    first_to_last: float  # first text -> last text
    tokens: int  # completion tokens, from the usage chunk
    text: str
    route: dict[str, Any] | None  # the `dragon` object
    error: str | None

    @property
    def tokens_per_s(self) -> float:
        """Over the whole request, waiting for the first token included."""
        return self.tokens / self.total if self.total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """From the first token to the last: N tokens are N - 1 intervals."""
        return (self.tokens - 1) / self.first_to_last if self.first_to_last > 0 else 0.0


def stream_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    # `cache: false`: every round is computed, not answered by the orchestrator's response cache.
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache": False}  # fmt: skip


class StreamParser:
    """Reads SSE lines of a completion stream, timing text as it arrives."""

    def __init__(self, start: float):
        self.start = start
        self.first = self.last = 0.0
        self.pieces: list[str] = []
        self.tokens = 0
        self.route: dict[str, Any] | None = None
        self.error: str | None = None

    def line(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            self.error = str(chunk["error"].get("message", chunk["error"]))
            return
        for choice in chunk.get("choices") or []:
            if choice.get("text"):
                self.last = time.perf_counter()
                self.first = self.first or self.last
                self.pieces.append(choice["text"])
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]
        if "dragon" in chunk:
            self.route = chunk["dragon"]

    def result(self, status: int, nodes_header: str | None, error: str | None = None) -> Streamed:
        error = error or self.error
        if status == 200 and not error and not self.first:
            error = "no text in the stream"
        first = self.first or self.start
        return Streamed(status, nodes_header, first - self.start, (self.last or first) - self.start,
                        (self.last or first) - first, self.tokens, "".join(self.pieces), self.route, error)  # fmt: skip


def stream_once(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> Streamed:
    parser = StreamParser(time.perf_counter())
    with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            return parser.result(response.status_code, None, response.text[:200])
        for line in response.iter_lines():
            parser.line(line)
    return parser.result(response.status_code, response.headers.get("x-dragon-nodes"))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


OTHER_MAX = 0.10  # the share of the machine a node itself treats as background noise
TRIES = 3


def measured(run: Callable[[], T], settle: Callable[[], bool]) -> tuple[T, dict[str, Any]]:
    """One timed run on a quiet machine, with the nodes settled.

    The machine is shared with other programs; a run during which they took more than
    OTHER_MAX of it is thrown away and repeated (TRIES in all; the last one is kept anyway).
    """
    for attempt in range(1, TRIES + 1):
        quiet_machine()
        settled = settle()
        watch = CpuWatch()
        result = run()
        other = watch.other_fraction()
        if other <= OTHER_MAX or attempt == TRIES:
            return result, {"settled": settled, "other_cpu": other, "attempts": attempt}
    raise AssertionError("unreachable")


def summarize_conditions(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """How quiet the machine was: other programs' CPU during the kept runs, repeats, unsettled starts."""
    other = [c["other_cpu"] for c in conditions]
    return {"other_cpu_median": median(other), "other_cpu_max": max(other, default=float("nan")),
            "other_max": OTHER_MAX, "repeated": sum(c.get("attempts", 1) - 1 for c in conditions),
            "unsettled_runs": sum(1 for c in conditions if not c["settled"]), "runs": conditions}  # fmt: skip


# 1. Hop overhead


def bench_hop(root: Path, gemma: Path, rounds: int, max_tokens: int, insecure: bool = False) -> dict[str, Any]:
    """Direct to the node vs through the orchestrator; `insecure`: the orchestrator on plain http."""
    name = "hop-node"
    with Processes(root / ("hop-plain" if insecure else "hop")) as procs:
        orch = start_orchestrator(procs, "orchestrator", *(["--insecure"] if insecure else []))
        node = start_node(procs, orch, name, f"{GEMMA}={gemma}", share=0.8, local_share=0.8)
        orch.wait_live([name], procs)
        wait_until(lambda: node.status()["swarm"]["connected"], 30, "the node's swarm link")
        paths = {
            "direct": (node.base + "/v1/completions", {}),
            "via orchestrator": (orch.api + "/completions", orch.auth("user")),
        }
        runs: dict[str, list[Streamed]] = {p: [] for p in paths}
        served: dict[str, list[int]] = {p: [] for p in paths}  # fragments the orchestrator placed, per run
        conditions: list[dict[str, Any]] = []
        with httpx.Client(timeout=600, verify=orch.verify) as client:

            def once(path: str) -> tuple[Streamed, int]:
                url, headers = paths[path]
                before = orch.nodes()[name].get("served", 0)
                run = stream_once(client, url, stream_body(GEMMA, CODE_PROMPT, max_tokens), headers)
                return run, orch.nodes()[name].get("served", 0) - before

            def settle() -> bool:
                return node.settle() and orch.wait_idle([name])

            for url, headers in paths.values():  # untimed: load the model, warm caches
                stream_once(client, url, stream_body(GEMMA, CODE_PROMPT, 8), headers)
            for r in range(rounds):
                order = list(paths) if r % 2 == 0 else list(paths)[::-1]  # alternate to cancel drift
                for path in order:
                    (run, placed), cond = measured(lambda p=path: once(p), settle)  # type: ignore[misc]
                    if run.error:
                        raise RuntimeError(f"{path}: HTTP {run.status}: {run.error}")
                    runs[path].append(run)
                    served[path].append(placed)
                    conditions.append(cond | {"path": path})
                    print(f"  round {r + 1}/{rounds} {path}: {run.decode_tokens_per_s:.1f} tok/s decode, "
                          f"TTFT {run.ttft * 1000:.0f} ms, {run.tokens} tokens, X-Dragon-Nodes {run.nodes_header}, "
                          f"other CPU {cond['other_cpu']:.0%}, try {cond['attempts']}", flush=True)  # fmt: skip
        gov = node.status()["governor"]
        tls = orch.tls
    systems = {p: summarize_hop(rs) for p, rs in runs.items()}
    direct, via = systems["direct"], systems["via orchestrator"]
    ratio = via["decode_tokens_per_s"] / direct["decode_tokens_per_s"]
    added = via["ttft_ms"] - direct["ttft_ms"]
    paired = [(v.ttft - d.ttft) * 1000 for d, v in zip(runs["direct"], runs["via orchestrator"], strict=True)]
    texts = {p: rs[0].text for p, rs in runs.items()}
    checks = {
        "direct: X-Dragon-Nodes is the node's own name": all(r.nodes_header == name for r in runs["direct"]),
        "direct: ran locally (the orchestrator placed nothing)": all(n == 0 for n in served["direct"]),
        "via: X-Dragon-Nodes names the node": all(r.nodes_header == name for r in runs["via orchestrator"]),
        "via: the `dragon` object names the node": all(
            (r.route or {}).get("nodes") == [name] for r in runs["via orchestrator"]),
        "via: the orchestrator placed one fragment": all(n == 1 for n in served["via orchestrator"]),
        "same text on both paths": len(set(texts.values())) == 1,
    }  # fmt: skip
    return {
        "rounds": rounds, "max_tokens": max_tokens, "share": 0.8, "local_share": 0.8, "node": name, "tls": tls,
        "model": GEMMA, "prompt": CODE_PROMPT, "targets": HOP_TARGETS,
        "threads": gov["threads"], "mechanism": gov["mechanism"], "systems": systems,
        "ratio_decode_tokens_per_s": ratio,
        "ratio_tokens_per_s": via["tokens_per_s"] / direct["tokens_per_s"],
        "added_ttft_ms": added, "added_ttft_ms_paired_median": median(paired),
        "pass_ratio": ratio >= HOP_TARGETS["ratio"], "pass_added_ttft": added <= HOP_TARGETS["added_ttft_ms"],
        "checks": checks, "texts": texts, "conditions": summarize_conditions(conditions),
        "runs": {p: [asdict(r) | {"text": None} for r in rs] for p, rs in runs.items()},
    }  # fmt: skip


def summarize_hop(runs: list[Streamed]) -> dict[str, float]:
    decode, ttft = [r.decode_tokens_per_s for r in runs], [r.ttft * 1000 for r in runs]
    return {
        "decode_tokens_per_s": median(decode), "decode_min": min(decode), "decode_max": max(decode),
        "tokens_per_s": median([r.tokens_per_s for r in runs]),
        "ttft_ms": median(ttft), "ttft_min": min(ttft), "ttft_max": max(ttft),
        "tokens": median([r.tokens for r in runs]),
    }  # fmt: skip


# 2. Fan-out


def bench_fanout(root: Path, tiny: Path, rounds: int, max_tokens: int, sizes: tuple[int, ...] = (1, 4),
                 share: float = 0.25) -> dict[str, Any]:  # fmt: skip
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in sizes}
    with Processes(root / "fanout") as procs, contextlib.ExitStack() as stack:
        swarms = {}
        for k in sizes:  # both swarms stay up, so their rounds can alternate
            orch = start_orchestrator(procs, f"orchestrator-{k}")
            nodes = [start_node(procs, orch, f"s{k}-worker-{i}", f"{TINY}={tiny}", share=share, local_share=0.8)
                     for i in range(1, k + 1)]  # fmt: skip
            orch.wait_live([n.name for n in nodes], procs)
            swarms[k] = (orch, nodes)
        tls = orch.tls
        body = {"model": TINY, "prompt": FANOUT_PROMPTS, "max_tokens": max_tokens, "temperature": 0, "cache": False}
        # A client per swarm: each orchestrator has a private CA of its own.
        clients = {k: stack.enter_context(httpx.Client(timeout=600, verify=orch.verify))
                   for k, (orch, _) in swarms.items()}  # fmt: skip

        def once(k: int) -> dict[str, Any]:
            orch, nodes = swarms[k]
            pids, orch_pid = [n.pid for n in nodes], orch.started.proc.pid
            cpu0, orch0, t0 = tree_cpu(pids), tree_cpu([orch_pid]), time.perf_counter()
            response = clients[k].post(orch.api + "/completions", json=body, headers=orch.auth("user"))
            wall = time.perf_counter() - t0
            cpu, orch_cpu = tree_cpu(pids) - cpu0, tree_cpu([orch_pid]) - orch0
            if response.status_code != 200:
                raise RuntimeError(f"swarm of {k}: HTTP {response.status_code}: {response.text[:300]}")
            data = response.json()
            tokens = data["usage"]["completion_tokens"]
            route = data.get("dragon") or {}
            return {"wall_s": wall, "node_cpu_s": cpu, "orchestrator_cpu_s": orch_cpu, "tokens": tokens,
                    "tokens_per_cpu_s": tokens / cpu if cpu > 0 else float("nan"),
                    "nodes": route.get("nodes", []), "fragments": route.get("fragments"),
                    "choices": len(data["choices"])}  # fmt: skip

        def settle(k: int) -> bool:
            return swarms[k][0].wait_idle([n.name for n in swarms[k][1]])

        for k in sizes:  # untimed: load every worker's runner
            once(k)
        for r in range(rounds):
            order = list(sizes) if r % 2 == 0 else list(sizes)[::-1]
            for k in order:
                x, cond = measured(lambda k=k: once(k), lambda k=k: settle(k))  # type: ignore[misc]
                runs[k].append(x | cond)
                print(f"  round {r + 1}/{rounds} {k} worker(s): {x['wall_s']:.2f} s, {x['tokens']} tokens, "
                      f"{x['tokens_per_cpu_s']:.0f} tok/CPU-s on {len(set(x['nodes']))} node(s), "
                      f"other CPU {cond['other_cpu']:.0%}, try {cond['attempts']}", flush=True)  # fmt: skip
    out: dict[str, Any] = {"rounds": rounds, "max_tokens": max_tokens, "prompts": len(FANOUT_PROMPTS),
                           "share": share, "tls": tls, "swarms": {}}  # fmt: skip
    for k, rs in runs.items():
        distinct = [len(set(x["nodes"])) for x in rs]
        expected = min(k, len(FANOUT_PROMPTS))
        out["swarms"][str(k)] = {
            "workers": k,
            "wall_s": median([x["wall_s"] for x in rs]),
            "tokens": median([x["tokens"] for x in rs]),
            "node_cpu_s": median([x["node_cpu_s"] for x in rs]),
            "orchestrator_cpu_s": median([x["orchestrator_cpu_s"] for x in rs]),
            "tokens_per_cpu_s": median([x["tokens_per_cpu_s"] for x in rs]),
            "tokens_per_s": median([x["tokens"] / x["wall_s"] for x in rs]),
            "cpu_fraction": median([x["node_cpu_s"] / (x["wall_s"] * N_CPUS) for x in rs]),
            "distinct_nodes": distinct,
            "expected_nodes": expected,
            "pass_nodes": all(d == expected for d in distinct) and all(x["fragments"] == 4 for x in rs),
            "runs": rs,
        }
    one, many = out["swarms"][str(sizes[0])], out["swarms"][str(sizes[-1])]
    out["speedup"] = one["wall_s"] / many["wall_s"]
    out["ideal_speedup"] = min(sizes[-1], len(FANOUT_PROMPTS), 1 / share) / sizes[0]
    out["efficiency_ratio"] = many["tokens_per_cpu_s"] / one["tokens_per_cpu_s"]
    out["conditions"] = summarize_conditions([x for rs in runs.values() for x in rs])
    return out


# 3. Many clients

# `dragon up` counts only its own processes as the swarm's; on one machine the benchmark's
# clients are "the owner's programs" to its nodes. The second swarm turns owner detection
# off (inherited by its nodes through the environment) to show the orchestrator alone.
CLIENT_SWARMS = {"defaults": {}, "owner detection off": {"DRAGON_OWNER_NOISE": "1.0"}}


async def _client(client: httpx.AsyncClient, url: str, key: str, i: int, max_tokens: int,
                  go: asyncio.Event) -> Streamed:  # fmt: skip
    await go.wait()
    parser = StreamParser(time.perf_counter())
    body = stream_body(TINY, f"# client {i}\ndef f{i}(x):\n", max_tokens)
    try:
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status_code != 200:
                await response.aread()
                return parser.result(response.status_code, None, response.text[:200])
            async for line in response.aiter_lines():
                parser.line(line)
            return parser.result(200, response.headers.get("x-dragon-nodes"))
    except httpx.HTTPError as exc:
        return parser.result(0, None, f"{type(exc).__name__}: {exc}")


async def _burst(url: str, keys: list[str], clients: int, max_tokens: int,
                 verify: ssl.SSLContext | bool) -> tuple[list[Streamed], float]:  # fmt: skip
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=30), verify=verify) as client:
        go = asyncio.Event()
        tasks = [asyncio.create_task(_client(client, url, keys[i % len(keys)], i, max_tokens, go))
                 for i in range(clients)]  # fmt: skip
        await asyncio.sleep(0.1)  # every task waits at the start line
        t0 = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def bench_clients(root: Path, tiny: Path, clients: int, max_tokens: int, bursts: int, alone_runs: int = 5,
                  swarms: dict[str, dict[str, str]] | None = None,
                  distinct_keys: bool = False) -> dict[str, Any]:  # fmt: skip
    """Each swarm in turn, alone on the machine: a second `dragon up` idling beside it would be
    one more owner program to the first one's nodes. With `distinct_keys`, each client has a
    user key of its own (so the per-key limits are not what is measured)."""
    workers = 3
    out: dict[str, Any] = {"clients": clients, "bursts": bursts, "max_tokens": max_tokens, "workers": workers,
                           "nodes_in_swarm": workers + 1, "swarms": {}}  # fmt: skip
    conditions: list[dict[str, Any]] = []
    me = psutil.Process()
    for i, (label, env) in enumerate((swarms or CLIENT_SWARMS).items()):
        runs: list[Streamed] = []
        walls: list[float] = []
        swarm_cpu: list[float] = []
        client_cpu: list[float] = []
        alone: list[Streamed] = []
        with Processes(root / f"clients-{i}") as procs:
            up = start_up(procs, "up", workers, f"{TINY}={tiny}", env)
            url, auth = up.api_url + "/completions", {"Authorization": f"Bearer {up.api_key}"}
            # Warm every node's runner: four prompts go to four nodes.
            body = {"model": TINY, "prompt": FANOUT_PROMPTS, "max_tokens": 4, "temperature": 0, "cache": False}
            verify = up.orchestrator.verify
            keys = [up.api_key]
            if distinct_keys:
                from bench.replica_procs import create_keys

                keys = create_keys(None, procs.root / "up", clients)[1]
            httpx.post(url, json=body, headers=auth, timeout=120, verify=verify).raise_for_status()
            with httpx.Client(timeout=120, verify=verify) as client:
                for _ in range(alone_runs):  # the reference: one client with the swarm to itself
                    quiet_machine()
                    up.orchestrator.wait_idle(up.node_names)
                    alone.append(stream_once(client, url, stream_body(TINY, "def f(x):\n", max_tokens), auth))
            for b in range(bursts):
                quiet_machine()
                settled = up.orchestrator.wait_idle(up.node_names)
                watch = CpuWatch()
                cpu0, me0 = tree_cpu(list(up.pids.values())), sum(me.cpu_times()[:2])
                burst, wall = asyncio.run(_burst(url, keys, clients, max_tokens, verify))
                swarm_cpu.append(tree_cpu(list(up.pids.values())) - cpu0)
                client_cpu.append(sum(me.cpu_times()[:2]) - me0)
                conditions.append({"settled": settled, "other_cpu": watch.other_fraction(), "swarm": label})
                runs.extend(burst)
                walls.append(wall)
                bad = sum(1 for r in burst if r.status != 200 or r.error)
                print(
                    f"  {label}, burst {b + 1}/{bursts}: {clients} clients in {wall:.2f} s, {bad} errors, "
                    f"TTFT p50 {percentile([r.ttft * 1000 for r in burst], 50):.0f} ms",
                    flush=True,
                )
            procs.check_alive()
        out["swarms"][label] = summarize_burst(runs, walls, swarm_cpu, client_cpu, alone) | {"env": env}
        out["tls"] = up.orchestrator.tls
    out["conditions"] = summarize_conditions(conditions)
    out["pass_errors"] = all(s["errors"] == 0 for s in out["swarms"].values())
    return out


def summarize_burst(runs: list[Streamed], walls: list[float], swarm_cpu: list[float], client_cpu: list[float],
                    alone: list[Streamed]) -> dict[str, Any]:  # fmt: skip
    errors = [r for r in runs if r.status != 200 or r.error]
    ok = [r for r in runs if r not in errors]
    nodes: dict[str, int] = {}
    for r in ok:
        for n in (r.nodes_header or "?").split(","):
            nodes[n] = nodes.get(n, 0) + 1
    ttft, total = [r.ttft * 1000 for r in ok], [r.total * 1000 for r in ok]
    return {
        "requests": len(runs), "errors": len(errors), "pass_errors": not errors,
        "error_samples": sorted({f"{r.status}: {r.error}" for r in errors})[:5],
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "max": max(ttft, default=math.nan)},
        "total_ms": {"p50": percentile(total, 50), "p99": percentile(total, 99),
                     "max": max(total, default=math.nan)},
        "wall_s": median(walls), "walls_s": walls,
        "requests_per_min": len(ok) / max(sum(walls), 1e-9) * 60, "swarm_cpu_s": median(swarm_cpu),
        "swarm_cpu_ms_per_request": sum(swarm_cpu) / max(1, len(runs)) * 1000, "client_cpu_s": median(client_cpu),
        "tokens": sum(r.tokens for r in ok), "requests_by_node": dict(sorted(nodes.items())),
        "alone": {"runs": len(alone), "ttft_ms": median([r.ttft * 1000 for r in alone]),
                  "total_ms": median([r.total * 1000 for r in alone]),
                  "errors": sum(1 for r in alone if r.status != 200 or r.error)},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and 50 clients: a smoke run")
    parser.add_argument("--hop-rounds", type=int, help="rounds per path in part 1 (default 7; --quick 2)")
    parser.add_argument("--fanout-rounds", type=int, help="rounds per swarm in part 2 (default 5; --quick 2)")
    parser.add_argument(
        "--fanout-tokens",
        type=int,
        default=2048,
        help="max_tokens per prompt in part 2 (long enough for CPU accounting and cgroup periods)",
    )
    parser.add_argument("--clients", type=int, help="concurrent clients in part 3 (default 200; --quick 50)")
    parser.add_argument("--bursts", type=int, help="bursts per swarm in part 3 (default 2; --quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "swarm")
    args = parser.parse_args(argv)
    hop_rounds = args.hop_rounds or (2 if args.quick else 7)  # TTFT jitters by ±10 ms: more than 5
    fanout_rounds = args.fanout_rounds or (2 if args.quick else 5)
    clients = args.clients or (50 if args.quick else 200)
    bursts = args.bursts or (1 if args.quick else 2)

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dragon-swarm-bench-"))
    with scratch(root):
        gemma = bundled_gemma(root / "models").path
        tiny = write_tiny_model(root / "models" / "tiny.gguf")
        results: dict[str, Any] = {
            "machine": f"{N_CPUS} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}, "
                       f"Python {platform.python_version()}",
            "cpus": N_CPUS,
            "other_max": OTHER_MAX,
            "command": " ".join(["python -m bench.swarm_bench", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }  # fmt: skip
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("hop", lambda: bench_hop(root, gemma, hop_rounds, 128)),
            ("hop_plain", lambda: bench_hop(root, gemma, hop_rounds, 128, insecure=True)),
            ("fanout", lambda: bench_fanout(root, tiny, fanout_rounds, args.fanout_tokens)),
            ("clients", lambda: bench_clients(root, tiny, clients, 16, bursts)),
        ]
        for name, step in steps:
            print(f"{name}...", flush=True)
            t0 = time.monotonic()
            results[name] = step() | {"elapsed_s": time.monotonic() - t0}
        results["elapsed_s"] = time.monotonic() - started
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
