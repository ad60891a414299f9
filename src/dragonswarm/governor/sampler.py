"""Sampling the machine: the only module that touches psutil and NVML."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

log = logging.getLogger("dragonswarm.governor")


@dataclass
class GpuSample:
    index: int
    name: str
    util: float  # 0..1
    mem_used: int
    mem_total: int


@dataclass
class Sample:
    at: float
    n_cpus: int
    cpu_total: float  # fraction of the whole machine in use, 0..1
    cpu_ours: float  # fraction used by this node's process tree
    owner_load: float  # fraction used by everything else
    ram_total: int
    ram_available: int
    gpus: list[GpuSample] = field(default_factory=list)


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of a process and all its live descendants."""
    total = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue  # exited between listing and reading
    return total


class Sampler:
    """CPU of the whole machine and of our process tree, from the OS's own accounting."""

    def __init__(self, root_pid: int | None = None):
        self.root = psutil.Process(root_pid or os.getpid())
        self.n_cpus = psutil.cpu_count() or 1
        self._last_time = time.monotonic()
        self._last_busy = self._machine_busy()
        self._last_ours = self._tree_cpu()
        self._nvml = _Nvml.open()

    def _machine_busy(self) -> float:
        t = psutil.cpu_times()
        # Linux counts guest time inside user time already, so it is not added again.
        # Steal time is the hypervisor's, not the owner's: it must not shrink our share.
        extra = sum(getattr(t, name, 0.0) for name in ("irq", "softirq"))
        return float(t.user + t.nice + t.system + extra)

    def _tree_cpu(self) -> float:
        return tree_cpu_seconds(self.root)

    def sample(self) -> Sample:
        now = time.monotonic()
        busy = self._machine_busy()
        ours = self._tree_cpu()
        wall = max(1e-3, now - self._last_time) * self.n_cpus
        cpu_total = min(1.0, max(0.0, (busy - self._last_busy) / wall))
        # A runner that exited takes its counted time with it: clamp at zero.
        cpu_ours = min(1.0, max(0.0, (ours - self._last_ours) / wall))
        self._last_time, self._last_busy, self._last_ours = now, busy, ours
        mem = psutil.virtual_memory()
        return Sample(
            at=time.time(),
            n_cpus=self.n_cpus,
            cpu_total=cpu_total,
            cpu_ours=cpu_ours,
            owner_load=max(0.0, cpu_total - cpu_ours),
            ram_total=mem.total,
            ram_available=mem.available,
            gpus=self._nvml.sample() if self._nvml else [],
        )

    def ram_available(self) -> int:
        return int(psutil.virtual_memory().available)

    def ram_total(self) -> int:
        return int(psutil.virtual_memory().total)

    def close(self) -> None:
        if self._nvml:
            self._nvml.close()


class _Nvml:
    """NVIDIA GPUs through nvidia-ml-py, when the library and a driver are present."""

    def __init__(self, pynvml: Any, count: int):
        self.pynvml = pynvml
        self.count = count

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetCount())
        except Exception:  # no package, no driver or no GPU: all mean "no GPU to report"
            return None

    def sample(self) -> list[GpuSample]:
        out = []
        for i in range(self.count):
            try:
                h = self.pynvml.nvmlDeviceGetHandleByIndex(i)
                util = self.pynvml.nvmlDeviceGetUtilizationRates(h)
                mem = self.pynvml.nvmlDeviceGetMemoryInfo(h)
                name = self.pynvml.nvmlDeviceGetName(h)
                out.append(GpuSample(i, str(name), util.gpu / 100.0, int(mem.used), int(mem.total)))
            except Exception as exc:  # a GPU that stops answering is skipped, not fatal
                log.debug("nvml sample failed for gpu %d: %s", i, exc)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):  # shutting down anyway
            self.pynvml.nvmlShutdown()
