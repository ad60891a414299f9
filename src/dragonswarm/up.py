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
from dragonswarm.store.base import Role, Store
from dragonswarm.store.sqlite import open_store
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
           local_share: float, say: Any) -> int:  # fmt: skip
    """Start the swarm, report it, and supervise it until Ctrl-C. Returns the exit code."""
    home.mkdir(parents=True, exist_ok=True)
    store = open_store(home)
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
    url = f"https://127.0.0.1:{port}"
    verify = client_context(tls.ca_cert)
    logs = home / "logs"
    model_args = [a for spec in models for a in ("--model", _model_arg(spec))]
    node_env = {"DRAGON_KEY": node_key, "DRAGON_SWARM_PID": str(os.getpid())}
    children = [Child("orchestrator", "orchestrator", ["orchestrator", "--home", str(home), "--port", str(port)],
                      {}, logs / "orchestrator.log")]  # fmt: skip
    names = ["local", *(f"worker-{i}" for i in range(1, workers + 1))]
    for name in names:
        local = name == "local"
        args = ["node", "--name", name, "--home", str(home / "nodes" / name), "--orchestrator", url, "--ca",
                str(tls.ca_cert),
                "--api-port", str(api_port if local else 0), "--no-bundled-model", "--share", str(share),
                "--local-share", str(local_share), *model_args]  # fmt: skip
        children.append(Child(name, "node" if local else "worker", args, node_env, logs / f"{name}.log"))

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
        children[0].start()
        _wait_for(lambda: httpx.get(f"{url}/health", timeout=1, verify=verify).status_code == 200,
                  children[:1], lambda: stopping, "the orchestrator did not start")  # fmt: skip
        for child in children[1:]:
            child.start()
        admin = {"Authorization": f"Bearer {admin_key}"}

        def all_live() -> bool:
            data = httpx.get(f"{url}/v1/nodes", headers=admin, timeout=2, verify=verify).json()["data"]
            return {n["name"] for n in data if n["state"] == "live"} >= set(names)

        _wait_for(all_live, children, lambda: stopping, "not every node joined")

        def write_state() -> None:
            write_private(home / "swarm.json", json.dumps({
                "api_url": f"{url}/v1", "api_key": user_key, "ca_cert": str(tls.ca_cert),
                "nodes": [{"name": c.name, "pid": c.pid, "role": c.role} for c in children],
            }, indent=2).encode())  # fmt: skip

        write_state()
        login = httpx.post(f"{url}/v1/dashboard/login", headers=admin, json={"ttl_s": DASHBOARD_LINK_S}, timeout=5,
                           verify=verify).json()["url"]  # fmt: skip
        _announce(say, url, user_key, home, tls.ca_cert, names, models, api_port, login)
        return _supervise(children, lambda: stopping, say, write_state)
    except _Stopped:
        return 130
    finally:
        say("dragon up: stopping the swarm")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for group in (children[1:], children[:1]):  # nodes first, so none is left orphaned mid-job
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


def _announce(say: Any, url: str, key: str, home: Path, ca: Path, names: list[str], models: list[ModelSpec],
              api_port: int, dashboard: str) -> None:  # fmt: skip
    say(f"dragon up: swarm ready: orchestrator and {len(names)} nodes ({', '.join(names)})")
    served = ", ".join(f"{m.name} ({', '.join(m.tags)})" if m.tags else m.name for m in models)
    say(f"  models   {served}")
    say(f"  API      {url}/v1   (also this machine's node: http://127.0.0.1:{api_port}/v1, no key needed)")
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


def _supervise(children: list[Child], stopping: Any, say: Any, write_state: Any) -> int:
    """Keep the nodes running until Ctrl-C; the swarm cannot outlive its orchestrator."""
    while not stopping():
        time.sleep(0.2)
        if not children[0].alive():
            say(f"dragon up: the orchestrator exited; see {children[0].log_path}")
            return 1
        for child in children[1:]:
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
