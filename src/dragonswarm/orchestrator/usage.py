"""What each key, and each node's hand-offs, have used: the report `GET /v1/usage` serves and
`dragon usage` prints, built from the store's records (pure), and the window it covers."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dragonswarm.errors import InvalidRequest
from dragonswarm.store.base import KeyRecord, NodeIdentity, NodeUsage, Store, Usage, hour_of

COUNTS = ("requests", "prompt_tokens", "completion_tokens")

# The latest `since` taken: the end of the year 9999, as far as ISO dates go. A later one is no
# time at all (and would not fit the store's integers); one in the future is fine, and empty.
MAX_SINCE = 253_402_300_799

UNITS = {"m": 60, "h": 3600, "d": 86_400}
SINCE_FORMS = "a duration back from now (30m, 24h, 7d), unix seconds, or an ISO date or time (2025-01-31T12:00)"


def usage_report(keys: Sequence[KeyRecord], usage: Sequence[Usage], now: float, nodes: Sequence[NodeUsage] = (),
                 identities: Sequence[NodeIdentity] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """One entry per key (`kind` "key"), oldest first, keys that never used anything included:
    its totals and, per model, the same counts. Never the key itself, only its shown prefix.
    Then one entry per node whose hand-offs used something (`kind` "node"), by name, with the
    fields a key's entry has, so a reader of keys' entries reads these too: no id or prefix,
    role "node", state "active", "revoked", or "forgotten" once its name was freed."""
    by_key: dict[int, list[Usage]] = {}
    for row in usage:
        by_key.setdefault(row.key_id, []).append(row)
    report = []
    for key in keys:
        report.append({"kind": "key", "id": key.id, "name": key.name, "role": key.role, "prefix": key.prefix,
                       "state": key.state(now), **_counted(by_key.get(key.id, []))})  # fmt: skip
    by_node: dict[str, list[NodeUsage]] = {}
    for node_row in nodes:
        by_node.setdefault(node_row.node, []).append(node_row)
    revoked = {i.name: i.revoked is not None for i in identities}
    for name in sorted(by_node):
        state = "forgotten" if name not in revoked else ("revoked" if revoked[name] else "active")
        report.append({"kind": "node", "id": None, "name": name, "role": "node", "prefix": None, "state": state,
                       **_counted(by_node[name])})  # fmt: skip
    return report


def _counted(rows: Sequence[Usage | NodeUsage]) -> dict[str, Any]:
    """Totals and `models` of one caller's rows."""
    models = {row.model: {name: getattr(row, name) for name in COUNTS} for row in rows}
    totals = {name: sum(counts[name] for counts in models.values()) for name in COUNTS}
    return {**totals, "models": models}


def usage_answer(keys: Sequence[KeyRecord], usage: Sequence[Usage], nodes: Sequence[NodeUsage],
                 identities: Sequence[NodeIdentity], since: float | None, now: float) -> dict[str, Any]:  # fmt: skip
    """The body of `GET /v1/usage`: the report, and the start of the hour it counts from (`since`,
    None for all time). Usage is kept by the hour, so a window starts at the hour holding `since`."""
    return {"object": "list", "since": None if since is None else hour_of(since),
            "data": usage_report(keys, usage, now, nodes, identities)}  # fmt: skip


def read_usage(store: Store, since: float | None, now: float) -> dict[str, Any]:
    """`usage_answer` from a store's records. Blocking: the API calls it in a thread (a store may be
    remote), `dragon usage --redis` directly."""
    return usage_answer(store.list_keys(), store.list_usage(since), store.list_node_usage(since),
                        store.list_identities(), since, now)  # fmt: skip


def since_param(value: str | None) -> float | None:
    """`?since=` of `GET /v1/usage`: unix seconds, none for all time; anything else is a 400."""
    if value is None:
        return None
    try:
        since = float(value)
    except ValueError:
        since = math.nan
    if not 0 <= since <= MAX_SINCE:  # NaN fails this too
        raise InvalidRequest(f"since must be a unix time in seconds between 0 and {MAX_SINCE}, not {value[:40]!r}",
                             param="since")  # fmt: skip
    return since


def since_arg(text: str, now: float) -> float:
    """`dragon usage --since`: a duration back from `now`, unix seconds or an ISO date or time (naive:
    local time), as unix seconds; ValueError for anything else. A duration reaching back past 1970
    is all time (0); a time in the future is allowed (the report is empty)."""
    text = text.strip()
    duration = re.fullmatch(r"(\d{1,9})([mhd])", text)
    if duration:
        return max(0.0, now - int(duration[1]) * UNITS[duration[2]])
    if re.fullmatch(r"\d+(\.\d+)?", text):
        since = float(text)
    else:
        try:
            since = datetime.fromisoformat(text).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"--since {text!r} is not {SINCE_FORMS}") from None
    if not 0 <= since <= MAX_SINCE:
        raise ValueError(f"--since {text!r} is not between 1970 and the year 9999")
    return since
