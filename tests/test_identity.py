"""A node's name through blips: bound only once the node holds its credential, freed by an
admin, and the node's own credential, not the shared node key, speaking for its owner's
hand-offs, whose usage is counted under the node."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from dragonswarm.protocol.swarm import VERSION

Start = Callable[..., Any]


def hello(name: str) -> str:
    return json.dumps({"type": "hello", "v": VERSION, "name": name, "models": [], "share": 0.1, "local_share": 0.8,
                       "cpus": 1, "ram_total": 1})  # fmt: skip


def welcome_then_drop(orch: OrchestratorProcess, name: str, token: str) -> dict[str, Any]:
    """Join as `name`, read the welcome, and go away without confirming: a welcome lost on the
    way, or a node that could not keep its credential, look like this to the orchestrator."""
    headers = {"Authorization": f"Bearer {token}", "X-Dragon-Node": name}
    with connect(orch.ws_url, additional_headers=headers, open_timeout=10, ssl=orch.ws_ssl) as ws:
        ws.send(hello(name))
        welcome: dict[str, Any] = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome"
    return welcome


def refused_status(orch: OrchestratorProcess, name: str, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {token}", "X-Dragon-Node": name},
                open_timeout=10, ssl=orch.ws_ssl)  # fmt: skip
    return refused.value.response.status_code


def credential_of(node: NodeProcess) -> str:
    """The credential the node keeps ("" while it keeps none: between a fallback and its new one)."""
    path = node.home / "swarm-credential.json"
    return str(json.loads(path.read_text())["credential"]) if path.is_file() else ""


def test_a_first_join_whose_welcome_is_lost_still_joins(start_orchestrator: Start, start_node: Start,
                                                        tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    lost = welcome_then_drop(orch, "w1", orch.keys["node"])["credential"]
    assert lost.startswith("dnc_")
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")  # the node key could ask again: the name was never bound
    assert credential_of(node) != lost
    assert refused_status(orch, "w1", lost) == 401  # the offer nobody confirmed is void
    assert refused_status(orch, "w1", orch.keys["node"]) == 403  # bound now: the node key cannot speak for it


def test_a_lost_confirm_the_credential_still_binds(start_orchestrator: Start) -> None:
    orch = start_orchestrator()
    credential = welcome_then_drop(orch, "w1", orch.keys["node"])["credential"]
    # The node kept it but its confirm never arrived: coming back with it proves it holds it.
    again = welcome_then_drop(orch, "w1", credential)
    assert "credential" not in again
    assert refused_status(orch, "w1", orch.keys["node"]) == 403


def test_a_failed_credential_write_does_not_lock_the_name_out(start_orchestrator: Start, start_node: Start,
                                                              tiny_model: Path, tmp_path: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    home = tmp_path / "unwritable"
    blocker = home / "swarm-credential.json"
    blocker.mkdir(parents=True)  # a directory where the credential goes: writing it fails, even as root
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", home=home, swarm=orch)
    wait_until(lambda: node.log().count("swarm link") >= 2, 60, "the node to fail to keep its credential twice")
    assert "w1" not in orch.nodes()
    blocker.rmdir()
    orch.wait_live("w1")  # its next try joins: the name was never bound to a credential it lost
    assert credential_of(node).startswith("dnc_")


def test_a_forgotten_name_is_free_and_its_node_rejoins_with_the_node_key_once(
        start_orchestrator: Start, start_node: Start, tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    before = credential_of(node)
    admin = ["--url", orch.url, "--key", orch.keys["admin"], "--ca", str(orch.ca)]
    forgot = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "nodes", "forget", "w1", *admin],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert forgot.returncode == 0, forgot.stderr
    assert "forgotten and cut off" in forgot.stderr
    # Its credential is unknown now: it says so, falls back to the node key, and is admitted afresh.
    wait_until(lambda: "joining once more with the node key" in node.log(), 30, "the node's fallback")
    wait_until(lambda: credential_of(node) not in ("", before), 30, "a new credential")
    orch.wait_live("w1")
    assert refused_status(orch, "w1", before) == 401
    missing = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "nodes", "forget", "nobody", *admin],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode != 0 and "no node named 'nobody'" in missing.stderr, missing.stderr


def test_a_hand_off_speaks_as_its_node(start_orchestrator: Start, start_node: Start, tiny_model: Path) -> None:
    # One request a minute per caller: the user key's lane is spent, the node's is its own.
    orch = start_orchestrator("--rate-rpm", "1")
    owner = start_node("--name", "owner", "--model", f"tiny={tiny_model}", "--local-share", "0.1", swarm=orch)
    start_node("--name", "worker", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("owner", "worker")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    with orch.client() as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.post("/v1/completions", json=body).status_code == 429
    # The node key no longer reaches inference; the node's own credential does, as that node.
    as_key = httpx.post(f"{orch.url}/v1/completions", json=body, verify=orch.verify,
                        headers={"Authorization": f"Bearer {orch.keys['node']}"})  # fmt: skip
    assert as_key.status_code == 403, as_key.text
    speaking_for_another = {"Authorization": f"Bearer {credential_of(owner)}", "X-Dragon-Node": "worker"}
    as_other = httpx.post(f"{orch.url}/v1/completions", json=body, verify=orch.verify, headers=speaking_for_another)
    assert as_other.status_code == 401, as_other.text

    # The owner's runner is busy with a long request of its own: the next one is handed over.
    long = threading.Thread(target=lambda: owner.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "mine", "max_tokens": 3000}, timeout=300))  # fmt: skip
    long.start()
    wait_until(lambda: owner.model_status("tiny")["busy"], 30, "the owner's long request")
    handed = owner.client.post("/v1/completions", json=body, timeout=60)
    long.join(300)
    assert handed.status_code == 200, handed.text
    assert handed.headers["x-dragon-nodes"] == "worker"  # its origin, the owner node, is known: not sent back there
    assert handed.json()["dragon"]["nodes"] == ["worker"]

    # The hand-off's usage is the owner node's, in the report and in `dragon usage`.
    def usage(query: str = "") -> httpx.Response:
        with orch.client("admin") as c:
            return c.get(f"/v1/usage{query}")

    def node_rows(answer: httpx.Response) -> dict[str, dict[str, Any]]:
        assert answer.status_code == 200, answer.text
        return {row["name"]: row for row in answer.json()["nodes"]}

    wait_until(lambda: node_rows(usage()), 30, "the hand-off's usage to be recorded")
    answer = usage().json()
    assert answer["since"] is None  # all time
    assert [row["name"] for row in answer["nodes"]] == ["owner"]  # the worker handed nothing off
    mine = answer["nodes"][0]
    assert {k: mine[k] for k in ("name", "state", "requests")} == {"name": "owner", "state": "active", "requests": 1}
    prompt, completion = handed.json()["usage"]["prompt_tokens"], handed.json()["usage"]["completion_tokens"]
    assert (mine["prompt_tokens"], mine["completion_tokens"]) == (prompt, completion) and prompt > 0
    assert mine["models"] == {"tiny": {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion}}
    # `data` holds the keys alone, each shaped as before nodes were counted: an older reader reads no node.
    assert [row["name"] for row in answer["data"]] == ["test admin", "test user", "test node", "second user"]
    assert all(set(row) == {"id", "name", "role", "prefix", "state", "requests", "prompt_tokens",
                            "completion_tokens", "models"} and row["id"] is not None for row in answer["data"])
    user = next(row for row in answer["data"] if row["name"] == "test user")
    assert user["requests"] == 1  # the user's own request, not the node's
    # A window: from the hour holding `since` on. The hand-off is in the past hour's, not the next one's.
    now = int(time.time())
    recent = usage(f"?since={now - 60}")
    assert node_rows(recent) == {"owner": mine} and recent.json()["since"] == (now - 60) // 3600 * 3600
    later = usage(f"?since={now + 7200}")
    assert node_rows(later) == {} and later.json()["since"] == (now + 7200) // 3600 * 3600
    assert all(row["requests"] == 0 for row in later.json()["data"])  # every key is listed, with nothing
    for bad in ("abc", "-5", "nan"):
        refused = usage(f"?since={bad}")
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "since" and error["type"] == "invalid_request_error", error

    cli = [sys.executable, "-m", "dragonswarm.cli", "usage", "--url", orch.url, "--ca", str(orch.ca), "--home",
           str(orch.home), "--key", orch.keys["admin"]]  # fmt: skip
    table = subprocess.run([*cli, "--since", "1h"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert table.stderr.startswith("usage since ")
    owner_line = next(line.split() for line in table.stdout.splitlines() if "owner" in line)
    assert owner_line == ["-", "node", "owner", "active", "tiny", "1", str(prompt), str(completion)]
    ahead = subprocess.run([*cli, "--since", str(now + 7200)], capture_output=True, text=True, timeout=60)
    assert ahead.returncode == 0 and "owner" not in ahead.stdout, ahead.stderr
    wrong = subprocess.run([*cli, "--since", "last tuesday"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and wrong.stdout == "", wrong.stdout
    assert wrong.stderr.startswith("dragon: error: --since 'last tuesday'") and wrong.stderr.count("\n") == 1
