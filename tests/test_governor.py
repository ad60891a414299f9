"""The share is enforced on real processes, measured with the OS's own CPU accounting."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from tests.conftest import NodeProcess, wait_until

N_CPUS = psutil.cpu_count() or 1
CGROUP_V1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")


def runner_cpu_fraction(node: NodeProcess, seconds: float, max_tokens: int = 4000) -> float:
    """CPU used by the runner while it streams a long generation, as a fraction of the machine."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    node.client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1}).raise_for_status()
    proc = psutil.Process(node.model_status("tiny")["runner_pid"])
    with httpx.Client(base_url=node.url, timeout=30) as client, client.stream("POST", "/v1/completions",
                                                                              json=body) as response:  # fmt: skip
        lines = response.iter_lines()
        next(lines)
        start_cpu, start = sum(proc.cpu_times()[:2]), time.monotonic()
        while time.monotonic() - start < seconds:
            line = next(lines)
            assert "[DONE]" not in line, "generation ended before the measurement did"
        used = sum(proc.cpu_times()[:2]) - start_cpu
        wall = time.monotonic() - start
    return used / (wall * N_CPUS)


@pytest.mark.skipif(not CGROUP_V1.exists() and not Path("/sys/fs/cgroup/cgroup.controllers").exists(),
                    reason="needs a cgroup CPU controller")  # fmt: skip
@pytest.mark.parametrize("share", [0.1, 0.25])
def test_cgroup_quota_holds_the_runner_to_its_share(start_node: Callable[..., NodeProcess], tiny_model: Path,
                                                    share: float) -> None:  # fmt: skip
    node = start_node("--model", f"tiny={tiny_model}", "--local-share", str(share), "--cap-mechanism", "cgroup")
    assert node.status()["governor"]["mechanism"].startswith("cgroup")
    used = runner_cpu_fraction(node, 3.0)
    assert used <= share + 0.03, f"runner used {used:.3f} of the machine at share {share}"
    assert used >= share * 0.5, f"runner used only {used:.3f}: was it generating?"


@pytest.mark.skipif(N_CPUS < 2, reason="affinity + duty cycle needs two cores to show")
def test_duty_cycle_holds_the_runner_to_its_share(start_node: Callable[..., NodeProcess], tiny_model: Path) -> None:
    node = start_node("--model", f"tiny={tiny_model}", "--local-share", "0.25", "--cap-mechanism", "duty")
    assert node.status()["governor"]["mechanism"] == "affinity+duty-cycle"
    used = runner_cpu_fraction(node, 3.0)
    assert used <= 0.25 + 0.06, f"runner used {used:.3f} of the machine at share 0.25"
    assert used >= 0.1
    runner = psutil.Process(node.model_status("tiny")["runner_pid"])
    assert runner.cpu_affinity() == [0]  # 0.25 of two cores fits on one


def test_uncapped_runner_uses_more_than_a_small_share(start_node: Callable[..., NodeProcess], tiny_model: Path) -> None:
    """The control for the tests above: without a cap the same work takes far more CPU."""
    # Uncapped, the tiny model can write 4000 tokens in under 2 s: give it room for more.
    node = start_node("--model", f"tiny={tiny_model}", "--local-share", "1.0", "--cap-mechanism", "none",
                      "--n-ctx", "32768")  # fmt: skip
    assert runner_cpu_fraction(node, 2.0, max_tokens=32000) > 0.4


@pytest.fixture
def cpu_hogs() -> Iterator[Callable[[], None]]:
    """Start one busy loop per core (the 'owner' compiling something); stop them on demand."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(N_CPUS)]

    def stop() -> None:
        for p in procs:
            p.kill()
            p.wait()

    yield stop
    stop()


def test_owner_activity_shrinks_the_share_and_it_comes_back(start_node: Callable[..., NodeProcess], tiny_model: Path,
                                                            cpu_hogs: Callable[[], None]) -> None:  # fmt: skip
    node = start_node("--model", f"tiny={tiny_model}")
    gov = wait_until(lambda: (g := node.status()["governor"])["owner_busy"] and g, 5, "the owner to be seen busy")
    assert gov["owner_load"] > 0.5
    assert gov["share_in_force"] <= 0.1  # 0.80 configured, shrunk to leave the owner the machine
    if gov["mechanism"] == "cgroup-v1":
        group = Path(f"/sys/fs/cgroup/cpu/dragonswarm/node-{node.proc.pid}")
        quota = int((group / "cpu.cfs_quota_us").read_text())
        assert 0 < quota <= 0.1 * N_CPUS * int((group / "cpu.cfs_period_us").read_text())
    # Work still gets done while the owner is busy, only slowly.
    out = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 20})
    assert out.status_code == 200
    cpu_hogs()
    wait_until(lambda: node.status()["governor"]["share_in_force"] == 0.8, 15, "the share to come back")
