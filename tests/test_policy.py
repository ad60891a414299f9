"""Pure decisions, tested with plain values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonswarm.engines.textstream import StopMatcher, TextStream
from dragonswarm.errors import ConfigError, InvalidRequest
from dragonswarm.governor.cgroups import Hierarchies, delegation_problem, parse_hierarchies, quota_cpus
from dragonswarm.governor.policy import (
    GpuPolicy,
    OwnerPolicy,
    cfs_quota_us,
    duty_cycle,
    effective_share,
    gpu_budget,
    gpu_layers,
    held_owner_load,
    machine_contended,
    mps_thread_percentage,
    owner_active,
    owner_on_gpu,
    ram_needed,
    spread_cores,
    threads_for,
    usable_cpus,
)
from dragonswarm.protocol.openai import ChatCompletionRequest, CompletionRequest
from dragonswarm.scheduler.split import chat_generations, completion_generations
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


def test_contention_drops_to_the_floor_at_once() -> None:
    """The owner and we fill the machine: what they got is what we left them, not what they
    want. Stepping down by it would take a sample per headroom step; we drop at once."""
    assert effective_share(1.0, 0.33, POLICY, contended=True) == 0.05
    assert effective_share(0.8, 0.05, POLICY, contended=True) == 0.8  # noise does not contend
    # The next sample shows their real demand, and we take the room it leaves.
    assert effective_share(1.0, 0.5, POLICY) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("total", "owner", "expected"),
    [(1.0, 0.33, True), (0.96, 0.2, True), (0.9, 0.5, False), (1.0, 0.05, False), (0.5, 0.5, False)],
)
def test_machine_contended(total: float, owner: float, expected: bool) -> None:
    assert machine_contended(total, owner, POLICY) is expected


def test_owner_load_is_held_then_released_whole() -> None:
    """Fast attack, a fixed release: busy at once, back in full `hold_s` after the last busy sample."""
    history = [(0.0, 0.0), (0.25, 0.9), (0.5, 0.0), (0.75, 0.0), (1.0, 0.0)]
    assert held_owner_load(history[:2], 0.25, 1.0) == 0.9  # the first busy sample counts
    assert held_owner_load(history, 1.0, 1.0) == 0.9  # held while within hold_s
    assert held_owner_load([*history, (1.25, 0.0)], 1.26, 1.0) == 0.0  # then released at once, whole
    assert held_owner_load([], 5.0, 1.0) == 0.0
    # A burst with gaps shorter than the hold holds the share down: it does not flap.
    bursty = [(t / 4, 0.8 if t % 3 == 0 else 0.0) for t in range(12)]
    assert all(held_owner_load(bursty[: i + 1], t, 1.0) == 0.8 for i, (t, _) in enumerate(bursty))


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


@pytest.mark.parametrize(
    ("allowed", "threads", "taken", "expected"),
    [
        ([0, 1], 1, [], [0]),
        ([0, 1], 1, [[0]], [1]),  # the second runner goes to the free core, not core 0 again
        ([0, 1, 2, 3], 2, [[0, 1]], [2, 3]),
        ([0, 1, 2, 3], 2, [[0, 1], [2, 3]], [0, 1]),
        ([4, 5, 6], 2, [[4]], [5, 6]),  # only cores in the affinity mask
        ([0, 1], 4, [], [0, 1]),  # never more cores than allowed
        ([0, 1], 1, [[7]], [0]),  # cores outside the mask do not count
    ],
)
def test_spread_cores(allowed: list[int], threads: int, taken: list[list[int]], expected: list[int]) -> None:
    assert spread_cores(allowed, threads, taken) == expected


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"), [(16, None, 16), (16, 1.5, 2), (16, 2.0, 2), (4, 8.0, 4), (2, 0.2, 1)]
)
def test_usable_cpus_from_affinity_and_quota(affinity: int, quota: float | None, expected: int) -> None:
    assert usable_cpus(affinity, quota) == expected


def test_quota_cpus_takes_the_tightest_limit_up_the_tree() -> None:
    assert quota_cpus([("max", "100000"), ("150000", "100000"), ("400000", "100000")]) == 1.5
    assert quota_cpus([("-1", "100000")]) is None  # v1's "no limit"
    assert quota_cpus([]) is None
    assert quota_cpus([("junk", "100000"), ("50000", "0")]) is None


MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_parse_hierarchies_hybrid_and_pure_v2() -> None:
    hybrid = parse_hierarchies(MOUNTINFO, "4:memory:/x\n1:cpu:/\n0::/user.slice\n")
    assert hybrid == Hierarchies(Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/unified/user.slice"),
                                 Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu"))  # fmt: skip
    desktop = parse_hierarchies(
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope\n",
    )
    scope = "user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope"
    assert desktop.v2_group == Path("/sys/fs/cgroup") / scope
    assert desktop.v1_mount is None
    # A container sees its own subtree mounted at the root of its view.
    container = parse_hierarchies("50 40 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/docker/abc\n")
    assert container.v2_group == Path("/sys/fs/cgroup")
    assert parse_hierarchies("", "") == Hierarchies(None, None, None, None)


def test_delegation_problem_says_what_is_missing() -> None:
    scope = Path("/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope")
    assert delegation_problem(scope, {"cpu", "memory", "pids"}, writable=True, others=0) is None
    not_ours = delegation_problem(Path("/sys/fs/cgroup/user.slice"), {"cpu"}, writable=False, others=0)
    assert not_ours is not None and "systemd-run --user --scope -p Delegate=yes" in not_ours
    no_cpu = delegation_problem(scope, {"memory", "pids"}, writable=True, others=0)
    assert no_cpu is not None and "cpu controller is not delegated" in no_cpu
    shared = delegation_problem(scope, {"cpu"}, writable=True, others=3)
    assert shared is not None and "3 other process(es)" in shared


GPU = GpuPolicy(noise=0.10, reserve_bytes=512 << 20)


def test_owner_on_gpu_only_when_known_and_above_noise() -> None:
    assert owner_on_gpu(0.6, GPU)  # a game
    assert not owner_on_gpu(0.03, GPU)  # the desktop compositor
    assert not owner_on_gpu(None, GPU)  # NVML cannot split it from ours: never back off from ourselves


def test_gpu_budget_is_our_share_left_within_the_free_memory() -> None:
    gib = 1 << 30
    assert gpu_budget(8 * gib, 1 * gib, 0, 0.5, GPU) == 4 * gib  # the share is the tighter bound
    assert gpu_budget(8 * gib, 6 * gib, 0, 0.8, GPU) == 2 * gib - (512 << 20)  # the free memory is
    assert gpu_budget(8 * gib, 3 * gib, 2 * gib, 0.5, GPU) == 2 * gib  # our first model counts against the share
    assert gpu_budget(8 * gib, 8 * gib, 0, 0.8, GPU) == 0  # nothing free: nothing offloaded
    assert gpu_budget(8 * gib, 0, 0, 0.0, GPU) == 0  # --gpu-share 0: the CPU only


def test_gpu_layers_fit_weights_and_cache_in_the_budget() -> None:
    mib = 1 << 20
    # 24 layers of 20 MiB each, a 4096-token context (256 MiB of cache, capped at the weights' 480 MiB).
    assert gpu_layers(24, 480 * mib, 4 * 1024 * mib, 4096) == 25  # all fit: the output layer too
    assert gpu_layers(24, 480 * mib, 256 * mib + 200 * mib, 4096) == 10  # 200 MiB left for weights: 10 layers
    assert gpu_layers(24, 480 * mib, 100 * mib, 4096) == 0  # the cache alone does not fit
    assert gpu_layers(0, 480 * mib, 4 * 1024 * mib, 4096) == 0  # unknown layer count: none


def test_mps_thread_percentage_follows_the_gpu_share() -> None:
    assert mps_thread_percentage(0.8) == 80
    assert mps_thread_percentage(0.001) == 1  # MPS refuses 0
    assert mps_thread_percentage(1.0) == 100


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
    assert [s.feed(euro[:1]), s.feed(euro[1:2]), s.feed(euro[2:])] == [("", 0), ("", 0), ("€", 3)]
    assert s.flush() == ""


def test_text_stream_pieces_end_on_token_boundaries() -> None:
    # A token holding the start of a stop string is held whole, even the part before it, so
    # every piece sent is exactly the text of the tokens it counts: a failover's exact prefix.
    s = TextStream(["\n\n"])
    assert s.feed(b"one") == ("one", 1)
    assert s.feed(b" two\n") == ("", 0)
    assert s.feed(b"x") == (" two\nx", 3)
    assert s.feed(b"\xe2\x82") == ("", 0)  # a character split over two tokens
    assert s.feed(b"\xacy") == ("\u20acy", 5)
    assert s.feed(b"end\n") == ("", 0)
    assert s.flush() == "end\n"  # the end of the answer: what is held goes out


def test_text_stream_stops_inside_a_token() -> None:
    s = TextStream(["\n\n"])
    assert s.feed(b"a\n") == ("", 0)
    assert s.feed(b"\nb") == ("", 0)
    assert s.stopped
    assert s.flush() == "a"


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


def test_a_noise_of_one_turns_owner_detection_off() -> None:
    # Readings are capped at 1.0: with `>=` alone, a machine filled by other programs still
    # counted as an owner at work and throttled a node whose owner detection was off.
    off = OwnerPolicy(noise=1.0, headroom=0.10, min_share=0.05)
    assert not owner_active(1.0, off) and effective_share(1.0, 1.0, off, contended=True) == 1.0
    assert not machine_contended(1.0, 1.0, off)
    assert owner_active(0.10, POLICY) and not owner_active(0.09, POLICY)
