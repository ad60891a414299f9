"""The operator's view, against a real `dragon up` (tiny model): the dashboard in a real
browser (headless Debian Chromium via Playwright), its one-time login, `/metrics` parsed
by Prometheus' own parser, and a log line and an id per request.

`DRAGON_UPDATE_SCREENSHOT=1` makes the browser test save its screenshot as
`docs/dashboard.png`, the one the README shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.browser import browser_context
from tests.conftest import free_port, wait_until

from dragonswarm.orchestrator.logins import Logins
from dragonswarm.orchestrator.overview import row_order
from dragonswarm.tls import client_context
from dragonswarm.web.requestlog import RequestFacts

DOCS = Path(__file__).resolve().parent.parent / "docs"

# --- pure parts -------------------------------------------------------------------------------------------


def test_a_login_token_works_once_and_not_after_it_expires() -> None:
    logins = Logins()
    token = logins.issue(now=100.0, ttl_s=60)
    session = logins.redeem(token, now=110.0)
    assert session is not None and logins.valid(session, now=111.0)
    assert logins.redeem(token, now=111.0) is None  # spent
    late = logins.issue(now=100.0, ttl_s=60)
    assert logins.redeem(late, now=161.0) is None  # expired
    assert logins.redeem("made-up", now=100.0) is None
    assert not logins.valid("made-up", now=111.0) and not logins.valid(None, now=111.0)
    logins.end(session)
    assert not logins.valid(session, now=112.0)
    assert token not in repr(logins) and session not in repr(logins)  # only hashes are kept


def test_rows_that_need_an_eye_come_first() -> None:
    rows = [{"name": "gone", "state": "gone"}, {"name": "idle", "state": "live"},
            {"name": "stale", "state": "stale"}, {"name": "owner", "state": "live", "owner_busy": True},
            {"name": "working", "state": "live", "running": 1}]  # fmt: skip
    assert [r["name"] for r in sorted(rows, key=row_order)] == ["working", "owner", "stale", "idle", "gone"]


def test_a_request_line_has_names_and_numbers_only() -> None:
    facts = RequestFacts(id="abc", method="POST", path="/v1/completions", started=10.0, key="alice", model="tiny")
    facts.prompt_tokens = 5
    facts.token(1, 10.5)
    facts.token(3, 11.5)
    facts.status, facts.ended = 200, 12.0
    assert facts.ttft() == 0.5 and facts.tpot() == pytest.approx(1.0 / 3)
    assert facts.line() == ("request abc POST /v1/completions key=alice model=tiny tokens=5+4 ttft=0.500s "
                            "duration=2.000s status=200")  # fmt: skip
    facts.error = "runner_failed"
    assert facts.outcome() == "runner_failed"  # a stream that failed after its 200


# --- a real swarm -----------------------------------------------------------------------------------------


@dataclass
class Up:
    home: Path
    url: str  # https://127.0.0.1:PORT
    user_key: str
    admin_key: str
    verify: Any
    info: dict[str, Any]
    log: Path
    proc: subprocess.Popen[bytes]

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def login_url(self, ttl_s: float = 120) -> str:
        r = httpx.post(f"{self.url}/v1/dashboard/login", headers=self.admin(), json={"ttl_s": ttl_s},
                       verify=self.verify, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
        return str(r.json()["url"])

    def complete(self, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", headers={"Authorization": f"Bearer {self.user_key}"},
                          json={"model": "tiny", "temperature": 0, **body}, verify=self.verify, timeout=120)

    def pid(self, name: str) -> int:
        info = json.loads((self.home / "swarm.json").read_text())
        return int(next(n["pid"] for n in info["nodes"] if n["name"] == name))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("up")
    home, port = tmp / "home", free_port()
    log_path = tmp / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dragonswarm.cli", "up", "--home", str(home), "--workers", "2",
                                 "--port", str(port), "--api-port", str(free_port()), "--no-bundled-model",
                                 "--model", f"tiny={tiny_model}:code,chat"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "DRAGON_OWNER_NOISE": "1.0"})  # see conftest.start_node  # fmt: skip
    try:
        # swarm.json is written just before the banner is printed
        wait_until(lambda: "Ctrl-C stops" in log_path.read_text() or proc.poll() is not None, 120, "the banner")
        assert proc.poll() is None, log_path.read_text()
        info = json.loads((home / "swarm.json").read_text())
        yield Up(home, f"https://127.0.0.1:{port}", info["api_key"], (home / "keys" / "admin.key").read_text().strip(),
                 client_context(Path(info["ca_cert"])), info, log_path, proc)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_dragon_up_prints_a_dashboard_link(up: Up) -> None:
    printed = up.log.read_text()
    line = next(line for line in printed.splitlines() if "dashboard" in line and "#login=" in line)
    assert f"{up.url}/dashboard#login=" in line
    assert up.admin_key not in printed  # the link is a one-time token, never the admin key


def test_dragon_dashboard_prints_a_one_time_link(up: Up) -> None:
    r = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "dashboard", "--home", str(up.home)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url.startswith(f"{up.url}/dashboard#login=") and up.admin_key not in url
    token = url.split("#login=")[1]
    first = httpx.post(f"{up.url}/dashboard/session", json={"token": token}, verify=up.verify)
    assert first.status_code == 204
    again = httpx.post(f"{up.url}/dashboard/session", json={"token": token}, verify=up.verify)
    assert again.status_code == 401 and "already used" in again.json()["error"]["message"]
    bad = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "dashboard", "--home", str(up.home), "--key",
                          up.user_key], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "403" in bad.stderr


def test_only_admins_get_a_login_and_only_a_session_gets_the_feed(up: Up) -> None:
    user = httpx.post(f"{up.url}/v1/dashboard/login", headers={"Authorization": f"Bearer {up.user_key}"},
                      verify=up.verify)  # fmt: skip
    assert user.status_code == 403 and user.json()["error"]["type"]
    assert httpx.post(f"{up.url}/v1/dashboard/login", verify=up.verify).status_code == 401
    feed = httpx.get(f"{up.url}/dashboard/events", verify=up.verify)
    assert feed.status_code == 401
    forged = httpx.get(f"{up.url}/dashboard/events", cookies={"dragon_dashboard": up.admin_key}, verify=up.verify)
    assert forged.status_code == 401  # a key is not a session
    foreign = httpx.post(f"{up.url}/dashboard/session", json={"token": "x"}, headers={"Origin": "https://evil.test"},
                         verify=up.verify)  # fmt: skip
    assert foreign.status_code == 403
    too_long = httpx.post(f"{up.url}/v1/dashboard/login", headers=up.admin(), json={"ttl_s": 86400},
                          verify=up.verify)  # fmt: skip
    assert too_long.status_code == 400


def test_the_dashboard_in_a_real_browser(up: Up) -> None:
    with browser_context() as ctx:
        page = ctx.new_page()
        page.goto(f"{up.url}/dashboard")  # no cookie, no token: asked to log in, shown nothing
        page.wait_for_selector("#login:not([hidden])")
        assert page.locator("#main").is_hidden()

        page.goto(up.login_url())
        page.wait_for_selector("#main:not([hidden])")
        assert "#login=" not in page.url  # the token left the address bar
        for name in ("local", "worker-1", "worker-2"):
            page.wait_for_selector(f'#nodes tr[data-node="{name}"][data-state="live"]', timeout=30_000)
        page.wait_for_selector('#models tr[data-model="tiny"]')
        cookie = next(c for c in ctx.cookies() if c["name"] == "dragon_dashboard")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # no script can read it

        # Running work and tokens/s change on the page, without a reload: the page's own values are watched.
        page.evaluate("""() => {
            window.seen = {running: 0, tps: 0, fragments: 0};
            const read = (id) => Number(document.getElementById(id).textContent);
            const watch = () => {
                seen.running = Math.max(seen.running, read('requests-running'));
                seen.fragments = Math.max(seen.fragments, read('fragments-running'));
                seen.tps = Math.max(seen.tps, read('tokens-per-s'));
            };
            new MutationObserver(watch).observe(document.getElementById('main'), {subtree: true, childList: true,
                                                                                    characterData: true});
        }""")
        tokens_before = int(page.locator('#nodes tr[data-node="worker-1"] td').nth(10).inner_text())
        with httpx.stream("POST", f"{up.url}/v1/completions", headers={"Authorization": f"Bearer {up.user_key}"},
                          json={"model": "tiny", "prompt": ["one", "two"], "max_tokens": 400, "stream": True},
                          verify=up.verify, timeout=120) as r:  # fmt: skip
            assert r.status_code == 200
            for line in r.iter_lines():
                time.sleep(0.005)  # a slow reader: the request stays open over a few snapshots
                if line == "data: [DONE]":
                    break
        wait_until(lambda: page.evaluate("seen.tps") > 0, 10, "tokens/s on the page")
        seen = page.evaluate("seen")
        assert seen["running"] >= 1 and seen["fragments"] >= 1, seen

        def tokens_on_page() -> int:
            cells = page.locator('#nodes tr[data-node="worker-1"] td, #nodes tr[data-node="worker-2"] td')
            return sum(int(cells.nth(i).inner_text()) for i in (10, 21))

        wait_until(lambda: tokens_on_page() > tokens_before, 10, "tokens served on the page")
        shot = page.screenshot(full_page=True)
        assert shot.startswith(b"\x89PNG")
        if os.environ.get("DRAGON_UPDATE_SCREENSHOT"):  # docs/dashboard.png comes from here, on demand
            (DOCS / "dashboard.png").write_bytes(shot)

        # A node that stops answering shows as stale, then gone.
        pid = up.pid("worker-2")
        os.kill(pid, signal.SIGSTOP)
        try:
            page.wait_for_selector('#nodes tr[data-node="worker-2"][data-state="stale"]', timeout=60_000)
            page.wait_for_selector('#nodes tr[data-node="worker-2"][data-state="gone"]', timeout=90_000)
            assert int(page.locator("#nodes-gone").inner_text()) >= 1
        finally:
            os.kill(pid, signal.SIGCONT)
        page.wait_for_selector('#nodes tr[data-node="worker-2"][data-state="live"]', timeout=60_000)

        page.click("#logout")  # the session ends on the server too
        page.wait_for_selector("#login:not([hidden])")
        page.goto(f"{up.url}/dashboard")
        page.wait_for_selector("#login:not([hidden])")


def test_a_spent_or_expired_link_is_refused_in_the_browser(up: Up) -> None:
    used = up.login_url()
    with browser_context() as ctx:
        page = ctx.new_page()
        page.goto(used)
        page.wait_for_selector("#main:not([hidden])")
    expired = up.login_url(ttl_s=0.5)
    time.sleep(1.0)
    for url in (used, expired):
        with browser_context() as ctx:
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_selector("#login:not([hidden])")
            assert "expired or was already used" in page.inner_text("#login-why")
            assert not [c for c in ctx.cookies() if c["name"] == "dragon_dashboard"]


# --- metrics and request logs -----------------------------------------------------------------------------


def scrape(up: Up, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(f"{up.url}/metrics", headers={"Authorization": f"Bearer {key or up.admin_key}"}, verify=up.verify)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families[family].samples if s.name == sample and all(s.labels.get(k) == v
             for k, v in labels.items())]  # fmt: skip
    return float(sum(found))


def test_metrics_count_exactly_what_was_sent(up: Up) -> None:
    before = scrape(up)
    types = {"dragon:requests": "counter", "dragon:prompt_tokens": "counter", "dragon:generation_tokens": "counter",
             "dragon:time_to_first_token_seconds": "histogram", "dragon:time_per_output_token_seconds": "histogram",
             "dragon:e2e_request_latency_seconds": "histogram", "dragon:num_requests_running": "gauge",
             "dragon:num_requests_waiting": "gauge", "dragon:nodes": "gauge", "dragon:fragments_running": "gauge",
             "dragon:failovers": "counter", "dragon:rate_limit_refusals": "counter", "dragon:node_cpu_total": "gauge",
             "dragon:node_share_in_force": "gauge", "dragon:node_owner_busy": "gauge"}  # fmt: skip
    for name, kind in types.items():
        assert name in before, name
        assert before[name].type == kind, (name, before[name].type)
    assert value(before, "dragon:nodes", "dragon:nodes", state="live") == 3
    assert {s.labels["node"] for s in before["dragon:node_cpu_total"].samples} == {"local", "worker-1", "worker-2"}

    prompt = completion = 0
    for max_tokens in (3, 5, 8):
        r = up.complete(prompt="count me", max_tokens=max_tokens)
        assert r.status_code == 200, r.text
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
    refused = up.complete(prompt="x", max_tokens=1, model="no-such-model")
    assert refused.status_code == 404

    after = scrape(up)
    moved = {(s.labels.get("status")): s.value - value(before, "dragon:requests", "dragon:requests_total", **s.labels)
             for s in after["dragon:requests"].samples if s.name == "dragon:requests_total"}  # fmt: skip
    assert moved.get("200") == 3 and moved.get("404") == 1
    assert value(after, "dragon:prompt_tokens", "dragon:prompt_tokens_total", model="tiny") - value(
        before, "dragon:prompt_tokens", "dragon:prompt_tokens_total", model="tiny") == prompt
    assert value(after, "dragon:generation_tokens", "dragon:generation_tokens_total", model="tiny") - value(
        before, "dragon:generation_tokens", "dragon:generation_tokens_total", model="tiny") == completion
    ttft = "dragon:time_to_first_token_seconds"
    assert value(after, ttft, ttft + "_count", model="tiny") - value(before, ttft, ttft + "_count", model="tiny") == 3


def test_metrics_need_an_admin_or_metrics_key(up: Up) -> None:
    assert httpx.get(f"{up.url}/metrics", verify=up.verify).status_code == 401
    user = httpx.get(f"{up.url}/metrics", headers={"Authorization": f"Bearer {up.user_key}"}, verify=up.verify)
    assert user.status_code == 403
    made = subprocess.run([sys.executable, "-m", "dragonswarm.cli", "keys", "create", "--role", "metrics",
                           "--name", "prometheus", "--home", str(up.home)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert "dragon:requests" in scrape(up, key)
    assert up.complete(prompt="x", max_tokens=1).status_code == 200
    no_inference = httpx.post(f"{up.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "tiny", "prompt": "x", "max_tokens": 1}, verify=up.verify)  # fmt: skip
    assert no_inference.status_code == 403


def test_each_request_has_an_id_and_one_log_line_without_prompt_or_key(up: Up) -> None:
    secret_prompt = "the-prompt-must-not-be-logged"
    r = up.complete(prompt=secret_prompt, max_tokens=4)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    log = up.home / "logs" / "orchestrator.log"
    line = wait_until(lambda: next((x for x in log.read_text().splitlines() if f"request {rid}" in x), None), 10,
                      "the request's log line")  # fmt: skip
    usage = r.json()["usage"]
    assert "key=dragon up user " in line
    assert "model=tiny" in line and f"tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" in line
    assert "status=200" in line and "ttft=" in line and "nodes=" in line
    text = log.read_text()
    assert secret_prompt not in text and up.user_key not in text and up.admin_key not in text
    refused = httpx.post(f"{up.url}/v1/completions", headers={"Authorization": "Bearer nope"},
                         json={"model": "tiny", "prompt": "x"}, verify=up.verify)  # fmt: skip
    assert refused.status_code == 401
    rid = refused.headers["x-request-id"]
    wait_until(lambda: f"request {rid} POST /v1/completions duration=" in log.read_text(), 10, "the refusal's line")
