"""Plain-text tables for the CLI: `dragon status` (nodes), `dragon keys list` and `dragon usage` (pure formatting)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dragonswarm.store.base import KeyRecord

COLUMNS = ("NAME", "STATE", "MODELS", "SHARE", "CPU", "OWNER", "RUNNING", "SERVED", "LAST SEEN")
# After CPU, when some node reports its network (nodes older than these figures do not).
NET_COLUMNS = ("NET IN/OUT", "SWARM IN/OUT", "RTT")


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def human_rate(bps: float) -> str:
    """Bytes per second in decimal units, as network speeds are given: 950B/s, 1.2kB/s, 34MB/s."""
    units = ("B", "kB", "MB", "GB", "TB")
    value, i = max(0.0, bps), 0
    while value >= 999.5 and i < len(units) - 1:  # 999.5 would print as "1000"
        value /= 1000
        i += 1
    return f"{value:.1f}{units[i]}/s" if i and value < 9.95 else f"{value:.0f}{units[i]}/s"


def _rtt(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms < 9.95 else f"{ms:.0f}ms"


def network_cells(node: dict[str, Any]) -> tuple[str, str, str]:
    """The machine's traffic in/out, ours on the swarm link in/out, and the round trip to the orchestrator."""
    if "net_recv_bps" not in node:
        return ("-", "-", "-")
    machine = f"{human_rate(node['net_recv_bps'])} {human_rate(node['net_sent_bps'])}"
    ours = f"{human_rate(node.get('swarm_recv_bps', 0.0))} {human_rate(node.get('swarm_sent_bps', 0.0))}"
    return (machine, ours, _rtt(node.get("rtt_ms")))


def _owner(node: dict[str, Any]) -> str:
    busy = [what for what, flag in (("busy", "owner_busy"), ("net busy", "net_busy")) if node.get(flag)]
    return ", ".join(busy) or "idle"


def node_row(node: dict[str, Any], now: float, network: bool = False) -> tuple[str, ...]:
    models = ",".join(m["name"] + ("*" if m["name"] in node.get("loaded", []) else "") for m in node.get("models", []))
    cpu = f"{node['cpu_total'] * 100:.0f}%" if "cpu_total" in node else "-"
    share = f"{node['share'] * 100:.0f}%" if "share" in node else "-"
    net = network_cells(node) if network else ()
    return (node["name"], node["state"], models or "-", share, cpu, *net, _owner(node), str(node.get("running", 0)),
            str(node.get("served", 0)), _ago(max(0.0, now - node["last_seen"])))  # fmt: skip


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def nodes_table(nodes: list[dict[str, Any]], now: float | None = None) -> str:
    """One row per node; `*` marks a model loaded in memory; traffic is given as in, then out."""
    if not nodes:
        return "no nodes have joined this swarm"
    now = time.time() if now is None else now
    network = any("net_recv_bps" in n for n in nodes)
    cpu = COLUMNS.index("CPU") + 1
    columns = (*COLUMNS[:cpu], *NET_COLUMNS, *COLUMNS[cpu:]) if network else COLUMNS
    return _table([columns, *(node_row(n, now, network) for n in nodes)])


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def keys_table(keys: Sequence[KeyRecord], now: float) -> str:
    """One row per key; the shown prefix is all that is ever printed of a key after creation."""
    if not keys:
        return "no keys yet: dragon keys create --role user|node|admin"
    rows = [("ID", "ROLE", "NAME", "PREFIX", "CREATED", "EXPIRES", "STATE", "CACHE")]
    for k in keys:
        rows.append((str(k.id), k.role, k.name, k.prefix + "…", _when(k.created),
                     _when(k.expires) if k.expires else "never", k.state(now), "on" if k.cache else "off"))  # fmt: skip
    return _table(rows)


def usage_table(keys: Sequence[dict[str, Any]], nodes: Sequence[dict[str, Any]] = ()) -> str:
    """One row per key with its totals (`GET /v1/usage`'s `data`), then one per model when it used
    several; then the same for each node's hand-offs (its `nodes`), with no ID (`-`), role `node`
    and the node's name."""
    if not keys:
        return "no keys yet: dragon keys create --role user|node|admin"
    rows = [("ID", "ROLE", "NAME", "STATE", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS")]
    callers = [*((str(k["id"]), k["role"], k) for k in keys), *(("-", "node", n) for n in nodes)]
    for ident, role, entry in callers:
        models: dict[str, dict[str, int]] = entry["models"]
        model = next(iter(models)) if len(models) == 1 else ("all" if models else "-")
        rows.append((ident, role, entry["name"], entry["state"], model, *_counts(entry)))
        if len(models) > 1:
            rows.extend(("", "", "", "", name, *_counts(counts)) for name, counts in models.items())
    return _table(rows)


def usage_since(start: float) -> str:
    """The line that says where a report's window starts (the hour, in local time)."""
    return f"usage since {_when(start)}, by the hour"


def _counts(counts: dict[str, Any]) -> tuple[str, str, str]:
    return (str(counts["requests"]), str(counts["prompt_tokens"]), str(counts["completion_tokens"]))
