"""What each key, and each node's hand-offs, have used: the report `GET /v1/usage` serves and
`dragon usage` prints, built from the store's records (pure), and the window it covers."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dragonswarm.errors import InvalidRequest
from dragonswarm.store.base import KeyRecord, NodeIdentity, NodeUsage, Store, Usage, first_hour_kept, hour_of

COUNTS = ("requests", "prompt_tokens", "completion_tokens")

# The latest `since` taken: the end of the year 9999, as far as ISO dates go. A later one is no
# time at all (and would not fit the store's integers); one in the future is fine, and empty.
MAX_SINCE = 253_402_300_799

# The smallest plain number `--since` takes as unix seconds: 9 digits, March 1973. A shorter one is
# more likely a year or a date without its dashes, which would silently mean all time.
MIN_UNIX_ARG = 100_000_000

UNITS = {"m": 60, "h": 3600, "d": 86_400}
SINCE_FORMS = ("a duration back from now (30m, 24h, 7d), unix seconds (9 digits or more), or an ISO date or time"
               " (2025-01-31T12:00)")  # fmt: skip


def usage_report(keys: Sequence[KeyRecord], usage: Sequence[Usage], now: float) -> list[dict[str, Any]]:
    """One entry per key, oldest first, keys that never used anything included: its totals and,
    per model, the same counts. Never the key itself, only its shown prefix."""
    by_key: dict[int, list[Usage]] = {}
    for row in usage:
        by_key.setdefault(row.key_id, []).append(row)
    return [{"id": key.id, "name": key.name, "role": key.role, "prefix": key.prefix, "state": key.state(now),
             **_counted(by_key.get(key.id, []))} for key in keys]  # fmt: skip


def node_report(nodes: Sequence[NodeUsage], identities: Sequence[NodeIdentity]) -> list[dict[str, Any]]:
    """One entry per node whose hand-offs used something, by name: its state ("active", "revoked",
    or "forgotten" once its name was freed), totals and, per model, the same counts. A name freed
    and taken by another machine carries the usage counted under it before."""
    by_node: dict[str, list[NodeUsage]] = {}
    for row in nodes:
        by_node.setdefault(row.node, []).append(row)
    revoked = {i.name: i.revoked is not None for i in identities}
    return [{"name": name, "state": "forgotten" if name not in revoked else ("revoked" if revoked[name] else "active"),
             **_counted(by_node[name])} for name in sorted(by_node)]  # fmt: skip


def _counted(rows: Sequence[Usage | NodeUsage]) -> dict[str, Any]:
    """Totals and `models` of one caller's rows."""
    models = {row.model: {name: getattr(row, name) for name in COUNTS} for row in rows}
    totals = {name: sum(counts[name] for counts in models.values()) for name in COUNTS}
    return {**totals, "models": models}


def usage_window(since: float | None, now: float) -> int | None:
    """Where a report asked for `since` starts at `now`: the hour holding `since`, or the first hour
    still kept if that is later (hours are kept 35 days); None for all time."""
    return None if since is None else max(hour_of(since), first_hour_kept(now))


def usage_answer(keys: Sequence[KeyRecord], usage: Sequence[Usage], nodes: Sequence[NodeUsage],
                 identities: Sequence[NodeIdentity], since: float | None, now: float) -> dict[str, Any]:  # fmt: skip
    """The body of `GET /v1/usage`: keys' entries in `data` (their shape since before nodes were
    counted), nodes' hand-offs' in `nodes`, and in `since` the start of the window counted
    (`usage_window`; None for all time)."""
    return {"object": "list", "since": usage_window(since, now), "data": usage_report(keys, usage, now),
            "nodes": node_report(nodes, identities)}  # fmt: skip


def read_usage(store: Store, since: float | None, now: float) -> dict[str, Any]:
    """`usage_answer` from a store's records. Blocking: the API calls it in a thread (a store may be
    remote), `dragon usage --redis` directly."""
    start = usage_window(since, now)  # not the hours before it: some of them may be dropped already
    return usage_answer(store.list_keys(), store.list_usage(start), store.list_node_usage(start),
                        store.list_identities(), start, now)  # fmt: skip


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
    """`dragon usage --since`: a duration back from `now`, unix seconds (at least 9 digits, so a year
    is never taken for one) or an ISO date or time (naive: local time), as unix seconds; ValueError
    for anything else. A duration reaching back past 1970 is all time (0); a time in the future is
    allowed (the report is empty)."""
    text = text.strip()
    duration = re.fullmatch(r"(\d{1,9})([mhd])", text)
    if duration:
        return max(0.0, now - int(duration[1]) * UNITS[duration[2]])
    if re.fullmatch(r"\d+(\.\d+)?", text):
        since = float(text)
        if since < MIN_UNIX_ARG:  # 2025 is a year, not 1970 plus half an hour
            raise ValueError(f"--since {text!r}: unix seconds have at least 9 digits (1973 on); for a date write "
                             "it in ISO form, such as 2025-01-01")  # fmt: skip
    else:
        try:
            since = datetime.fromisoformat(text).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"--since {text!r} is not {SINCE_FORMS}") from None
    if not 0 <= since <= MAX_SINCE:
        raise ValueError(f"--since {text!r} is not between 1970 and the year 9999")
    return since
