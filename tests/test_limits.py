"""Keys that expire or are revoked, per-key rate limits and per-request limits, on a real swarm."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import OrchestratorProcess, wait_until

from dragonswarm.status import usage_since
from dragonswarm.store.backends import open_store
from dragonswarm.store.base import first_hour_kept

Swarm = Callable[..., OrchestratorProcess]


def post(orch: OrchestratorProcess, key: str, body: dict[str, object], path: str = "/v1/completions"
         ) -> httpx.Response:  # fmt: skip
    return httpx.post(orch.url + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60,
                      verify=orch.verify)  # fmt: skip


def served(orch: OrchestratorProcess) -> int:
    return int(orch.nodes()["w1"]["served"])


def _redis_flag(url: str | None) -> list[str]:
    return ["--redis", url] if url else []


def test_revoked_and_expired_keys_are_refused(swarm: Swarm, state_redis: str | None) -> None:
    orch = swarm(1, redis=state_redis)
    store = open_store(orch.home, state_redis)
    short, _ = store.create_key("user", "short-lived", expires=time.time() + 2)
    store.close()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert post(orch, short, body).status_code == 200
    time.sleep(2.1)  # the key's own lifetime, not synchronisation
    expired = post(orch, short, body)
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]

    # Revoked from the CLI while the orchestrator runs: the very next request is refused.
    listed = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "list", "--home", str(orch.home),
                             *_redis_flag(state_redis)], capture_output=True, text=True, check=True)  # fmt: skip
    user_row = next(line for line in listed.stdout.splitlines() if "test user" in line)
    assert orch.keys["user"] not in listed.stdout  # only the shown prefix, never the key
    assert post(orch, orch.keys["user"], body).status_code == 200
    subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "revoke", user_row.split()[0], "--home",
                    str(orch.home), *_redis_flag(state_redis)], check=True, capture_output=True)  # fmt: skip
    revoked = post(orch, orch.keys["user"], body)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
    assert post(orch, orch.keys["user2"], body).status_code == 200  # other keys are untouched


def test_rate_limit_per_key(swarm: Swarm, state_redis: str | None) -> None:
    orch = swarm(1, "--rate-rpm", "2", redis=state_redis)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert [post(orch, orch.keys["user"], body).status_code for _ in range(2)] == [200, 200]
    before = served(orch)
    limited = post(orch, orch.keys["user"], body)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60  # until the first request leaves the minute's window
    assert post(orch, orch.keys["user2"], body).status_code == 200  # per key
    assert served(orch) == before + 1  # the refused request never reached a worker


def test_token_rate_limit(swarm: Swarm, state_redis: str | None) -> None:
    orch = swarm(1, "--rate-tpm", "300", redis=state_redis)
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
                    ssl=orch.ws_ssl, open_timeout=10)  # fmt: skip
        assert refused.value.response.status_code == 401
    assert orch.nodes()["w1"]["state"] == "live"  # the revoke endpoint was never reached


def test_usage_report_per_key_and_model(swarm: Swarm, state_redis: str | None) -> None:
    orch = swarm(1, "--rate-rpm", "3", redis=state_redis)
    body = {"model": "tiny", "prompt": "count me", "max_tokens": 3}
    for _ in range(2):
        assert post(orch, orch.keys["user"], body).status_code == 200
    assert post(orch, orch.keys["user2"], body).status_code == 200
    assert post(orch, orch.keys["user2"], {**body, "model": "nothing-serves-this"}).status_code == 404
    assert [post(orch, orch.keys["user"], body).status_code for _ in range(2)] == [200, 429]  # 3 a minute
    # The 404 was refused after admission, before any work: it is no request, and does not
    # use up one of the three.
    assert [post(orch, orch.keys["user2"], body).status_code for _ in range(3)] == [200, 200, 429]

    def report() -> dict[str, dict[str, Any]]:
        with orch.client("admin") as c:
            r = c.get("/v1/usage")
        assert r.status_code == 200, r.text
        return {row["name"]: row for row in r.json()["data"]}

    wait_until(lambda: report()["second user"]["requests"] == 3, 30, "the last request to be recorded")
    rows = report()
    assert list(rows) == ["test admin", "test user", "test node", "second user"]  # every key, oldest first
    user, user2, admin = rows["test user"], rows["second user"], rows["test admin"]
    assert user["role"] == "user" and user["state"] == "active" and user["requests"] == 3
    assert user["prompt_tokens"] > 0 and 0 < user["completion_tokens"] <= 9
    assert user["models"] == {"tiny": {name: user[name] for name in ("requests", "prompt_tokens", "completion_tokens")}}
    assert user2["requests"] == 3  # the request for a model nobody serves was not served, so not counted
    assert admin["requests"] == 0 and admin["models"] == {}
    assert all(orch.keys[role] not in str(rows) for role in orch.keys)  # only the shown prefix, never a key

    # Only an admin key may read it; anyone else gets the OpenAI error shape.
    for role, status in (("user", 403), ("node", 403), (None, 401)):
        with orch.client(role) as c:
            refused = c.get("/v1/usage")
        assert refused.status_code == status, (role, refused.text)
        assert set(refused.json()["error"]) >= {"message", "type", "code"}
        if status == 403:
            assert refused.json()["error"]["code"] == "permission_denied"

    # The CLI prints the same report, as a table or as JSON.
    cli = [sys.executable, "-m", "dragonswarm.cli", "usage", "--url", orch.url, "--ca", str(orch.ca), "--home",
           str(orch.home)]  # fmt: skip
    table = subprocess.run([*cli, "--key", orch.keys["admin"]], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:5] == ["ID", "ROLE", "NAME", "STATE", "MODEL"]
    user_line = next(line for line in lines if "test user" in line)
    assert user_line.split()[-5:] == ["active", "tiny", "3", str(user["prompt_tokens"]), str(user["completion_tokens"])]
    as_json = subprocess.run([*cli, "--key", orch.keys["admin"], "--json"], capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    printed = json.loads(as_json.stdout)  # the whole answer: keys in `data`, no node handed anything off
    assert {row["name"]: row for row in printed["data"]} == report() and printed["nodes"] == []
    assert printed["since"] is None and printed["object"] == "list"
    denied = subprocess.run([*cli, "--key", orch.keys["user"]], capture_output=True, text=True, timeout=60)
    assert denied.returncode == 2 and "403" in denied.stderr and "may not read usage" in denied.stderr
    if state_redis:  # replicas' shared usage, read from Redis itself: no orchestrator, no admin key
        direct = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "usage", "--json"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "DRAGON_REDIS": state_redis})  # fmt: skip
        assert direct.returncode == 0, direct.stderr
        assert {row["name"]: row for row in json.loads(direct.stdout)["data"]} == report()

    # A window, through the orchestrator and (with a Redis) from Redis itself: the hours of the last
    # 30 minutes hold every request above; from two hours ahead, nothing is counted yet.
    ways: list[tuple[list[str], dict[str, str] | None]] = [([*cli, "--key", orch.keys["admin"]], None)]
    if state_redis:
        ways.append(([sys.executable, "-m", "dragonswarm.cli", "usage"], {**os.environ, "DRAGON_REDIS": state_redis}))
    for way, env in ways:
        recent = subprocess.run([*way, "--json", "--since", "30m"], capture_output=True, text=True, timeout=60,
                                env=env)  # fmt: skip
        assert recent.returncode == 0, recent.stderr
        assert {row["name"]: row for row in json.loads(recent.stdout)["data"]} == report()
        assert recent.stderr.startswith("usage since ")
        ahead = subprocess.run([*way, "--json", "--since", str(int(time.time()) + 7200)], capture_output=True,
                               text=True, timeout=60, env=env)  # fmt: skip
        assert ahead.returncode == 0, ahead.stderr
        assert [row["requests"] for row in json.loads(ahead.stdout)["data"]] == [0, 0, 0, 0]
        # From further back than the hours are kept: the window starts at the first hour kept, and says so.
        before = first_hour_kept(time.time())
        past = subprocess.run([*way, "--json", "--since", "60d"], capture_output=True, text=True, timeout=60,
                              env=env)  # fmt: skip
        assert past.returncode == 0, past.stderr
        start = json.loads(past.stdout)["since"]
        assert start in (before, first_hour_kept(time.time()))  # (the clock may pass an hour meanwhile)
        assert past.stderr.startswith(usage_since(start))
        assert {row["name"]: row for row in json.loads(past.stdout)["data"]} == report()


def test_since_from_an_orchestrator_too_old_to_count_by_the_hour_is_an_error(tmp_path: Path) -> None:
    # An orchestrator from before hours were kept ignores ?since= and answers all time, with no `since`.
    old_answer = {"object": "list", "data": [{"id": 1, "name": "admin", "role": "admin", "prefix": "dsk_aaaaaaaa",
                                              "state": "active", "requests": 2, "prompt_tokens": 3,
                                              "completion_tokens": 4, "models": {}}]}  # fmt: skip
    asked: list[str] = []

    class OldOrchestrator(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            asked.append(self.path)
            body = json.dumps(old_answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # not onto the test's stderr

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldOrchestrator)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    env = {k: v for k, v in os.environ.items() if k not in ("DRAGON_REDIS", "DRAGON_KEY", "DRAGON_CA")}
    cli = [sys.executable, "-m", "dragonswarm.cli", "usage", "--url", f"http://127.0.0.1:{server.server_port}",
           "--key", "dsk_test", "--home", str(tmp_path)]  # fmt: skip
    try:
        refused = subprocess.run([*cli, "--since", "24h"], capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout
        assert "too old to count usage by the hour" in refused.stderr and refused.stderr.count("\n") == 1
        assert asked[0].startswith("/v1/usage?since=")
        # Without --since, its all-time answer is printed as before.
        plain = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.splitlines()[1].split() == ["1", "admin", "admin", "active", "-", "2", "3", "4"]
        # A year is not taken for unix seconds (all time): it is an error before anything is asked.
        year = subprocess.run([*cli, "--since", "2025"], capture_output=True, text=True, timeout=60, env=env)
        assert year.returncode == 2 and "2025-01-01" in year.stderr and year.stderr.count("\n") == 1
        assert len(asked) == 2
    finally:
        server.shutdown()
        server.server_close()
        serving.join(10)


def test_usage_table_plain_values() -> None:
    from dragonswarm.status import usage_table

    counts = {"requests": 3, "prompt_tokens": 30, "completion_tokens": 9}
    keys = [
        {"id": 1, "name": "admin", "role": "admin", "state": "active", "requests": 0, "prompt_tokens": 0,
         "completion_tokens": 0, "models": {}},
        {"id": 2, "name": "alice", "role": "user", "state": "revoked", "requests": 4, "prompt_tokens": 31,
         "completion_tokens": 10, "models": {"gemma": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1},
                                             "tiny": counts}},
        {"id": 3, "name": "bob", "role": "user", "state": "active", **counts, "models": {"tiny": counts}},
    ]  # fmt: skip
    nodes = [{"name": "box-1", "state": "forgotten", **counts, "models": {"tiny": counts}}]
    lines = [line.split() for line in usage_table(keys, nodes).splitlines()]
    assert lines[1] == ["1", "admin", "admin", "active", "-", "0", "0", "0"]
    assert lines[2] == ["2", "user", "alice", "revoked", "all", "4", "31", "10"]
    assert lines[3:5] == [["gemma", "1", "1", "1"], ["tiny", "3", "30", "9"]]
    assert lines[5] == ["3", "user", "bob", "active", "tiny", "3", "30", "9"]
    assert lines[6] == ["-", "node", "box-1", "forgotten", "tiny", "3", "30", "9"]  # a node's hand-offs: no key id
    assert [line.split() for line in usage_table(keys).splitlines()] == lines[:6]  # an older orchestrator's answer
    assert usage_table([]).startswith("no keys yet")


def test_usage_report_plain_values() -> None:
    from dragonswarm.orchestrator.usage import node_report, usage_answer, usage_report
    from dragonswarm.store.base import KeyRecord, NodeIdentity, NodeUsage, Usage

    keys = [KeyRecord(1, "admin", "admin", "dsk_aaaaaaaa", 0.0), KeyRecord(2, "alice", "user", "dsk_bbbbbbbb", 0.0,
                                                                            revoked=5.0)]  # fmt: skip
    usage = [Usage(2, "gemma", 1, 1, 1), Usage(2, "tiny", 2, 20, 5), Usage(9, "tiny", 1, 1, 1)]  # 9: no such key
    nodes = [NodeUsage("zeta", "tiny", 1, 3, 3), NodeUsage("alpha", "gemma", 1, 1, 1),
             NodeUsage("alpha", "tiny", 2, 2, 2), NodeUsage("gone", "tiny", 1, 4, 4)]  # fmt: skip
    identities = [NodeIdentity("alpha", 0.0), NodeIdentity("zeta", 0.0, revoked=1.0), NodeIdentity("idle", 0.0)]
    # Keys' entries have the shape they had before nodes were counted: a reader of them reads no node.
    report = usage_report(keys, usage, 10.0)
    assert report == [
        {"id": 1, "name": "admin", "role": "admin", "prefix": "dsk_aaaaaaaa", "state": "active",
         "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "models": {}},
        {"id": 2, "name": "alice", "role": "user", "prefix": "dsk_bbbbbbbb", "state": "revoked",
         "requests": 3, "prompt_tokens": 21, "completion_tokens": 6,
         "models": {"gemma": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1},
                    "tiny": {"requests": 2, "prompt_tokens": 20, "completion_tokens": 5}}},
    ]  # fmt: skip
    # The nodes that handed something off, by name; the idle one is not there.
    by_node = node_report(nodes, identities)
    assert [(r["name"], r["state"], r["requests"], r["prompt_tokens"]) for r in by_node] == [
        ("alpha", "active", 3, 3), ("gone", "forgotten", 1, 4), ("zeta", "revoked", 1, 3)]
    assert all(set(r) == {"name", "state", "requests", "prompt_tokens", "completion_tokens", "models"}
               for r in by_node)  # fmt: skip
    assert by_node[0]["models"] == {"gemma": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1},
                                    "tiny": {"requests": 2, "prompt_tokens": 2, "completion_tokens": 2}}  # fmt: skip
    # The answer: keys in `data`, nodes in `nodes`, and where the window starts (None: all time).
    assert usage_answer(keys, usage, nodes, identities, None, 10.0) == {"object": "list", "since": None,
                                                                        "data": report, "nodes": by_node}  # fmt: skip
    assert usage_answer(keys, [], [], [], 1_700_000_000.5, 1_700_000_000.5)["since"] == 1_699_999_200


def test_the_usage_window_starts_no_earlier_than_the_first_hour_kept() -> None:
    from dragonswarm.orchestrator.usage import usage_window
    from dragonswarm.store.base import HOUR_S, USAGE_HOURS_KEPT_S, first_hour_kept

    now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    hour = 1_699_999_200
    first = hour - USAGE_HOURS_KEPT_S + HOUR_S  # 840 hours kept, the current one the last
    assert USAGE_HOURS_KEPT_S == 35 * 86_400 and first_hour_kept(now) == first
    assert usage_window(None, now) is None  # all time: the totals, kept for good
    assert usage_window(now - 60, now) == hour  # the hour holding `since`
    assert usage_window(now + 7200, now) == hour + 7200  # the future: allowed, and empty
    assert usage_window(now - 30 * 86_400, now) == hour - 30 * 86_400  # `30d` is kept whole
    assert usage_window(first, now) == usage_window(first + HOUR_S - 1, now) == first
    for older in (first - 1, now - 40 * 86_400, 0):  # what is no longer kept is not in the window
        assert usage_window(older, now) == first


def test_since_values() -> None:
    from datetime import datetime

    from dragonswarm.errors import InvalidRequest
    from dragonswarm.orchestrator.usage import since_arg, since_param

    # ?since= on the API: unix seconds, from 1970 to the year 9999 (the future is allowed: it is empty).
    assert since_param(None) is None
    for good, value in (("0", 0.0), ("1700000000", 1.7e9), ("1700000000.5", 1_700_000_000.5), ("1e10", 1e10)):
        assert since_param(good) == value
    for bad in ("abc", "", "-1", "nan", "inf", "1e300", "24h"):
        with pytest.raises(InvalidRequest) as refused:
            since_param(bad)
        assert refused.value.status == 400 and refused.value.param == "since"

    # --since: back from now, unix seconds, or an ISO date or time (naive: local time).
    now = 1_700_000_000.0
    assert since_arg("30m", now) == now - 1800 and since_arg("24h", now) == now - 86_400
    assert since_arg("7d", now) == now - 7 * 86_400 and since_arg("100000d", now) == 0  # before 1970: all time
    assert since_arg("1690000000", now) == 1.69e9 and since_arg(" 100000000 ", now) == 1e8  # 9 digits: 1973
    assert since_arg("2023-11-14T22:13:20Z", now) == 1_700_000_000
    assert since_arg("2023-11-14T23:13:20+01:00", now) == 1_700_000_000
    assert since_arg("2023-11-14", now) == datetime(2023, 11, 14).timestamp()
    assert since_arg("2100-01-01T00:00Z", now) == 4_102_444_800  # the future: allowed
    for bad in ("yesterday", "5x", "-5", "", "1h30m", "1960-01-01T00:00Z", "9999999999d", "1" * 400):
        with pytest.raises(ValueError, match="--since"):
            since_arg(bad, now)
    # A plain number of fewer than 9 digits is no unix time anyone means (a year, a date without its
    # dashes): an error that says how to write a date, not all time.
    for short in ("2025", "20250101", "99999999", "0", "0.5", "00000002025"):
        with pytest.raises(ValueError, match=r"at least 9 digits.*2025-01-01"):
            since_arg(short, now)


def test_a_stream_cut_by_the_orchestrators_shutdown_is_counted(
        start_orchestrator: Callable[..., OrchestratorProcess], start_node: Callable[..., Any], coder_model: Path,
        state_redis: str | None) -> None:  # fmt: skip
    """Stopped while a stream runs, the orchestrator cancels it after its grace period (5 s) and
    closes the limiter and the store. The stream's usage, written as it ends, must get there
    first: what it used is counted, not lost with the shutdown."""
    orch = start_orchestrator(redis=state_redis)
    start_node("--name", "w1", "--model", f"coder={coder_model}", swarm=orch)
    orch.wait_live("w1")
    received: list[str] = []

    def stream() -> None:  # about 20 s of tokens on these cores: still running 5 s after the stop
        body = {"model": "coder", "prompt": "Counting to 1000: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 700,
                "stream": True, "temperature": 0}  # fmt: skip
        with contextlib.suppress(httpx.HTTPError), orch.client() as c, \
                c.stream("POST", "/v1/completions", json=body, timeout=60) as r:  # fmt: skip
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    received.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: len(received) >= 5, 60, "the stream to begin")
    assert orch.proc is not None
    orch.proc.send_signal(signal.SIGINT)
    orch.proc.wait(60)  # 130 after a SIGINT: uvicorn raises the signal again once it has stopped
    reader.join(30)
    assert "timeout graceful shutdown exceeded" in orch.log()  # cut, not finished
    store = open_store(orch.home, state_redis)
    try:
        key_id = next(k.id for k in store.list_keys() if k.name == "test user")
        requests, prompt, completion = store.usage_by_key().get(key_id, (0, 0, 0))
    finally:
        store.close()
    assert requests == 1 and prompt > 0 and len(received) <= completion < 700, (requests, completion, orch.log())
