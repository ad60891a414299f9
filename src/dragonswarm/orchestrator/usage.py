"""What each key has used: the report `GET /v1/usage` serves, built from the store's records (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dragonswarm.store.base import KeyRecord, Usage

COUNTS = ("requests", "prompt_tokens", "completion_tokens")


def usage_report(keys: Sequence[KeyRecord], usage: Sequence[Usage], now: float) -> list[dict[str, Any]]:
    """One entry per key, oldest first, keys that never used anything included: its totals and,
    per model, the same counts. Never the key itself, only its shown prefix."""
    by_key: dict[int, list[Usage]] = {}
    for row in usage:
        by_key.setdefault(row.key_id, []).append(row)
    report = []
    for key in keys:
        rows = by_key.get(key.id, [])
        models = {row.model: {name: getattr(row, name) for name in COUNTS} for row in rows}
        totals = {name: sum(counts[name] for counts in models.values()) for name in COUNTS}
        report.append({"id": key.id, "name": key.name, "role": key.role, "prefix": key.prefix,
                       "state": key.state(now), **totals, "models": models})  # fmt: skip
    return report
