"""The swarm end to end: a real orchestrator, real nodes joined over WebSocket, real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import OrchestratorProcess, free_port, wait_until

from dragonswarm.tls import client_context

Start = Callable[..., Any]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def texts_by_index(events: list[dict[str, Any]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for event in events:
        for choice in event.get("choices", []):
            out[choice["index"]] = out.get(choice["index"], "") + (choice.get("text") or "")
    return out


def complete(orch: OrchestratorProcess, role: str = "user", **body: Any) -> httpx.Response:
    with orch.client(role) as c:
        return c.post("/v1/completions", json={"model": "tiny", "temperature": 0, "cache_prompt": False, **body})


def test_fragments_run_on_different_workers_and_combine_in_order(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(3)
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    whole = complete(orch, prompt=prompts, max_tokens=12)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["dragon"]["fragments"] == 3
    assert len(set(body["dragon"]["nodes"])) == 3  # three idle workers: one fragment each, in parallel
    assert set(whole.headers["x-dragon-nodes"].split(",")) <= {"w1", "w2", "w3"}
    # Each fragment equals the same prompt run on its own (temperature 0).
    singles = [complete(orch, prompt=p, max_tokens=12).json()["choices"][0]["text"] for p in prompts]
    assert [c["text"] for c in body["choices"]] == singles
    assert body["usage"]["completion_tokens"] == 36

    # Streamed: chunks carry the right index, and reassemble to the same texts.
    with orch.client() as c, c.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": prompts, "max_tokens": 12, "temperature": 0, "cache_prompt": False, "stream": True,
        "stream_options": {"include_usage": True},
    }) as response:  # fmt: skip
        assert response.status_code == 200
        events = sse_events(response)
    assert texts_by_index(events) == {0: singles[0], 1: singles[1], 2: singles[2]}
    assert events[-1]["usage"]["completion_tokens"] == 36
    assert events[-1]["dragon"]["fragments"] == 3

    # n > 1 splits too: with a seed, choice j samples with seed + j, wherever it runs.
    n = complete(orch, prompt="omega", max_tokens=10, n=3, temperature=1.0, seed=42).json()
    again = complete(orch, prompt="omega", max_tokens=10, n=3, temperature=1.0, seed=42).json()
    assert [c["text"] for c in n["choices"]] == [c["text"] for c in again["choices"]]
    assert len(set(n["dragon"]["nodes"])) >= 2


def test_worker_killed_mid_stream_the_stream_continues(start_orchestrator: Start, start_node: Start,
                                                       tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    workers = {name: start_node("--name", name, "--model", f"tiny={tiny_model}", "--share", "0.1", swarm=orch)
               for name in ("w1", "w2")}  # fmt: skip
    orch.wait_live("w1", "w2")
    max_tokens = 1500
    seen: list[str] = []
    with orch.client() as c, c.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": "failover", "max_tokens": max_tokens, "temperature": 0, "cache_prompt": False,
        "stream": True, "stream_options": {"include_usage": True},
    }) as response:  # fmt: skip
        assert response.status_code == 200
        first = response.headers["x-dragon-nodes"]
        events = []
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            if len(events) == 40:  # well into the answer: kill the worker serving it
                seen = [texts_by_index(events).get(0, "")]
                workers[first].proc.send_signal(signal.SIGKILL)
    assert not any("error" in e for e in events), [e for e in events if "error" in e]
    text = texts_by_index(events)[0]
    final = events[-1]
    assert text.startswith(seen[0])  # nothing streamed before the kill is lost or changed
    assert final["usage"]["completion_tokens"] == max_tokens  # no gap, no repeat: exactly what was asked
    assert final["dragon"]["nodes"] == [first, ({"w1", "w2"} - {first}).pop()]
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    assert finishes == ["length"]


def test_local_first_then_hand_off_when_busy(start_orchestrator: Start, start_node: Start, tiny_model: Path) -> None:
    orch = start_orchestrator()
    local = start_node("--name", "local", "--model", f"tiny={tiny_model}", swarm=orch)
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("local", "w1")
    wait_until(lambda: local.status()["swarm"]["connected"], 30, "the node to be linked")

    body = {"model": "tiny", "prompt": "local first", "max_tokens": 8, "temperature": 0}
    here = local.client.post("/v1/completions", json=body)
    assert here.status_code == 200
    assert here.headers["x-dragon-nodes"] == "local"
    assert here.json()["dragon"] == {"nodes": ["local"], "fragments": 1}

    # While the owner's first request holds the local runner, the next one goes to the swarm.
    long_done = threading.Event()
    long_result: list[httpx.Response] = []

    def long_request() -> None:
        with httpx.Client(base_url=local.url, timeout=120) as c:
            long_result.append(c.post("/v1/completions", json={**body, "max_tokens": 3000}))
        long_done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: local.model_status("tiny")["busy"], 30, "the local runner to be busy")
    away = local.client.post("/v1/completions", json=body)
    assert away.status_code == 200, away.text
    assert away.headers["x-dragon-nodes"] == "w1"
    assert away.json()["dragon"]["nodes"] == ["w1"]
    assert away.json()["choices"][0]["text"] == here.json()["choices"][0]["text"]  # same model, same answer
    thread.join(120)
    assert long_result and long_result[0].headers["x-dragon-nodes"] == "local"


def test_orchestrator_restart_nodes_rejoin_keys_survive(start_orchestrator: Start, start_node: Start,
                                                        tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    assert complete(orch, prompt="before", max_tokens=4).status_code == 200

    orch.stop()
    wait_until(lambda: not node.status()["swarm"]["connected"], 30, "the node to notice")
    # Unreachable orchestrator: the node still serves its owner.
    alone = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "alone", "max_tokens": 4})
    assert alone.status_code == 200 and alone.headers["x-dragon-nodes"] == "w1"

    orch.start()  # same home, same port
    orch.wait_live("w1", timeout=60)
    after = complete(orch, prompt="after", max_tokens=4)  # the user key from before the restart
    assert after.status_code == 200, after.text
    assert orch.nodes()["w1"]["state"] == "live"


def test_a_node_notices_a_frozen_orchestrator_and_joins_again(start_orchestrator: Start, start_node: Start,
                                                               tiny_model: Path) -> None:  # fmt: skip
    """A frozen orchestrator closes nothing: its node takes the connection for dead when a
    ping goes unanswered (the link's own keepalive), serves its owner meanwhile, and joins
    again once the orchestrator runs."""
    orch = start_orchestrator()
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    assert orch.proc is not None
    orch.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not node.status()["swarm"]["connected"], 60, "the node to give the connection up")
        assert "no answer from the orchestrator to a ping" in node.log()
        alone = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "alone", "max_tokens": 4})
        assert alone.status_code == 200 and alone.headers["x-dragon-nodes"] == "w1"
    finally:
        orch.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: node.status()["swarm"]["connected"], 60, "the node to join again")
    assert complete(orch, prompt="after", max_tokens=4).status_code == 200


ENDPOINTS = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/v1/nodes"), ("GET", "/v1/usage")]  # fmt: skip


def test_auth_matrix(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(1)
    bodies = {"/v1/completions": {"model": "tiny", "prompt": "x", "max_tokens": 2},
              "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 2}}  # fmt: skip
    # The node key only joins: a node hands its owner's requests over with its own credential.
    allowed = {"/v1/models": {"user", "admin"}, "/v1/completions": {"user", "admin"},
               "/v1/chat/completions": {"user", "admin"}, "/v1/nodes": {"admin"},
               "/v1/usage": {"admin"}}  # fmt: skip
    for method, path in ENDPOINTS:
        for label, headers in [("no key", {}), ("bad key", {"Authorization": "Bearer dsk_not-a-key"}),
                               ("bad scheme", {"Authorization": f"Basic {orch.keys['user']}"})]:  # fmt: skip
            r = httpx.request(method, orch.url + path, headers=headers, json=bodies.get(path), timeout=30,
                              verify=orch.verify)  # fmt: skip
            assert r.status_code == 401, (label, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        for role in ("user", "node", "admin"):
            headers = {"Authorization": f"Bearer {orch.keys[role]}"}
            r = httpx.request(method, orch.url + path, headers=headers, json=bodies.get(path), timeout=30,
                              verify=orch.verify)  # fmt: skip
            if role in allowed[path]:
                assert r.status_code == 200, (role, path, r.text)
            else:
                assert r.status_code == 403, (role, path, r.text)
                assert r.json()["error"]["code"] == "permission_denied"
    assert httpx.get(orch.url + "/health", verify=orch.verify).status_code == 200
    assert httpx.get(orch.url + "/docs", verify=orch.verify).status_code == 404

    # The node WebSocket: only node (and admin) keys get past the handshake.
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = orch.ws_url
    for label, key, status in [("no key", None, 401), ("bad key", "dsk_nope", 401), ("user", orch.keys["user"], 403),
                               ("bad credential", "dnc_nope", 401)]:  # fmt: skip
        headers = {"X-Dragon-Node": "probe"} | ({"Authorization": f"Bearer {key}"} if key else {})
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10, ssl=orch.ws_ssl)
        assert refused.value.response.status_code == status, label
    with pytest.raises(InvalidStatus) as unnamed:
        connect(url, additional_headers={"Authorization": f"Bearer {orch.keys['node']}"}, open_timeout=10,
                ssl=orch.ws_ssl)  # fmt: skip
    assert unnamed.value.response.status_code == 400
    with connect(url, additional_headers={"Authorization": f"Bearer {orch.keys['node']}",
                                          "X-Dragon-Node": "probe"}, ssl=orch.ws_ssl) as ws:  # fmt: skip
        ws.send("{}")  # not a hello: the orchestrator ends the connection
        with pytest.raises(Exception, match="1008"):
            ws.recv(timeout=10)


def _stream_in_thread(orch: OrchestratorProcess, role: str, body: dict[str, Any], results: list[Any],
                      order: list[str], label: str) -> threading.Thread:  # fmt: skip
    def go() -> None:
        with orch.client(role) as c:
            r = c.post("/v1/completions", json={"model": "tiny", "temperature": 0, "cache_prompt": False, **body},
                       timeout=300)
        results.append((label, r))
        order.append(label)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_full_queue_answers_429_and_nothing_is_lost(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(1, "--max-queue", "2", node_flags=("--share", "0.1"))
    results: list[Any] = []
    order: list[str] = []
    busy = _stream_in_thread(orch, "user", {"prompt": "hold the worker", "max_tokens": 1500}, results, order, "busy")
    wait_until(lambda: orch.nodes()["w1"]["running"] == 1, 30, "the worker to be busy")
    queued = _stream_in_thread(orch, "user", {"prompt": ["a", "b"], "max_tokens": 4}, results, order, "queued")
    wait_until(lambda: orch.queued() == 2, 30, "two fragments to be queued")
    refused = complete(orch, prompt="one too many", max_tokens=4)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    # A request bigger than the whole queue is refused whole, not half-queued.
    too_big = complete(orch, prompt=["x", "y", "z"], max_tokens=4)
    assert too_big.status_code == 429
    busy.join(300)
    queued.join(300)
    statuses = {label: r.status_code for label, r in results}
    assert statuses == {"busy": 200, "queued": 200}
    assert len(dict(results)["queued"].json()["choices"]) == 2


def test_one_users_flood_does_not_starve_another(swarm: Callable[..., OrchestratorProcess]) -> None:
    orch = swarm(1, "--max-queue-per-user", "6", node_flags=("--share", "0.1"))
    results: list[Any] = []
    order: list[str] = []
    threads = [_stream_in_thread(orch, "user", {"prompt": f"flood {i}", "max_tokens": 300}, results, order, f"a{i}")
               for i in range(8)]  # fmt: skip
    wait_until(lambda: orch.queued() >= 6, 60, "user A's flood to fill its share of the queue")
    threads.append(_stream_in_thread(orch, "user2", {"prompt": "me too", "max_tokens": 300}, results, order, "b"))
    for thread in threads:
        thread.join(300)
    statuses = {label: r.status_code for label, r in results}
    assert statuses["b"] == 200
    refused = [label for label, code in statuses.items() if code == 429]
    assert refused, "user A's flood beyond its share should have been refused"
    served_a = [label for label in order if label.startswith("a") and statuses[label] == 200]
    # Round robin: B waits behind at most the one running request and one more of A's.
    assert order.index("b") <= order.index(served_a[min(2, len(served_a) - 1)]), order


def test_deadline_ends_a_request_that_cannot_be_served(start_orchestrator: Start, start_node: Start,
                                                       tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator("--fragment-timeout", "3")
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--local-share", "0.1", swarm=orch)
    orch.wait_live("w1")
    # The owner keeps the only worker busy with a long request of their own.
    holder = threading.Thread(target=lambda: node.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "mine", "max_tokens": 4000}, timeout=300))  # fmt: skip
    holder.start()
    wait_until(lambda: orch.nodes()["w1"].get("local_busy") == 1, 30, "the owner's request to show")
    waiting = complete(orch, prompt="wait", max_tokens=4)  # the client gives up after 60 s: no hang
    assert waiting.status_code == 504
    assert waiting.json()["error"]["code"] == "timeout"
    assert orch.queued() == 0  # and it left the queue
    holder.join(300)


def test_auto_picks_the_code_or_chat_model(start_orchestrator: Start, start_node: Start, tiny_model: Path,
                                           tmp_path: Path) -> None:  # fmt: skip
    from dragonswarm.devtools.tiny_model import write_tiny_model

    chat_model = write_tiny_model(tmp_path / "chat.gguf", seed=3)
    orch = start_orchestrator()
    start_node("--name", "w1", "--model", f"coder={tiny_model}:code", "--model", f"talker={chat_model}:chat",
               swarm=orch)  # fmt: skip
    orch.wait_live("w1")
    with orch.client() as c:
        code = c.post("/v1/completions", json={"model": "auto", "prompt": "def fib(n):\n", "max_tokens": 2})
        chat = c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "Hello, how are you?"}]})
        models = c.get("/v1/models").json()["data"]
        unknown = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert code.json()["model"] == "coder"
    assert chat.json()["model"] == "talker"
    assert {m["id"]: m["tags"] for m in models} == {"coder": ["code"], "talker": ["chat"]}
    assert unknown.status_code == 404 and "coder" in unknown.json()["error"]["message"]


def test_no_node_yet_is_a_clear_503(start_orchestrator: Start) -> None:
    orch = start_orchestrator()
    r = complete(orch, prompt="x")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_workers"


def test_dragon_up_runs_a_swarm_and_stops_it_cleanly(tmp_path: Path, tiny_model: Path) -> None:
    import subprocess
    import sys

    home, port, api_port = tmp_path / "up", free_port(), free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dragonswarm.cli", "up", "--home", str(home), "--workers", "2",
                                 "--port", str(port), "--api-port", str(api_port), "--no-bundled-model",
                                 "--model", f"tiny={tiny_model}:code,chat"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "DRAGON_OWNER_NOISE": "1.0"})  # see conftest.start_node  # fmt: skip
    try:
        swarm_file = home / "swarm.json"
        wait_until(lambda: swarm_file.exists() or proc.poll() is not None, 120, "swarm.json")
        assert proc.poll() is None, log_path.read_text()
        info = json.loads(swarm_file.read_text())
        assert info["api_url"] == f"https://127.0.0.1:{port}/v1"
        assert Path(info["ca_cert"]) == home / "tls" / "ca.pem"
        assert [(n["name"], n["role"]) for n in info["nodes"]] == [
            ("orchestrator", "orchestrator"), ("local", "node"), ("worker-1", "worker"), ("worker-2", "worker")]
        assert oct(swarm_file.stat().st_mode & 0o777) == "0o600"
        # swarm.json is written before the banner is printed
        wait_until(lambda: "Ctrl-C stops" in log_path.read_text(), 30, "the banner")
        printed = log_path.read_text()
        assert info["api_key"] in printed and info["api_url"] in printed and "curl" in printed

        assert info["api_url"].startswith("https://")
        verify = client_context(Path(info["ca_cert"]))  # TLS on loopback too, with the swarm's own CA
        r = httpx.post(info["api_url"] + "/completions", headers={"Authorization": f"Bearer {info['api_key']}"},
                       json={"model": "auto", "prompt": ["a", "b", "c"], "max_tokens": 4}, timeout=60,
                       verify=verify)  # fmt: skip
        assert r.status_code == 200, r.text
        assert len(set(r.json()["dragon"]["nodes"])) == 3
        owner = httpx.post(f"http://127.0.0.1:{api_port}/v1/completions", json={"model": "tiny", "prompt": "hi",
                           "max_tokens": 4}, timeout=60)  # fmt: skip
        assert owner.headers["x-dragon-nodes"] == "local"

        status = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "status", "--home", str(home)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:]}
        assert rows == {"local": "live", "worker-1": "live", "worker-2": "live"}
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log_path.read_text()
    for node in info["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)


def test_node_cli_needs_both_orchestrator_and_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "node", "--home", str(tmp_path), "--no-bundled-model",
                        "--orchestrator", "http://127.0.0.1:1"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "DRAGON_KEY"})  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "node key" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "create", "--role", "boss",
                          "--home", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_keys_create_prints_once_and_stores_only_the_hash(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "create", "--role", "user", "--name", "ci",
                        "--home", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("dsk_") and len(key) >= 40
    assert key.encode() not in (tmp_path / "state.db").read_bytes()
    from dragonswarm.store.sqlite import open_store

    store = open_store(tmp_path)
    record = store.find_key(key)
    store.close()
    assert record is not None and record.role == "user" and record.name == "ci"


def test_owner_comes_first_work_for_others_moves(start_orchestrator: Start, start_node: Start,
                                                 tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    local = start_node("--name", "local", "--model", f"tiny={tiny_model}", "--share", "0.1", swarm=orch)
    orch.wait_live("local")
    events: list[dict[str, Any]] = []

    def others() -> None:  # someone else's long request, placed on the only node: this machine
        with orch.client() as c, c.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": "others", "max_tokens": 1500, "temperature": 0, "cache_prompt": False,
            "stream": True, "stream_options": {"include_usage": True}}, timeout=300) as r:  # fmt: skip
            events.extend(json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]")  # fmt: skip

    thread = threading.Thread(target=others)
    thread.start()
    wait_until(lambda: orch.nodes()["local"]["running"] == 1, 30, "the remote work to run here")
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    mine = local.client.post("/v1/completions", json={"model": "tiny", "prompt": "mine", "max_tokens": 8})
    assert mine.status_code == 200
    assert mine.headers["x-dragon-nodes"] == "local"  # the owner is served here, at once
    thread.join(300)
    assert not any("error" in e for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 1500
    assert events[-1]["dragon"]["nodes"] == ["local", "w1"]  # the work for others moved


def test_owner_busy_and_no_idle_worker_the_owner_is_served_here(start_orchestrator: Start, start_node: Start,
                                                                 tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    # Owner detection on (the fixture turns it off for placement tests).
    node = start_node("--name", "n1", "--model", f"tiny={tiny_model}", swarm=orch, env={"DRAGON_OWNER_NOISE": "0.10"})
    orch.wait_live("n1")
    # An owner's program outside the swarm's process tree keeps a core busy (bash exits at once,
    # so the hog is nobody's child here): the node hands requests over, and nobody can take them.
    hog = subprocess.run(["bash", "-c", "timeout 300 python3 -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                         check=True, capture_output=True, text=True)  # fmt: skip
    hog_pid = int(hog.stdout)  # `timeout`'s, which passes a TERM on to the hog
    try:
        wait_until(lambda: node.status()["governor"]["owner_busy"], 30, "the node to see its owner busy")
        r = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "mine", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-dragon-nodes"] == "n1"  # served here, not parked in the swarm's queue
        assert orch.queued() == 0
    finally:
        os.kill(hog_pid, signal.SIGTERM)


def test_the_standard_event_loop_where_uvloop_is_missing(start_orchestrator: Start, start_node: Start, tiny_model: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The orchestrator runs on uvloop where it is installed; Windows has none, and there it
    runs on asyncio's own loop (`DRAGON_EVENT_LOOP=asyncio` picks it here): the same service."""
    from dragonswarm.web.eventloop import loop_factory

    assert loop_factory() is not None  # uvloop comes with uvicorn[standard] on Linux
    monkeypatch.setenv("DRAGON_EVENT_LOOP", "asyncio")
    assert loop_factory() is None
    monkeypatch.delenv("DRAGON_EVENT_LOOP")
    orch = start_orchestrator(env={"DRAGON_EVENT_LOOP": "asyncio"})
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    whole = complete(orch, prompt="alpha beta", max_tokens=8)
    assert whole.status_code == 200 and whole.json()["dragon"]["nodes"] == ["w1"], whole.text
    with orch.client() as c, c.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": "alpha beta", "max_tokens": 8, "temperature": 0, "cache_prompt": False,
        "stream": True}) as response:  # fmt: skip
        assert response.status_code == 200
        assert texts_by_index(sse_events(response)) == {0: whole.json()["choices"][0]["text"]}
