"""`dragon up`: a whole swarm on one machine, as separate processes.

An orchestrator, this machine's node (`local`, the owner's API on :8701) and K worker
nodes, each with its own share, all on the same models. On one machine the workers
share its cores: this shows the swarm's behaviour, not extra speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dragonswarm.errors import ConfigError
from dragonswarm.secrets_file import write_private
from dragonswarm.settings import ModelSpec
from dragonswarm.store.backends import open_store
from dragonswarm.store.base import Role, Store
from dragonswarm.store.redis import redacted
from dragonswarm.store.redis_server import LocalRedis, start_local_redis
from dragonswarm.tls import TlsFiles, client_context, init_ca

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
DASHBOARD_LINK_S = 600.0  # the link `dragon up` prints: time to read the banner and open it
RESTART_DELAY_S = 2.0


@dataclass
class Child:
    name: str
    role: str  # "orchestrator", "node" or "worker"
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    died_at: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dragonswarm.cli", *self.args], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, start_new_session=True,  # Ctrl-C reaches us; we stop them in order
            )  # fmt: skip
        self.died_at = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)

    def wait(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def key_file(store: Store, path: Path, role: Role, name: str) -> str:
    """The key kept in `path` if the store still knows it, else a new one written there (0600)."""
    if path.exists():
        key = path.read_text().strip()
        record = store.find_key(key)
        if record is not None and record.role == role:
            return key
    key, _ = store.create_key(role, name)
    write_private(path, (key + "\n").encode())
    return key


def run_up(home: Path, port: int, api_port: int, workers: int, models: list[ModelSpec], share: float,
           local_share: float, say: Any, replicas: int = 1) -> int:  # fmt: skip
    """Start the swarm, report it, and supervise it until Ctrl-C. Returns the exit code.

    With `replicas` > 1: a local Redis (loopback, a password, its data in home/redis) and that
    many orchestrators on ports `port`, `port + 1`, ...; each node is given every replica's
    URL, starting with a different one, so they spread over the replicas and move on when one dies."""
    home.mkdir(parents=True, exist_ok=True)
    redis = start_local_redis(home / "redis") if replicas > 1 else None
    try:
        return _run(home, port, api_port, workers, models, share, local_share, say, replicas, redis)
    finally:
        if redis is not None:
            redis.stop()  # last: the orchestrators have written what they keep


def _run(home: Path, port: int, api_port: int, workers: int, models: list[ModelSpec], share: float,
         local_share: float, say: Any, replicas: int, redis: LocalRedis | None) -> int:  # fmt: skip
    store = open_store(home, redis.url if redis else None)
    try:
        user_key = key_file(store, home / "keys" / "user.key", "user", "dragon up user")
        node_key = key_file(store, home / "keys" / "node.key", "node", "dragon up nodes")
        admin_key = key_file(store, home / "keys" / "admin.key", "admin", "dragon up admin")
    finally:
        store.close()
    # TLS on loopback too: the same code path as a real swarm, and keys never in the clear.
    tls = TlsFiles(home / "tls")
    if not tls.ready():
        init_ca(tls, ["localhost", "127.0.0.1", "::1"])
    ports = [p for p in range(port, port + replicas + 1) if p != api_port][:replicas]  # 8700, 8702: 8701 is ours
    urls = [f"https://127.0.0.1:{p}" for p in ports]
    url = urls[0]
    verify = client_context(tls.ca_cert)
    logs = home / "logs"
    model_args = [a for spec in models for a in ("--model", _model_arg(spec))]
    node_env = {"DRAGON_KEY": node_key, "DRAGON_SWARM_PID": str(os.getpid())}
    # The Redis URL holds its password: in the environment, never on a command line.
    orch_env = {"DRAGON_REDIS": redis.url if redis else ""}  # "": not one from this shell's environment
    children = []
    for i in range(replicas):
        name = "orchestrator" if replicas == 1 else f"orchestrator-{i + 1}"
        children.append(Child(name, "orchestrator", ["orchestrator", "--home", str(home), "--port", str(ports[i])],
                              orch_env, logs / f"{name}.log"))  # fmt: skip
    names = ["local", *(f"worker-{i}" for i in range(1, workers + 1))]
    for k, name in enumerate(names):
        local = name == "local"
        spread = ",".join(urls[k % replicas:] + urls[:k % replicas])  # node k starts with replica k
        args = ["node", "--name", name, "--home", str(home / "nodes" / name), "--orchestrator", spread, "--ca",
                str(tls.ca_cert),
                "--api-port", str(api_port if local else 0), "--no-bundled-model", "--share", str(share),
                "--local-share", str(local_share), *model_args]  # fmt: skip
        children.append(Child(name, "node" if local else "worker", args, node_env, logs / f"{name}.log"))
    orchestrators, nodes = children[:replicas], children[replicas:]

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: no more waiting
            for child in children:
                if child.proc and child.alive():
                    child.proc.kill()
            raise SystemExit(130)
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i, (child, at) in enumerate(zip(orchestrators, urls, strict=True)):
            child.start()
            _wait_for(lambda at=at: httpx.get(f"{at}/health", timeout=1, verify=verify).status_code == 200,  # type: ignore[misc]
                      orchestrators[: i + 1], lambda: stopping, f"{child.name} did not start")  # fmt: skip
        for child in nodes:
            child.start()
        admin = {"Authorization": f"Bearer {admin_key}"}

        def all_live() -> bool:  # as every replica sees them: any of them may be asked first
            for at in urls:
                data = httpx.get(f"{at}/v1/nodes", headers=admin, timeout=2, verify=verify).json()["data"]
                if not {n["name"] for n in data if n["state"] == "live"} >= set(names):
                    return False
            return True

        _wait_for(all_live, children, lambda: stopping, "not every node joined")

        def write_state() -> None:
            state: dict[str, Any] = {
                "api_url": f"{url}/v1", "api_key": user_key, "ca_cert": str(tls.ca_cert),
                "nodes": [{"name": c.name, "pid": c.pid, "role": c.role} for c in children],
            }  # fmt: skip
            if redis is not None:
                state |= {"api_urls": [f"{u}/v1" for u in urls], "redis": redacted(redis.url),
                          "redis_password_file": str(redis.dir / "password"), "redis_pid": redis.process.pid}
            write_private(home / "swarm.json", json.dumps(state, indent=2).encode())

        write_state()
        login = httpx.post(f"{url}/v1/dashboard/login", headers=admin, json={"ttl_s": DASHBOARD_LINK_S}, timeout=5,
                           verify=verify).json()["url"]  # fmt: skip
        _announce(say, urls, user_key, home, tls.ca_cert, names, models, api_port, login)
        return _supervise(orchestrators, nodes, lambda: stopping, say, write_state)
    except _Stopped:
        return 130
    finally:
        say("dragon up: stopping the swarm")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for group in (nodes, orchestrators):  # nodes first, so none is left orphaned mid-job
            for child in group:
                child.stop()
            for child in group:
                child.wait(deadline)


class _Stopped(Exception):
    pass


def _model_arg(spec: ModelSpec) -> str:
    return f"{spec.name}={spec.path}" + (f":{','.join(spec.tags)}" if spec.tags else "")


def _wait_for(ready: Callable[[], bool], children: list[Child], stopping: Any, what: str) -> None:
    """Poll `ready` until it holds; stop early on Ctrl-C or a child that exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if stopping():
            raise _Stopped()
        for child in children:
            if not child.alive():
                raise ConfigError(f"{child.name} exited at start; see {child.log_path}")
        try:
            if ready():
                return
        except (httpx.TransportError, KeyError, ValueError):
            pass  # not up yet
        time.sleep(0.2)
    raise ConfigError(f"{what} within {START_TIMEOUT_S:.0f} s; see the logs in {children[0].log_path.parent}")


def _announce(say: Any, urls: list[str], key: str, home: Path, ca: Path, names: list[str], models: list[ModelSpec],
              api_port: int, dashboard: str) -> None:  # fmt: skip
    url = urls[0]
    replicas = f"{len(urls)} orchestrator replicas sharing a local Redis" if len(urls) > 1 else "orchestrator"
    say(f"dragon up: swarm ready: {replicas} and {len(names)} nodes ({', '.join(names)})")
    served = ", ".join(f"{m.name} ({', '.join(m.tags)})" if m.tags else m.name for m in models)
    say(f"  models   {served}")
    say(f"  API      {url}/v1   (also this machine's node: http://127.0.0.1:{api_port}/v1, no key needed)")
    for other in urls[1:]:
        say(f"           {other}/v1   (another replica: any of them serves any request)")
    say(f"  this machine   http://127.0.0.1:{api_port}/dashboard   (its own page; pause lending there)")
    say(f"  key      {key}")
    say(f"  dashboard {dashboard}")
    say(f"           (a one-time link, valid {DASHBOARD_LINK_S // 60:.0f} minutes; 'dragon dashboard' prints another)")
    say(f"  details  {home / 'swarm.json'}   logs in {home / 'logs'}")
    say("  try:")
    say(f"    curl --cacert {ca} {url}/v1/completions -H 'Authorization: Bearer {key}' \\")
    say("      -H 'Content-Type: application/json' \\")
    say(f"      -d '{{\"model\": \"{models[0].name}\", \"prompt\": \"def fib(n):\", \"max_tokens\": 48, \"n\": 2}}'")
    say("  Ctrl-C stops everything.")


def _supervise(orchestrators: list[Child], nodes: list[Child], stopping: Any, say: Any, write_state: Any) -> int:
    """Keep the nodes running until Ctrl-C. The swarm cannot outlive a lone orchestrator; a
    replica that exits is restarted like a node (the others hold the swarm meanwhile)."""
    replicated = len(orchestrators) > 1
    while not stopping():
        time.sleep(0.2)
        if not replicated and not orchestrators[0].alive():
            say(f"dragon up: the orchestrator exited; see {orchestrators[0].log_path}")
            return 1
        for child in (orchestrators if replicated else []) + nodes:
            if child.alive():
                continue
            now = time.monotonic()
            if child.died_at is None:
                child.died_at = now
                code = child.proc.returncode if child.proc else None
                say(f"dragon up: {child.name} exited ({code}); restarting it")
            elif now - child.died_at >= RESTART_DELAY_S:
                child.start()
                write_state()  # its new pid
    return 0
