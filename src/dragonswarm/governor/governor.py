"""The governor: samples the machine about once a second and holds us to our share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any, Literal

from dragonswarm.governor.caps import CpuCap
from dragonswarm.governor.policy import OwnerPolicy, effective_share, smooth_owner_load, threads_for
from dragonswarm.governor.sampler import Sample, Sampler

log = logging.getLogger("dragonswarm.governor")

WorkKind = Literal["local", "remote"]


class Governor:
    """Decides the share in force and applies it through the active CPU cap.

    Local work (the owner's own requests) runs at `local_share`; work for others at
    `share`. Either shrinks while the owner's other programs use the machine.
    """

    def __init__(self, sampler: Sampler, cap: CpuCap, *, local_share: float, share: float,
                 policy: OwnerPolicy, interval: float):  # fmt: skip
        self.sampler = sampler
        self.cap = cap
        self.local_share = local_share
        self.share = share
        self.policy = policy
        self.interval = interval
        self.owner_load = 0.0
        self.active: Counter[WorkKind] = Counter()
        self.last: Sample = sampler.sample()
        self._task: asyncio.Task[None] | None = None
        self.apply()

    @property
    def n_cpus(self) -> int:
        return self.sampler.n_cpus

    @property
    def owner_busy(self) -> bool:
        """The owner's other programs use more than background noise."""
        return self.owner_load >= self.policy.noise

    def configured_share(self) -> float:
        if self.active["remote"] and not self.active["local"]:
            return self.share
        return self.local_share

    def current_share(self) -> float:
        return effective_share(self.configured_share(), self.owner_load, self.policy)

    def threads(self) -> int:
        return threads_for(self.current_share(), self.n_cpus)

    def apply(self) -> None:
        self.cap.set_share(self.current_share(), self.threads())

    def job_started(self, kind: WorkKind) -> None:
        self.active[kind] += 1
        self.apply()

    def job_finished(self, kind: WorkKind) -> None:
        self.active[kind] -= 1
        self.apply()

    def attach(self, pid: int, *, runner: bool) -> None:
        try:
            self.cap.attach(pid, runner=runner)
        except OSError as exc:  # e.g. the process already exited
            log.warning("could not attach pid %d to the cpu cap: %s", pid, exc)

    def tick(self) -> None:
        self.last = self.sampler.sample()
        self.owner_load = smooth_owner_load(self.owner_load, self.last.owner_load)
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

    def status(self) -> dict[str, Any]:
        s = self.last
        return {
            "cpus": s.n_cpus,
            "cpu_total": round(s.cpu_total, 3),
            "cpu_ours": round(s.cpu_ours, 3),
            "owner_load": round(self.owner_load, 3),
            "owner_busy": self.owner_busy,
            "ram_total": s.ram_total,
            "ram_available": s.ram_available,
            "gpus": [g.__dict__ for g in s.gpus],
            "local_share": self.local_share,
            "share": self.share,
            "share_in_force": round(self.current_share(), 3),
            "threads": self.threads(),
            "mechanism": self.cap.name,
            "active_jobs": dict(self.active),
        }

