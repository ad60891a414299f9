"""Plain-text tables for the CLI: `dragon status` (nodes) and `dragon keys list` (pure formatting)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dragonswarm.store.base import KeyRecord

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


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def nodes_table(nodes: list[dict[str, Any]], now: float | None = None) -> str:
    """One row per node; `*` marks a model loaded in memory."""
    if not nodes:
        return "no nodes have joined this swarm"
    now = time.time() if now is None else now
    return _table([COLUMNS, *(node_row(n, now) for n in nodes)])


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def keys_table(keys: Sequence[KeyRecord], now: float) -> str:
    """One row per key; the shown prefix is all that is ever printed of a key after creation."""
    if not keys:
        return "no keys yet: dragon keys create --role user|node|admin"
    rows = [("ID", "ROLE", "NAME", "PREFIX", "CREATED", "EXPIRES", "STATE")]
    for k in keys:
        state = "revoked" if k.revoked else ("expired" if k.refusal(now) else "active")
        rows.append((str(k.id), k.role, k.name, k.prefix + "…", _when(k.created),
                     _when(k.expires) if k.expires else "never", state))  # fmt: skip
    return _table(rows)
