"""NVIDIA GPUs through NVML (nvidia-ml-py): the only module that touches it.

Each reading splits the GPU between us (our runners' processes) and the owner (every
other process on it): a game or a render is owner activity, as a compile is on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger("dragonswarm.governor")


@dataclass
class GpuSample:
    index: int
    name: str
    util: float  # 0..1, the whole device
    mem_used: int
    mem_total: int
    ours_mem: int = 0  # held by our runners
    owner_mem: int = 0  # held by every other process
    # The owner's share of the device's time, 0..1. None when NVML cannot split it per
    # process and our runners are on the device: then it cannot be told from ours.
    owner_util: float | None = None


class Nvml:
    """NVIDIA GPUs, when the library and a driver are present."""

    def __init__(self, pynvml: Any, count: int):
        self.pynvml = pynvml
        self.count = count
        self._seen: dict[int, int] = {}  # device -> timestamp of the last per-process utilisation read

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetCount())
        except Exception:  # no package, no driver or no GPU: all mean "no GPU to report"
            return None

    def sample(self, ours: set[int]) -> list[GpuSample]:
        out = []
        for i in range(self.count):
            try:
                out.append(self._device(i, ours))
            except Exception as exc:  # a GPU that stops answering is skipped, not fatal
                log.debug("nvml sample failed for gpu %d: %s", i, exc)
        return out

    def _device(self, i: int, ours: set[int]) -> GpuSample:
        nv = self.pynvml
        h = nv.nvmlDeviceGetHandleByIndex(i)
        util = min(1.0, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        # Within the bounds of the heartbeat's GPU record (protocol/swarm.py GpuRecord).
        sample = GpuSample(i, str(nv.nvmlDeviceGetName(h))[:128], util, int(mem.used), int(mem.total))
        on_device: set[int] = set()
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            with contextlib.suppress(nv.NVMLError):
                for proc in getter(h):
                    used = int(proc.usedGpuMemory or 0)  # None where the driver will not say
                    on_device.add(proc.pid)
                    if proc.pid in ours:
                        sample.ours_mem += used
                    else:
                        sample.owner_mem += used
        if any(not psutil.pid_exists(pid) for pid in on_device):
            # NVML names processes by the host's pids, and we run in a container with pids of our
            # own: ours cannot be told from the owner's, and we must not back off from ourselves.
            sample.owner_util = None
        else:
            sample.owner_util = self._owner_util(h, i, util, ours, bool(on_device & ours))
        return sample

    def _owner_util(self, h: Any, i: int, util: float, ours: set[int], ours_on_device: bool) -> float | None:
        nv = self.pynvml
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(h, self._seen.get(i, 0))
        except nv.NVMLError:  # not supported on this GPU, or no sample since the last read
            return None if ours_on_device else util
        if samples:
            self._seen[i] = max(s.timeStamp for s in samples)
        return min(1.0, float(sum(s.smUtil for s in samples if s.pid not in ours)) / 100.0)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # shutting down anyway
            self.pynvml.nvmlShutdown()
