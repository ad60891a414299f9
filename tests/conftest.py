"""Fixtures: real models on disk and real node processes on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.redis_server import redis_server, redis_url, state_redis  # noqa: F401
from tests.volunteer import delegated_scope, start_volunteer_node, volunteer  # noqa: F401

from dragonswarm.devtools.tiny_model import TOOLS_TEMPLATE, write_tiny_model
from dragonswarm.engines.models import bundled_coder, bundled_gemma
from dragonswarm.store.backends import open_store
from dragonswarm.tls import client_context


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def count_tokens(tiny_model: Path) -> Callable[[str], int]:
    """Token count of a prompt for the tiny model, from llama.cpp's own tokenizer."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=True, special=True))


@pytest.fixture(scope="session")
def models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DRAGON_HOME shared by the session, so the bundled model is written once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def gemma_model(models_home: Path) -> Path:
    return bundled_gemma(models_home / "models").path


@pytest.fixture(scope="session")
def coder_model(models_home: Path) -> Path:
    return bundled_coder(models_home / "models").path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    home: Path
    log_path: Path
    client: httpx.Client = field(init=False)
    _openai: list[openai.OpenAI] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def openai(self) -> openai.OpenAI:
        """The official client pointed at this node, closed when the node stops."""
        client = openai.OpenAI(base_url=self.api, api_key="unused", max_retries=0)
        self._openai.append(client)
        return client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get("/v1/node").json()
        return data

    def model_status(self, name: str) -> dict[str, Any]:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        for client in self._openai:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _healthy(node: NodeProcess) -> bool:
    if node.proc.poll() is not None:
        raise AssertionError(f"node exited with {node.proc.returncode}:\n{node.log()}")
    try:
        return node.client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class OrchestratorProcess:
    """A real `dragon orchestrator` with an admin, a user and a node key in its store."""

    proc: subprocess.Popen[bytes] | None
    port: int
    home: Path
    log_path: Path
    flags: tuple[str, ...]
    keys: dict[str, str] = field(default_factory=dict)
    tls: bool = True
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/v1/swarm"

    @property
    def ca(self) -> Path:
        """The swarm's CA certificate, which the orchestrator creates on its first start."""
        return self.home / "tls" / "ca.pem"

    @property
    def ssl(self) -> ssl.SSLContext | None:
        return client_context(self.ca) if self.tls else None

    @property
    def ws_ssl(self) -> ssl.SSLContext | None:
        """The context for a test's own node connection (websockets' sync client), capped
        at TLS 1.2. That client reads the socket in a thread while the caller writes; with
        TLS 1.3 the server's session tickets arrive after the handshake, the thread's read
        consumes them and blocks inside OpenSSL, and now and then the handshake request is
        lost: the connect times out and the thread can never be joined (3 hangs in 3,000
        connects on two loaded cores; none at TLS 1.2, none with the asyncio client that
        real nodes use)."""
        context = self.ssl
        if context is not None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return self.ssl or True

    def node_flags(self) -> list[str]:
        return ["--orchestrator", self.url, *(["--ca", str(self.ca)] if self.tls else ["--insecure"])]

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def client(self, role: str | None = "user") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=self.verify)

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self.client("admin") as c:
            return {n["name"]: n for n in c.get("/v1/nodes").json()["data"]}

    def queued(self) -> int:
        """Fragments waiting for a worker."""
        with self.client("admin") as c:
            return int(c.get("/v1/nodes").json()["queue"]["queued"])

    def wait_live(self, *names: str, timeout: float = 60) -> None:
        def live() -> bool:
            nodes = self.nodes()
            return all(nodes.get(n, {}).get("state") == "live" for n in names)

        wait_until(live, timeout, f"nodes {names} to be live")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            tls = [] if self.tls else ["--insecure"]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dragonswarm.cli", "orchestrator", "--home", str(self.home),
                 "--port", str(self.port), *tls, *self.flags], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env})  # fmt: skip

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"orchestrator exited with {self.proc.returncode}:\n{self.log()}")
            if self.tls and not self.ca.exists():
                return False  # the orchestrator writes its CA on its first start
            try:
                return httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 30, "the orchestrator to answer /health")

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test, so fixtures can tell at teardown that it failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call"))


def _print_log_tail(label: str, log_path: Path, lines: int = 40) -> None:
    """What a server printed, shown with a failed test: in CI its log file is gone afterwards."""
    if log_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
        print(f"----- last {len(tail)} lines of {label} ({log_path.name}) -----", *tail, sep="\n")


@pytest.fixture
def start_orchestrator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., OrchestratorProcess]]:
    """Start `dragon orchestrator` as a real process with fresh keys; stopped at teardown.

    With `redis`, its state is in that Redis (`--redis`), where its keys are made too: replicas
    started on one Redis each get keys of their own, and every one of them is valid on all."""
    started: list[OrchestratorProcess] = []

    def start(*flags: str, tls: bool = True, redis: str | None = None, replica_of: OrchestratorProcess | None = None,
              env: dict[str, str] | None = None) -> OrchestratorProcess:  # fmt: skip
        """`replica_of`: a replica of that orchestrator: its certificate too, so its nodes trust both."""
        home = tmp_path / f"orchestrator-{len(started)}"
        if replica_of is not None:
            shutil.copytree(replica_of.home / "tls", home / "tls")
        store = open_store(home, redis)
        if redis is not None:
            flags = ("--redis", redis, *flags)
        keys = {role: store.create_key(role, f"test {role}")[0] for role in ("admin", "user", "node")}  # type: ignore[arg-type]
        keys["user2"] = store.create_key("user", "second user")[0]
        store.close()
        orch = OrchestratorProcess(None, free_port(), home, tmp_path / f"orchestrator-{len(started)}.log", flags, keys,
                                   tls, env or {})  # fmt: skip
        started.append(orch)
        orch.start()
        return orch

    yield start
    for orch in started:
        orch.stop()
        if _failed(request):
            _print_log_tail("the orchestrator", orch.log_path)


@pytest.fixture
def start_node(tmp_path: Path, models_home: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., NodeProcess]]:
    """Start `dragon node` as a real process with the given flags; stopped at teardown.

    With `swarm`, it joins that orchestrator and counts the test run's processes as its
    own, as `dragon up` does: on one machine the other nodes and the test client must
    not look like a busy owner. A model decodes one sequence at a time unless the flags
    ask for more (`--parallel`): the default depends on the machine's cores and RAM, and
    tests of queues and failover count on one stream per node (test_batching covers more).
    """
    nodes: list[NodeProcess] = []

    def start(*flags: str, bundled: bool = False, home: Path | None = None, swarm: OrchestratorProcess | None = None,
              wait: bool = True, env: dict[str, str] | None = None) -> NodeProcess:  # fmt: skip
        port = free_port()
        home = home or (models_home if bundled else tmp_path / f"home-{len(nodes)}")
        log_path = tmp_path / f"node-{len(nodes)}.log"
        args = [sys.executable, "-m", "dragonswarm.cli", "node", "--home", str(home), "--api-port", str(port)]
        if not bundled:
            args.append("--no-bundled-model")
        if "--parallel" not in flags:
            args += ["--parallel", "1"]
        base_env = dict(os.environ)
        if swarm is not None:
            args += swarm.node_flags()
            base_env |= {"DRAGON_KEY": swarm.keys["node"], "DRAGON_SWARM_PID": str(os.getpid()),
                    # Placement, not owner detection, is under test here (test_governor and
                    # test_scheduler cover that): a shared CI machine's other load must not
                    # make every worker look like a busy owner.
                    "DRAGON_OWNER_NOISE": "1.0"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*args, *flags], stdout=log, stderr=subprocess.STDOUT, env=base_env | (env or {}))
        node = NodeProcess(proc, port, home, log_path)
        nodes.append(node)
        if wait:
            wait_until(lambda: _healthy(node), 60, "the node to answer /health")
        return node

    yield start
    for node in nodes:
        node.stop()
        if _failed(request):
            _print_log_tail("a node", node.log_path)


@pytest.fixture
def tiny_node(start_node: Callable[..., NodeProcess], tiny_model: Path) -> NodeProcess:
    return start_node("--model", f"tiny={tiny_model}")


@pytest.fixture
def swarm(start_orchestrator: Callable[..., OrchestratorProcess], start_node: Callable[..., NodeProcess],
          tiny_model: Path) -> Callable[..., OrchestratorProcess]:  # fmt: skip
    """An orchestrator and `workers` nodes serving the tiny model, all live; its state in `redis` if given."""

    def make(workers: int, *orch_flags: str, node_flags: tuple[str, ...] = (),
             redis: str | None = None) -> OrchestratorProcess:  # fmt: skip
        orch = start_orchestrator(*orch_flags, redis=redis)
        names = [f"w{i}" for i in range(1, workers + 1)]
        for name in names:
            start_node("--name", name, "--model", f"tiny={tiny_model}", *node_flags, swarm=orch)
        orch.wait_live(*names)
        return orch

    return make


@pytest.fixture(scope="session")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tt.gguf", chat_template=TOOLS_TEMPLATE, fim=True,
                            seed=1)  # fmt: skip


@dataclass
class Api:
    """One OpenAI-compatible endpoint under test: a node's own, or the orchestrator's."""

    where: str
    base: str
    key: str
    verify: Any
    ca: Path | None
    clients: list[Any]

    def openai(self) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.base, api_key=self.key, max_retries=0,
                               http_client=httpx.Client(verify=self.verify, timeout=120))  # fmt: skip
        self.clients.append(client)
        return client

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(verify=self.verify, timeout=120) as c:
            return c.post(self.base + path, json=body, headers={"Authorization": f"Bearer {self.key}"})

    def stream(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The SSE events of a streamed answer, [DONE] left out."""
        with httpx.Client(verify=self.verify, timeout=120) as c, c.stream(
                "POST", self.base + path, json={**body, "stream": True},
                headers={"Authorization": f"Bearer {self.key}"}) as r:  # fmt: skip
            assert r.status_code == 200, r.read()
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(params=["node", "swarm"])
def api(request: pytest.FixtureRequest, start_node: Callable[..., NodeProcess],
        start_orchestrator: Callable[..., OrchestratorProcess], tiny_model: Path,
        tools_model: Path) -> Iterator[Api]:  # fmt: skip
    models = ("--model", f"tiny={tiny_model}", "--model", f"tt={tools_model}")
    if request.param == "node":
        node = start_node(*models)
        api = Api("node", node.api, "unused", True, None, [])
    else:
        orch = start_orchestrator()
        start_node("--name", "w1", *models, swarm=orch)
        orch.wait_live("w1")
        api = Api("swarm", orch.api, orch.keys["user"], orch.verify, orch.ca, [])
    yield api
    for client in api.clients:
        client.close()
