"""Keys that expire or are revoked, per-key rate limits and per-request limits, on a real swarm."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from tests.conftest import OrchestratorProcess

from dragonswarm.store.sqlite import open_store

Swarm = Callable[..., OrchestratorProcess]


def post(orch: OrchestratorProcess, key: str, body: dict[str, object], path: str = "/v1/completions"
         ) -> httpx.Response:  # fmt: skip
    return httpx.post(orch.url + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60,
                      verify=orch.verify)  # fmt: skip


def served(orch: OrchestratorProcess) -> int:
    return int(orch.nodes()["w1"]["served"])


def test_revoked_and_expired_keys_are_refused(swarm: Swarm) -> None:
    orch = swarm(1)
    store = open_store(orch.home)
    short, _ = store.create_key("user", "short-lived", expires=time.time() + 2)
    store.close()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert post(orch, short, body).status_code == 200
    time.sleep(2.1)  # the key's own lifetime, not synchronisation
    expired = post(orch, short, body)
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]

    # Revoked from the CLI while the orchestrator runs: the very next request is refused.
    listed = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "list", "--home", str(orch.home)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    user_row = next(line for line in listed.stdout.splitlines() if "test user" in line)
    assert orch.keys["user"] not in listed.stdout  # only the shown prefix, never the key
    assert post(orch, orch.keys["user"], body).status_code == 200
    subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "revoke", user_row.split()[0], "--home",
                    str(orch.home)], check=True, capture_output=True)  # fmt: skip
    revoked = post(orch, orch.keys["user"], body)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
    assert post(orch, orch.keys["user2"], body).status_code == 200  # other keys are untouched


def test_rate_limit_per_key(swarm: Swarm) -> None:
    orch = swarm(1, "--rate-rpm", "2")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert [post(orch, orch.keys["user"], body).status_code for _ in range(2)] == [200, 200]
    before = served(orch)
    limited = post(orch, orch.keys["user"], body)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60  # until the first request leaves the minute's window
    assert post(orch, orch.keys["user2"], body).status_code == 200  # per key
    assert served(orch) == before + 1  # the refused request never reached a worker


def test_token_rate_limit(swarm: Swarm) -> None:
    orch = swarm(1, "--rate-tpm", "300")
    first = post(orch, orch.keys["user"], {"model": "tiny", "prompt": "x" * 40, "max_tokens": 200})
    assert first.status_code == 200
    # 40 + 200 were charged; the used tokens stay charged, so another 240 does not fit.
    second = post(orch, orch.keys["user"], {"model": "tiny", "prompt": "x" * 40, "max_tokens": 200})
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    # A request bigger than the whole limit is not clamped to it, nor told to retry: it can never fit.
    huge = post(orch, orch.keys["user2"], {"model": "tiny", "prompt": "x", "max_tokens": 300})
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "request_too_large", huge.text
    assert "retry-after" not in huge.headers and "300 tokens per minute" in huge.json()["error"]["message"]


def test_request_limits_are_enforced_before_any_work(swarm: Swarm) -> None:
    orch = swarm(1, "--max-tokens", "64")
    key = orch.keys["user"]
    cases = [
        ({"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 9}, 400, "n"),
        ({"model": "tiny", "prompt": ["x"] * 17}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x" * 200_001}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x" * (5 << 20)}, 413, None),
        ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ]
    for body, status, param in cases:
        r = post(orch, key, body)
        assert r.status_code == status, (body if status != 413 else "big body", r.text[:200])
        error = r.json()["error"]
        if param:
            assert error["param"] == param, error
    chat = post(orch, key, {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "y" * 200_001}]},
                "/v1/chat/completions")  # fmt: skip
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert served(orch) == 0 and orch.queued() == 0  # nothing was half-processed


def test_expired_and_revoked_keys_on_every_endpoint_and_the_websocket(swarm: Swarm) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    orch = swarm(1)
    store = open_store(orch.home)
    expired, _ = store.create_key("admin", "expired admin", expires=time.time() - 1)
    revoked, record = store.create_key("admin", "revoked admin")
    store.revoke_key(str(record.id))
    revoked_node, node_record = store.create_key("node", "revoked node key")
    store.revoke_key(str(node_record.id))
    store.close()
    endpoints = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "tiny", "prompt": "x"}),
                 ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}),
                 ("GET", "/v1/nodes", None), ("POST", "/v1/nodes/w1/revoke", None)]  # fmt: skip
    for method, path, body in endpoints:
        for label, key in (("expired", expired), ("revoked", revoked)):
            r = httpx.request(method, orch.url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                              verify=orch.verify, timeout=30)  # fmt: skip
            assert r.status_code == 401, (label, path, r.text)
            assert label in r.json()["error"]["message"]
    for key in (expired, revoked, revoked_node):
        with pytest.raises(InvalidStatus) as refused:
            connect(orch.ws_url, additional_headers={"Authorization": f"Bearer {key}", "X-Dragon-Node": "newcomer"},
                    ssl=orch.ssl, open_timeout=10)  # fmt: skip
        assert refused.value.response.status_code == 401
    assert orch.nodes()["w1"]["state"] == "live"  # the revoke endpoint was never reached
