"""Runner processes: disconnect frees them, crashes are contained, idle ones unload."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tests.conftest import NodeProcess, wait_until

LONG = {"model": "tiny", "prompt": "go on", "max_tokens": 4000, "temperature": 0}


def runner_pid(node: NodeProcess) -> int:
    pid = node.model_status("tiny")["runner_pid"]
    assert pid, "the model should be loaded"
    return int(pid)


def warm(node: NodeProcess) -> int:
    node.client.post("/v1/completions", json={**LONG, "max_tokens": 1}).raise_for_status()
    return runner_pid(node)


def test_disconnect_mid_stream_frees_the_runner(tiny_node: NodeProcess) -> None:
    warm(tiny_node)
    body = {**LONG, "stream": True}
    with httpx.Client(base_url=tiny_node.url, timeout=30) as client, client.stream("POST", "/v1/completions",
                                                                                   json=body) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(10):
            next(lines)
        assert tiny_node.model_status("tiny")["busy"] is True
    # leaving the block closed the connection mid-generation

    status = wait_until(lambda: (s := tiny_node.model_status("tiny"))["jobs"]["cancelled"] == 1 and s, 10,
                        "the job to be cancelled")  # fmt: skip
    assert status["busy"] is False
    assert status["tokens_generated"] < 4000 + 1  # the warm-up token plus a cut-off job
    # The runner is really idle, not still generating: it uses no CPU now.
    proc = psutil.Process(runner_pid(tiny_node))
    before = sum(proc.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(proc.cpu_times()[:2]) - before < 0.1
    out = tiny_node.client.post("/v1/completions", json={**LONG, "max_tokens": 3})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_waiting_for_a_non_streamed_answer(tiny_node: NodeProcess) -> None:
    warm(tiny_node)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_node.api + "/completions", json=LONG, timeout=0.3)
    wait_until(lambda: tiny_node.model_status("tiny")["jobs"]["cancelled"] == 1, 10, "the job to be cancelled")
    assert tiny_node.model_status("tiny")["busy"] is False


def test_runner_crash_mid_stream_is_reported_and_recovered(tiny_node: NodeProcess) -> None:
    first_pid = warm(tiny_node)
    events: list[Any] = []
    with tiny_node.client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if len(events) == 5:
                os.kill(first_pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "runner_failed" and "retry" in error["message"]

    # The node is alive, restarts the runner by itself, and serves again.
    assert tiny_node.client.get("/health").status_code == 200
    status = wait_until(lambda: (s := tiny_node.model_status("tiny"))["runner_pid"] not in (None, first_pid) and s,
                        20, "the runner to be restarted")  # fmt: skip
    assert status["restarts"] == 1 and status["jobs"]["failed"] == 1
    client = tiny_node.openai()
    assert client.completions.create(model="tiny", prompt="again", max_tokens=4).usage.completion_tokens == 4  # type: ignore[union-attr]


def test_runner_crash_during_non_streamed_request_gives_503(tiny_node: NodeProcess) -> None:
    pid = warm(tiny_node)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(r=tiny_node.client.post("/v1/completions", json=LONG)))
    thread.start()
    wait_until(lambda: tiny_node.model_status("tiny")["busy"], 10, "the request to start")
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    response = result["r"]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "runner_failed"


def test_idle_model_is_unloaded_and_reloaded(start_node: Callable[..., NodeProcess], tiny_model: Path) -> None:
    node = start_node("--model", f"tiny={tiny_model}", "--idle-unload", "1.5")
    pid = warm(node)
    assert psutil.pid_exists(pid)
    wait_until(lambda: not node.model_status("tiny")["loaded"], 15, "the idle model to be unloaded")
    wait_until(lambda: not psutil.pid_exists(pid), 5, "the runner process to exit")
    # An idle node uses next to no CPU: its own process over two seconds.
    node_proc = psutil.Process(node.proc.pid)
    before = sum(node_proc.cpu_times()[:2])
    time.sleep(2.0)
    assert sum(node_proc.cpu_times()[:2]) - before < 0.1
    # The next request loads it again.
    out = node.client.post("/v1/completions", json={**LONG, "max_tokens": 2})
    assert out.status_code == 200
    assert node.model_status("tiny")["loaded"] is True


def test_full_queue_answers_429(start_node: Callable[..., NodeProcess], tiny_model: Path) -> None:
    node = start_node("--model", f"tiny={tiny_model}", "--max-queue", "1")
    warm(node)
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        r = httpx.post(node.api + "/completions", json={**LONG, "max_tokens": 1500}, timeout=60)
        with lock:
            results.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["Retry-After"].isdigit()
                assert r.json()["error"]["code"] == "queue_full"

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: node.model_status("tiny")["waiting"] == 1, 10, "one request running and one queued")
    call()  # the third finds the queue full
    for t in threads:
        t.join(60)
    assert sorted(results) == [200, 200, 429]


def test_client_leaving_the_queue_frees_its_place(start_node: Callable[..., NodeProcess], tiny_model: Path) -> None:
    node = start_node("--model", f"tiny={tiny_model}", "--max-queue", "1")
    warm(node)
    busy = threading.Thread(target=lambda: httpx.post(node.api + "/completions", json=LONG, timeout=60))
    busy.start()
    wait_until(lambda: node.model_status("tiny")["busy"], 10, "the first request to run")
    with pytest.raises(httpx.ReadTimeout):  # queued behind it, then gives up
        httpx.post(node.api + "/completions", json={**LONG, "stream": True}, timeout=0.5)
    wait_until(lambda: node.model_status("tiny")["waiting"] == 0, 10, "the queued request to leave")
    busy.join(60)
    status = node.model_status("tiny")
    assert status["jobs"]["completed"] == 2  # the warm-up and the long one; the leaver never ran


def test_a_client_that_leaves_while_a_long_prompt_is_read_keeps_the_runner(
        start_node: Callable[..., NodeProcess], coder_model: Path) -> None:  # fmt: skip
    """At a small share one 512-token batch of the prompt takes far longer than the 5 s the
    node waits for a cancel: llama.cpp must stop within the batch, or the runner is killed
    and the owner's next request waits for the model to load again."""
    node = start_node("--model", f"coder={coder_model}", "--local-share", "0.05", "--cap-mechanism", "duty",
                      env={"DRAGON_OWNER_NOISE": "1.0"})  # fmt: skip
    node.client.post("/v1/completions", json={"model": "coder", "prompt": "def", "max_tokens": 1}).raise_for_status()
    pid = node.model_status("coder")["runner_pid"]
    prompt = " ".join(f"item_{i} = compute({i}, cache[{i % 7}])" for i in range(150))  # about 2,000 tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(node.api + "/completions", json={"model": "coder", "prompt": prompt, "max_tokens": 8,
                                                    "cache_prompt": False}, timeout=2.0)  # fmt: skip
    # The node waits 5 s for the runner to confirm, then kills it: give it twice that.
    status = wait_until(lambda: (s := node.model_status("coder"))["jobs"]["cancelled"] == 1 and s, 10,
                        "the runner to confirm the cancel")  # fmt: skip
    assert status["runner_pid"] == pid and psutil.pid_exists(pid), "a cancel killed a healthy runner"
    out = node.client.post("/v1/completions", json={"model": "coder", "prompt": "def", "max_tokens": 2})
    assert out.status_code == 200 and node.model_status("coder")["runner_pid"] == pid
