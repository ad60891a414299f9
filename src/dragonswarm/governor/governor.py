"""The governor: samples the machine a few times a second and holds us to our share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Literal

from dragonswarm.governor.caps import CpuCap
from dragonswarm.governor.policy import (
    GpuPolicy,
    OwnerPolicy,
    effective_share,
    gpu_budget,
    held_owner_load,
    machine_contended,
    mps_thread_percentage,
    owner_active,
    owner_on_gpu,
    threads_for,
)
from dragonswarm.governor.sampler import Sample, Sampler

log = logging.getLogger("dragonswarm.governor")

WorkKind = Literal["local", "remote"]
MPS_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


class Governor:
    """Decides the share in force and applies it through the active CPU cap.

    Local work (the owner's own requests) runs at `local_share`; work for others at
    `share`. Either shrinks while the owner's other programs use the machine. Whoever
    registered with `on_threads` hears the thread count in force when it changes, so a
    runner follows the share between two tokens, not only between two jobs.
    """

    def __init__(self, sampler: Sampler, cap: CpuCap, *, local_share: float, share: float, policy: OwnerPolicy,
                 interval: float, gpu_share: float | None = None, gpu_policy: GpuPolicy | None = None):  # fmt: skip
        self.sampler = sampler
        self.cap = cap
        self.local_share = local_share
        self.share = share
        self.gpu_share = local_share if gpu_share is None else gpu_share
        self.policy = policy
        self.gpu_policy = gpu_policy or GpuPolicy()
        self.interval = interval
        self.owner_load = 0.0  # held: the highest reading of the last `policy.hold_s`
        self.contended = False  # the last sample found the owner and us filling the machine
        self.gpu_owner_util = 0.0  # held like owner_load
        # Whether a runner has layers on the GPU (so the owner's GPU use concerns us); the node sets it.
        self.gpu_in_use: Callable[[], bool] = lambda: False
        self.active: Counter[WorkKind] = Counter()
        # Jobs per model process: one process decodes all of its jobs together, so the duty
        # cycle's budget is split between the processes at work, not between their jobs.
        self._runners: Counter[str] = Counter()
        self._history: deque[tuple[float, float]] = deque()
        self._gpu_history: deque[tuple[float, float]] = deque()
        self._listeners: list[Callable[[int], None]] = []
        self._threads: int | None = None
        self.last: Sample = sampler.sample()
        self._task: asyncio.Task[None] | None = None
        self.apply()

    @property
    def n_cpus(self) -> int:
        return self.sampler.n_cpus

    @property
    def cpu_owner_busy(self) -> bool:
        """The owner's other programs use more than background noise."""
        return owner_active(self.owner_load, self.policy)

    @property
    def gpu_owner_busy(self) -> bool:
        return self.gpu_in_use() and owner_on_gpu(self.gpu_owner_util, self.gpu_policy)

    @property
    def owner_busy(self) -> bool:
        return self.cpu_owner_busy or self.gpu_owner_busy

    def configured_share(self) -> float:
        if self.active["remote"] and not self.active["local"]:
            return self.share
        return self.local_share

    def current_share(self) -> float:
        return effective_share(self.configured_share(), self.owner_load, self.policy, contended=self.contended)

    def threads(self) -> int:
        return threads_for(self.current_share(), self.n_cpus)

    def on_threads(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def apply(self) -> None:
        share, threads = self.current_share(), self.threads()
        self.cap.set_share(share, threads, busy=max(1, len(self._runners)))
        if threads != self._threads:
            self._threads = threads
            for listener in self._listeners:
                listener(threads)

    def job_started(self, kind: WorkKind, runner: str = "") -> None:
        """A job started on the model process `runner` (its jobs share that one process)."""
        self.active[kind] += 1
        self._runners[runner] += 1
        self.apply()

    def job_finished(self, kind: WorkKind, runner: str = "") -> None:
        self.active[kind] -= 1
        self._runners[runner] -= 1
        if self._runners[runner] <= 0:
            del self._runners[runner]
        self.apply()

    def attach(self, pid: int, *, runner: bool) -> None:
        self.sampler.track(pid)
        try:
            self.cap.attach(pid, runner=runner)
        except OSError as exc:  # e.g. the process already exited
            log.warning("could not attach pid %d to the cpu cap: %s", pid, exc)

    def detach(self, pid: int) -> None:
        self.cap.detach(pid)

    def runner_threads(self, pid: int, threads: int) -> None:
        """A runner now computes with `threads` threads (it takes up a change at its next step)."""
        self.cap.runner_threads(pid, threads)

    def tick(self) -> None:
        s = self.last = self.sampler.sample()
        now = time.monotonic()
        self.owner_load = _hold(self._history, now, s.owner_load, self.policy.hold_s)
        self.contended = machine_contended(s.cpu_total, s.owner_load, self.policy)
        gpu_owner = max((g.owner_util or 0.0 for g in s.gpus), default=0.0)
        self.gpu_owner_util = _hold(self._gpu_history, now, gpu_owner, self.policy.hold_s)
        self.apply()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # a failed sample must not stop enforcement for good
                log.exception("governor sample failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="governor")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.cap.close()
        self.sampler.close()

    def gpu_budget(self) -> int | None:
        """Video memory a runner loading now may fill, on the first GPU (llama.cpp's main GPU).

        None where NVML sees no GPU: then llama.cpp offloads what it can (Metal, ROCm, Vulkan,
        or CUDA without NVML), as it would on its own, unless the GPU share is 0. While the
        owner uses the GPU, nothing new goes onto it.
        """
        if self.gpu_share <= 0.0:
            return 0
        gpus = self.last.gpus
        if not gpus:
            return None
        if owner_on_gpu(self.gpu_owner_util, self.gpu_policy):
            return 0
        g = gpus[0]
        return gpu_budget(g.mem_total, g.mem_used, g.ours_mem, self.gpu_share, self.gpu_policy)

    def runner_env(self) -> dict[str, str] | None:
        """The environment for a new runner: on a GPU machine, MPS's thread percentage at our GPU
        share (unless the owner set one); None (inherit the node's) without a GPU."""
        if not self.last.gpus or MPS_PERCENTAGE in os.environ:
            return None
        return {**os.environ, MPS_PERCENTAGE: str(mps_thread_percentage(self.gpu_share))}

    def status(self) -> dict[str, Any]:
        s = self.last
        return {
            "sampled_at": round(s.at, 3),  # wall clock of the sample the rest comes from
            "cpus": s.n_cpus,
            "cpu_total": round(s.cpu_total, 3),
            "cpu_ours": round(s.cpu_ours, 3),
            "owner_load": round(self.owner_load, 3),
            "owner_busy": self.owner_busy,
            "contended": self.contended,
            "ram_total": s.ram_total,
            "ram_available": s.ram_available,
            "gpus": [g.__dict__ for g in s.gpus],
            "gpu_share": self.gpu_share,
            "gpu_owner_busy": self.gpu_owner_busy,
            "local_share": self.local_share,
            "share": self.share,
            "share_in_force": round(self.current_share(), 3),
            "threads": self.threads(),
            "mechanism": self.cap.name,
            "mechanism_reason": self.cap.reason,
            "sample_interval_s": self.interval,
            "owner_hold_s": self.policy.hold_s,
            "active_jobs": dict(self.active),
        }


def _hold(history: deque[tuple[float, float]], now: float, reading: float, hold_s: float) -> float:
    history.append((now, reading))
    while history and now - history[0][0] > hold_s:
        history.popleft()
    return held_owner_load(history, now, hold_s)
