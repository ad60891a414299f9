"""Fixtures: real models on disk and real node processes on free loopback ports."""

from __future__ import annotations

import signal
import socket
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

from dragonswarm.devtools.tiny_model import write_tiny_model
from dragonswarm.engines.models import bundled_model


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
    return bundled_model(models_home / "models").path


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


@pytest.fixture
def start_node(tmp_path: Path, models_home: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `dragon node` as a real process with the given flags; stopped at teardown."""
    nodes: list[NodeProcess] = []

    def start(*flags: str, bundled: bool = False, home: Path | None = None) -> NodeProcess:
        port = free_port()
        home = home or (models_home if bundled else tmp_path / f"home-{len(nodes)}")
        log_path = tmp_path / f"node-{len(nodes)}.log"
        args = [sys.executable, "-m", "dragonswarm.cli", "node", "--home", str(home), "--api-port", str(port)]
        if not bundled:
            args.append("--no-bundled-model")
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*args, *flags], stdout=log, stderr=subprocess.STDOUT)
        node = NodeProcess(proc, port, home, log_path)
        nodes.append(node)
        wait_until(lambda: _healthy(node), 60, "the node to answer /health")
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def tiny_node(start_node: Callable[..., NodeProcess], tiny_model: Path) -> NodeProcess:
    return start_node("--model", f"tiny={tiny_model}")
