"""Real swarm processes for the swarm benchmark: an orchestrator, nodes, `dragon up`.

Every process is started through `Processes`, which stops them all, newest first, when
its `with` block ends, also on failure: SIGINT, a grace period, then SIGKILL for the
process and every descendant it had (runners, and `dragon up`'s children, which live in
sessions of their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from dragonswarm.governor.sampler import tree_cpu_seconds
from dragonswarm.store.backends import open_store

T = TypeVar("T")
N_CPUS = psutil.cpu_count() or 1
STOP_GRACE_S = 15.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def quiet_machine(threshold: float = 10.0, timeout: float = 60.0) -> float:
    """Wait until the whole machine's CPU is under `threshold` percent; returns the last reading.

    Gives up at the deadline rather than fail: a machine shared with other work may never
    be quiet, and `CpuWatch` then shows how much the others took during the timed run.
    """
    deadline = time.monotonic() + timeout
    reading = psutil.cpu_percent(interval=0.3)
    while reading > threshold and time.monotonic() < deadline:
        reading = psutil.cpu_percent(interval=0.3)
    return reading


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy, counted as the node's sampler counts them."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class CpuWatch:
    """CPU over one timed run: the whole machine's, and the part not from this benchmark's process tree."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = machine_busy()
        self.ours0 = tree_cpu([os.getpid()])

    def other_fraction(self) -> float:
        """Fraction of the machine used meanwhile by processes this benchmark did not start."""
        wall = max(1e-3, time.monotonic() - self.t0) * N_CPUS
        other = (machine_busy() - self.machine0) - (tree_cpu([os.getpid()]) - self.ours0)
        return max(0.0, other / wall)


def tree_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants, now alive."""
    total = 0.0
    for pid in pids:
        try:
            total += tree_cpu_seconds(psutil.Process(pid))
        except psutil.Error:
            continue  # already gone
    return total


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    adopted: list[psutil.Process] = field(default_factory=list)  # descendants we must not leave behind


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise SystemExit(128 + signum)  # unwinds every `with Processes`, which stops its processes


class Processes:
    """The processes of one benchmark part, stopped together when the `with` block ends."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[Started] = []

    def __enter__(self) -> Processes:
        # A bench stopped with SIGTERM (a timeout, `kill`) must stop what it started too: by
        # default Python dies at once, and the orchestrators it started kept spinning on a core.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              module: str = "dragonswarm.cli") -> Started:  # fmt: skip
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # DRAGON_HOME points at the temp dir, so no config.toml of this machine's user is read.
        full_env = {**os.environ, "DRAGON_HOME": str(self.root), **(env or {})}
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=full_env)  # fmt: skip
        started = Started(name, proc, log_path)
        self.started.append(started)
        return started

    def log_tail(self, name: str, lines: int = 30) -> str:
        for s in self.started:
            if s.name == name:
                return "\n".join(s.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check_alive(self) -> None:
        for s in self.started:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{self.log_tail(s.name)}")

    def close(self) -> None:
        for s in reversed(self.started):
            descendants = _descendants(s)
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGINT)
                try:
                    s.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
            _, alive = psutil.wait_procs(descendants, timeout=STOP_GRACE_S)
            for p in alive:
                with contextlib.suppress(psutil.Error):  # psutil checks it is still the process we listed
                    p.kill()
        self.started.clear()


def _descendants(s: Started) -> list[psutil.Process]:
    """Everything under a started process (listed before it is stopped, while it still knows them)."""
    found = list(s.adopted)
    roots = list(s.adopted)
    with contextlib.suppress(psutil.Error):
        roots.append(psutil.Process(s.proc.pid))
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found += root.children(recursive=True)
    return found


@dataclass
class Orchestrator:
    url: str  # http(s)://127.0.0.1:PORT
    keys: dict[str, str]  # role -> key
    started: Started
    ca: Path | None = None  # the swarm's CA certificate when it serves https
    verify: ssl.SSLContext | bool = True  # for httpx: trusts that CA

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def auth(self, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def nodes(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(self.api + "/nodes", headers=self.auth("admin"), timeout=10, verify=self.verify)
        response.raise_for_status()
        return {n["name"]: n for n in response.json()["data"]}

    def wait_live(self, names: list[str], procs: Processes, timeout: float = 120) -> None:
        def live() -> bool:
            procs.check_alive()
            try:
                nodes = self.nodes()
            except httpx.HTTPError:
                return False
            return all(nodes.get(n, {}).get("state") == "live" for n in names)

        wait_until(live, timeout, f"nodes {names} to be live")

    def wait_idle(self, names: list[str], timeout: float = 30) -> bool:
        """Every node live, holding no work and not seeing its owner busy; False at the deadline."""

        def idle() -> bool:
            nodes = self.nodes()
            return all(
                nodes.get(n, {}).get("state") == "live" and not nodes[n].get("owner_busy")
                and not any(nodes[n].get(k) for k in ("running", "local_busy", "busy")) for n in names
            )  # fmt: skip

        try:
            wait_until(idle, timeout, f"nodes {names} to be idle", interval=0.2)
        except RuntimeError:
            return False
        return True


def _cli_key(home: Path, role: str, env: dict[str, str]) -> str:
    """A new key from `dragon keys create` run with `env`: the store is made by the code that will serve it."""
    out = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "create", "--home", str(home),
                          "--role", role, "--name", f"bench {role}"],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def start_orchestrator(procs: Processes, name: str, *flags: str, env: dict[str, str] | None = None,
                       module: str = "dragonswarm.cli", redis: str | None = None,
                       keys: dict[str, str] | None = None) -> Orchestrator:  # fmt: skip
    """`dragon orchestrator` on a free port, with an admin, a user and a node key in its store
    (`env`: more environment, say a PYTHONPATH that runs another commit's source; `module`: a
    wrapper that runs the CLI with something added; `redis`: its state in that Redis, given in
    DRAGON_REDIS so that the password stays off the command line; `keys`: role -> key already in
    the store it will use, say a shared Redis, instead of new ones)."""
    home = procs.root / name
    if redis:
        env = {**(env or {}), "DRAGON_REDIS": redis}
    if keys is None and env and "PYTHONPATH" in env:  # another commit's source: its own CLI makes its store
        keys = {role: _cli_key(home, role, env) for role in ("admin", "user", "node")}
    elif keys is None:
        store = open_store(home, redis)
        try:
            keys = {role: store.create_key(role, f"bench {role}")[0] for role in ("admin", "user", "node")}
        finally:
            store.close()
    port = free_port()
    started = procs.start(name, ["orchestrator", "--home", str(home), "--port", str(port), *flags], env, module)

    def serving() -> tuple[str, Path | None] | None:
        """Its scheme and CA, from the first line it prints: https with a private CA unless --insecure."""
        procs.check_alive()
        text = started.log_path.read_text(errors="replace")
        scheme = re.search(r"dragon orchestrator: (https?)://", text)
        if scheme is None:
            return None
        if scheme.group(1) == "http":
            return "http", None
        ca = re.search(r"--ca (\S+)", text)
        return "https", Path(ca.group(1)) if ca else home / "tls" / "ca.pem"

    scheme, ca = wait_until(serving, 60, f"{name} to start")
    orch = Orchestrator(f"{scheme}://127.0.0.1:{port}", keys, started, ca, client_verify(ca))

    def healthy() -> bool:
        procs.check_alive()
        try:
            return httpx.get(orch.url + "/health", timeout=2, verify=orch.verify).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, 60, f"{name} to answer /health")
    return orch


def client_verify(ca: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca)) if ca else True


@dataclass
class Node:
    name: str
    base: str  # http://127.0.0.1:PORT, the node's local API
    started: Started

    @property
    def pid(self) -> int:
        return self.started.proc.pid

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.base + "/v1/node", timeout=10).json()
        return data

    def settle(self, timeout: float = 30) -> bool:
        """Wait until the governor sees no busy owner and runs at its full share; False at the deadline."""

        def settled() -> bool:
            gov = self.status()["governor"]
            return not gov["owner_busy"] and gov["share_in_force"] >= max(gov["local_share"], gov["share"])

        try:
            wait_until(settled, timeout, f"{self.name}'s governor to settle", interval=0.2)
        except RuntimeError:
            return False  # other programs keep the machine busy: measured anyway, and reported
        return True


def start_node(procs: Processes, orch: Orchestrator, name: str, model: str, share: float, local_share: float,
               *flags: str, env: dict[str, str] | None = None) -> Node:  # fmt: skip
    """`dragon node` joined to `orch`, serving `model` (NAME=PATH) and no bundled model;
    `flags` and `env` are added to its command line and environment.

    DRAGON_SWARM_PID is this benchmark's pid: on one machine every swarm process is ours,
    so no node mistakes the others' CPU for its owner's.
    """
    port = free_port()
    args = ["node", "--name", name, "--home", str(procs.root / "nodes" / name), "--api-port", str(port),
            "--no-bundled-model", "--model", model, "--orchestrator", orch.url, "--share", str(share),
            "--local-share", str(local_share), *(["--ca", str(orch.ca)] if orch.tls else ["--insecure"]),
            *flags]  # fmt: skip
    env = {"DRAGON_KEY": orch.keys["node"], "DRAGON_SWARM_PID": str(os.getpid()), **(env or {})}
    return Node(name, f"http://127.0.0.1:{port}", procs.start(name, args, env))


@dataclass
class Up:
    """A `dragon up` swarm, as described by its swarm.json."""

    api_url: str  # http://127.0.0.1:PORT/v1
    api_key: str  # a user key
    pids: dict[str, int]  # child name ("orchestrator", "local", "worker-1", ...) -> pid
    orchestrator: Orchestrator  # with the user key and the admin key `dragon up` keeps

    @property
    def node_names(self) -> list[str]:
        return [name for name in self.pids if name != "orchestrator"]


def start_up(procs: Processes, name: str, workers: int, model: str, env: dict[str, str] | None = None,
             timeout: float = 180) -> Up:  # fmt: skip
    """`dragon up --workers K --no-bundled-model --model NAME=PATH` on free ports, home `root/name`."""
    home = procs.root / name
    swarm_file = home / "swarm.json"
    args = ["up", "--home", str(home), "--port", str(free_port()), "--api-port", str(free_port()),
            "--workers", str(workers), "--no-bundled-model", "--model", model]  # fmt: skip
    started = procs.start(name, args, env)

    def ready() -> dict[str, Any] | None:
        procs.check_alive()
        return json.loads(swarm_file.read_text()) if swarm_file.exists() else None

    state = wait_until(ready, timeout, f"{name} (dragon up) to write swarm.json", interval=0.2)
    pids = {n["name"]: n["pid"] for n in state["nodes"]}
    # `dragon up` starts its children in sessions of their own: hold on to them by pid, so
    # they are stopped even if `dragon up` itself dies first.
    for pid in pids.values():
        with contextlib.suppress(psutil.Error):
            started.adopted.append(psutil.Process(pid))
    keys = {"user": state["api_key"], "admin": (home / "keys" / "admin.key").read_text().strip()}
    ca = Path(state["ca_cert"]) if state.get("ca_cert") else None
    orch = Orchestrator(state["api_url"].removesuffix("/v1"), keys, started, ca, client_verify(ca))
    return Up(state["api_url"], state["api_key"], pids, orch)
