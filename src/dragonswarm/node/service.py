"""Loaded models and the jobs that run on them, for the local API and for the swarm
link alike: both come in as `Generation`s with a work kind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from dragonswarm.engines.models import model_sha256
from dragonswarm.engines.runner import RunnerProcess
from dragonswarm.errors import InsufficientMemory, ModelNotFound, Overloaded, Timeout
from dragonswarm.governor.governor import Governor, WorkKind
from dragonswarm.governor.policy import default_parallel, ram_needed
from dragonswarm.node.metrics import Course, NodeMetrics, StreamRate
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.runner import Generation, run_job
from dragonswarm.settings import ModelSpec, NodeSettings

log = logging.getLogger("dragonswarm.node")

RESTART_BACKOFF_S = (0.5, 2.0, 8.0, 30.0)


@dataclass(frozen=True)
class LocalModel:
    """A model file this node serves: its name and tags, and its size."""

    spec: ModelSpec
    size: int


class ModelSlot:
    """One model the node can serve: at most one runner, decoding up to `parallel` jobs together."""

    def __init__(self, model: LocalModel, settings: NodeSettings, governor: Governor):
        self.spec = model.spec
        self.size = model.size
        self.sha256: str | None = None  # the file's identity, once hashed (`NodeService.identify`)
        self.settings = settings
        self.governor = governor
        self.runner: RunnerProcess | None = None
        self.parallel = settings.parallel or default_parallel(
            model.size, settings.n_ctx, settings.ram_margin_mb << 20, governor.sampler.ram_available(),
            governor.n_cpus, max(settings.share, settings.local_share))  # fmt: skip
        self.seats = asyncio.Semaphore(self.parallel)  # one per sequence of the runner, held by a request
        self.running = 0  # requests holding a seat
        self._start_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None  # held so the task is not collected
        self.waiting = 0
        self.last_used = time.monotonic()
        self.crashes = 0
        self.stats: Counter[str] = Counter()  # jobs completed/cancelled/failed, tokens generated
        self.created = int(time.time())

    def gpu_layers(self) -> int:
        """Layers the loaded runner holds on the GPU (0 when none, or nothing is loaded)."""
        return int(self.runner.info.get("gpu_layers", 0)) if self.loaded and self.runner else 0

    @property
    def full(self) -> bool:
        """Every sequence is taken: the next request waits."""
        return self.running >= self.parallel

    @property
    def loaded(self) -> bool:
        return self.runner is not None and self.runner.alive

    @property
    def loading(self) -> bool:
        """A runner is being started for this model now."""
        return self._start_lock.locked() and not self.loaded

    async def ensure_runner(self) -> RunnerProcess:
        async with self._start_lock:
            if self.runner is not None and self.runner.alive:
                return self.runner
            needed = ram_needed(self.size, self.settings.n_ctx * self.parallel, self.settings.ram_margin_mb << 20)
            available = self.governor.sampler.ram_available()
            if needed > available:
                raise InsufficientMemory(
                    f"model {self.spec.name!r} needs about {needed / 2**30:.1f} GiB of RAM "
                    f"(weights, context and a safety margin) but only {available / 2**30:.1f} GiB "
                    "is free; refusing to load it rather than swap the machine"
                )
            runner = RunnerProcess(
                self.spec.name, self.spec.path, self.settings.n_ctx, self.governor.threads(),
                self.settings.logs_dir / f"runner-{self.spec.name}.log", self.stats, self.governor.gpu_budget(),
                self.governor.runner_env(), self.governor.runner_threads, self.parallel,
            )  # fmt: skip
            log.info("loading model %s from %s", self.spec.name, self.spec.path)
            try:
                await runner.start(on_spawn=lambda pid: self.governor.attach(pid, runner=True))
            except BaseException:
                if runner.pid is not None:
                    self.governor.detach(runner.pid)
                raise
            runner.set_threads(self.governor.threads())  # the share may have moved while it loaded
            self.runner = runner
            self._supervisor = asyncio.create_task(self._supervise(runner), name=f"supervise-{self.spec.name}")
            return runner

    async def _supervise(self, runner: RunnerProcess) -> None:
        """Restart a runner that crashed, with backoff, so the model stays warm."""
        started = time.monotonic()
        await runner.exited.wait()
        if runner.pid is not None:  # a crash: released from the cap (a no-op after unload)
            self.governor.detach(runner.pid)
        if runner.stopping or self.runner is not runner:
            return
        self.crashes = 0 if time.monotonic() - started > 60 else self.crashes + 1
        delay = RESTART_BACKOFF_S[min(self.crashes, len(RESTART_BACKOFF_S) - 1)]
        await asyncio.sleep(delay)
        if self.runner is runner:  # nobody restarted or unloaded it meanwhile
            try:
                await self.ensure_runner()
                self.stats["restarts"] += 1
                log.info("runner for %s restarted after a crash", self.spec.name)
            except Exception as exc:  # next request retries and reports the error
                log.error("restarting runner for %s failed: %s", self.spec.name, exc)

    async def unload(self) -> None:
        async with self._start_lock:
            runner, self.runner = self.runner, None
            if runner is not None:
                if runner.pid is not None:  # released first: a suspended runner would exit slowly
                    self.governor.detach(runner.pid)
                await runner.stop()
                log.info("unloaded model %s", self.spec.name)

    def status(self) -> dict[str, Any]:
        runner = self.runner if self.loaded else None
        return {
            "name": self.spec.name,
            "path": str(self.spec.path),
            "sha256": self.sha256,
            "tags": list(self.spec.tags),
            "size": self.size,
            "loaded": runner is not None,
            "busy": self.running > 0,
            "full": self.full,
            "parallel": self.parallel,
            "running": self.running,
            "waiting": self.waiting,
            "runner_pid": runner.pid if runner else None,
            "n_ctx": runner.info.get("n_ctx") if runner else None,
            "gpu_layers": self.gpu_layers() if runner else None,
            "threads": runner.threads_in_force if runner else None,
            "idle_s": round(time.monotonic() - self.last_used, 1),
            "restarts": self.stats["restarts"],
            "jobs": {k: self.stats[k] for k in ("completed", "cancelled", "failed")},
            "tokens_generated": self.stats["tokens"],
        }


class NodeService:
    def __init__(self, settings: NodeSettings, governor: Governor, models: list[LocalModel]):
        self.settings = settings
        self.governor = governor
        self.slots = {m.spec.name: ModelSlot(m, settings, governor) for m in models}
        governor.on_threads(self._threads_changed)
        governor.gpu_in_use = lambda: any(slot.gpu_layers() for slot in self.slots.values())
        self._idle_task: asyncio.Task[None] | None = None
        self._identify_task: asyncio.Task[None] | None = None
        self.identified = asyncio.Event()  # every model that can be served has its sha256
        self.metrics = NodeMetrics()  # what it served, for `GET /metrics` and the node's page
        self.stream_rate = StreamRate(time.monotonic())  # what each stream gets, for the swarm's placement

    async def identify(self) -> None:
        """Hash every model file once (cached by size and mtime), off the event loop: the
        owner is served at once, and the swarm hears of the models when they are known."""
        cache = self.settings.models_dir / "sha256-cache.json"
        ram = self.governor.sampler.ram_total()
        for slot in self.slots.values():
            if slot.size > ram:  # it can never load here: reading it all would be wasted
                log.warning("model %s is larger than this machine's memory; not offered to the swarm",
                            slot.spec.name)  # fmt: skip
                continue
            try:
                slot.sha256 = await asyncio.to_thread(model_sha256, slot.spec.path, cache)
            except OSError as exc:  # that model stays local; the others still join the swarm
                log.error("cannot hash model %s: %s", slot.spec.name, exc)
        self.identified.set()

    def capacity(self) -> int:
        """Jobs for the swarm this node may run at once: the sequences of its narrowest model
        (the orchestrator places work per node, and any of its models may be asked for)."""
        return min((slot.parallel for slot in self.slots.values()), default=1)

    def _threads_changed(self, threads: int) -> None:
        for slot in self.slots.values():
            if slot.runner is not None:
                slot.runner.set_threads(threads)

    def slot(self, name: str) -> ModelSlot:
        try:
            return self.slots[name]
        except KeyError:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ModelNotFound(f"the model {name!r} does not exist on this node (models: {known})",
                                param="model") from None  # fmt: skip

    async def run_jobs(self, slot: ModelSlot, gens: list[Generation], kind: WorkKind = "local",
                       ids: list[str] | None = None) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
        """Run the generations of one request in order on the model's runner.

        Yields (index, event). A request waits its turn behind a bounded queue;
        when the queue is full it is refused at once with Overloaded (429). It ends by
        `request_timeout_s` with a 504, waiting included, and a runner that makes no
        progress for `stall_timeout_s` is restarted (the job fails with `runner_stalled`).
        Counted in `metrics` as it ends, however it ends.
        """
        course = Course(time.monotonic(), len(gens))
        try:
            # Closed with this generator (a client gone): the runner's job is cancelled and the model freed at once.
            async with contextlib.aclosing(self._run_jobs(slot, gens, kind, ids)) as events:
                async for index, event in events:
                    course.see(event, time.monotonic())
                    yield index, event
        except Exception:  # refused (queue full), timed out waiting, or failed: counted as an error
            course.failed = True
            raise
        finally:
            self.metrics.served(kind, course)

    async def _run_jobs(self, slot: ModelSlot, gens: list[Generation], kind: WorkKind,
                        ids: list[str] | None) -> AsyncGenerator[tuple[int, Event]]:  # fmt: skip
        s = self.settings
        deadline = time.monotonic() + s.request_timeout_s
        if slot.full and slot.waiting >= s.max_queue:
            raise Overloaded(f"model {slot.spec.name!r} is busy and its queue is full; retry shortly")
        slot.waiting += 1
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await slot.seats.acquire()
        except TimeoutError:
            raise Timeout(f"model {slot.spec.name!r} stayed busy for the whole request timeout "
                          f"({s.request_timeout_s:.0f} s)") from None  # fmt: skip
        finally:
            slot.waiting -= 1
        slot.running += 1
        generating = False  # counted in the stream rate from its first token: decoding, not loading or reading
        try:
            self.governor.job_started(kind, slot.spec.name)
            runner = await slot.ensure_runner()
            for index, gen in enumerate(gens):
                job = run_job(ids[index] if ids else uuid.uuid4().hex, gen)
                async for event in runner.run(job, s.stall_timeout_s, deadline):
                    if event.get("ev") == "text":
                        if not generating:
                            generating = True
                            self.stream_rate.started(time.monotonic())
                        self.stream_rate.generated(len(event.get("ids", ())))
                    elif event.get("ev") in ("done", "error") and generating:
                        generating = False
                        self.stream_rate.ended(time.monotonic())
                    yield index, event
                    if event.get("ev") == "error":
                        return
        finally:
            slot.last_used = time.monotonic()
            try:
                self.governor.job_finished(kind, slot.spec.name)
            finally:  # whatever the cap did, the next request must get the model
                if generating:
                    self.stream_rate.ended(time.monotonic())
                slot.running -= 1
                slot.seats.release()

    async def _unload_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.idle_unload_s / 2))
            now = time.monotonic()
            for slot in self.slots.values():
                idle = now - slot.last_used
                if slot.loaded and not slot.running and idle >= self.settings.idle_unload_s:
                    log.info("model %s idle for %.0f s", slot.spec.name, idle)
                    await slot.unload()

    def start(self) -> None:
        self._idle_task = asyncio.create_task(self._unload_idle(), name="idle-unload")
        self._identify_task = asyncio.create_task(self.identify(), name="identify-models")

    async def close(self) -> None:
        for task in (self._idle_task, self._identify_task):
            if task:
                task.cancel()
        await asyncio.gather(*(slot.unload() for slot in self.slots.values()), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {"models": [slot.status() for slot in self.slots.values()]}

