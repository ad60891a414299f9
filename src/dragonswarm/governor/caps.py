"""Enforcing a CPU share on our processes: the only module that touches cgroups.

Strongest first: a cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`) on a group
holding the node and its runners; otherwise CPU affinity plus a duty cycle that
suspends and resumes the runners (SIGSTOP/SIGCONT). The active mechanism is reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

import psutil

from dragonswarm.errors import ConfigError
from dragonswarm.governor.policy import cfs_quota_us, duty_cycle

log = logging.getLogger("dragonswarm.governor")

PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CpuCap(Protocol):
    name: str

    def attach(self, pid: int, *, runner: bool) -> None:
        """Hold `pid` to the cap. The node itself is attached with runner=False."""

    def set_share(self, share: float, threads: int) -> None:
        """Limit everything attached to `share` of the machine."""

    def close(self) -> None:
        """Release every process and remove what was created."""


class NoCap:
    name = "none"

    def attach(self, pid: int, *, runner: bool) -> None:
        pass

    def set_share(self, share: float, threads: int) -> None:
        pass

    def close(self) -> None:
        pass


class _CgroupCap:
    """Shared by v1 and v2: one directory per node, holding the node and its runners."""

    name = "cgroup"

    def __init__(self, base: Path, group: Path, n_cpus: int):
        self.base = base
        self.group = group
        self.n_cpus = n_cpus
        self._quota: int | str | None = "unset"
        group.mkdir(parents=True, exist_ok=True)

    def attach(self, pid: int, *, runner: bool) -> None:
        (self.group / "cgroup.procs").write_text(str(pid))

    def set_share(self, share: float, threads: int) -> None:
        quota = cfs_quota_us(share, self.n_cpus, PERIOD_US)
        if quota != self._quota:
            self._write_quota(quota)
            self._quota = quota

    def _write_quota(self, quota: int | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        procs = self.group / "cgroup.procs"
        try:
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):  # exited meanwhile
                    (self.base / "cgroup.procs").write_text(pid)
            self.group.rmdir()
        except OSError as exc:
            log.debug("cgroup cleanup of %s: %s", self.group, exc)


class CgroupV1Cap(_CgroupCap):
    name = "cgroup-v1"

    def __init__(self, base: Path, group: Path, n_cpus: int):
        super().__init__(base, group, n_cpus)
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        _weigh(group, n_cpus)

    def _write_quota(self, quota: int | None) -> None:
        (self.group / "cpu.cfs_quota_us").write_text(str(quota if quota is not None else -1))


class CgroupV2Cap(_CgroupCap):
    name = "cgroup-v2"

    def __init__(self, base: Path, group: Path, n_cpus: int):
        super().__init__(base, group, n_cpus)
        _weigh(group, n_cpus)

    def _write_quota(self, quota: int | None) -> None:
        value = "max" if quota is None else str(quota)
        (self.group / "cpu.max").write_text(f"{value} {PERIOD_US}")


class DutyCycleCap:
    """Affinity to `threads` cores plus suspend/resume of the runners in a fixed period."""

    name = "affinity+duty-cycle"

    def __init__(self, n_cpus: int, period_s: float = 0.05):
        self.n_cpus = n_cpus
        self.period_s = period_s
        self._pids: set[int] = set()
        self._duty = 1.0
        self._threads = n_cpus
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)
        self._thread.start()

    def attach(self, pid: int, *, runner: bool) -> None:
        if not runner:
            return  # never suspend the node itself: it must keep answering
        with self._lock:
            self._pids.add(pid)
        self._apply_affinity(pid)

    def set_share(self, share: float, threads: int) -> None:
        with self._lock:
            changed = threads != self._threads
            self._threads = threads
            self._duty = duty_cycle(share, self.n_cpus, threads)
            pids = list(self._pids)
        if changed:
            for pid in pids:
                self._apply_affinity(pid)

    def _apply_affinity(self, pid: int) -> None:
        with contextlib.suppress(OSError):  # exited meanwhile
            os.sched_setaffinity(pid, range(min(self._threads, self.n_cpus)))

    def _signal_all(self, sig: signal.Signals) -> None:
        with self._lock:
            pids = list(self._pids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                with self._lock:
                    self._pids.discard(pid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            duty = self._duty
            if duty >= 1.0 or not self._pids:
                self._stop.wait(self.period_s)
                continue
            self._signal_all(signal.SIGCONT)
            time.sleep(self.period_s * duty)
            self._signal_all(signal.SIGSTOP)
            self._stop.wait(self.period_s * (1.0 - duty))
        self._signal_all(signal.SIGCONT)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._signal_all(signal.SIGCONT)


def _weigh(group: Path, n_cpus: int) -> None:
    """Weigh a group like `n_cpus` busy threads rather than like one.

    The scheduler weighs a whole group as one entity of default weight, as much as a
    single thread; ours runs one busy thread per core. The quota, not the weight, is
    what limits us.
    """
    if (group / "cpu.shares").exists():  # v1
        (group / "cpu.shares").write_text(str(1024 * n_cpus))
    else:  # v2
        (group / "cpu.weight").write_text(str(min(10_000, 100 * n_cpus)))


def _sweep_stale(parent: Path) -> None:
    """Remove groups left behind by nodes that died without cleaning up."""
    for group in parent.glob("node-*"):
        try:
            pid = int(group.name.split("-", 1)[1])
            if not psutil.pid_exists(pid) and not (group / "cgroup.procs").read_text().strip():
                group.rmdir()
        except (ValueError, OSError):
            continue


def _cgroup_v2(n_cpus: int) -> CpuCap:
    root = CGROUP_ROOT
    if "cpu" not in (root / "cgroup.controllers").read_text().split():
        raise OSError("cgroup v2 without the cpu controller")
    (root / "cgroup.subtree_control").write_text("+cpu")
    parent = root / "dragonswarm"
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.subtree_control").write_text("+cpu")
    _weigh(parent, n_cpus)
    _sweep_stale(parent)
    return CgroupV2Cap(root, parent / f"node-{os.getpid()}", n_cpus)


def _cgroup_v1(n_cpus: int) -> CpuCap:
    for name in ("cpu", "cpu,cpuacct"):
        base = CGROUP_ROOT / name
        if (base / "cpu.cfs_quota_us").exists():
            parent = base / "dragonswarm"
            parent.mkdir(exist_ok=True)
            _weigh(parent, n_cpus)
            _sweep_stale(parent)
            return CgroupV1Cap(base, parent / f"node-{os.getpid()}", n_cpus)
    raise OSError("no cgroup v1 cpu hierarchy")


def open_cap(mechanism: str, n_cpus: int) -> CpuCap:
    """The strongest mechanism allowed by `mechanism` (auto, cgroup, duty, none)."""
    if mechanism == "none":
        return NoCap()
    if mechanism in ("auto", "cgroup"):
        errors = []
        for opener in (_cgroup_v2, _cgroup_v1):
            try:
                cap = opener(n_cpus)
                log.info("cpu cap: %s at %s", cap.name, getattr(cap, "group", ""))
                return cap
            except OSError as exc:
                errors.append(f"{opener.__name__.lstrip('_')}: {exc}")
        if mechanism == "cgroup":
            raise ConfigError("no writable cgroup CPU controller (" + "; ".join(errors) + ")")
        log.info("no cgroup CPU control (%s); using affinity + duty cycle", "; ".join(errors))
    return DutyCycleCap(n_cpus)
