"""Models: the bundled Gemma 3 270M end to end, local GGUF files, and the RAM guard."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tests.conftest import NodeProcess

from dragonswarm.engines.models import bundled_model

EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_bundled_model_is_written_verified_and_reused(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    spec = bundled_model(tmp_path, lambda done, total: calls.append((done, total)))
    assert spec.name == "gemma3-270m" and spec.path.parent == tmp_path
    data = spec.path.read_bytes()
    assert data[:4] == b"GGUF"
    assert hashlib.sha256(data).hexdigest() == EXPECTED_SHA256
    assert calls and calls[-1][0] == calls[-1][1] == len(data), "progress must reach the total"
    assert not list(tmp_path.glob("*.partial"))

    mtime = spec.path.stat().st_mtime_ns
    assert bundled_model(tmp_path).path == spec.path
    assert spec.path.stat().st_mtime_ns == mtime, "a verified model is not written again"

    with spec.path.open("r+b") as f:  # corrupt it: the next start must notice and rewrite
        f.seek(1000)
        f.write(b"\0" * 16)
    spec.path.with_suffix(".sha256").unlink()
    bundled_model(tmp_path)
    assert hashlib.sha256(spec.path.read_bytes()).hexdigest() == EXPECTED_SHA256


def test_node_shows_progress_while_writing_the_bundled_model(start_node: Callable[..., NodeProcess],
                                                             tmp_path: Path) -> None:  # fmt: skip
    node = start_node(bundled=True, home=tmp_path / "fresh-home")
    log = node.log()
    assert "writing the bundled model gemma3-270m" in log and "(100%)" in log
    assert (tmp_path / "fresh-home" / "models" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_bundled_gemma_answers_through_the_openai_client(start_node: Callable[..., NodeProcess],
                                                         gemma_model: Path) -> None:  # fmt: skip
    node = start_node(bundled=True)
    client = node.openai()
    assert [m.id for m in client.models.list()] == ["gemma3-270m"]
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    answers = [client.chat.completions.create(model="gemma3-270m", messages=messages,  # type: ignore[arg-type]
                                              max_tokens=12, temperature=0).choices[0].message.content
               for _ in range(2)]  # fmt: skip
    assert answers[0] == answers[1]
    assert answers[0]  # the bundled GGUF is the base model: it answers, but not wisely
    code = client.completions.create(model="gemma3-270m", prompt="def fibonacci(n):\n", max_tokens=40,
                                     temperature=0).choices[0].text  # fmt: skip
    assert "return" in code
    stream = client.chat.completions.create(model="gemma3-270m", messages=messages,  # type: ignore[arg-type]
                                            max_tokens=12, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answers[0]


def test_model_too_big_for_ram_is_refused(start_node: Callable[..., NodeProcess], tmp_path: Path,
                                          tiny_model: Path) -> None:  # fmt: skip
    huge = tmp_path / "huge.gguf"
    with huge.open("wb") as f:  # sparse: 4 real bytes, 4 TiB apparent size
        f.write(b"GGUF")
        f.truncate(4 << 40)
    node = start_node("--model", f"huge={huge}", "--model", f"tiny={tiny_model}")
    response = node.client.post("/v1/completions", json={"model": "huge", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory" and "GiB" in error["message"]
    assert node.model_status("huge")["loaded"] is False
    ok = node.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_corrupt_gguf_gives_a_clear_error_not_a_dead_node(start_node: Callable[..., NodeProcess],
                                                            tmp_path: Path) -> None:  # fmt: skip
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    node = start_node("--model", f"broken={broken}")
    response = node.client.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "runner_failed"
    assert "cannot load model" in response.json()["error"]["message"]
    assert node.client.get("/health").status_code == 200


def test_several_local_models_by_name(start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    from dragonswarm.devtools.tiny_model import write_tiny_model

    a = write_tiny_model(tmp_path / "a.gguf", seed=1)
    b = write_tiny_model(tmp_path / "b.gguf", seed=2)
    node = start_node("--model", f"a={a}", "--model", f"b={b}:code")
    client = node.openai()
    assert sorted(m.id for m in client.models.list()) == ["a", "b"]
    texts = [client.completions.create(model=m, prompt="p", max_tokens=10, temperature=0).choices[0].text
             for m in ("a", "b")]  # fmt: skip
    assert texts[0] != texts[1], "different weights must give different text"
    assert {m["name"]: m["tags"] for m in node.status()["models"]} == {"a": [], "b": ["code"]}
