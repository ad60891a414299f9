"""Linux cgroups: the only module that reads or writes them.

A CPU quota on a group that holds the node and its runners is the strongest cap: the
kernel enforces it every 100 ms, whatever the runners do. Two ways to get such a group:

- as root, a `dragonswarm/node-PID` group under the hierarchy's root (v2 or v1);
- as an ordinary user, the cgroup-v2 subtree systemd delegates to them: the node's own
  scope must be theirs, have the `cpu` controller, and hold no other process (start the
  node with `systemd-run --user --scope -p Delegate=yes dragon node`). The node then
  moves into a `dragon` group inside that scope and sets its quota there.

Whatever is not possible comes back as a reason, which the node reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from dragonswarm.governor.policy import cfs_quota_us

log = logging.getLogger("dragonswarm.governor")

PERIOD_US = 100_000
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")
SYSTEMD_RUN_HINT = "systemd-run --user --scope -p Delegate=yes dragon node ..."


class CgroupUnavailable(Exception):
    """No cgroup CPU quota can be set here; the message says why."""


@dataclass(frozen=True)
class Hierarchies:
    """Where this process's CPU cgroups are: the v2 group and the v1 `cpu` group, as paths on disk."""

    v2_mount: Path | None
    v2_group: Path | None
    v1_mount: Path | None
    v1_group: Path | None


def parse_hierarchies(mountinfo: str, proc_cgroup: str) -> Hierarchies:
    """Read `/proc/self/mountinfo` and `/proc/self/cgroup` (plain text in, paths out)."""
    v2_mount = v1_mount = None
    v2_root = v1_root = "/"
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(extra) < 3:
            continue
        fstype, options = extra[0], extra[2].split(",")
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount, v2_root = Path(fields[4]), fields[3]
        elif fstype == "cgroup" and "cpu" in options and v1_mount is None:
            v1_mount, v1_root = Path(fields[4]), fields[3]
    v2_path = v1_path = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_path = parts[2]
    return Hierarchies(
        v2_mount, _on_disk(v2_mount, v2_root, v2_path) if v2_mount and v2_path else None,
        v1_mount, _on_disk(v1_mount, v1_root, v1_path) if v1_mount and v1_path else None,
    )  # fmt: skip


def _on_disk(mount: Path, mount_root: str, path: str) -> Path:
    # In a container the mount shows a subtree (its root field) and the path may be given
    # from the hierarchy's root: the part the mount already covers is dropped.
    if mount_root != "/" and path.startswith(mount_root):
        path = path[len(mount_root) :]
    return mount / path.lstrip("/")


def quota_cpus(limits: list[tuple[str, str]]) -> float | None:
    """The tightest CPU quota among a group and its ancestors, in CPUs; None when unlimited.

    Each limit is (quota, period) as `cpu.max` spells it ("max" or -1 for none).
    """
    tightest: float | None = None
    for quota, period in limits:
        if quota in ("max", "-1") or not period.isdigit() or int(period) == 0:
            continue
        with contextlib.suppress(ValueError):
            cpus = int(quota) / int(period)
            tightest = cpus if tightest is None else min(tightest, cpus)
    return tightest


def delegation_problem(group: Path, controllers: set[str], writable: bool, others: int) -> str | None:
    """Why this user's own cgroup-v2 group cannot hold the node's quota; None when it can."""
    if not writable:
        return (f"this user cannot write its cgroup {group} (not delegated to it); "
                f"start the node in its own delegated scope: {SYSTEMD_RUN_HINT}")  # fmt: skip
    if "cpu" not in controllers:
        return (f"the cpu controller is not delegated to {group}; on systemd, delegate it to user "
                "sessions (Delegate=cpu in a drop-in for user@.service)")  # fmt: skip
    if others:
        return (f"{group} also holds {others} other process(es), which a CPU quota there would "
                f"cap too; start the node in its own scope: {SYSTEMD_RUN_HINT}")  # fmt: skip
    return None


def read_hierarchies() -> Hierarchies:
    try:
        return parse_hierarchies(MOUNTINFO.read_text(), PROC_CGROUP.read_text())
    except OSError:  # not Linux, or /proc not mounted
        return Hierarchies(None, None, None, None)


def cpu_limit() -> float | None:
    """CPUs this process may use by its cgroups' quotas (a container's limit), None if unlimited.

    Read before the node sets a quota of its own, which is a share of this limit.
    """
    h = read_hierarchies()
    limits: list[tuple[str, str]] = []
    for mount, group, read in ((h.v2_mount, h.v2_group, _v2_limit), (h.v1_mount, h.v1_group, _v1_limit)):
        if mount is None or group is None:
            continue
        at = group
        while True:
            limit = read(at)
            if limit:
                limits.append(limit)
            if at == mount or mount not in at.parents:
                break
            at = at.parent
    return quota_cpus(limits)


def _v2_limit(group: Path) -> tuple[str, str] | None:
    try:
        quota, period = (group / "cpu.max").read_text().split()
        return quota, period
    except (OSError, ValueError):
        return None


def _v1_limit(group: Path) -> tuple[str, str] | None:
    try:
        return (group / "cpu.cfs_quota_us").read_text().strip(), (group / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None


class CgroupCap:
    """A CPU quota on one group holding the node and its runners."""

    def __init__(self, name: str, base: Path, group: Path, n_cpus: int, *, v2: bool, owned_base: bool = False):
        self.name = name
        self.reason = ""
        self.base = base  # where our processes go back to when the cap is released
        self.group = group
        self.n_cpus = n_cpus
        self.v2 = v2
        self.owned_base = owned_base  # a delegated scope: we enabled its controller, we disable it
        self._quota: int | str | None = "unset"
        group.mkdir(parents=True, exist_ok=True)
        if not v2:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        weigh(group, n_cpus)

    def attach(self, pid: int, *, runner: bool) -> None:
        (self.group / "cgroup.procs").write_text(str(pid))

    def detach(self, pid: int) -> None:
        pass  # an exited process leaves its group by itself

    def runner_threads(self, pid: int, threads: int) -> None:
        pass  # the quota holds the group, whatever its threads

    def set_share(self, share: float, threads: int, busy: int = 1) -> None:
        # One quota holds the whole group, however many runners work in it.
        quota = cfs_quota_us(share, self.n_cpus, PERIOD_US)
        if quota == self._quota:
            return
        if self.v2:
            (self.group / "cpu.max").write_text(f"{'max' if quota is None else quota} {PERIOD_US}")
        else:
            (self.group / "cpu.cfs_quota_us").write_text(str(-1 if quota is None else quota))
        self._quota = quota

    def close(self) -> None:
        try:
            if self.owned_base:  # a group that enables controllers cannot take processes back
                (self.base / "cgroup.subtree_control").write_text("-cpu")
            for pid in (self.group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # exited meanwhile
                    (self.base / "cgroup.procs").write_text(pid)
            self.group.rmdir()
        except OSError as exc:
            log.debug("cgroup cleanup of %s: %s", self.group, exc)


def weigh(group: Path, n_cpus: int) -> None:
    """Weigh a group like `n_cpus` busy threads rather than like one.

    The scheduler weighs a whole group as one entity of default weight, as much as a
    single thread; ours runs one busy thread per core. The quota, not the weight, is
    what limits us.
    """
    if (group / "cpu.shares").exists():  # v1
        (group / "cpu.shares").write_text(str(1024 * n_cpus))
    elif (group / "cpu.weight").exists():  # v2
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


def _root_v2(h: Hierarchies, n_cpus: int) -> CgroupCap:
    if h.v2_mount is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
    if "cpu" not in (h.v2_mount / "cgroup.controllers").read_text().split():
        raise CgroupUnavailable("the cpu controller is not on the cgroup v2 hierarchy (it is bound to v1)")
    (h.v2_mount / "cgroup.subtree_control").write_text("+cpu")
    parent = h.v2_mount / "dragonswarm"
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.subtree_control").write_text("+cpu")
    weigh(parent, n_cpus)
    _sweep_stale(parent)
    return CgroupCap("cgroup-v2", h.v2_group or h.v2_mount, parent / f"node-{os.getpid()}", n_cpus, v2=True)


def _root_v1(h: Hierarchies, n_cpus: int) -> CgroupCap:
    if h.v1_mount is None or not (h.v1_mount / "cpu.cfs_quota_us").exists():
        raise CgroupUnavailable("no cgroup v1 cpu hierarchy")
    parent = h.v1_mount / "dragonswarm"
    parent.mkdir(exist_ok=True)
    weigh(parent, n_cpus)
    _sweep_stale(parent)
    return CgroupCap("cgroup-v1", h.v1_group or h.v1_mount, parent / f"node-{os.getpid()}", n_cpus, v2=False)


def _delegated_v2(h: Hierarchies, n_cpus: int) -> CgroupCap:
    group = h.v2_group
    if h.v2_mount is None or group is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
    try:
        if "cpu" not in (h.v2_mount / "cgroup.controllers").read_text().split():
            raise CgroupUnavailable("the cpu controller is not on the cgroup v2 hierarchy (it is bound to cgroup v1, "
                                    "where only root may set quotas)")  # fmt: skip
        controllers = set((group / "cgroup.controllers").read_text().split())
        procs = [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read {group}: {exc.strerror}") from None
    writable = all(os.access(group / f, os.W_OK) for f in ("cgroup.procs", "cgroup.subtree_control"))
    problem = delegation_problem(group, controllers, writable, len([p for p in procs if p != os.getpid()]))
    if problem:
        raise CgroupUnavailable(problem)
    # The node leaves its scope for a child group first: a group with processes in it
    # cannot hand a controller down to its children.
    inner = group / "dragon"
    inner.mkdir(exist_ok=True)
    (inner / "cgroup.procs").write_text(str(os.getpid()))
    try:
        (group / "cgroup.subtree_control").write_text("+cpu")
        return CgroupCap("cgroup-v2-delegated", group, inner, n_cpus, v2=True, owned_base=True)
    except OSError:
        # Back as we were, in the order the kernel allows: no controller handed down, then
        # the node back in its scope, then the empty group removed.
        for undo in (lambda: (group / "cgroup.subtree_control").write_text("-cpu"),
                     lambda: (group / "cgroup.procs").write_text(str(os.getpid())), inner.rmdir):  # fmt: skip
            with contextlib.suppress(OSError):
                undo()
        raise


def open_cgroup(n_cpus: int) -> tuple[CgroupCap | None, list[str]]:
    """The cgroup quota this process can hold, or None with the reasons each way failed."""
    h = read_hierarchies()
    # Root in a container may not own the hierarchy's root, but its own group is its to use.
    openers = [_root_v2, _root_v1, _delegated_v2] if os.geteuid() == 0 else [_delegated_v2]
    reasons: list[str] = []
    for opener in openers:
        try:
            return opener(h, n_cpus), reasons
        except CgroupUnavailable as exc:
            reasons.append(str(exc))
        except OSError as exc:  # a cgroup file we may not write, or a controller that refused
            reasons.append(f"{opener.__name__.strip('_').replace('_', ' ')}: {exc.strerror or exc}")
    if os.geteuid() != 0 and h.v1_mount is not None:
        reasons.append("cgroup v1 CPU quotas can only be set by root")
    return None, reasons
