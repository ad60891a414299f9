"""`dragon status`: the orchestrator's node list as a plain-text table (pure formatting)."""

from __future__ import annotations

import time
from typing import Any

COLUMNS = ("NAME", "STATE", "MODELS", "SHARE", "CPU", "OWNER", "RUNNING", "SERVED", "LAST SEEN")


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def node_row(node: dict[str, Any], now: float) -> tuple[str, ...]:
    models = ",".join(m["name"] + ("*" if m["name"] in node.get("loaded", []) else "") for m in node.get("models", []))
    owner = "busy" if node.get("owner_busy") else "idle"
    cpu = f"{node['cpu_total'] * 100:.0f}%" if "cpu_total" in node else "-"
    share = f"{node['share'] * 100:.0f}%" if "share" in node else "-"
    return (node["name"], node["state"], models or "-", share, cpu, owner, str(node.get("running", 0)),
            str(node.get("served", 0)), _ago(max(0.0, now - node["last_seen"])))  # fmt: skip


def nodes_table(nodes: list[dict[str, Any]], now: float | None = None) -> str:
    """One row per node; `*` marks a model loaded in memory."""
    if not nodes:
        return "no nodes have joined this swarm"
    now = time.time() if now is None else now
    rows = [COLUMNS, *(node_row(n, now) for n in nodes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)
