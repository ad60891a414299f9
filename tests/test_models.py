"""Models: the two bundled models end to end, local GGUF files, model hashes and the RAM guard."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from tests.conftest import NodeProcess

from dragonswarm.engines.models import CODER_PARTS, bundled_coder, bundled_gemma, model_sha256
from dragonswarm.errors import ConfigError

EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CODER_SIZE = 491_400_064


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_bundled_model_is_written_verified_and_reused(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    spec = bundled_gemma(tmp_path, lambda done, total: calls.append((done, total)))
    assert spec.name == "gemma3-270m" and spec.path.parent == tmp_path and spec.tags == ("base",)
    data = spec.path.read_bytes()
    assert data[:4] == b"GGUF"
    assert hashlib.sha256(data).hexdigest() == EXPECTED_SHA256
    assert calls and calls[-1][0] == calls[-1][1] == len(data), "progress must reach the total"
    assert not list(tmp_path.glob("*.partial"))

    mtime = spec.path.stat().st_mtime_ns
    assert bundled_gemma(tmp_path).path == spec.path
    assert spec.path.stat().st_mtime_ns == mtime, "a verified model is not written again"

    with spec.path.open("r+b") as f:  # corrupt it: the next start must notice and rewrite
        f.seek(1000)
        f.write(b"\0" * 16)
    spec.path.with_suffix(".sha256").unlink()
    bundled_gemma(tmp_path)
    assert hashlib.sha256(spec.path.read_bytes()).hexdigest() == EXPECTED_SHA256


def test_bundled_coder_is_assembled_verified_and_reused(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    spec = bundled_coder(tmp_path, lambda done, total: calls.append((done, total)))
    assert spec.name == "qwen2.5-coder-0.5b" and spec.path.parent == tmp_path and spec.tags == ("code", "chat")
    assert spec.path.stat().st_size == CODER_SIZE
    assert file_sha256(spec.path) == CODER_SHA256
    done = [d for d, _ in calls]
    assert done == sorted(set(done)), "progress only grows"
    assert {t for _, t in calls} == {CODER_SIZE} and done[-1] == CODER_SIZE
    assert not list(tmp_path.glob("*.partial"))

    calls.clear()
    mtime = spec.path.stat().st_mtime_ns
    assert bundled_coder(tmp_path, lambda done, total: calls.append((done, total))).path == spec.path
    assert spec.path.stat().st_mtime_ns == mtime and not calls, "a stamped model is neither hashed nor written again"

    with spec.path.open("r+b") as f:  # damage it later, in place: the stamp no longer vouches for it
        f.seek(4096)
        f.write(b"\xff" * 64)
    os.utime(spec.path, ns=(mtime + 10**9, mtime + 10**9))
    bundled_coder(tmp_path)
    assert file_sha256(spec.path) == CODER_SHA256
    assert not list(tmp_path.glob("*.partial"))


def test_a_missing_part_names_its_package(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the package dragonswarm-no-such-part, which is not installed"):
        bundled_coder(tmp_path / "models", parts=(*CODER_PARTS[:5], "dragonswarm-no-such-part"))
    assert not (tmp_path / "models").exists(), "nothing is written before every part is found"


def test_parts_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sha256"):
        bundled_coder(tmp_path, parts=CODER_PARTS[-1:])  # the last part alone: a file, but not the model
    assert list(tmp_path.iterdir()) == [], "neither the file nor a .partial is left behind"


def test_model_sha256_hashes_once_per_content(tmp_path: Path) -> None:
    model, other, cache = tmp_path / "m.gguf", tmp_path / "o.gguf", tmp_path / "cache" / "sha256.json"
    model.write_bytes(b"GGUF" + b"a" * 5000)
    other.write_bytes(b"GGUF" + b"b" * 10)
    first = model_sha256(model, cache)
    assert first == hashlib.sha256(model.read_bytes()).hexdigest()
    assert model_sha256(other, cache) == hashlib.sha256(other.read_bytes()).hexdigest()
    st = model.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": first}
    assert json.loads(cache.read_text())[str(model.resolve())] == entry

    # Same size, same mtime, new bytes: the cache is trusted, so the file was not read again.
    model.write_bytes(b"GGUF" + b"c" * 5000)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(model, cache) == first
    # A new mtime means a changed file: hashed again, and the cache follows.
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = model_sha256(model, cache)
    assert second == hashlib.sha256(model.read_bytes()).hexdigest() != first
    assert json.loads(cache.read_text())[str(model.resolve())]["sha256"] == second
    # So does a new size, even with the old mtime.
    model.write_bytes(b"GGUF" + b"d" * 10)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_sha256(model, cache) == hashlib.sha256(model.read_bytes()).hexdigest()

    other.unlink()  # a file that is gone drops out of the cache at its next write
    model.write_bytes(b"GGUF")
    model_sha256(model, cache)
    assert list(json.loads(cache.read_text())) == [str(model.resolve())]


def test_model_sha256_of_the_bundled_models(tmp_path: Path, coder_model: Path, gemma_model: Path) -> None:
    cache = tmp_path / "sha256.json"
    assert model_sha256(coder_model, cache) == CODER_SHA256
    assert model_sha256(gemma_model, cache) == EXPECTED_SHA256
    assert {e["sha256"] for e in json.loads(cache.read_text()).values()} == {CODER_SHA256, EXPECTED_SHA256}


def test_the_coder_model_has_fim_tokens_and_a_chat_template(coder_model: Path) -> None:
    import llama_cpp

    with closing(llama_cpp.Llama(str(coder_model), vocab_only=True, verbose=False)) as vocab:
        assert vocab.metadata["general.architecture"] == "qwen2"
        for token in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
            assert len(vocab.tokenize(token.encode(), add_bos=False, special=True)) == 1, token
        assert "<|im_start|>" in vocab.metadata["tokenizer.chat_template"]


def test_node_shows_progress_while_writing_the_bundled_model(start_node: Callable[..., NodeProcess],
                                                             tmp_path: Path) -> None:  # fmt: skip
    node = start_node(bundled=True, home=tmp_path / "fresh-home")
    log = node.log()
    for name in ("qwen2.5-coder-0.5b", "gemma3-270m"):
        assert f"writing the bundled model {name}: " in log
    assert "469/469 MiB (100%)" in log
    models = tmp_path / "fresh-home" / "models"
    assert {p.name for p in models.glob("*.gguf")} == {"qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                                                       "gemma-3-270m-q4_k_m.gguf"}  # fmt: skip


def test_bundled_models_answer_through_the_openai_client(start_node: Callable[..., NodeProcess],
                                                        gemma_model: Path, coder_model: Path) -> None:  # fmt: skip
    node = start_node(bundled=True)
    client = node.openai()
    assert [m.id for m in client.models.list()] == ["qwen2.5-coder-0.5b", "gemma3-270m"]
    tags = {m["name"]: m["tags"] for m in node.status()["models"]}
    assert tags == {"qwen2.5-coder-0.5b": ["code", "chat"], "gemma3-270m": ["base"]}
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
    answer = client.chat.completions.create(model="qwen2.5-coder-0.5b", messages=messages,  # type: ignore[arg-type]
                                            max_tokens=12, temperature=0).choices[0].message.content  # fmt: skip
    assert "Paris" in (answer or ""), "an instruct model with its own chat template answers the question"


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
