"""Every kind of bad input gets a 4xx with an OpenAI-shaped error, and the node goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import NodeProcess


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"model": ""}, "model"),
    ],
)
def test_wrong_types_and_values(tiny_node: NodeProcess, patch: dict[str, Any], param: str) -> None:
    error = assert_error(tiny_node.client.post("/v1/completions", json={**GOOD, **patch}), 400, "invalid_request")
    assert error["param"] is not None and error["param"].startswith(param)


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_missing_fields(tiny_node: NodeProcess, missing: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != missing}
    error = assert_error(tiny_node.client.post("/v1/completions", json=body), 400, "invalid_request")
    assert missing in error["message"]


def test_chat_missing_and_malformed_messages(tiny_node: NodeProcess) -> None:
    for body in ({"model": "tiny"}, {"model": "tiny", "messages": []},
                 {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "tiny", "messages": "hello"}):  # fmt: skip
        assert_error(tiny_node.client.post("/v1/chat/completions", json=body), 400, "invalid_request")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": "tiny", "prompt": "x"'])
def test_malformed_json(tiny_node: NodeProcess, raw: bytes) -> None:
    response = tiny_node.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_unknown_model(tiny_node: NodeProcess) -> None:
    error = assert_error(tiny_node.client.post("/v1/completions", json={**GOOD, "model": "gpt-9"}), 404,
                         "model_not_found")  # fmt: skip
    assert "gpt-9" in error["message"] and "tiny" in error["message"]
    body = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    assert_error(tiny_node.client.post("/v1/chat/completions", json=body), 404, "model_not_found")


def test_max_tokens_beyond_context(tiny_node: NodeProcess) -> None:
    for stream in (False, True):
        response = tiny_node.client.post("/v1/completions", json={**GOOD, "max_tokens": 100_000, "stream": stream})
        error = assert_error(response, 400, "context_length_exceeded")
        assert "4096" in error["message"]


def test_prompt_longer_than_context(tiny_node: NodeProcess) -> None:
    long_prompt = "z" * 5000  # one byte token each: past the 4096-token context
    response = tiny_node.client.post("/v1/completions", json={**GOOD, "prompt": long_prompt})
    assert_error(response, 400, "context_length_exceeded")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}], "stream": True}
    assert_error(tiny_node.client.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")


def test_n_and_prompt_list_limits(tiny_node: NodeProcess) -> None:
    assert_error(tiny_node.client.post("/v1/completions", json={**GOOD, "n": 9}), 400, "invalid_request")
    assert_error(tiny_node.client.post("/v1/completions", json={**GOOD, "prompt": ["p"] * 17}), 400)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 50}
    assert_error(tiny_node.client.post("/v1/chat/completions", json=chat), 400)


def test_body_too_large(tiny_node: NodeProcess) -> None:
    huge = {**GOOD, "prompt": "a" * (5 * 1024 * 1024)}
    assert_error(tiny_node.client.post("/v1/completions", json=huge), 413, "request_too_large")


def test_unknown_route_and_method(tiny_node: NodeProcess) -> None:
    assert_error(tiny_node.client.get("/v1/nothing"), 404)
    assert_error(tiny_node.client.get("/v1/completions"), 405)


def test_node_still_serves_after_bad_input(tiny_node: NodeProcess) -> None:
    for raw in (b"{", b"null", b'{"model": 1}'):
        tiny_node.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    response = tiny_node.client.post("/v1/completions", json=GOOD)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4


def test_cli_rejects_bad_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    def dragon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dragonswarm.cli", *args], capture_output=True, text=True,
                              timeout=60, env={"DRAGON_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    cases = [
        (["node", "--frobnicate"], "unrecognized arguments"),
        (["node", "--local-share", "1.5"], "share must be in (0, 1]"),
        (["node", "--share", "abc"], "expected a number"),
        (["node", "--api-port", "http"], "invalid int value"),
        (["node", "--model", "noequals"], "NAME=PATH"),
        (["node", "--no-bundled-model", "--model", f"x={tmp_path}/missing.gguf"], "cannot read model file"),
        (["node", "--no-bundled-model", "--model", f"x={not_gguf}"], "not a GGUF file"),
        (["node", "--no-bundled-model", "--model", f"x={tmp_path}"], "directory"),
        (["node", "--no-bundled-model"], "no model to serve"),
        (["node", "--gpu-share", "1.5"], "share must be in (0, 1]"),
        (["node", "--gpu-share", "0", "--no-bundled-model"], "no model to serve"),  # 0 is a valid GPU share
        (["bogus"], "invalid choice"),
    ]
    for args, expected in cases:
        result = dragon(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("dragon: error: ") and expected in lines[0], (args, lines)
