"""What holding the output to a JSON grammar costs: the runner's tokens/s for one chat
request with and without `response_format` (json_object), alternating, on the bundled
code model, in one process with the runner's own generation loop.

    .venv/bin/python -m bench.grammar_bench            # writes bench/results/grammar.{json,md}
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from bench.node_bench import N_CPUS, RESULTS
from dragonswarm.engines.models import bundled_coder
from dragonswarm.engines.runner_main import Runner
from dragonswarm.protocol.runner import Generation

ASK = [{"role": "user", "content": "List 40 programming languages with the year each was created, "
                                   "as a JSON object mapping the name to the year."}]  # fmt: skip


def tokens_per_s(runner: Runner, out: io.BytesIO, json_mode: bool, max_tokens: int) -> float:
    out.seek(0)
    out.truncate()
    gen = Generation(messages=ASK, max_tokens=max_tokens, temperature=0, cache_prompt=False,
                     json_schema={"type": "object"} if json_mode else None)  # fmt: skip
    start = time.perf_counter()
    runner.run("bench", gen)
    elapsed = time.perf_counter() - start
    done = orjson.loads(out.getvalue().splitlines()[-1])
    return float(done["completion_tokens"]) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args(argv)
    model = bundled_coder(Path.home() / ".dragonswarm" / "models").path
    out = io.BytesIO()
    runner = Runner(out, str(model), 4096, N_CPUS)
    runs: dict[str, list[float]] = {"plain text": [], "json_object": []}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(tokens_per_s(runner, out, name == "json_object", args.max_tokens))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    result: dict[str, Any] = {"machine": f"{N_CPUS} CPUs, {platform.platform()}", "model": model.name,
                              "rounds": args.rounds, "max_tokens": args.max_tokens, "threads": N_CPUS,
                              "runs": runs, "median_tokens_per_s": medians,
                              "ratio": medians["json_object"] / medians["plain text"]}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grammar.json").write_text(json.dumps(result, indent=2))
    lines = ["# Grammar benchmark results", "",
             f"Machine: {result['machine']}. Model: {model.name}, {N_CPUS} threads, whole machine, in-process "
             f"runner, temperature 0, {args.max_tokens} tokens, {args.rounds} alternating rounds. Command: "
             "`python -m bench.grammar_bench`.", "",
             "| output | tokens/s (median) |", "|---|---|",
             *(f"| {name} | {value:.1f} |" for name, value in medians.items()), "",
             f"JSON held by the grammar runs at **{result['ratio']:.2f}×** the speed of plain text."]  # fmt: skip
    (RESULTS / "grammar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
