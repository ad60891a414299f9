"""The node's own page, its live overview and its Prometheus metrics: a real node, a real
orchestrator where the swarm is the subject, and a real headless browser for the page."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import NodeProcess, wait_until
from tests.test_lending import seen_paused, served_by

from dragonswarm.node.metrics import Course, gauges

Start = Callable[..., Any]
SWITCH = "Lend this machine to the swarm"


def scrape(node: NodeProcess) -> dict[str, Any]:
    """`/metrics` parsed: family name -> (type, {(sample name, sorted labels): value})."""
    r = node.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
            for f in text_string_to_metric_families(r.text)}  # fmt: skip


def value(metrics: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    result: float = metrics[family][1][(sample, tuple(sorted(labels.items())))]
    return result


def moved(before: dict[str, Any], after: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return value(after, family, sample, **labels) - value(before, family, sample, **labels)


# --- Plain values -----------------------------------------------------------------------------


def test_a_course_counts_what_its_events_say() -> None:
    two = Course(started=10.0, generations=2)
    two.see({"ev": "progress", "prompt_done": 3}, 10.1)
    two.see({"ev": "start", "prompt_tokens": 5}, 10.2)
    two.see({"ev": "text", "text": "a", "completion_tokens": 1}, 10.5)
    two.see({"ev": "done", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 2}, 10.6)
    assert two.status == "cancelled"  # its second generation never ended
    two.see({"ev": "start", "prompt_tokens": 5}, 10.7)
    two.see({"ev": "text", "text": "b", "completion_tokens": 1}, 10.8)
    two.see({"ev": "done", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 1}, 10.9)
    assert (two.status, two.prompt_tokens, two.tokens, two.first_token_s) == ("ok", 10, 3, 0.5)

    cut = Course(started=0.0, generations=1)
    cut.see({"ev": "start", "prompt_tokens": 4}, 0.1)
    cut.see({"ev": "text", "text": "abc", "completion_tokens": 3}, 0.2)
    assert (cut.status, cut.tokens) == ("cancelled", 3)  # a client gone: what was generated still counts
    cut.see({"ev": "error", "code": "runner_failed", "message": "x"}, 0.3)
    assert (cut.status, cut.tokens) == ("error", 3)


def test_gauges_come_from_the_overview() -> None:
    governor = {"owner_load": 0.25, "owner_busy": True, "gpu_owner_busy": False, "cpu_total": 0.5, "cpu_ours": 0.2,
                "cpus": 8, "share_in_force": 0.15, "local_share": 0.8, "share": 0.1, "threads": 2,
                "ram_total": 16 << 30, "ram_available": 8 << 30, "mechanism": "duty",
                "gpus": [{"index": 0, "util": 0.5, "mem_used": 1 << 30, "mem_total": 8 << 30}]}  # fmt: skip
    overview = {"governor": governor, "lending": {"paused": True}, "swarm": None,
                "models": [{"name": "tiny", "loaded": True, "waiting": 2}]}  # fmt: skip
    samples = {(s.name, tuple(s.labels.values())): s.value for m in gauges(overview) for s in m.samples}
    assert samples[("dragon:owner_load", ())] == 0.25 and samples[("dragon:owner_busy", ())] == 1
    assert samples[("dragon:lending_paused", ())] == 1 and samples[("dragon:swarm_connected", ())] == 0
    assert samples[("dragon:fragments_running", ())] == 0
    assert samples[("dragon:gpu_memory_used_bytes", ("0",))] == 1 << 30
    assert samples[("dragon:cap_mechanism_info", ("duty",))] == 1
    assert samples[("dragon:requests_waiting", ("tiny",))] == 2


# --- /metrics on a real node --------------------------------------------------------------------

COUNTERS = ("dragon:requests", "dragon:prompt_tokens", "dragon:generation_tokens")
GAUGES = tuple("dragon:" + name for name in (
    "owner_load", "owner_busy", "cpu_total", "cpu_ours", "share_in_force", "lending_paused", "fragments_running",
    "swarm_connected", "ram_total_bytes", "ram_available_bytes", "threads", "model_loaded", "cap_mechanism_info",
))  # fmt: skip
TTFT = "dragon:time_to_first_token_seconds"


def test_metrics_count_exactly_what_was_served(start_orchestrator: Start, start_node: Start,
                                               tiny_model: Path) -> None:  # fmt: skip
    orch = start_orchestrator()
    node = start_node("--name", "w1", "--model", f"tiny={tiny_model}", swarm=orch)
    orch.wait_live("w1")
    wait_until(lambda: node.status()["swarm"]["connected"], 30, "the node to be linked")
    before = scrape(node)
    types = {name: kind for name, (kind, _) in before.items()}
    assert {name: types.get(name) for name in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {name: types.get(name) for name in GAUGES} == dict.fromkeys(GAUGES, "gauge")
    assert types.get(TTFT) == "histogram"
    assert value(before, "dragon:swarm_connected", "dragon:swarm_connected") == 1
    assert value(before, "dragon:lending_paused", "dragon:lending_paused") == 0

    # The owner's own requests, served here (local first): one plain, one streamed, one with two
    # choices (one request), and one the runner refuses (its context cannot hold it).
    owner = {"requests": 0, "prompt": 0, "generation": 0}
    base = {"model": "tiny", "temperature": 0}
    for body in ({"prompt": "one", "max_tokens": 7}, {"prompt": "two", "max_tokens": 3, "n": 2}):
        r = node.client.post("/v1/completions", json={**base, **body})
        assert r.status_code == 200 and r.headers["x-dragon-nodes"] == "w1", r.text
        owner["requests"] += 1
        owner["prompt"] += r.json()["usage"]["prompt_tokens"]
        owner["generation"] += r.json()["usage"]["completion_tokens"]
    with node.client.stream("POST", "/v1/completions", json={**base, "prompt": "three", "max_tokens": 5,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        lines = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    owner["requests"] += 1
    owner["prompt"] += lines[-1]["usage"]["prompt_tokens"]
    owner["generation"] += lines[-1]["usage"]["completion_tokens"]
    refused = node.client.post("/v1/completions", json={**base, "prompt": "four", "max_tokens": 100_000})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    mid = scrape(node)
    assert moved(before, mid, "dragon:requests", "dragon:requests_total", origin="owner", status="ok") == 3
    assert moved(before, mid, "dragon:requests", "dragon:requests_total", origin="owner", status="error") == 1
    assert moved(before, mid, "dragon:prompt_tokens", "dragon:prompt_tokens_total", origin="owner") == owner["prompt"]
    generated = moved(before, mid, "dragon:generation_tokens", "dragon:generation_tokens_total", origin="owner")
    assert generated == owner["generation"] == 7 + 2 * 3 + 5
    assert moved(before, mid, TTFT, f"{TTFT}_count", origin="owner") == 3  # the refused one had no first token
    for origin in ("owner", "swarm"):  # every series is there from the start
        assert (f"{TTFT}_bucket", (("le", "+Inf"), ("origin", origin))) in mid[TTFT][1]
    for status in ("ok", "error", "cancelled"):
        assert moved(before, mid, "dragon:requests", "dragon:requests_total", origin="swarm", status=status) == 0

    # Work for others: one request of two prompts (two fragments) and one of one, through the orchestrator.
    swarm = {"prompt": 0, "generation": 0}
    with orch.client() as c:
        for prompts in (["five", "six"], ["seven"]):
            r = c.post("/v1/completions", json={**base, "prompt": prompts, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["dragon"]["nodes"] == ["w1"], r.text
            swarm["prompt"] += r.json()["usage"]["prompt_tokens"]
            swarm["generation"] += r.json()["usage"]["completion_tokens"]
    after = scrape(node)
    assert moved(mid, after, "dragon:requests", "dragon:requests_total", origin="swarm", status="ok") == 3
    assert moved(mid, after, "dragon:prompt_tokens", "dragon:prompt_tokens_total", origin="swarm") == swarm["prompt"]
    generated = moved(mid, after, "dragon:generation_tokens", "dragon:generation_tokens_total", origin="swarm")
    assert generated == swarm["generation"] == 3 * 4
    assert moved(mid, after, TTFT, f"{TTFT}_count", origin="swarm") == 3
    assert moved(mid, after, "dragon:requests", "dragon:requests_total", origin="owner", status="ok") == 0
    assert value(after, "dragon:model_loaded", "dragon:model_loaded", model="tiny") == 1
    # The same tallies in the overview the page reads.
    served = node.status()["served"]
    assert served["swarm"]["generation_tokens"] == value(after, "dragon:generation_tokens",
                                                         "dragon:generation_tokens_total", origin="swarm")  # fmt: skip

    node.client.post("/v1/node/lending", json={"paused": True})
    assert value(scrape(node), "dragon:lending_paused", "dragon:lending_paused") == 1


# --- The page, without a browser ----------------------------------------------------------------


def test_the_page_ships_in_the_package_and_keeps_to_itself(tiny_node: NodeProcess) -> None:
    page = tiny_node.client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in (("node-dashboard.js", "text/javascript"), ("node-dashboard.css", "text/css"),
                       ("node-dashboard.svg", "image/svg+xml")):  # fmt: skip
        assert f"/dashboard/{name}" in page.text
        asset = tiny_node.client.get(f"/dashboard/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        text = asset.text.replace("http://www.w3.org/2000/svg", "")  # a name, not a place the page loads from
        assert "http://" not in text and "https://" not in text, f"{name} reaches out of the node"
    assert "innerHTML" not in tiny_node.client.get("/dashboard/node-dashboard.js").text  # data only as text
    for other in ("node-dashboard.html", "dashboard.js", "..%2F..%2Fsettings.py"):
        assert tiny_node.client.get(f"/dashboard/{other}").status_code == 404, other
    # Not for a rebound name, nor for a page of another site.
    url = f"http://127.0.0.1:{tiny_node.port}"
    for path in ("/dashboard", "/v1/node/events", "/metrics"):
        r = httpx.get(url + path, headers={"Host": "attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (path, r.text)
        r = httpx.get(url + path, headers={"Origin": "https://attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (path, r.text)


def test_the_overview_streams_as_server_sent_events(tiny_node: NodeProcess) -> None:
    seen: list[dict[str, Any]] = []
    with tiny_node.client.stream("GET", "/v1/node/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
            if len(seen) == 3:
                break
    assert all(s["name"] == seen[0]["name"] for s in seen) and seen[0]["lending"]["paused"] is False
    assert len({s["governor"]["sampled_at"] for s in seen}) > 1  # live figures, not one snapshot again


# --- The page in a real browser -------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_the_page_in_a_browser_is_live_and_its_switch_pauses_lending(start_orchestrator: Start, start_node: Start,
                                                                     tiny_model: Path) -> None:  # fmt: skip
    from playwright.sync_api import expect
    from tests.browser import browser_context

    orch = start_orchestrator()
    model = ("--model", f"tiny={tiny_model}")
    node = start_node("--name", "my-box", *model, swarm=orch)
    start_node("--name", "other", *model, swarm=orch)
    orch.wait_live("my-box", "other")
    wait = {"timeout": 30_000}
    with browser_context() as ctx:
        page = ctx.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"{m.text} {m.location}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(node.url + "/dashboard")
        page.evaluate("window.loadedOnce = true")  # gone if the page reloaded
        expect(page.locator("#node-name")).to_have_text("my-box", **wait)
        expect(page.locator("#stream-state")).to_have_text("live", **wait)
        expect(page.locator("#share-in-force")).to_have_text(re.compile(r"^\d+%$"), **wait)
        expect(page.locator("#local-share")).to_have_text("80%", **wait)
        expect(page.locator("#swarm-state")).to_have_text("connected", **wait)
        expect(page.locator("#gpus")).to_have_text(re.compile(r"."), **wait)
        expect(page.locator("#models tr")).to_have_count(1, **wait)
        expect(page.locator("#models td").first).to_have_text("tiny", **wait)
        expect(page.locator("#owner-tokens")).to_have_text("0", **wait)
        expect(page.locator("#lending-switch")).to_be_checked(**wait)

        r = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 9})
        assert r.status_code == 200 and r.headers["x-dragon-nodes"] == "my-box", r.text
        tokens = r.json()["usage"]["completion_tokens"]
        expect(page.locator("#owner-tokens")).to_have_text(str(tokens), **wait)
        expect(page.locator("#owner-requests")).to_have_text("1", **wait)

        page.get_by_text(SWITCH).click()
        wait_until(lambda: node.status()["lending"]["paused"], 30, "the switch to pause lending")
        expect(page.locator("#lending-switch")).not_to_be_checked(**wait)
        expect(page.locator("#lending-state")).to_contain_text("Paused by you", **wait)
        wait_until(seen_paused(orch, "my-box", True), 30, "the orchestrator to see the node paused")
        assert served_by(orch) == {"other"}

        page.get_by_text(SWITCH).click()
        wait_until(lambda: not node.status()["lending"]["paused"], 30, "the switch to resume lending")
        expect(page.locator("#lending-switch")).to_be_checked(**wait)
        assert page.evaluate("window.loadedOnce") is True
        assert not problems, problems


def test_each_owner_request_has_an_id_and_one_log_line(tiny_node: NodeProcess) -> None:
    secret = "an-owner-prompt-that-stays-private"
    r = tiny_node.client.post("/v1/completions", json={"model": "tiny", "prompt": secret, "max_tokens": 5})
    assert r.status_code == 200, r.text
    rid, usage = r.headers["x-request-id"], r.json()["usage"]
    line = wait_until(lambda: next((x for x in tiny_node.log().splitlines() if f"request {rid}" in x), None), 10,
                      "the request's log line")  # fmt: skip
    assert "key=owner model=tiny fragments=1 nodes=" in line and "status=200" in line
    assert f"tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" in line and "ttft=" in line
    bad = tiny_node.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400
    rid = bad.headers["x-request-id"]
    wait_until(lambda: f"request {rid} POST /v1/completions" in tiny_node.log(), 10, "the refusal's line")
    assert secret not in tiny_node.log()
