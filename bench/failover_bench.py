"""Failover time (issue 10): from a worker's runner freezing to the next token from another worker.

    .venv/bin/python -m bench.failover_bench [--runs 10] [--stall 30 5]   # writes bench/results/failover.{json,md}

Per stall timeout: one orchestrator (TLS, keys) with `--stall-timeout S`, two nodes serving the
bundled Gemma 3 270M at the same share, `--cap-mechanism none` (a duty cycle would SIGCONT the
frozen runner), DRAGON_OWNER_NOISE=1.0 (owner detection off: other programs share this machine) and a node stall
timeout of 600 s, so the orchestrator's detection is what is measured. Each run streams a
completion through the orchestrator and, at its FREEZE_AT-th token, SIGSTOPs the serving node's
runner only: the node keeps heartbeating. The failover time runs from that SIGSTOP to the first
text after the silence that follows (tokens already on their way arrive within milliseconds;
they are counted as `in_flight`), split by the orchestrator's debug log into detection, waiting
for a worker to place it on, and that worker's first token. The reference, from the same run:
S itself, and the inter-token gap of the streams before the freeze. Between runs the frozen
runner is left to the node, which kills a runner that ignores a cancel, and the next run waits
for that and reloads the model. Every text must equal the unfrozen run's, end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.outputs import save, scratch
from bench.swarm_bench import CODE_PROMPT, GEMMA, RESULTS, median, stream_body
from bench.swarm_procs import Node, Orchestrator, Processes, start_node, start_orchestrator, wait_until
from dragonswarm.engines.models import bundled_gemma

FREEZE_AT = 16  # text events before the SIGSTOP
MAX_TOKENS = 128  # the bundled Gemma writes 128 tokens for CODE_PROMPT without stopping
SHARE = 0.5  # each node: one llama.cpp thread of the two cores
SILENCE_S = 1.0  # a gap this long after the SIGSTOP is the failover (tokens come every ~50 ms)
NODE_STALL_S = 600
TARGET_EXTRA_S = 2.0
PARTS = ("detected_s", "placed_s", "token_s")  # SIGSTOP -> moved off -> placed on a worker -> its first token


def stream(client: httpx.Client, orch: Orchestrator, nodes: dict[str, Node], freeze: bool) -> dict[str, Any]:
    """One streamed completion; with `freeze`, the serving runner is stopped at the FREEZE_AT-th token."""
    body = stream_body(GEMMA, CODE_PROMPT, MAX_TOKENS) | {"cache_prompt": False}
    t0 = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    out: dict[str, Any] = {"error": None, "tokens": 0, "route": None, "pid": None, "t_freeze": None}
    with client.stream("POST", orch.api + "/completions", json=body, headers=orch.auth("user")) as response:
        if response.status_code != 200:
            return out | {"error": f"HTTP {response.status_code}: {response.read()[:200]!r}"}
        out["node"] = response.headers["x-dragon-nodes"].split(",")[0]
        if freeze:
            model = nodes[out["node"]].status()["models"][0]
            out["pid"], out["busy"] = model["runner_pid"], model["busy"]
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = str(chunk["error"])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    times.append(time.perf_counter())
                    pieces.append(choice["text"])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            out["route"] = chunk.get("dragon", out["route"])
            if freeze and out["t_freeze"] is None and len(times) == FREEZE_AT:
                os.kill(out["pid"], signal.SIGSTOP)
                out["t_freeze"], out["wall_freeze"] = time.perf_counter(), time.time()
    gaps = [b - a for a, b in itertools.pairwise(times[:FREEZE_AT])]
    out |= {"text": "".join(pieces), "ttft_s": times[0] - t0 if times else None, "gap_s": median(gaps)}
    if out["t_freeze"] is not None:
        after = [i for i in range(FREEZE_AT, len(times)) if times[i] > out["t_freeze"]]
        first = next((i for i in after if times[i] - times[i - 1] > SILENCE_S), None)
        out["in_flight"] = len(after) if first is None else first - after[0]
        out["failover_s"] = times[first] - out["t_freeze"] if first is not None else None
        out["splice_char"] = len("".join(pieces[:first])) if first is not None else None
    return out


def diverges(text: str, reference: str) -> int | None:
    """The first character where `text` leaves `reference`; None if they are the same."""
    if text == reference:
        return None
    for i, (a, b) in enumerate(zip(text, reference, strict=False)):
        if a != b:
            return i
    return min(len(text), len(reference))


def logged_at(log: Path, what: str, after: float) -> float | None:
    """Wall time of the orchestrator's first log line matching `what` at or after `after` (its clock is ours)."""
    lines = log.read_text(errors="replace")
    for stamp in re.findall(rf"^(\S+ \S+) \w+ dragonswarm.orchestrator: .*{what}", lines, re.M):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t >= after - 0.002:  # the log's stamps are in whole milliseconds
            return t
    return None


def recover(node: Node, pid: int, timeout: float = 60) -> float | None:
    """Seconds until the node dropped the frozen runner; None (and SIGCONT) if it never did."""
    t0 = time.monotonic()

    def replaced() -> bool:
        model = node.status()["models"][0]
        return model["runner_pid"] != pid and not model["busy"] and not psutil.pid_exists(pid)

    try:
        wait_until(replaced, timeout, f"{node.name} to drop runner {pid}", interval=0.2)
    except RuntimeError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # so the node can go on: the next run reports how it did
        return None
    return time.monotonic() - t0


def warm(orch: Orchestrator, nodes: dict[str, Node], procs: Processes) -> None:
    """Both nodes idle with the model loaded: a 1-token request on the local API of any that unloaded it."""
    for node in nodes.values():
        if node.status()["models"][0]["runner_pid"] is None:
            body = {"model": GEMMA, "prompt": "x", "max_tokens": 1}
            httpx.post(node.base + "/v1/completions", json=body, timeout=120).raise_for_status()
    procs.check_alive()
    if not orch.wait_idle(list(nodes), timeout=60):
        raise RuntimeError("the nodes did not become idle")


def bench_stall(root: Path, gemma: Path, stall: float, runs: int, references: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    with Processes(root / f"stall-{stall:g}") as procs:
        orch = start_orchestrator(procs, "orchestrator", "--stall-timeout", str(stall), "--log-level", "debug")
        flags = ("--cap-mechanism", "none", "--stall-timeout", str(NODE_STALL_S))
        nodes = {n: start_node(procs, orch, n, f"{GEMMA}={gemma}", SHARE, SHARE, *flags,
                               env={"DRAGON_OWNER_NOISE": "1.0"}) for n in ("worker-a", "worker-b")}  # fmt: skip
        orch.wait_live(list(nodes), procs)
        with httpx.Client(timeout=600, verify=orch.verify) as client:
            refs = []
            for _ in range(references):  # the same request with no freeze: its text and its token gap
                warm(orch, nodes, procs)
                refs.append(stream(client, orch, nodes, freeze=False))
            done: list[dict[str, Any]] = []
            for r in range(runs):
                warm(orch, nodes, procs)
                run = stream(client, orch, nodes, freeze=True) | {"loadavg": os.getloadavg()[0]}
                run["recovered_s"] = recover(nodes[run["node"]], run["pid"]) if run.get("pid") else None
                run["diverge_char"] = diverges(run["text"], refs[0]["text"])
                # Where the time went: SIGSTOP -> "moves off" (detection) -> "attempt 1 -> NODE" (a worker
                # free to take it) -> the next token (the new worker reads the prompt and what was streamed).
                freeze, log = run["wall_freeze"], orch.started.log_path
                moved = logged_at(log, "moves off", freeze)
                placed = logged_at(log, "attempt 1 -> ", moved) if moved else None
                if moved and placed and run.get("failover_s"):
                    run |= {"detected_s": moved - freeze, "placed_s": placed - moved,
                            "token_s": run["failover_s"] - (placed - freeze)}  # fmt: skip
                run["checks"] = {
                    "no error": run["error"] is None,
                    "completion_tokens == max_tokens": run["tokens"] == MAX_TOKENS,
                    "route names both nodes": sorted((run["route"] or {}).get("nodes", [])) == sorted(nodes),
                    "text identical to the unfrozen run's": run.get("splice_char") is not None
                    and run["diverge_char"] is None,
                    "node dropped the frozen runner": run["recovered_s"] is not None,
                }
                done.append(run)
                print(f"  stall {stall:g} s, run {r + 1}/{runs}: failover {run.get('failover_s') or 0:.3f} s on "
                      f"{run['node']}, in flight {run.get('in_flight')}, route {(run['route'] or {}).get('nodes')}, "
                      f"failed checks {[k for k, ok in run['checks'].items() if not ok]}", flush=True)  # fmt: skip
    times = [r["failover_s"] for r in done if r.get("failover_s") is not None]
    over = [t - stall for t in times]
    parts = {k: [r[k] for r in done if k in r] for k in PARTS}
    return {
        "stall_timeout_s": stall, "runs": len(done), "measured": len(times),
        "failover_s": {"median": median(times), "max": max(times, default=None), "min": min(times, default=None)},
        "overhead_s": {"median": median(over), "max": max(over, default=None)},
        **{k: {"median": median(v), "max": max(v, default=None)} for k, v in parts.items()},
        "target_s": stall + TARGET_EXTRA_S,
        "pass": len(times) == len(done) and max(times, default=0) <= stall + TARGET_EXTRA_S,
        "gap_ms_before_freeze": median([r["gap_s"] for r in done]) * 1000,
        "gap_ms_reference": median([r["gap_s"] for r in refs]) * 1000,
        "ttft_ms_reference": median([r["ttft_s"] for r in refs]) * 1000,
        "reference_texts_agree": len({r["text"] for r in refs}) == 1,
        "identical_texts": sum(r["diverge_char"] is None for r in done),
        "checks_failed": {k: sum(not r["checks"][k] for r in done) for k in done[0]["checks"]} if done else {},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "per_run": [{k: v for k, v in r.items() if k != "text"} for r in done],
    }  # fmt: skip


def split(config: dict[str, Any], stat: str, sep: str) -> str:
    return sep.join(f"{config[k][stat]:.2f}" if config[k][stat] is not None else "?" for k in PARTS)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    rows = [f"| {c['stall_timeout_s']:g} s | **{c['failover_s']['median']:.2f}** / {c['failover_s']['max']:.2f} / "
            f"{c['failover_s']['min']:.2f} s | {c['overhead_s']['median']:+.2f} / {c['overhead_s']['max']:+.2f} s | "
            f"{split(c, 'median', ' + ')} s (max {split(c, 'max', ' / ')}) | "
            f"{c['gap_ms_before_freeze']:.0f} ms ({c['gap_ms_reference']:.0f} ms unfrozen) | "
            f"≤ {c['target_s']:g} s: **{'met' if c['pass'] else 'not met'}** | "
            f"{', '.join(f'{k}: {n}' for k, n in c['checks_failed'].items() if n) or 'none'} | "
            f"{c['loadavg_before'][0]:.1f} → {c['loadavg_after'][0]:.1f} |" for c in results["configs"]]  # fmt: skip
    lines = [
        "# Failover benchmark results", "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. {results['date']}.", "",
        f"Two nodes (bundled {GEMMA}, share {SHARE}, `--cap-mechanism none`, node stall timeout {NODE_STALL_S} s) "
        f"behind one TLS orchestrator; {MAX_TOKENS} tokens at temperature 0, `cache_prompt: false`; the serving "
        f"node's runner SIGSTOPped at the {FREEZE_AT}th token. Failover: that SIGSTOP → the first token from the "
        "other worker.", "",
        "| stall timeout | failover median / max / min | overhead (− stall) median / max | of which: SIGSTOP → "
        "moved off + → placed + → next token, medians | inter-token gap before the freeze | target | failed checks | "
        "load average (1 min) |", "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Runs per row: {results['configs'][0]['runs']}. Checks per run: no error event, completion_tokens = "
        f"{MAX_TOKENS}, the route names both nodes, the text equals the same request's with no freeze end to end "
        "(nothing lost, repeated or changed), the frozen node dropped its runner. Per-run values in failover.json.",
        "", "Runs that waited over 0.1 s for a worker: "
        + "; ".join(f"stall {c['stall_timeout_s']:g} s: {sum(r.get('placed_s', 0) > 0.1 for r in c['per_run'])} "
                    f"of {c['runs']}" for c in results["configs"]) + ".", "",
        *(f"Stall {c['stall_timeout_s']:g} s: {c['identical_texts']} of {c['runs']} texts identical to the unfrozen "
          f"run's end to end" + (f"; others leave it at character {divergences(c)}." if c["identical_texts"] < c["runs"]
                                 else ".") for c in results["configs"]),
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def divergences(config: dict[str, Any]) -> str:
    """Where failed-over texts leave the unfrozen one, after the splice at which character."""
    seen = Counter((r["diverge_char"], r["splice_char"]) for r in config["per_run"] if r["diverge_char"] is not None)
    return ", ".join(f"{d} (splice at {s}; {n}×)" for (d, s), n in seen.items()) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--references", type=int, default=3, help="unfrozen runs per row before the timed ones")
    parser.add_argument("--stall", type=float, nargs="+", default=[30.0, 5.0], help="orchestrator stall timeouts")
    parser.add_argument("--out", type=Path, default=RESULTS / "failover")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dragon-failover-bench-"))
    gemma = bundled_gemma(Path.home() / ".dragonswarm" / "models").path
    results: dict[str, Any] = {
        "machine": f"{psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": " ".join(["python -m bench.failover_bench", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": GEMMA, "freeze_at": FREEZE_AT,
        "max_tokens": MAX_TOKENS, "share": SHARE, "node_stall_timeout_s": NODE_STALL_S,
    }  # fmt: skip
    with scratch(root):
        results["configs"] = [bench_stall(root, gemma, s, args.runs, args.references) for s in args.stall]
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
