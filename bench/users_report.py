"""`bench/users_bench`'s figures: what each variant's requests came to, and the Markdown table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def spread(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 50), 1), "p90": round(percentile(values, 90), 1),
            "p99": round(percentile(values, 99), 1), "max": round(max(values, default=math.nan), 1)}  # fmt: skip


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """A variant's requests, counted and timed; its readings kept as they are (the rows left out)."""
    out = {k: v for k, v in raw.items() if k != "rows"}
    rows = raw.get("rows")
    if not rows:
        return out
    t0, t1 = raw["window"]
    wanted = max(r[8] for r in rows)  # every answer is the same length: the tokens asked for
    ok, refused, failed = [], [], []
    for r in rows:
        first, status, retry, got, done, error = r[3], r[5], r[6], r[8], r[9], r[10]
        if status == 200 and done and got == wanted and not error and first:
            ok.append(r)
        elif status == 429 and retry:
            refused.append(r)
        else:
            failed.append(r)
    firsts: dict[int, float] = {}
    for r in rows:
        firsts[r[0]] = min(firsts.get(r[0], math.inf), r[2])
    ttft = [(r[3] - r[2]) * 1000 for r in ok]
    ttft_first = [(r[3] - r[2]) * 1000 for r in ok if r[2] == firsts[r[0]]]
    ttft_later = [(r[3] - r[2]) * 1000 for r in ok if r[2] != firsts[r[0]]]
    crossed = sum(1 for r in ok if r[7] and _replica_of(r[7]) != r[1])
    tokens = sum(r[8] for r in ok)
    seconds = t1 - t0
    load = raw.get("load", {})
    per_1000 = {name: round(cores * load["seconds"] / max(1, tokens) * 1000, 3)
                for name, cores in load.get("cpu_cores", {}).items()
                if name not in ("generators", "clients")}  # fmt: skip
    out |= {
        "requests": len(rows), "ok": len(ok), "refused_429": len(refused), "failed": len(failed),
        "failed_samples": sorted({f"{r[5]}, {r[8]} of {wanted} tokens: {r[10]}"[:240] for r in failed})[:5],
        "ttft_ms": spread(ttft), "ttft_first_round_ms": spread(ttft_first), "ttft_later_ms": spread(ttft_later),
        "total_ms": spread([(r[4] - r[2]) * 1000 for r in ok]),
        "crossed": crossed, "crossed_fraction": round(crossed / max(1, len(ok)), 3),
        "tokens": tokens, "seconds": round(seconds, 1), "token_events_per_s": round(tokens / seconds, 1),
        "requests_per_s": round(len(ok) / seconds, 1), "cpu_s_per_1000_tokens": per_1000,
        "concurrent_streams": round(sum(r[4] - r[2] for r in ok) / seconds, 1),
    }  # fmt: skip
    out["summary"] = (f"{len(ok)} ok, {len(refused)} refused, {len(failed)} failed; TTFT p50 {out['ttft_ms']['p50']} "
                      f"p99 {out['ttft_ms']['p99']} ms; {out['token_events_per_s']} tokens/s")  # fmt: skip
    return out


def _replica_of(nodes: str) -> int:
    """The replica a worker was linked to, from its name (`w<replica>-<i>`) in `X-Dragon-Nodes`."""
    first = nodes.split(",")[0]
    return int(first[1:first.index("-")]) if first.startswith("w") and "-" in first else -1


def write_markdown(results: dict[str, Any], path: Path) -> None:
    variants = results["variants"]
    labels = list(variants)
    lines = [
        "# The orchestrators alone under many users",
        "",
        f"{results['users']} users, each with its own key and its own connection, streaming `/v1/completions` for "
        f"{results['duration_s']:.0f} s (a pause of 0 to {2 * results['think_s']:g} s between two) from "
        f"{results['client_procs']} client processes, all starting at "
        f"once. {results['workers']} simulated workers (`bench/load_generator.py`, the real node protocol over TLS, "
        f"capacity {results['capacity']} each) from {results['generators']} processes answer every request with "
        f"{results['tokens']} tokens at {results['rate']:g} tokens/s, the first {results['first_token_ms']:.0f} ms "
        f"after `run`. **Everything shares the same 2 cores.** Machine: {results['machine']}. "
        f"Source: {results['source']}. Command: `{results['command']}`.",
        "",
        "Variants: `one` — one orchestrator without Redis (the reference); `split` — two replicas on one Redis, half "
        "the users and half the workers on each; `local` / `cross` — two replicas, every user on A and every worker "
        "on A (nothing crosses) or on B (everything crosses).",
        "",
        "| measure | " + " | ".join(f"`{v}`" for v in labels) + " | target |",
        "|---|" + "---|" * len(labels) + "---|",
    ]  # fmt: skip

    def row(title: str, cell: Any, target: str = "") -> None:
        cells = []
        for v in labels:
            try:
                cells.append(cell(variants[v]))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                cells.append("-")
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {target} |")

    def ms(d: dict[str, float]) -> str:
        return f"{d['p50']:.0f} / **{d['p99']:.0f}** / {d['max']:.0f}"

    def cores(v: dict[str, Any]) -> str:
        return ", ".join(f"{k} {c:.2f}" for k, c in v["load"]["cpu_cores"].items())

    row("requests: served / refused whole (429, Retry-After) / failed", lambda v: f"{v['ok']:,} / "
        f"{v['refused_429']} / **{v['failed']}**", "0 failed")  # fmt: skip
    row("time to first token p50 / p99 / max (ms), all", lambda v: ms(v["ttft_ms"]))
    row("... the first round (every user arriving at once)", lambda v: ms(v["ttft_first_round_ms"]))
    row("... after it", lambda v: ms(v["ttft_later_ms"]))
    row("whole answer p50 / p99 (ms)", lambda v: f"{v['total_ms']['p50']:.0f} / {v['total_ms']['p99']:.0f}")
    row("streams open at once, on average", lambda v: f"{v['concurrent_streams']:.0f}")
    row("requests / token events relayed per second", lambda v: f"{v['requests_per_s']:.0f} / "
        f"{v['token_events_per_s']:,.0f}")  # fmt: skip
    row("requests served on the other replica's worker", lambda v: f"{v['crossed']:,} ({v['crossed_fraction']:.0%})")
    row("worker runs that found their worker busy and waited (waits in all, s)", lambda v: f"{v['workers']['queued']:,}"
        f" ({v['workers']['queued_s']:,.0f} s)")  # fmt: skip
    row("CPU (cores)", cores)
    row("CPU seconds per 1,000 token events", lambda v: ", ".join(f"{k} {c:.3f}" for k, c in
                                                                    v["cpu_s_per_1000_tokens"].items()))  # fmt: skip
    row("loop lag p50 / p99 / max (ms)", lambda v: "; ".join(
        f"{k} {p['lag']['p50_ms']:.1f} / {p['lag']['p99_ms']:.0f} / {p['lag']['max_ms']:.0f}"
        for k, p in v["probe"].items()))  # fmt: skip
    row("Redis: commands/s, in / out kB/s", lambda v: f"{v['load']['redis']['commands_per_s']:,.0f}, "
        f"{v['load']['redis']['in_bytes_per_s'] / 1e3:,.0f} / {v['load']['redis']['out_bytes_per_s'] / 1e3:,.0f}")
    row("load average (1 min) before → after", lambda v: f"{v['loadavg_before'][0]} → {v['loadavg_after'][0]}")
    if "one" in variants and "split" in variants and "ttft_ms" in variants["one"] and "ttft_ms" in variants["split"]:
        one, split = variants["one"], variants["split"]
        lines += ["", "**Time to first token added by the replicas** (`split` − `one`, same run):", ""]
        for title, key in (("all requests", "ttft_ms"), ("first round", "ttft_first_round_ms"),
                           ("after it", "ttft_later_ms")):  # fmt: skip
            lines.append(f"- {title}: p50 {split[key]['p50'] - one[key]['p50']:+.0f} ms, "
                         f"p99 **{split[key]['p99'] - one[key]['p99']:+.0f} ms** "
                         f"(target p99 ≤ +{results['targets']['p99_added_ms']:.0f} ms)")  # fmt: skip
    for v in labels:
        if variants[v].get("error"):
            lines += ["", f"`{v}` stopped early: {variants[v]['error']}"]
        if variants[v].get("failed_samples"):
            lines += ["", f"`{v}`, failures seen: " + "; ".join(f"`{s}`" for s in variants[v]["failed_samples"])]
    path.write_text("\n".join(lines) + "\n")
