"""Orchestrator replicas on one Redis for the benchmarks: the Redis, the replicas (each with
the loop-lag probe of `bench/loop_probe.py`, all on this worktree's source), and readings of
their CPU, loop lag and Redis's own figures.

The replicas share one CA: the first makes it in its home, the others get a copy of its
`tls/` before they start (as the README's three-machine layout copies it by hand).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.loop_bench import gc_window, window
from bench.swarm_procs import Orchestrator, Processes, start_orchestrator, wait_until
from dragonswarm.store.base import Role
from dragonswarm.store.redis_server import LocalRedis, start_local_redis

REPO = Path(__file__).resolve().parent.parent
ROLES: tuple[Role, ...] = ("admin", "user", "node")


@dataclass
class Replica:
    """One orchestrator of the run, and where its probe writes."""

    name: str
    orch: Orchestrator
    probe: Path
    id: str = ""  # its replica id in Redis (from its log); "" without Redis

    @property
    def pid(self) -> int:
        return self.orch.started.proc.pid

    @property
    def ws_url(self) -> str:
        return self.orch.url.replace("https://", "wss://") + "/v1/swarm"


def start_redis(root: Path) -> LocalRedis:
    """A Redis as `dragon up --replicas` starts it: loopback, a password, an append-only file."""
    return start_local_redis(root / "redis", persist=True)


def create_keys(redis_url: str | None, home: Path, users: int = 0) -> tuple[dict[str, str], list[str]]:
    """An admin, a user and a node key, and `users` more user keys, in Redis (or in `home`'s
    SQLite file without one): (role -> key, the user keys)."""
    from dragonswarm.store.backends import open_store

    store = open_store(home, redis_url)
    try:
        keys: dict[str, str] = {role: store.create_key(role, f"bench {role}")[0] for role in ROLES}
        many = [store.create_key("user", f"user-{i:04d}")[0] for i in range(users)]
    finally:
        store.close()
    return keys, many


def start_replicas(procs: Processes, names: list[str], keys: dict[str, str], redis_url: str | None,
                   env: dict[str, str] | None = None) -> list[Replica]:  # fmt: skip
    """Orchestrators on this worktree's source, each with the loop-lag probe; with `redis_url`, all
    on that Redis (one CA), else each with its own SQLite file (give `keys` made in the first's home)."""
    out: list[Replica] = []
    for name in names:
        home = procs.root / name
        home.mkdir(parents=True, exist_ok=True)
        if out:  # one CA for the swarm: the first replica's, copied before this one starts
            shutil.copytree(procs.root / names[0] / "tls", home / "tls")
        probe = home / "loop-probe.txt"
        full_env = {"PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "LOOP_PROBE_FILE": str(probe),
                    "DRAGON_REDIS": redis_url or "", **(env or {})}  # fmt: skip
        orch = start_orchestrator(procs, name, env=full_env, module="bench.loop_probe", keys=keys)
        replica = Replica(name, orch, probe)
        if redis_url:
            replica.id = wait_until(functools.partial(_replica_id, orch), 30, f"{name}'s replica id")
        out.append(replica)
    return out


def _replica_id(orch: Orchestrator) -> str | None:
    found = re.search(r"replica (\w+) sharing nodes", orch.started.log_path.read_text(errors="replace"))
    return found.group(1) if found else None


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


@dataclass
class Reading:
    """CPU seconds of each process and Redis's counters at one moment."""

    t: float
    cpu: dict[str, float]  # process name -> user + system seconds
    redis: dict[str, Any] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")  # gone (a replica the run killed)
    return float(t.user + t.system)


def read(pids: dict[str, int], client: redis.Redis | None) -> Reading:
    """Each process's CPU, and Redis's memory, commands, network and persistence figures."""
    out = Reading(time.monotonic(), {name: cpu_seconds(pid) for name, pid in pids.items()})
    if client is not None:
        info = client.info("all")
        out.redis = {k: info.get(k) for k in ("used_memory", "used_memory_rss", "total_commands_processed",
                                              "total_net_input_bytes", "total_net_output_bytes",
                                              "aof_current_size", "connected_clients", "used_cpu_sys",
                                              "used_cpu_user", "instantaneous_ops_per_sec")}  # fmt: skip
        out.redis["keys"] = client.dbsize()
        out.redis["commandstats"] = {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()
                                     if k.startswith("cmdstat_")}  # fmt: skip
    return out


def between(a: Reading, b: Reading) -> dict[str, Any]:
    """What happened from reading `a` to reading `b`: CPU in cores per process, and Redis's rates."""
    wall = max(1e-6, b.t - a.t)
    out: dict[str, Any] = {"seconds": round(wall, 1),
                           "cpu_cores": {n: round((b.cpu[n] - a.cpu[n]) / wall, 3) for n in a.cpu}}  # fmt: skip
    if a.redis and b.redis:
        ra, rb = a.redis, b.redis
        cpu = (rb["used_cpu_sys"] + rb["used_cpu_user"]) - (ra["used_cpu_sys"] + ra["used_cpu_user"])
        calls = {k: v - ra["commandstats"].get(k, 0) for k, v in rb["commandstats"].items()}
        out["redis"] = {
            "cpu_cores": round(cpu / wall, 3),
            "commands_per_s": round((rb["total_commands_processed"] - ra["total_commands_processed"]) / wall, 1),
            "in_bytes_per_s": round((rb["total_net_input_bytes"] - ra["total_net_input_bytes"]) / wall),
            "out_bytes_per_s": round((rb["total_net_output_bytes"] - ra["total_net_output_bytes"]) / wall),
            "aof_bytes_per_s": round((rb["aof_current_size"] - ra["aof_current_size"]) / wall),
            "used_memory": rb["used_memory"], "used_memory_rss": rb["used_memory_rss"], "keys": rb["keys"],
            "calls_per_s": {k: round(v / wall, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v},
        }  # fmt: skip
    return out


def probe_windows(replica: Replica, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """A replica's loop lag (p50 / p99 / max) and garbage-collector passes in each named window."""
    samples = [tuple(map(float, line.split())) for line in replica.probe.read_text().splitlines() if line]
    gc_file = replica.probe.with_name(replica.probe.name + ".gc")
    passes = [tuple(map(float, line.split())) for line in gc_file.read_text().splitlines() if line] \
        if gc_file.exists() else []  # fmt: skip
    return {name: {"lag": window(samples, a, b), "gc": gc_window(passes, a, b)} for name, (a, b) in windows.items()}


def machine() -> str:
    import platform

    return (f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}")  # fmt: skip


def git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
