"""What the dashboard shows, built once a second for every viewer at once.

`Overview.tick()` runs once a second on the orchestrator's loop: it reads the registry,
the queue and the metrics, keeps ten minutes of time series (tokens/s, queue depth, the
swarm's CPU) and a few minutes of time-to-first-token samples, and encodes one snapshot.
Every open dashboard is sent that same snapshot, so ten viewers cost what one does, and
none of them makes the orchestrator do anything on its own schedule.

What the store knows and the registry does not (nodes that left, each key's usage) is read
every `STORE_EVERY_S` in a thread. The node rows are capped at `MAX_ROWS`, the ones that
need an operator's eye first: a page of 10,000 rows a second would cost more than it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from dragonswarm.orchestrator.looplag import LoopLag, percentile
from dragonswarm.orchestrator.metrics import Metrics
from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.orchestrator.swarm import Swarm
from dragonswarm.orchestrator.usage import usage_report
from dragonswarm.store.base import NodeRecord

log = logging.getLogger("dragonswarm.orchestrator")

TICK_S = 1.0
SERIES_POINTS = 600  # ten minutes of one-second points
TTFT_WINDOW_S = 300.0
STORE_EVERY_S = 5.0
MAX_ROWS = 500
GONE_SHOWN_S = 3600.0  # nodes that left within the hour are listed as gone


def row_order(row: dict[str, Any]) -> tuple[int, str]:
    """Rows that need an eye first: working, owner busy, stale, paused, idle, then gone."""
    if row["state"] == "gone":
        rank = 5
    elif row.get("running"):
        rank = 0
    elif row.get("owner_busy"):
        rank = 1
    elif row["state"] == "stale":
        rank = 2
    elif row.get("lending_paused"):
        rank = 3
    else:
        rank = 4
    return rank, row["name"]


def node_row(conn: NodeConn, state: str) -> dict[str, Any]:
    """One connected node as the dashboard shows it."""
    hello, hb = conn.hello, conn.heartbeat
    row: dict[str, Any] = {
        "name": conn.name, "state": state, "cpus": hello.cpus, "ram_total": hello.ram_total,
        "share": hello.share, "models": [m.name for m in hello.models], "running": len(conn.jobs),
        "served": conn.served, "tokens": conn.tokens,
    }  # fmt: skip
    if conn.cut_off:
        row["cut_off"] = conn.cut_off
    if hb is not None:
        row.update({
            "cpu_total": hb.cpu_total, "cpu_ours": hb.cpu_ours, "owner_load": hb.owner_load,
            "owner_busy": hb.owner_busy, "net_busy": hb.net_busy, "share_in_force": hb.share_in_force,
            "cap_mechanism": hb.cap_mechanism, "ram_available": hb.ram_available, "loaded": hb.loaded,
            "net_recv_bps": hb.net_recv_bps, "net_sent_bps": hb.net_sent_bps, "rtt_ms": hb.rtt_ms,
            "swarm_recv_bps": hb.swarm_recv_bps, "swarm_sent_bps": hb.swarm_sent_bps,
            "lending_paused": bool(getattr(hb, "lending_paused", False)),
            "gpus": [{"name": g.name, "util": g.util, "mem_used": g.mem_used, "mem_total": g.mem_total}
                     for g in hb.gpus],
        })  # fmt: skip
    return row


def gone_row(record: NodeRecord) -> dict[str, Any]:
    return {"name": record.name, "state": "gone", "last_seen": record.last_seen,
            "models": [m.get("name", "?") for m in record.info.get("models", [])],
            "served": record.info.get("served", 0), "tokens": record.info.get("tokens", 0)}  # fmt: skip


@dataclass
class Series:
    """Ten minutes of one-second points."""

    t: deque[float] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))
    values: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, t: float, **points: float) -> None:
        self.t.append(t)
        for name, value in points.items():
            self.values.setdefault(name, deque(maxlen=SERIES_POINTS)).append(round(value, 4))

    def dump(self) -> dict[str, list[float]]:
        return {"t": list(self.t), **{name: list(v) for name, v in self.values.items()}}


class Overview:
    def __init__(self, swarm: Swarm, metrics: Metrics, loop_lag: LoopLag) -> None:
        self.swarm = swarm
        self.metrics = metrics
        self.loop_lag = loop_lag
        self.series = Series()
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=10_000)  # (when, seconds)
        self.snapshot: bytes = b"{}"
        self.changed = asyncio.Condition()
        self.gone: list[NodeRecord] = []
        self.keys: list[dict[str, Any]] = []
        self._tokens_then = metrics.tokens_out
        self._at = time.monotonic()
        self._store_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.viewers = 0  # open dashboards: with none, only the time series are kept

    def request_done(self, ttft: float | None) -> None:
        if ttft is not None:
            self.ttfts.append((time.monotonic(), ttft))

    def gone_count(self) -> int:
        return len(self.gone)

    async def _read_store(self) -> None:
        store = self.swarm.store
        records, keys, usage = await asyncio.to_thread(lambda: (store.list_nodes(), store.list_keys(),
                                                                store.list_usage()))  # fmt: skip
        connected, cutoff = self.swarm.registry.conns, time.time() - GONE_SHOWN_S
        self.gone = [r for r in records if r.name not in connected and r.last_seen >= cutoff]
        refused = self.metrics.refused_by_key
        self.keys = [{"name": k["name"], "role": k["role"], "state": k["state"], "requests": k["requests"],
                      "prompt_tokens": k["prompt_tokens"], "completion_tokens": k["completion_tokens"],
                      "refused": refused.get(k["name"], 0)}
                     for k in usage_report(keys, usage, time.time()) if k["role"] != "node"]  # fmt: skip

    def build(self, now: float) -> dict[str, Any] | None:
        """Add the time series' points; the whole snapshot while someone is looking."""
        swarm, registry, metrics = self.swarm, self.swarm.registry, self.metrics
        mono = time.monotonic()
        stale_after = registry.stale_after
        cpu_total, cpu_ours = registry.cpu.use()  # kept as nodes report: no pass over them each second
        elapsed = max(1e-3, mono - self._at)
        tokens_per_s = (metrics.tokens_out - self._tokens_then) / elapsed
        self._tokens_then, self._at = metrics.tokens_out, mono
        waiting: dict[str, int] = {}
        for f in [*swarm.dispatcher.queue, *swarm.dispatcher.retries]:
            waiting[f.request.model] = waiting.get(f.request.model, 0) + 1
        queued = sum(waiting.values())
        self.series.add(now, tokens_per_s=tokens_per_s, queue=queued, cpu_total=cpu_total, cpu_ours=cpu_ours)
        if not self.viewers:
            return None
        rows = [node_row(c, c.state(mono, stale_after)) for c in registry.conns.values()]
        live = sum(1 for row in rows if row["state"] == "live")
        counts = {"live": live, "stale": len(rows) - live}
        rows.extend(gone_row(r) for r in self.gone)
        rows.sort(key=row_order)
        while self.ttfts and self.ttfts[0][0] < mono - TTFT_WINDOW_S:
            self.ttfts.popleft()
        ttfts = sorted(t for _, t in self.ttfts)
        models = []
        for name, tags in registry.model_tags().items():
            serving = registry.serving(name)
            loaded = [c.name for c in serving if c.heartbeat and name in c.heartbeat.loaded]
            models.append({"name": name, "tags": tags, "nodes": len(serving), "loaded_on": loaded[:50],
                           "loaded": len(loaded), "waiting": waiting.get(name, 0)})  # fmt: skip
        return {
            "t": now,
            "glance": {
                "nodes": {**counts, "gone": len(self.gone)},
                "requests_running": len(swarm.requests), "fragments_running": len(swarm.running),
                "queued": queued, "tokens_per_s": round(tokens_per_s, 2),
                "ttft_p50": percentile(ttfts, 50) if ttfts else None,
                "ttft_p99": percentile(ttfts, 99) if ttfts else None,
                "ttft_window_s": TTFT_WINDOW_S, "ttft_samples": len(ttfts),
                "failovers": metrics.failover_count, "errors": metrics.errors,
                "cpu_total": cpu_total, "cpu_ours": cpu_ours, "loop": self.loop_lag.summary(),
            },
            "models": models,
            "nodes": rows[:MAX_ROWS],
            "nodes_total": len(rows),
            "keys": self.keys,
            "series": self.series.dump(),
        }  # fmt: skip

    async def tick(self) -> None:
        if self.viewers and time.monotonic() - self._store_at >= STORE_EVERY_S:
            self._store_at = time.monotonic()
            try:
                await self._read_store()
            except Exception:
                log.exception("reading the store for the dashboard failed")
        snapshot = self.build(time.time())
        if snapshot is None:
            return
        self.snapshot = orjson.dumps(snapshot)
        async with self.changed:
            self.changed.notify_all()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the dashboard must not take the orchestrator down
                log.exception("building the dashboard's snapshot failed")
            await asyncio.sleep(TICK_S)

    async def next_snapshot(self) -> bytes:
        async with self.changed:
            await self.changed.wait()
        return self.snapshot

    async def first_snapshot(self) -> bytes:
        """For a new viewer: a snapshot built now, store figures included."""
        self._store_at = 0.0
        await self.tick()
        return self.snapshot

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="overview")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
