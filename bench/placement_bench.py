"""Placement decision time over 10,000 simulated nodes: the index side by side with the reference single pass.

    .venv/bin/python -m bench.placement_bench       # writes bench/results/placement.{json,md}

Pure Python, no processes: every number is the cost of the decision alone, as the orchestrator's loop pays it.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.outputs import save
from dragonswarm.scheduler.placement import NodeState, PlacementIndex, choose, rank

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODELS = ("gemma3-270m", "qwen2.5-coder-1.5b", "llama3.2-3b", "phi3-mini")
TARGET_US = 1000.0  # ≤ 1 ms per decision


def make_node(rng: random.Random, name: str) -> NodeState:
    models = frozenset(rng.sample(MODELS, rng.randint(1, len(MODELS))))
    capacity = rng.randint(1, 8)
    return NodeState(name=name, models=models, loaded=frozenset(m for m in models if rng.random() < 0.5),
                     capacity=capacity, assigned=rng.randint(0, capacity), owner_busy=rng.random() < 0.2,
                     load=rng.random(), live=rng.random() < 0.97)  # fmt: skip


def churn(rng: random.Random, node: NodeState) -> NodeState:
    """A heartbeat's worth of change: load moves, a fragment starts or ends, the owner comes or goes."""
    return replace(node, load=rng.random(), assigned=max(0, min(node.capacity, node.assigned + rng.choice((-1, 1)))),
                   owner_busy=rng.random() < 0.2)  # fmt: skip


def timed(fn: Callable[[Any], object], iterations: int, prepare: Callable[[], Any] = lambda: None) -> dict[str, float]:
    """Time fn(prepare()) alone: building the input (a new node state, the next model) stays off the clock."""
    samples = []
    for _ in range(iterations):
        arg = prepare()
        start = time.perf_counter_ns()
        fn(arg)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return {"median_us": statistics.median(samples) / 1000, "p99_us": samples[int(len(samples) * 0.99)] / 1000,
            "max_us": samples[-1] / 1000, "iterations": iterations}  # fmt: skip


def run(n_nodes: int, iterations: int, reference_iterations: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    nodes = {f"node-{i:05d}": make_node(rng, f"node-{i:05d}") for i in range(n_nodes)}
    index = PlacementIndex()
    for n in nodes.values():
        index.update(n)
    names = list(nodes)
    placed: deque[str] = deque()

    def next_model() -> str:
        return rng.choice(MODELS)

    # A request's fragments go to distinct nodes: exclude the best ones, so the walk has to pass them by.
    excluded = {m: set(_best(nodes.values(), m, 32)) for m in MODELS}

    def heartbeat() -> NodeState:
        name = names[rng.randrange(n_nodes)]
        nodes[name] = churn(rng, nodes[name])
        return nodes[name]

    def place_one(model: str) -> None:
        # The orchestrator's whole step: choose, then file the node with one more fragment on it.
        name = index.choose(model)
        if name is not None:
            nodes[name] = replace(nodes[name], assigned=nodes[name].assigned + 1)
            index.update(nodes[name])
            placed.append(name)

    def finish_one() -> str:
        # Untimed: a fragment placed earlier finishes, so the pool's free capacity stays steady.
        if len(placed) > 1000:
            name = placed.popleft()
            nodes[name] = replace(nodes[name], assigned=max(0, nodes[name].assigned - 1))
            index.update(nodes[name])
        return next_model()

    rows: dict[str, dict[str, float]] = {}
    cases: list[tuple[str, Callable[[Any], object], int, Callable[[], Any]]] = [
        ("PlacementIndex.choose", index.choose, iterations, next_model),
        ("PlacementIndex.choose, 32 best excluded", lambda m: index.choose(m, excluded[m]), iterations, next_model),
        ("PlacementIndex.update (heartbeat churn)", index.update, iterations, heartbeat),
        ("place one fragment (choose + update)", place_one, iterations, finish_one),
        ("reference choose (single pass)", lambda m: choose(m, nodes.values()), reference_iterations, next_model),
    ]
    for label, fn, count, prepare in cases:
        gc.collect()  # start each row clean; collections during a row stay in, as the orchestrator pays them too
        rows[label] = timed(fn, count, prepare)
        print(f"  {label}: median {rows[label]['median_us']:.2f} µs, p99 {rows[label]['p99_us']:.2f} µs", flush=True)
    return {"nodes": n_nodes, "models": list(MODELS), "seed": seed, "rows": rows,
            "agreement": agreement(index, nodes)}  # fmt: skip


def _best(nodes: Any, model: str, k: int) -> list[str]:
    ranked = sorted((key, n.name) for n in nodes if (key := rank(n, model)) is not None)
    return [name for _, name in ranked[:k]]


def agreement(index: PlacementIndex, nodes: dict[str, NodeState]) -> dict[str, Any]:
    """After all the churn, the index still picks a node of the best rank, model by model."""
    same = {}
    for model in MODELS:
        got, expected = index.choose(model), choose(model, nodes.values())
        got_rank = None if got is None else rank(nodes[got], model)
        same[model] = got_rank == (None if expected is None else rank(nodes[expected], model))
    return {"all_best_rank": all(same.values()), "per_model": same}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [
        "# Placement benchmark results",
        "",
        f"Machine: {results['machine']}. Python {results['python']}. Command: `{results['command']}`.",
        "",
        f"{results['nodes']:,} simulated nodes, {len(results['models'])} models, seed {results['seed']}. "
        f"Target: ≤ 1 ms per decision (p99). Index agrees with the reference on the best rank after the churn: "
        f"{results['agreement']['all_best_rank']}.",
        "",
        "| operation | median | p99 | max | iterations | ≤ 1 ms (p99) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results["rows"].items():
        verdict = "pass" if r["p99_us"] <= TARGET_US else "fail"
        lines.append(f"| {label} | {r['median_us']:.2f} µs | {r['p99_us']:.2f} µs | {r['max_us']:.1f} µs "
                     f"| {r['iterations']:,} | {verdict} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=50_000)
    parser.add_argument("--reference-iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "placement")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "command": "python -m bench.placement_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results.update(run(args.nodes, args.iterations, args.reference_iterations, args.seed))
    decision = results["rows"]["PlacementIndex.choose"]
    results["target_us"] = TARGET_US
    results["pass"] = decision["p99_us"] <= TARGET_US and results["agreement"]["all_best_rank"]
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
