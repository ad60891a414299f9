"""A load generator for the benchmarks (never used by the tests): simulated nodes that speak
the real node protocol, each over its own TLS WebSocket, from a few processes that stand in
for other machines.

A simulated node says `hello` (one model, `capacity` fragments at once), reads `welcome`,
confirms the credential it offers and then uses that credential, and reports at the cadence
the welcome gives: a heartbeat every `heartbeat_s` while it works, every `idle_heartbeat_s`
while it is quiet (its CPU load and round trip varying from beat to beat, as a machine's do),
and a WebSocket ping every 2 of those periods, as `node/link.py` does.
Given several orchestrator URLs it moves to the next one when its link is lost, after
`node.link.reconnect_delay` (0.2 s, then a backoff per round of all of them), with the same
jitter.

With `serve`, it answers `run` as a worker whose runner streams a fixed text at a fixed rate:
`start`, one `text` event per token (with the token's id), then `done` (`length` when the
text is cut at `max_tokens`); `cancel` ends a job with `done` / `cancelled`. Jobs beyond its
capacity wait, as behind a real node's runner. Nothing is generated: what it measures is the
orchestrators' work, not a model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.loop_bench import BEAT, raise_open_files

SHA = "1" * 64  # the one model file every simulated worker holds
MODEL = "chat"
# The fixed answer: a token is a word, its id its place in this list.
WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "swarm", "streams",
         "every", "token", "in", "order", "to", "each", "of", "its", "many", "users")  # fmt: skip
QUIET_BEAT = orjson.loads(BEAT)
BUSY_BEAT = QUIET_BEAT | {"cpu_ours": 0.25, "share_in_force": 0.25}


def beat(running: list[str]) -> str:
    """A heartbeat whose figures move from beat to beat, as a real machine's do (the CPU it sees,
    its round trip): what a replica publishes of its nodes changes with each one."""
    figures = {"cpu_total": round(random.uniform(0.05, 0.3), 3), "rtt_ms": round(random.uniform(0.3, 0.6), 3)}
    return orjson.dumps((BUSY_BEAT | {"running": running} if running else QUIET_BEAT) | figures).decode()


def answer(n: int) -> list[str]:
    """The first `n` pieces of the fixed answer (repeated as needed), each one token."""
    return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(n)]


@dataclass
class GenConfig:
    """What every simulated node of one run shares (pickled into each generator process)."""

    urls: list[str]  # wss://.../v1/swarm of every replica, in the order of the run's replicas
    key: str  # the node key, for the first join
    ca: str
    serve: bool = False
    tokens: int = 16  # tokens in the fixed answer
    rate: float = 10.0  # tokens per second, per job
    first_token_s: float = 0.05  # from `run` to the first token (a runner reading a short prompt)
    capacity: int = 1
    nice: int = 0


@dataclass
class GenStats:
    connects: int = 0
    failures: int = 0  # connection attempts that failed (refused, timed out, reset)
    drops: int = 0  # established links lost
    beats: int = 0
    pings: int = 0
    jobs: int = 0
    tokens: int = 0
    cancels: int = 0
    queued: int = 0  # jobs that found every runner slot taken and waited
    queued_s: float = 0.0  # ... for this long in all
    last_error: str = ""
    # (monotonic time, node index, url index) of every welcome, and every lost link
    welcomes: list[tuple[float, int, int]] = field(default_factory=list)
    losses: list[tuple[float, int, int]] = field(default_factory=list)


class SimNode:
    """One node's links, one after another, for as long as the generator runs."""

    def __init__(self, name: str, index: int, urls: list[int], cfg: GenConfig, ssl_ctx: Any, stats: GenStats,
                 linked: Any, stop: asyncio.Event):  # fmt: skip
        self.name, self.index, self.order, self.cfg = name, index, urls, cfg
        self.ssl_ctx, self.stats, self.linked, self.stop = ssl_ctx, stats, linked, stop
        self.credential: str | None = None
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.runner = asyncio.Semaphore(cfg.capacity)
        self.welcomed = False  # the current link got its welcome

    def hello(self) -> str:
        return json.dumps({"type": "hello", "v": 4, "name": self.name, "share": 0.25, "local_share": 0.8,
                           "models": [{"name": MODEL, "sha256": SHA, "tags": ["chat"], "loaded": True,
                                       "n_ctx": 4096}],
                           "cpus": 4, "ram_total": 16 << 30, "capacity": self.cfg.capacity})  # fmt: skip

    async def run(self) -> None:
        from dragonswarm.node.link import reconnect_delay

        failures, at = 0, 0
        while not self.stop.is_set():
            url = self.order[at]
            self.welcomed = False
            try:
                await self._link(url)
            except Exception as exc:  # counted, and tried again as a real node would
                if self.stop.is_set():
                    return
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:200]
            if self.stop.is_set():
                return
            if self.welcomed:
                self.stats.drops += 1
                self.stats.losses.append((time.monotonic(), self.index, url))
                failures = 0  # a link that was up is a fresh start (see the report: node/link.py keeps counting)
            else:
                self.stats.failures += 1
            delay = reconnect_delay(failures, len(self.order)) * random.uniform(0.8, 1.2)
            failures += 1
            at = (at + 1) % len(self.order)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    async def _link(self, url: int) -> None:
        """One connection, until it is lost."""
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.credential or self.cfg.key}", "X-Dragon-Node": self.name}
        self.stats.connects += 1
        async with connect(self.cfg.urls[url], additional_headers=headers, ssl=self.ssl_ctx, open_timeout=60,
                           ping_interval=None, close_timeout=2, max_size=1 << 20) as ws:  # fmt: skip
            await ws.send(self.hello())
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"expected welcome, got {welcome.get('type')}")
            if welcome.get("credential"):  # kept, then confirmed, as a node does
                self.credential = welcome["credential"]
                await ws.send(json.dumps({"type": "confirm", "credential": self.credential}))
            self.welcomed = True
            self.stats.welcomes.append((time.monotonic(), self.index, url))
            with self.linked.get_lock():
                self.linked[url] += 1
            try:
                await self._session(ws, welcome["heartbeat_s"], welcome.get("idle_heartbeat_s") or 5.0)
            finally:
                with self.linked.get_lock():
                    self.linked[url] -= 1
                for task in self.jobs.values():  # the runner stops with the link, as on a real node
                    task.cancel()

    async def _session(self, ws: Any, heartbeat_s: float, idle_s: float) -> None:
        beats = asyncio.create_task(self._beats(ws, heartbeat_s, idle_s))
        try:
            async for raw in ws:
                message = orjson.loads(raw)
                if message["type"] == "run" and self.cfg.serve and message["job"] not in self.jobs:
                    job = message["job"]
                    self.jobs[job] = asyncio.create_task(self._job(ws, job, message["gen"]))
                    self.jobs[job].add_done_callback(functools.partial(self._forget, job))
                elif message["type"] == "cancel":
                    self.stats.cancels += 1
                    running = self.jobs.get(message["job"])
                    if running is not None:
                        running.cancel()
                    else:
                        await ws.send(_event(message["job"], "done", finish_reason="cancelled", completion_tokens=0))
        finally:
            beats.cancel()

    def _forget(self, job: str, _: object) -> None:
        self.jobs.pop(job, None)

    async def _beats(self, ws: Any, heartbeat_s: float, idle_s: float) -> None:
        """Heartbeats as `Cadence.due` sends them, and pings every 2 periods as `SwarmLink._pings`."""
        sent_at, sent_busy, next_ping = 0.0, None, 0.0
        while True:
            now = time.monotonic()
            busy = bool(self.jobs)
            if busy or busy != sent_busy or now - sent_at >= idle_s - heartbeat_s / 2:
                await ws.send(beat(list(self.jobs)[:64]))
                self.stats.beats += 1
                sent_at, sent_busy = now, busy
            if now >= next_ping:
                await ws.ping()  # its pong is not awaited: the round trip is not what is measured
                self.stats.pings += 1
                next_ping = now + 2 * (heartbeat_s if busy else max(heartbeat_s, idle_s))
            await asyncio.sleep(heartbeat_s)

    async def _job(self, ws: Any, job: str, gen: dict[str, Any]) -> None:
        cfg = self.cfg
        n = min(cfg.tokens, int(gen["max_tokens"]))
        prompt = len(str(gen.get("prompt") or gen.get("messages") or "")) // 4 + 1
        sent = 0
        try:
            arrived = time.monotonic()
            if self.runner.locked():  # placed on a worker that is already full: it waits, as behind a runner
                self.stats.queued += 1
            async with self.runner:
                self.stats.queued_s += time.monotonic() - arrived
                self.stats.jobs += 1
                start = time.monotonic()
                await asyncio.sleep(cfg.first_token_s)
                await ws.send(_event(job, "start", prompt_tokens=prompt, cached_tokens=0))
                for i, piece in enumerate(answer(n)):
                    delay = start + cfg.first_token_s + i / cfg.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send(_event(job, "text", text=piece, ids=[i % len(WORDS) + 1], completion_tokens=i + 1))
                    sent += 1
                    self.stats.tokens += 1
                reason = "length" if n == gen["max_tokens"] else "stop"
                await ws.send(_event(job, "done", finish_reason=reason, prompt_tokens=prompt, completion_tokens=n))
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the link may be gone with it
                await ws.send(_event(job, "done", finish_reason="cancelled", completion_tokens=sent))
            raise


def _event(job: str, ev: str, **fields: Any) -> str:
    return orjson.dumps({"type": "event", "job": job, "ev": ev, **fields}).decode()


def generator(index: int, nodes: list[tuple[str, int, list[int]]], cfg: GenConfig, ready: Any, go: Any,
              stop_flag: Any, linked: Any, out: Any) -> None:  # fmt: skip
    """A load-generator process: its share of the nodes, all opened at `go`, until `stop_flag`.
    `nodes`: (name, index, the order in which it tries the replicas' URLs)."""
    raise_open_files(len(nodes) + 256)
    os.nice(cfg.nice)
    from dragonswarm.tls import client_context

    async def main() -> GenStats:
        ssl_ctx = client_context(Path(cfg.ca))
        stats = GenStats()
        stop = asyncio.Event()
        ready.set()
        while not go.is_set():  # a busy wait of 10 ms steps: the start is the same instant for every process
            await asyncio.sleep(0.01)
        sims = [SimNode(name, i, order, cfg, ssl_ctx, stats, linked, stop) for name, i, order in nodes]
        tasks = [asyncio.create_task(s.run()) for s in sims]
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        for task in tasks:  # a quiet link would wait for its next message: closed now
            task.cancel()
        await asyncio.wait(tasks, timeout=30)
        return stats

    out.put((index, asyncio.run(main()).__dict__))


@dataclass
class Generators:
    """Generator processes started together; `linked[k]`: nodes whose link to URL k is up now."""

    procs: list[Any]
    go: Any
    stop_flag: Any
    linked: Any
    out: Any
    stats: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> float:
        """Open every node's link at once; the monotonic time of the start."""
        t0 = time.monotonic()
        self.go.set()
        return t0

    def connected(self, url: int) -> int:
        return int(self.linked[url])

    def stop(self) -> list[dict[str, Any]]:
        self.stop_flag.set()
        with contextlib.suppress(Exception):
            for _ in self.procs:
                self.stats.append(self.out.get(timeout=60)[1])
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        return self.stats


def start_generators(nodes: list[tuple[str, int, list[int]]], cfg: GenConfig, processes: int) -> Generators:
    """Spawn `processes` generators sharing `nodes` between them, and wait until each is ready."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(processes)]
    go, stop_flag, out = ctx.Event(), ctx.Event(), ctx.Queue()
    linked = ctx.Array("i", len(cfg.urls))
    procs = [ctx.Process(target=generator, daemon=True,
                         args=(k, nodes[k::processes], cfg, ready[k], go, stop_flag, linked, out))
             for k in range(processes)]  # fmt: skip
    for p in procs:
        p.start()
    for e in ready:
        if not e.wait(120):
            raise RuntimeError("a load generator did not start")
    return Generators(procs, go, stop_flag, linked, out)


def totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The generators' counters, added up (the event lists left out)."""
    keys = ("connects", "failures", "drops", "beats", "pings", "jobs", "tokens", "cancels", "queued", "queued_s")
    return {k: sum(s[k] for s in stats) for k in keys} | {
        "last_errors": sorted({s["last_error"] for s in stats if s["last_error"]})[:3]}  # fmt: skip
