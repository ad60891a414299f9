"""The CPU cap that needs no privilege: each runner pinned to as many cores as it has
threads, and suspended (SIGSTOP) and resumed (SIGCONT) in a fixed period so that it runs
only its fraction of the time.

One invariant makes it safe: whenever the runners may run all the time (a share that
fills their cores, the node stopping, a runner leaving the cap), they are resumed at
once, never left stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence

from dragonswarm.governor.policy import duty_cycle, spread_cores


class DutyCycleCap:
    name = "affinity+duty-cycle"

    def __init__(self, cpus: Sequence[int], n_cpus: int, period_s: float = 0.05):
        self.cpus = list(cpus)  # the cores we may use (our affinity mask)
        self.n_cpus = n_cpus
        self.period_s = period_s
        self.reason = ""
        self._cores: dict[int, list[int]] = {}  # runner pid -> the cores it is pinned to
        self._duty = 1.0
        self._threads = n_cpus
        self._stopped = False  # our last signal to the runners was SIGSTOP
        self._lock = threading.Lock()
        self._wake = threading.Event()  # the share changed: look again now, not at the period's end
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)
        self._thread.start()

    def attach(self, pid: int, *, runner: bool) -> None:
        if not runner:
            return  # never suspend the node itself: it must keep answering
        with self._lock:
            cores = spread_cores(self.cpus, self._threads, list(self._cores.values()))
            self._cores[pid] = cores
        _pin(pid, cores)

    def detach(self, pid: int) -> None:
        """Release a runner that is leaving (replaced or unloaded): it must not stay stopped."""
        with self._lock:
            self._cores.pop(pid, None)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def set_share(self, share: float, threads: int) -> None:
        with self._lock:
            duty = duty_cycle(share, self.n_cpus, threads)
            grew, self._duty = duty > self._duty, duty
            repin = threads != self._threads
            self._threads = threads
            if repin:  # each runner again on the least shared cores, as many as it has threads
                placed: list[list[int]] = []
                for pid in self._cores:
                    self._cores[pid] = spread_cores(self.cpus, threads, placed)
                    placed.append(self._cores[pid])
            pinned = list(self._cores.items())
        if repin:
            for pid, cores in pinned:
                _pin(pid, cores)
        if grew:  # may run more: resume now rather than at the end of a stopped phase
            self._wake.set()

    def _signal(self, sig: signal.Signals) -> None:
        with self._lock:
            pids = list(self._cores)
            self._stopped = sig == signal.SIGSTOP
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                with self._lock:
                    self._cores.pop(pid, None)

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.clear()
            with self._lock:
                duty, idle = self._duty, not self._cores
            if duty >= 1.0 or idle:
                if self._stopped:
                    self._signal(signal.SIGCONT)
                self._wake.wait(self.period_s)
                continue
            start = time.monotonic()
            self._signal(signal.SIGCONT)
            time.sleep(max(0.0, start + self.period_s * duty - time.monotonic()))
            self._signal(signal.SIGSTOP)
            # Stopped for the rest of the period, unless the share grows meanwhile.
            self._wake.wait(max(0.0, start + self.period_s - time.monotonic()))
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=2.0)
        self._signal(signal.SIGCONT)  # also if the loop thread did not end in time


def _pin(pid: int, cores: list[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):  # exited meanwhile
            os.sched_setaffinity(pid, cores)
