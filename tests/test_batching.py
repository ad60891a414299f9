"""Continuous batching: several sequences in one model process.

The decisions with plain values first; then a real runner process (its wire protocol read in
order, so what ran together shows); then nodes and the swarm using the sequences.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import NodeProcess, OrchestratorProcess, wait_until

from dragonswarm.engines.batching import PREFILL_CHUNK, Want, pick_sequence, plan_step, shared_prefix
from dragonswarm.governor.policy import MAX_PARALLEL, default_parallel, ram_needed
from dragonswarm.node.metrics import StreamRate
from dragonswarm.scheduler.placement import streams_within_floor

Start = Callable[..., Any]
GIB = 2**30


# --- decisions, plain values -------------------------------------------------------------------


def test_prompts_and_streams_take_turns() -> None:
    streams, prompts = [Want(1, 0), Want(1, 0)], [Want(100, 100), Want(30, 30)]
    # A prompt waits for no stream's token: it goes first, one chunk while others generate...
    assert plan_step(streams + prompts, 512, chunk=64) == [0, 0, 64, 0]
    assert plan_step([Want(1, 0), Want(40, 40), Want(30, 30)], 512, chunk=64) == [0, 40, 24]
    # ... and once a chunk's worth was read since their last step, the streams take theirs,
    # so none waits for a whole prompt.
    assert plan_step(streams + prompts, 512, chunk=64, read_since=64) == [1, 1, 0, 0]
    assert plan_step(streams + prompts, 512, chunk=64, read_since=50) == [0, 0, 14, 0]
    # Nobody generating: prompts fill the whole batch, step after step.
    assert plan_step([Want(600, 600), Want(30, 30)], 512, chunk=64) == [512, 0]
    assert plan_step([Want(300, 300), Want(30, 30)], 512, chunk=64, read_since=512) == [300, 30]
    # A failover's answer so far, read one token at a time, is a stream.
    assert plan_step([Want(5, 0), Want(200, 200)], 512, chunk=64) == [0, 64]
    assert plan_step([Want(5, 0), Want(200, 200)], 512, chunk=64, read_since=64) == [1, 0]
    assert plan_step([Want(3, 0)], 512, read_since=64) == [1]
    assert plan_step([], 512) == []
    # More streams than the batch holds: the batch is full, nobody overflows it.
    assert sum(plan_step([Want(1, 0)] * 600, 512)) == 512


def test_a_new_prompt_takes_the_sequence_whose_cache_it_shares() -> None:
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert shared_prefix([], [1]) == 0
    assert shared_prefix([1, 2], [1, 2, 3]) == 2
    free = [([5, 6, 7], 10.0), ([1, 2, 3, 4], 20.0), ([], 5.0)]
    assert pick_sequence(free, [1, 2, 3, 8]) == 1  # its conversation's cache
    assert pick_sequence(free, [9, 9]) == 2  # none shared: the one idle longest
    assert pick_sequence([([1], 3.0), ([2], 1.0)], []) == 1


def test_default_parallel_follows_cores_shares_and_ram() -> None:
    model = 400 << 20
    plenty = 64 * GIB
    assert default_parallel(model, 4096, 512 << 20, plenty, cpus=2, share=0.8) == 3  # two per core the work may use
    assert default_parallel(model, 4096, 512 << 20, plenty, cpus=16, share=0.8) == MAX_PARALLEL
    assert default_parallel(model, 4096, 512 << 20, plenty, cpus=2, share=0.1) == 1  # under one core: one stream
    # RAM for two contexts but not three (a 4 GiB model, whose contexts the estimate does not cap).
    big = 4 * GIB
    two = ram_needed(big, 4096 * 2, 512 << 20)
    assert default_parallel(big, 4096, 512 << 20, two, cpus=16, share=1.0) == 2
    assert default_parallel(big, 4096, 512 << 20, 0, cpus=16, share=1.0) == 1


def test_streams_within_the_floor() -> None:
    assert streams_within_floor(8, None, 0.0, 14.0) == 1  # nothing measured yet: one stream
    assert streams_within_floor(8, 34.0, 1.0, 14.0) == 2  # alone at 34 tokens/s: 17 each for two
    assert streams_within_floor(8, 13.2, 4.0, 14.0) == 3  # four at 13.2 each: 52.8 in all, 17.6 each for three
    assert streams_within_floor(8, 5.0, 1.0, 14.0) == 1  # a slow node still takes one
    assert streams_within_floor(3, 500.0, 1.0, 14.0) == 3  # never past what it announced
    assert streams_within_floor(4, None, 0.0, 0.0) == 4  # no floor: every sequence


def test_stream_rate_counts_tokens_over_stream_seconds() -> None:
    rate = StreamRate(now=0.0)
    assert rate.reading(0.5) == (None, 0.0)
    rate.started(1.0)
    rate.started(1.0)
    rate.generated(60)
    assert rate.reading(1.5) == (None, 0.0)  # one stream-second: too little to tell
    rate.generated(20)
    assert rate.reading(3.0) == (20.0, 1.6)  # 80 tokens over 4 stream-seconds, 2 streams for 2.5 of 3 s
    rate.ended(3.0)
    rate.ended(3.0)
    assert rate.reading(100.0) == (20.0, 1.6)  # idle: the last reading stands


# --- one runner process, its protocol read in order ---------------------------------------------


class RawRunner:
    """A real runner child process, spoken to over its pipes; its events kept in the order sent."""

    def __init__(self, model: Path, parallel: int, n_ctx: int = 2048, threads: int = 2):
        config = {"model_path": str(model), "n_ctx": n_ctx, "threads": threads, "parallel": parallel}
        args = [sys.executable, "-m", "dragonswarm.engines.runner_main", json.dumps(config)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.events: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._new.get(timeout=120)
        assert ready["ev"] == "ready" and ready["parallel"] == parallel, ready

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            self._new.put(event)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, job: str, **gen: Any) -> None:
        self.send({"op": "run", "id": job, "gen": {"temperature": 0.0, "cache_prompt": False, **gen}})

    def of(self, job: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("id") == job]

    def ended(self, job: str) -> dict[str, Any] | None:
        return next((e for e in self.of(job) if e["ev"] in ("done", "error")), None)

    def wait_end(self, *jobs: str, timeout: float = 120) -> list[dict[str, Any]]:
        wait_until(lambda: all(self.ended(j) for j in jobs), timeout, f"jobs {jobs} to end")
        return [self.ended(j) or {} for j in jobs]

    def ids(self, job: str) -> list[int]:
        return [t for e in self.of(job) if e["ev"] == "text" for t in e["ids"]]

    def logprobs(self, job: str) -> list[Any]:
        return [lp for e in self.of(job) if e["ev"] == "text" for lp in e.get("logprobs", [])]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                pipe.close()


@pytest.fixture
def raw_runner() -> Iterator[Callable[..., RawRunner]]:
    runners: list[RawRunner] = []

    def start(model: Path, parallel: int, **kw: Any) -> RawRunner:
        runners.append(RawRunner(model, parallel, **kw))
        return runners[-1]

    yield start
    for runner in runners:
        runner.close()


CODE_PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n",
                "import json\n\n\ndef load_config(path):\n", "def is_prime(n: int) -> bool:\n"]  # fmt: skip


def test_streams_together_answer_as_alone_or_part_at_a_near_tie(raw_runner: Start, coder_model: Path) -> None:
    """Four greedy streams decoded in one batch against each run alone, with the code model.

    llama.cpp's arithmetic depends on the batch: other matrix kernels for other batch sizes,
    other rounding. So a greedy answer cannot be promised identical whatever runs beside it;
    the bound that holds is that the logits move by little: two answers part only where
    the model's two best tokens were nearly tied, and until then they are the same tokens."""
    runner = raw_runner(coder_model, 4)
    n = 40
    for i, prompt in enumerate(CODE_PROMPTS):
        runner.run(f"alone{i}", prompt=prompt, max_tokens=n, logprobs=2)
        runner.wait_end(f"alone{i}")
    for i, prompt in enumerate(CODE_PROMPTS):
        runner.run(f"together{i}", prompt=prompt, max_tokens=n, logprobs=2)
    runner.wait_end(*(f"together{i}" for i in range(4)))
    # They ran together: text events of different jobs interleave.
    order = [e["id"] for e in runner.events if e["ev"] == "text" and e["id"].startswith("together")]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches >= n, f"the streams took turns instead of sharing steps: {switches} switches"
    same = 0
    for i in range(4):
        alone, together = runner.ids(f"alone{i}"), runner.ids(f"together{i}")
        assert (runner.ended(f"together{i}") or {}).get("ev") == "done"
        if alone == together:
            same += 1
            continue
        k = next(j for j in range(min(len(alone), len(together))) if alone[j] != together[j])
        top = runner.logprobs(f"alone{i}")[k]["top"]  # [[token, logprob, bytes], ...], best first
        gap = top[0][1] - top[1][1]
        assert gap < 0.5, f"stream {i} parted from its lone run at token {k} where the best led by {gap:.2f}"
        for a, b in zip(runner.logprobs(f"alone{i}")[:k], runner.logprobs(f"together{i}")[:k], strict=True):
            assert abs(a["logprob"] - b["logprob"]) < 0.3  # the same tokens, with nearly the same probabilities
    assert same >= 2, "most answers should not depend on what ran beside them"


def test_a_joining_prompt_is_read_in_chunks_between_the_others_tokens(raw_runner: Start, tiny_model: Path) -> None:
    runner = raw_runner(tiny_model, 2, n_ctx=4096)
    runner.run("a", prompt="go on", max_tokens=3000)
    wait_until(lambda: any(e["ev"] == "text" for e in runner.of("a")), 30, "the first stream to generate")
    long_prompt = "word " * 300  # about 1,500 tokens of the tiny model
    runner.run("b", prompt=long_prompt, max_tokens=4)
    b_done = runner.wait_end("b")[0]
    prompt_tokens = b_done["prompt_tokens"]
    events = runner.events
    start = next(i for i, e in enumerate(events) if e.get("id") == "b" and e["ev"] == "start")
    first = next(i for i, e in enumerate(events) if e.get("id") == "b" and e["ev"] == "text")
    a_tokens = sum(len(e["ids"]) for e in events[start:first] if e.get("id") == "a" and e["ev"] == "text")
    chunks = math.ceil(prompt_tokens / PREFILL_CHUNK)
    # Prompt chunks and the running stream's tokens take turns: about one token per chunk (a
    # few may still be held back as text), where reading the prompt whole, a batch at a time,
    # would have let through one token per 512 prompt tokens.
    assert prompt_tokens > 8 * PREFILL_CHUNK
    assert a_tokens >= chunks // 2, f"{a_tokens} tokens of the running stream while {chunks} chunks were read"
    runner.send({"op": "cancel", "id": "a"})
    assert runner.wait_end("a")[0]["finish_reason"] == "cancelled"


def test_cancel_one_sequence_the_others_run_on(raw_runner: Start, tiny_model: Path) -> None:
    runner = raw_runner(tiny_model, 3)
    for job in ("a", "b", "c"):
        runner.run(job, prompt=f"stream {job}", max_tokens=2000)
    wait_until(lambda: any(e["ev"] == "text" for e in runner.of("b")), 30, "b to generate")
    runner.send({"op": "cancel", "id": "b"})
    b = runner.wait_end("b")[0]
    assert b["finish_reason"] == "cancelled" and b["completion_tokens"] < 2000
    # The others were still running when b ended, and ran on to their end.
    assert runner.ended("a") is None and runner.ended("c") is None
    a, c = runner.wait_end("a", "c")
    for done in (a, c):
        assert done["ev"] == "done"
        assert done["completion_tokens"] == 2000 or done["finish_reason"] == "stop"
    # Text held back never went out after the cancel, and b's sequence is free for a new job.
    runner.run("d", prompt="stream d", max_tokens=5)
    assert runner.wait_end("d")[0]["completion_tokens"] == 5


def test_more_jobs_than_sequences_wait_their_turn(raw_runner: Start, tiny_model: Path) -> None:
    runner = raw_runner(tiny_model, 2)
    for i in range(5):
        runner.run(f"j{i}", prompt=f"job {i}", max_tokens=20)
    ends = runner.wait_end(*(f"j{i}" for i in range(5)))
    assert all(e["ev"] == "done" and e["completion_tokens"] == 20 for e in ends)
    # Never more than two in flight: a job starts only after an earlier one ended.
    running, most = set(), 0
    for e in runner.events:
        if e["ev"] == "start":
            running.add(e["id"])
        elif e["ev"] == "done":
            running.discard(e["id"])
        most = max(most, len(running))
    assert most == 2


def test_a_bad_job_among_running_ones_fails_alone(raw_runner: Start, tiny_model: Path) -> None:
    runner = raw_runner(tiny_model, 2, n_ctx=256)
    runner.run("good", prompt="go on", max_tokens=100)
    runner.run("bad", prompt="go on", max_tokens=10_000)
    good, bad = runner.wait_end("good", "bad")
    assert bad["ev"] == "error" and bad["code"] == "context_length_exceeded"
    assert good["ev"] == "done" and good["completion_tokens"] == 100


# --- nodes and the swarm ----------------------------------------------------------------------


def _stream(client: Callable[[], httpx.Client], path: str, body: dict[str, Any], out: list[dict[str, Any]]) -> None:
    with client() as c, c.stream("POST", path, json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))


def _streams(client: Callable[[], httpx.Client], path: str, body: dict[str, Any], n: int,
             ) -> tuple[list[threading.Thread], list[list[dict[str, Any]]]]:  # fmt: skip
    """n streamed requests at once, each in its thread (started); their events fill the lists."""
    outs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(client, path, body, out)) for out in outs]
    for t in threads:
        t.start()
    return threads, outs


def _warm(orch: OrchestratorProcess) -> None:
    with orch.client() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "warm", "max_tokens": 1, "cache": False})
    assert r.status_code == 200, r.text


def test_a_node_serves_its_owners_requests_together(start_node: Start, tiny_model: Path) -> None:
    node: NodeProcess = start_node("--model", f"tiny={tiny_model}", "--parallel", "3")
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 300, "temperature": 0, "stream": True}
    threads, outs = _streams(lambda: httpx.Client(base_url=node.url), "/v1/completions", body, 3)
    status = wait_until(lambda: (s := node.model_status("tiny"))["running"] == 3 and s, 30, "three streams at once")
    assert status["parallel"] == 3 and status["full"] is True and status["waiting"] == 0
    for t in threads:
        t.join(120)
    for out in outs:
        assert out and not any("error" in e for e in out)
    after = node.model_status("tiny")
    assert after["running"] == 0 and after["jobs"]["completed"] == 3


def test_the_swarm_fills_a_warm_nodes_sequences(start_orchestrator: Start, start_node: Start,
                                                tiny_model: Path) -> None:  # fmt: skip
    orch: OrchestratorProcess = start_orchestrator("--min-stream-tps", "0")
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--parallel", "2", swarm=orch)
    orch.wait_live("w1")
    assert orch.nodes()["w1"]["capacity"] == 2
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 600, "temperature": 0, "stream": True}
    threads, outs = _streams(orch.client, "/v1/completions", body, 2)
    wait_until(lambda: orch.nodes()["w1"]["running"] == 2, 30, "both fragments on the one node")
    for t in threads:
        t.join(120)
    for out in outs:
        assert out and not any("error" in e for e in out)


def test_a_runner_crash_fails_over_every_sequence_it_held(start_orchestrator: Start, start_node: Start,
                                                          tiny_model: Path) -> None:  # fmt: skip
    orch: OrchestratorProcess = start_orchestrator("--min-stream-tps", "0")
    a = start_node("--name", "a", "--model", f"tiny={tiny_model}", "--parallel", "2", swarm=orch)
    orch.wait_live("a")
    _warm(orch)  # on a, the only node: its warm runner then ranks before b's cold one
    start_node("--name", "b", "--model", f"tiny={tiny_model}", "--parallel", "2", swarm=orch)
    orch.wait_live("b")
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 3000, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    threads, outs = _streams(orch.client, "/v1/completions", body, 2)
    wait_until(lambda: all(len(out) > 3 for out in outs), 30, "both streams to run")
    assert orch.nodes()["a"]["running"] == 2  # both on a's two sequences
    os.kill(int(a.model_status("tiny")["runner_pid"]), signal.SIGKILL)
    for t in threads:
        t.join(180)
    for out in outs:
        assert not any("error" in e for e in out), [e for e in out if "error" in e]
        assert out[-1]["usage"]["completion_tokens"] == 3000
        assert out[-1]["dragon"]["nodes"][0] == "a" and "b" in out[-1]["dragon"]["nodes"]


def test_the_owner_comes_first_on_a_shared_model_process(start_orchestrator: Start, start_node: Start,
                                                         tiny_model: Path) -> None:  # fmt: skip
    orch: OrchestratorProcess = start_orchestrator("--min-stream-tps", "0")
    local = start_node("--name", "local", "--model", f"tiny={tiny_model}", "--parallel", "2", swarm=orch)
    orch.wait_live("local")
    _warm(orch)
    start_node("--name", "w1", "--model", f"tiny={tiny_model}", "--parallel", "2", swarm=orch)
    orch.wait_live("w1")
    body = {"model": "tiny", "prompt": "others", "max_tokens": 3000, "temperature": 0, "cache_prompt": False,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    threads, outs = _streams(orch.client, "/v1/completions", body, 2)
    wait_until(lambda: orch.nodes()["local"]["running"] == 2, 30, "others' work in both sequences here")
    mine = local.client.post("/v1/completions", json={"model": "tiny", "prompt": "mine", "max_tokens": 8})
    assert mine.status_code == 200 and mine.headers["x-dragon-nodes"] == "local"  # served here, at once
    for t in threads:
        t.join(300)
    for out in outs:
        assert not any("error" in e for e in out)
        assert out[-1]["usage"]["completion_tokens"] == 3000
        assert out[-1]["dragon"]["nodes"] == ["local", "w1"]  # the work for others moved


def test_the_duty_cycle_splits_its_budget_between_processes_not_their_jobs() -> None:
    """Three jobs decoded together by one model process run on one process's duty, not a third of it."""
    from dragonswarm.governor.dutycycle import DutyCycleCap
    from dragonswarm.governor.governor import Governor
    from dragonswarm.governor.policy import OwnerPolicy
    from dragonswarm.governor.sampler import Sampler

    n = os.cpu_count() or 1
    sampler, cap = Sampler(os.getpid()), DutyCycleCap(list(range(n)), n)
    governor = Governor(sampler, cap, local_share=0.5, share=0.1, policy=OwnerPolicy(1.0, 0.1, 0.05), interval=0.25)
    try:
        governor.job_started("local", "coder")
        one = cap._duty
        for _ in range(2):
            governor.job_started("local", "coder")
        assert cap._duty == one  # the same process: the same duty
        governor.job_started("local", "chat")
        assert cap._duty < one  # a second process at work: the budget is shared
        governor.job_finished("local", "chat")
        assert cap._duty == one
    finally:
        cap.close()
        sampler.close()
