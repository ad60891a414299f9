"""The CPU cap that needs no privilege: each runner pinned to as many cores as it has threads,
and suspended (SIGSTOP) and resumed (SIGCONT) in a fixed period so that it runs only its
fraction of the time.

One invariant makes it safe: whenever the runners may run all the time (a share that fills
their cores, the node stopping, a runner leaving the cap), they are resumed at once and not
stopped again. Signals are sent under the lock that guards the set of runners, so a runner
that leaves is never stopped after it was released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence

from dragonswarm.governor.policy import duty_cycle, spread_cores

log = logging.getLogger("dragonswarm.governor")


class DutyCycleCap:
    name = "affinity+duty-cycle"

    def __init__(self, cpus: Sequence[int], n_cpus: int, period_s: float = 0.05):
        self.cpus = list(cpus)  # the cores we may use (our affinity mask)
        self.n_cpus = n_cpus
        self.period_s = period_s
        self.reason = ""
        self._cores: dict[int, list[int]] = {}  # runner pid -> the cores it is pinned to
        # Runner pid -> the threads it computes with. A runner takes up a smaller count only at
        # its next step: until then it keeps as many cores, or its threads would wait on each
        # other on one core, and its duty is computed for them all.
        self._computing: dict[int, int] = {}
        self._share, self._threads, self._busy = 1.0, n_cpus, 1
        self._duty = 1.0
        self._stopped = False  # our last signal to the runners was SIGSTOP
        self._lock = threading.Lock()
        self._wake = threading.Event()  # the duty grew: look again now, not at the phase's end
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)
        self._thread.start()

    def attach(self, pid: int, *, runner: bool) -> None:
        if not runner:
            return  # never suspend the node itself: it must keep answering
        with self._lock:
            self._computing[pid] = self._threads  # a runner starts with the count in force
            self._replan()

    def detach(self, pid: int) -> None:
        """Release a runner that is leaving (replaced or unloaded): resumed, and never stopped again."""
        with self._lock:
            self._computing.pop(pid, None)
            if self._cores.pop(pid, None) is not None:
                _send(pid, signal.SIGCONT)
            self._replan()

    def set_share(self, share: float, threads: int, busy: int = 1) -> None:
        """`busy` runners at once share the one budget: each runs its part of it."""
        with self._lock:
            self._share, self._threads, self._busy = share, threads, max(1, busy)
            self._replan()

    def runner_threads(self, pid: int, threads: int) -> None:
        with self._lock:
            if pid in self._computing:
                self._computing[pid] = threads
                self._replan()

    def _replan(self) -> None:
        """Cores for each runner and the duty for them all; under the lock."""
        placed: list[list[int]] = []
        widest = self._threads
        for pid, computing in self._computing.items():
            width = max(self._threads, computing)
            widest = max(widest, width)
            cores = spread_cores(self.cpus, width, placed)
            placed.append(cores)
            if self._cores.get(pid) != cores:
                self._cores[pid] = cores
                _pin(pid, cores)
        duty = duty_cycle(self._share, self.n_cpus, widest * self._busy)
        grew, self._duty = duty > self._duty, duty
        if grew:  # may run more: resume now rather than at the end of a phase
            self._wake.set()

    def _signal(self, sig: signal.Signals) -> None:
        with self._lock:
            self._stopped = sig == signal.SIGSTOP
            for pid in list(self._cores):
                if not _send(pid, sig):
                    del self._cores[pid]
                    self._computing.pop(pid, None)

    def _wait(self, until: float, while_below_one: bool) -> None:
        """Sleep until `until`; cut short when the duty reaches 1.0 (if asked) or the cap closes."""
        while (left := until - time.monotonic()) > 0 and not self._closing.is_set():
            if self._wake.wait(left):
                self._wake.clear()
                if while_below_one and self._duty >= 1.0:
                    return

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self._cycle()
            except Exception:  # the cap must outlive any surprise, and never leave runners stopped
                log.exception("duty cycle failed; resuming the runners")
                self._signal(signal.SIGCONT)
                time.sleep(self.period_s)
        self._signal(signal.SIGCONT)

    def _cycle(self) -> None:
        self._wake.clear()
        with self._lock:
            duty, idle = self._duty, not self._cores
        if duty >= 1.0 or idle:
            if self._stopped:
                self._signal(signal.SIGCONT)
            self._wake.wait(self.period_s)
            return
        start = time.monotonic()
        self._signal(signal.SIGCONT)
        self._wait(start + self.period_s * duty, while_below_one=True)
        if self._duty >= 1.0 or self._closing.is_set():
            return  # the share grew to fill the cores meanwhile: no stop this time
        self._signal(signal.SIGSTOP)
        self._wait(start + self.period_s, while_below_one=True)

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=2.0)
        self._signal(signal.SIGCONT)  # also if the loop thread did not end in time


def _send(pid: int, sig: signal.Signals) -> bool:
    """Signal a runner; False when it is gone or no longer ours to signal."""
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):  # exited; or its pid now belongs to another user
        return False


def _pin(pid: int, cores: list[int]) -> None:
    """Pin every thread of the process: affinity is per thread, and llama.cpp's already exist."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):  # exited meanwhile
            os.sched_setaffinity(tid, cores)
