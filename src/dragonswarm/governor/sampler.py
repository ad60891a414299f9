"""Sampling the machine: the only module that touches psutil's CPU and memory readings
(NVML lives in `gpus.py`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from dragonswarm.governor.gpus import GpuSample, Nvml

# Under `dragon up` our tree holds other nodes whose runners we do not attach ourselves;
# a walk of the whole process table finds them. It reads every /proc entry, so it is done
# only this often, or sooner when others' load looks like the owner's. A node on its own
# never walks: its runners are its children, attached as they start.
RESCAN_S = 2.0
RESCAN_SUSPECT_S = 0.5
SUSPECT_LOAD = 0.05


@dataclass
class Sample:
    at: float
    n_cpus: int
    cpu_total: float  # fraction of our cores in use, 0..1
    cpu_ours: float  # fraction used by this node's process tree
    owner_load: float  # fraction used by everything else
    ram_total: int
    ram_available: int
    gpus: list[GpuSample] = field(default_factory=list)


def allowed_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask, set by a container or `taskset`)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(psutil.cpu_count() or 1))


def cumulative_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and of its children that it has reaped.

    A runner that exits hands its time to its parent's children counters when reaped, so
    a sum of this over a process tree never drops: the CPU a runner used in its last
    moments is still counted as ours, never as the owner's.
    """
    t = proc.cpu_times()
    return float(t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds of a process tree: every live member and the children they reaped."""
    total = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for proc in procs:
        try:
            total += cumulative_cpu(proc)
        except psutil.Error:
            continue  # exited between listing and reading
    return total


class Sampler:
    """CPU of our cores and of our process tree, from the OS's own accounting."""

    def __init__(self, root_pid: int | None = None, cpus: Sequence[int] | None = None, n_cpus: int | None = None):
        self.root = psutil.Process(root_pid or os.getpid())
        self.cpus = list(cpus) if cpus is not None else allowed_cpus()
        self.n_cpus = n_cpus or len(self.cpus)
        self._walk = self.root.pid != os.getpid()  # the tree of `dragon up`, not just our own
        self._tree: dict[int, psutil.Process] = {self.root.pid: self.root}
        self._rescanned = 0.0
        if self._walk:
            self._rescan()
        self._last_busy, self._last_elapsed = self._machine_times()
        self._last_ours = self._tree_cpu()
        self._nvml = Nvml.open()

    def track(self, pid: int) -> None:
        """Count `pid` as ours from now on (a runner we just started)."""
        with contextlib.suppress(psutil.Error):  # already gone: nothing to count
            self._tree[pid] = psutil.Process(pid)

    def _rescan(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = [self.root]
        self._tree = {p.pid: self._tree.get(p.pid, p) for p in procs}
        self._rescanned = time.monotonic()

    def _machine_times(self) -> tuple[float, float]:
        """(busy, elapsed) CPU seconds of our cores since boot, from the same kernel counters.

        The window is measured by the counters themselves, not by our clock: a node held to its
        own quota may be paused between reading them and reading a clock, which would make a
        full machine look partly idle.
        """
        per_cpu = psutil.cpu_times(percpu=True)
        busy = elapsed = 0.0
        for core in self.cpus:
            if core < len(per_cpu):
                t = per_cpu[core]
                # Linux counts guest time inside user time already, so it is not added again.
                # Steal time is the hypervisor's, not the owner's: it must not shrink our share.
                work = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                busy += work
                elapsed += work + t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
        return busy, elapsed

    def _tree_cpu(self) -> float:
        total, gone = self._read_tree()
        if gone:
            # A member was reaped while we read: its time moved into its parent's counters,
            # perhaps after we had read the parent. Read the rest again, all after the move.
            total, _ = self._read_tree()
        return total

    def _read_tree(self) -> tuple[float, bool]:
        total, gone = 0.0, False
        for pid, proc in list(self._tree.items()):
            try:
                total += cumulative_cpu(proc)
            except psutil.Error:
                del self._tree[pid]
                gone = True
        return total, gone

    def sample(self) -> Sample:
        if self._walk and time.monotonic() - self._rescanned >= RESCAN_S:
            self._rescan()
        busy, elapsed = self._machine_times()
        ours = self._tree_cpu()
        now = time.monotonic()
        wall = max(1e-3, elapsed - self._last_elapsed)  # CPU-seconds of our cores in the window
        cpu_total = min(1.0, max(0.0, (busy - self._last_busy) / wall))
        cpu_ours = min(cpu_total, max(0.0, (ours - self._last_ours) / wall))
        if self._walk and cpu_total - cpu_ours >= SUSPECT_LOAD and now - self._rescanned >= RESCAN_SUSPECT_S:
            # Others look busy: first make sure they are not processes of ours we have not met.
            known = set(self._tree)
            self._rescan()
            for pid in set(self._tree) - known:
                try:  # met now: what it used since the last sample cannot be told apart, count it all
                    ours += cumulative_cpu(self._tree[pid])
                except psutil.Error:
                    continue
            cpu_ours = min(cpu_total, max(0.0, (ours - self._last_ours) / wall))
        self._last_elapsed, self._last_busy, self._last_ours = elapsed, busy, ours
        mem = psutil.virtual_memory()
        return Sample(
            at=time.time(),
            n_cpus=self.n_cpus,
            cpu_total=cpu_total,
            cpu_ours=cpu_ours,
            owner_load=cpu_total - cpu_ours,
            ram_total=mem.total,
            ram_available=mem.available,
            gpus=self._nvml.sample(self.our_pids()) if self._nvml else [],
        )

    def our_pids(self) -> set[int]:
        return set(self._tree)

    def ram_available(self) -> int:
        return int(psutil.virtual_memory().available)

    def ram_total(self) -> int:
        return int(psutil.virtual_memory().total)

    def close(self) -> None:
        if self._nvml:
            self._nvml.close()
