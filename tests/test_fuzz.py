"""Property-based fuzzing of both HTTP APIs from their OpenAPI schemas (schemathesis), bounded in
time, against real processes: whatever comes in, no answer is a 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dragonswarm.orchestrator.app import create_app
from dragonswarm.settings import OrchestratorSettings
from dragonswarm.store.sqlite import open_store


def fuzz(schema: Path, url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "schemathesis"
    args = [str(exe), "run", str(schema), "--url", url, "--checks", "not_a_server_error", "--max-examples", "25",
            "--max-time", "75", "--seed", "7", "--workers", "1", "--request-timeout", "60", "--no-color",
            "--phases", "examples,coverage,fuzzing", "--generation-database", "none", *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=280, cwd=tmp_path)


def test_orchestrator_api_never_answers_5xx(swarm: Callable[..., Any], tmp_path: Path) -> None:
    # Short generations keep the run in its time budget; no rate limit, so every case reaches the code.
    orch = swarm(1, "--max-tokens", "64", "--rate-rpm", "0", "--rate-tpm", "0")
    store = open_store(tmp_path / "schema-home")
    schema = create_app(OrchestratorSettings(home=tmp_path / "schema-home"), store).openapi()
    store.close()
    path = tmp_path / "orchestrator.json"
    path.write_text(json.dumps(schema))
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nodes"} <= set(schema["paths"])
    r = fuzz(path, orch.url, tmp_path, "-H", f"Authorization: Bearer {orch.keys['admin']}", "--tls-verify",
             str(orch.ca))  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
    assert orch.proc is not None and orch.proc.poll() is None  # and it is still up
    assert orch.nodes()["w1"]["state"] == "live"


def test_node_api_never_answers_5xx(start_node: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    node = start_node("--model", f"tiny={tiny_model}", "--n-ctx", "256")
    path = tmp_path / "node.json"
    path.write_text(node.client.get("/openapi.json").text)
    r = fuzz(path, node.url, tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
    assert node.proc.poll() is None
    after = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert after.status_code == 200
