"""Choosing how our CPU share is enforced, strongest first.

A cgroup CPU quota (`cgroups.py`: as root, or in a delegated cgroup-v2 scope); otherwise
affinity plus a duty cycle (`dutycycle.py`), which any user may use. The mechanism in
force, and why a stronger one was not available, is reported by the node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from dragonswarm.errors import ConfigError
from dragonswarm.governor.cgroups import open_cgroup
from dragonswarm.governor.dutycycle import DutyCycleCap

log = logging.getLogger("dragonswarm.governor")


class CpuCap(Protocol):
    name: str
    reason: str  # why no stronger mechanism holds the share ("" when this is the strongest)

    def attach(self, pid: int, *, runner: bool) -> None:
        """Hold `pid` to the cap. The node itself is attached with runner=False."""

    def detach(self, pid: int) -> None:
        """Release a runner that is leaving; it must be left running."""

    def set_share(self, share: float, threads: int, busy: int = 1) -> None:
        """Limit everything attached to `share` of the machine, `busy` runners working at once."""

    def runner_threads(self, pid: int, threads: int) -> None:
        """The runner `pid` now computes with `threads` threads."""

    def close(self) -> None:
        """Release every process and remove what was created."""


class NoCap:
    name = "none"

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def attach(self, pid: int, *, runner: bool) -> None:
        pass

    def detach(self, pid: int) -> None:
        pass

    def set_share(self, share: float, threads: int, busy: int = 1) -> None:
        pass

    def runner_threads(self, pid: int, threads: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_cap(mechanism: str, cpus: Sequence[int], n_cpus: int) -> CpuCap:
    """The strongest mechanism allowed by `mechanism` (auto, cgroup, duty, none)."""
    if mechanism == "none":
        return NoCap("--cap-mechanism none: the share is not enforced")
    reasons = [f"--cap-mechanism {mechanism}"] if mechanism == "duty" else []
    if mechanism in ("auto", "cgroup"):
        cap, reasons = open_cgroup(n_cpus)
        if cap is not None:
            log.info("cpu cap: %s at %s", cap.name, cap.group)
            return cap
        if mechanism == "cgroup":
            raise ConfigError("no writable cgroup CPU controller: " + "; ".join(reasons))
        log.info("no cgroup CPU quota (%s); using affinity + duty cycle", "; ".join(reasons))
    duty = DutyCycleCap(cpus, n_cpus)
    duty.reason = "; ".join(reasons)
    return duty
