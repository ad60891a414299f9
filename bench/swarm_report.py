"""The swarm benchmark's results as markdown: one table per part, with its target and verdict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def scheme(tls: bool) -> str:
    return "https (TLS with the swarm's private CA, the default)" if tls else "plain http (--insecure)"


def verdict(ok: bool) -> str:
    return "pass" if ok else "**fail**"


def conditions_line(c: dict[str, Any]) -> str:
    return (
        "Other programs' CPU during the kept timed runs (machine busy time not from this benchmark's processes): "
        f"median {c['other_cpu_median']:.1%}, max {c['other_cpu_max']:.1%} of the machine; runs thrown away and "
        f"repeated because others took more than {c['other_max']:.0%}: {c['repeated']}; runs started before the nodes "
        f"had settled (owner seen busy or work still held after 30 s): {c['unsettled_runs']}."
    )


def hop_comparison(results: dict[str, Any]) -> list[str]:
    """Part 1 again with the orchestrator on plain http: how much of the hop is TLS."""
    plain = results.get("hop_plain")
    if not plain:
        return []
    lines = [
        f"For comparison, the same measurement ({plain['rounds']} alternating rounds, a fresh orchestrator and node) "
        f"with the orchestrator on {scheme(plain['tls'])}, node → orchestrator on plain ws:",
        "",
        "| orchestrator | direct: decode tokens/s, TTFT | via: decode tokens/s, TTFT | decode tokens/s via / direct "
        "| added TTFT | checks |",
        "|---|---|---|---|---|---|",
    ]
    for hop in (results["hop"], plain):
        d, v = hop["systems"]["direct"], hop["systems"]["via orchestrator"]
        lines.append(
            f"| {'https' if hop['tls'] else 'plain http'} | {d['decode_tokens_per_s']:.1f}, {d['ttft_ms']:.1f} ms "
            f"| {v['decode_tokens_per_s']:.1f}, {v['ttft_ms']:.1f} ms | {hop['ratio_decode_tokens_per_s']:.3f} "
            f"| {hop['added_ttft_ms']:+.1f} ms | {verdict(all(hop['checks'].values()))} |"
        )
    return [*lines, "", conditions_line(plain["conditions"]), ""]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    hop, fan, cl = results["hop"], results["fanout"], results["clients"]
    d, v = hop["systems"]["direct"], hop["systems"]["via orchestrator"]
    lines = [
        "# Swarm benchmark results",
        "",
        f"Machine: {results['machine']}. **{results['cpus']} CPU cores in all, shared by every process of the run**: "
        "the benchmark's own clients, the orchestrator(s), every node and its llama.cpp runner. "
        "A swarm on one machine shows the swarm's overheads and behaviour, not extra speed. "
        "Other work may run on the machine too: every timed run waits for it to be quiet (under 10% busy), a run "
        f"during which other programs took more than {results['other_max']:.0%} of it is repeated, and the line "
        "under each table says how much they took.",
        "",
        f"Command: `{results['command']}` ({results['date']}, {results['elapsed_s'] / 60:.1f} min).",
        "",
        f"## 1. Hop overhead: direct to the node vs through the orchestrator ({hop['rounds']} alternating rounds)",
        "",
        f"Model {hop['model']} (Gemma 3 270M Q4_K_M); one node with --share {hop['share']} --local-share "
        f"{hop['local_share']} ({hop['threads']} threads, cap: {hop['mechanism']}); prompt {hop['prompt']!r}, "
        f"temperature 0, max_tokens {hop['max_tokens']}, streamed, usage from `stream_options.include_usage`. "
        f"Client → orchestrator and node → orchestrator over {scheme(hop['tls'])}; the node's local API is plain "
        "http on loopback. "
        "Medians. Decode tokens/s: (completion tokens − 1) / (last token − first token).",
        "",
        "| path | decode tokens/s (min–max) | tokens/s over the request | time to first token (min–max) | tokens |",
        "|---|---|---|---|---|",
        f"| direct (node's local API) | {d['decode_tokens_per_s']:.1f} ({d['decode_min']:.1f}–{d['decode_max']:.1f}) "
        f"| {d['tokens_per_s']:.1f} | {d['ttft_ms']:.1f} ms ({d['ttft_min']:.0f}–{d['ttft_max']:.0f}) "
        f"| {d['tokens']:.0f} |",
        f"| via orchestrator (user key) | {v['decode_tokens_per_s']:.1f} ({v['decode_min']:.1f}–{v['decode_max']:.1f}) "
        f"| {v['tokens_per_s']:.1f} | {v['ttft_ms']:.1f} ms ({v['ttft_min']:.0f}–{v['ttft_max']:.0f}) "
        f"| {v['tokens']:.0f} |",
        "",
        "| measure | value | target | result |",
        "|---|---|---|---|",
        f"| decode tokens/s, via / direct | {hop['ratio_decode_tokens_per_s']:.3f} | ≥ {hop['targets']['ratio']} "
        f"| {verdict(hop['pass_ratio'])} |",
        f"| tokens/s over the request, via / direct | {hop['ratio_tokens_per_s']:.3f} | (reported) | |",
        f"| added time to first token (difference of medians) | {hop['added_ttft_ms']:+.1f} ms "
        f"| ≤ {hop['targets']['added_ttft_ms']:.0f} ms | {verdict(hop['pass_added_ttft'])} |",
        f"| added time to first token (median of per-round differences) | "
        f"{hop['added_ttft_ms_paired_median']:+.1f} ms | (reported) | |",
        *[f"| {name} | {ok} | True | {verdict(ok)} |" for name, ok in hop["checks"].items()],
        "",
        conditions_line(hop["conditions"]),
        "",
        *hop_comparison(results),
        f"## 2. Fan-out: one 4-prompt request, 1 worker vs 4 workers ({fan['rounds']} alternating rounds)",
        "",
        f"Tiny random-weight llama GGUF; `/v1/completions` with a list of {fan['prompts']} prompts, non-streaming, "
        f"temperature 0, max_tokens {fan['max_tokens']} per prompt, through the orchestrator "
        f"over {scheme(fan['tls'])}; every worker at --share {fan['share']} "
        f"(1 thread, {fan['share'] * results['cpus']:.1f} CPU of quota). "
        "Node CPU: user + system seconds of every node process and its runner, before/after. Medians.",
        "",
        "| swarm | wall time | completion tokens | tokens/s | node CPU | tokens per CPU-second "
        "| node CPU / machine | orchestrator CPU | distinct nodes used (per round) | target | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in fan["swarms"].values():
        lines.append(
            f"| {s['workers']} worker(s) | {s['wall_s']:.2f} s | {s['tokens']:.0f} | {s['tokens_per_s']:.0f} "
            f"| {s['node_cpu_s']:.2f} s | {s['tokens_per_cpu_s']:.0f} | {s['cpu_fraction']:.2f} "
            f"| {s['orchestrator_cpu_s']:.2f} s | {', '.join(map(str, s['distinct_nodes']))} "
            f"| {s['expected_nodes']} node(s), 4 fragments | {verdict(s['pass_nodes'])} |"
        )
    lines += [
        "",
        f"Speedup in wall time, 4 workers over 1: {fan['speedup']:.2f}× (ideal {fan['ideal_speedup']:.0f}×: "
        f"4 × {fan['share']} of the machine against {fan['share']}). Tokens per CPU-second, 4 workers / 1 worker: "
        f"{fan['efficiency_ratio']:.2f}.",
        "",
        conditions_line(fan["conditions"]),
        "",
        f"## 3. Many clients: {cl['clients']} concurrent streaming clients on `dragon up --workers {cl['workers']}` "
        f"({cl['bursts']} burst(s) per swarm)",
        "",
        f"Tiny model on {cl['nodes_in_swarm']} nodes (`local` and {cl['workers']} workers at `dragon up`'s default "
        f"--share 0.10, one fragment at a time each); each client one streamed `/v1/completions` request, "
        f"max_tokens {cl['max_tokens']}, temperature 0, all released at once from one `httpx.AsyncClient` "
        f"(a connection each) against the orchestrator's api_url over {scheme(cl['tls'])} with the user key "
        "from swarm.json. "
        "Percentiles over every request of every burst; times from the release to the first and last text. "
        "`dragon up` counts only its own processes as the swarm's, so to its nodes the benchmark's clients are "
        "the owner's programs: with the defaults a node that sees them use more than 10% of the machine takes no "
        "work. The second swarm is the same `dragon up` with DRAGON_OWNER_NOISE=1.0 in its environment "
        "(inherited by its nodes): owner detection off, the orchestrator and nodes alone. "
        "The two swarms run one after the other, each alone on the machine. "
        "The reference: one client alone on the same swarm, sequential requests, medians.",
        "",
        "| measure | " + " | ".join(cl["swarms"]) + " | target |",
        "|---|" + "---|" * len(cl["swarms"]) + "---|",
    ]
    sw = list(cl["swarms"].values())

    def row(label: str, cell: Callable[[dict[str, Any]], str], target: str = "(reported)") -> None:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in sw) + f" | {target} |")

    row(
        "errors (HTTP ≠ 200, error event, transport error)",
        lambda s: f"{s['errors']} of {s['requests']}: {verdict(s['pass_errors'])}",
        "0",
    )
    row(
        "time to first token p50 / p99 / max",
        lambda s: f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f} / {s['ttft_ms']['max']:.0f} ms",
    )
    row(
        "total time p50 / p99 / max",
        lambda s: f"{s['total_ms']['p50']:.0f} / {s['total_ms']['p99']:.0f} / {s['total_ms']['max']:.0f} ms",
    )
    row(f"wall time for all {cl['clients']} (median of bursts)", lambda s: f"{s['wall_s']:.2f} s")
    row("completion tokens, all requests", lambda s: f"{s['tokens']}")
    row("swarm CPU per burst (orchestrator, nodes, runners)", lambda s: f"{s['swarm_cpu_s']:.1f} s")
    row("swarm CPU per request", lambda s: f"{s['swarm_cpu_ms_per_request']:.1f} ms")
    row("the clients' own CPU per burst (this benchmark's process)", lambda s: f"{s['client_cpu_s']:.1f} s")
    row(
        "one client alone: time to first token / total",
        lambda s: f"{s['alone']['ttft_ms']:.1f} / {s['alone']['total_ms']:.1f} ms",
        "(reference)",
    )
    row("requests per node (X-Dragon-Nodes)",
        lambda s: ", ".join(f"{n}: {c}" for n, c in s["requests_by_node"].items()))  # fmt: skip
    lines += ["", conditions_line(cl["conditions"])]
    for label, s in cl["swarms"].items():
        if s["error_samples"]:
            lines += ["", f"Errors seen ({label}): " + "; ".join(f"`{e}`" for e in s["error_samples"])]
    if results.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in results["notes"]]]
    path.write_text("\n".join(lines) + "\n")
