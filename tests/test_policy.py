"""Pure decisions, tested with plain values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonswarm.engines.textstream import StopMatcher, TextStream
from dragonswarm.errors import ConfigError, InvalidRequest
from dragonswarm.governor.policy import (
    OwnerPolicy,
    cfs_quota_us,
    duty_cycle,
    effective_share,
    ram_needed,
    smooth_owner_load,
    threads_for,
)
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest
from dragonswarm.scheduler.fragments import chat_generations, completion_generations
from dragonswarm.settings import Limits, ModelSpec

POLICY = OwnerPolicy(noise=0.10, headroom=0.10, min_share=0.05)


@pytest.mark.parametrize(
    ("configured", "owner", "expected"),
    [
        (0.8, 0.0, 0.8),  # idle owner: the full share
        (0.8, 0.04, 0.8),  # background noise is not the owner
        (1.0, 0.09, 1.0),
        (1.0, 0.10, 0.8),  # the owner is busy: leave what they use plus 10% headroom
        (0.8, 0.2, 0.7),  # owner uses 20%: leave that plus 10% headroom
        (0.8, 0.5, 0.4),
        (0.1, 0.5, 0.1),  # a small share already fits
        (0.8, 0.95, 0.05),  # owner takes everything: floor, never zero
        (0.8, 1.0, 0.05),
    ],
)
def test_effective_share(configured: float, owner: float, expected: float) -> None:
    assert effective_share(configured, owner, POLICY) == pytest.approx(expected)


def test_owner_load_reacts_at_once_and_relaxes_gradually() -> None:
    assert smooth_owner_load(0.0, 0.9) == 0.9
    relaxed = smooth_owner_load(0.9, 0.0)
    assert 0.0 < relaxed < 0.9
    load = 0.9
    for _ in range(10):
        load = smooth_owner_load(load, 0.0)
    assert load < 0.01


@pytest.mark.parametrize(
    ("share", "cpus", "threads"),
    [(0.1, 2, 1), (0.5, 2, 1), (0.51, 2, 2), (0.8, 2, 2), (1.0, 2, 2), (0.1, 16, 2), (0.8, 16, 13), (1.0, 1, 1)],
)
def test_threads_for(share: float, cpus: int, threads: int) -> None:
    assert threads_for(share, cpus) == threads


def test_quota_and_duty_cycle() -> None:
    assert cfs_quota_us(0.8, 2, 100_000) == 160_000
    assert cfs_quota_us(0.1, 2, 100_000) == 20_000
    assert cfs_quota_us(1.0, 2, 100_000) is None
    assert cfs_quota_us(0.0001, 1, 100_000) == 1000  # the kernel's minimum
    assert duty_cycle(0.25, 2, 1) == 0.5
    assert duty_cycle(0.8, 2, 2) == 0.8
    assert duty_cycle(1.0, 2, 1) == 1.0


def test_ram_needed_counts_weights_context_and_margin() -> None:
    assert ram_needed(250 << 20, 4096, 512 << 20) == (250 << 20) * 2 + (512 << 20)
    assert ram_needed(8 << 30, 4096, 0) == (8 << 30) + 4096 * 64 * 1024


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "stopped"),
    [
        ([], ["ab", "cd"], "abcd", False),
        (["END"], ["abc", "EN", "D", "x"], "abc", True),
        (["END"], ["abc", "EN", "x"], "abcENx", False),  # a partial match that was not one
        (["\n\n"], ["a\n", "\nb"], "a", True),
        (["xy", "b"], ["aab"], "aa", True),
        (["abc"], ["a", "b", "c"], "", True),
    ],
)
def test_stop_matcher(stops: list[str], pieces: list[str], emitted: str, stopped: bool) -> None:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    assert out == emitted
    assert m.stopped is stopped


def test_stop_matcher_never_emits_text_that_may_become_a_stop() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("hello ST") == "hello "
    assert m.feed("O") == ""
    assert m.feed("P and more") == ""
    assert m.stopped


def test_text_stream_reassembles_utf8_split_across_tokens() -> None:
    euro = "€".encode()  # three bytes, one token each in a byte-level vocabulary
    s = TextStream([])
    assert [s.feed(euro[:1]), s.feed(euro[1:2]), s.feed(euro[2:])] == ["", "", "€"]
    assert s.flush() == ""


def test_completion_generations_order_seeds_and_limits() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 5, "stop": "x"})
    jobs = completion_generations(req, Limits(max_n=4, max_prompts=4, max_tokens=100, max_prompt_chars=1000,
                                       default_max_tokens=50))  # fmt: skip
    assert [j.prompt for j in jobs] == ["a", "a", "b", "b"]
    assert [j.seed for j in jobs] == [5, 6, 5, 6]
    assert all(j.stop == ["x"] for j in jobs)
    with pytest.raises(InvalidRequest):
        completion_generations(req, Limits(max_n=1, max_prompts=4, max_tokens=100, max_prompt_chars=1000,
                                    default_max_tokens=50))  # fmt: skip
    with pytest.raises(InvalidRequest):
        completion_generations(req, Limits(max_n=4, max_prompts=1, max_tokens=100, max_prompt_chars=1000,
                                    default_max_tokens=50))  # fmt: skip


def test_chat_generations_map_developer_role_and_text_parts() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
    ]})  # fmt: skip
    (job,) = chat_generations(req, Limits(max_n=2, max_prompts=1, max_tokens=100, max_prompt_chars=1000,
                                   default_max_tokens=50))  # fmt: skip
    assert job.messages == [{"role": "system", "content": "rules"}, {"role": "user", "content": "hello"}]
    # No limit asked: the default cap, shortened to the context if need be.
    assert job.seed is None and job.max_tokens == 50 and job.fit_context


def test_model_spec_parse(tmp_path: Path) -> None:
    assert ModelSpec.parse("a=/m/x.gguf") == ModelSpec(name="a", path=Path("/m/x.gguf"))
    assert ModelSpec.parse("coder=/m/c.gguf:code").tags == ("code",)
    assert ModelSpec.parse("c=/m/c.gguf:code,chat").tags == ("code", "chat")
    odd = tmp_path / "weird:name"
    odd.write_text("")
    assert ModelSpec.parse(f"w={odd}").path == odd  # an existing path wins over tag parsing
    for bad in ("noequals", "=path", "name=", "bad name=/x"):
        with pytest.raises(ConfigError):
            ModelSpec.parse(bad)
