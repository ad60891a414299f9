"""The node on a volunteer's machine, beside its owner: recovery, share accuracy, backoff and release.

    .venv/bin/python -m bench.volunteer_bench       # as root; writes bench/results/volunteer.{json,md}

Run as root: the bench starts nodes as root (cgroup quota) and as the `dragon-volunteer` user
(affinity + duty cycle), whose venv tests/test_volunteer.py builds; it reuses it and builds none.
The owner is played by CPU hogs (`python -c "while True: pass"`, one per core) that the bench
starts and kills. "dragon node before" is the node of commit f55c623, the commit before the
volunteer-machine change, run from a git worktree with the same venv.

1. Owner recovery: a 4 s burst of hogs, 2 s of quiet, then a 200-token chat request at
   temperature 0; decode tokens/s of the node at --local-share 1.0 against plain
   llama-cpp-python (a child process, all cores) and the node before, alternately.
2. Share accuracy without root: the node as the volunteer at shares 0.10-1.0 with
   --cap-mechanism auto; CPU of its runner (and node + runner) over 30 s of generation; the
   same as root with the cgroup quota for reference.
3. Backoff and release: hogs start mid-generation at share 1.0; how soon the runner's CPU is
   under the 0.05 the node should then hold, and how soon share and threads come back after.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from tests.volunteer import USER, Volunteer, built_venv, volunteer_session

from bench.code_bench import Answer, PlainChat
from bench.node_bench import CODE_PROMPT, N_CPUS, RESULTS, ROOT, free_port, wait_http
from bench.outputs import save
from dragonswarm.engines.models import bundled_coder
from dragonswarm.settings import CODER_MODEL_NAME

REPO = ROOT.parent
BEFORE_COMMIT = "f55c623"
NODE, BEFORE, PLAIN = "dragon node", "dragon node before (f55c623)", "llama-cpp-python"
VOLUNTEER = "dragon node, volunteer"
STEADY = "dragon node, no burst"
MIN_SHARE = 0.05  # the node's floor while the owner fills the machine (--min-share's default)
TOLERANCE = 0.02
BURST_S = 4.0
QUIET_S = 2.0  # part 1: from the burst's end to the request
GAP_S = 4.0  # part 3: from one burst's end to the next one's start
TICK_S = 0.05  # part 3: the runner's CPU is read this often
WINDOW_S = 0.25  # ... and judged over this sliding window
RECOVERY_TOKENS = 200
RECOVERY_TARGET = 0.95
RELEASE_TARGET_S = 2.0
BACKOFF_TARGET_S = 1.0
RECOVERY_PROMPT = (
    "Write a Python module that implements a priority queue backed by a binary heap: a class with push, pop, "
    "peek and __len__, docstrings on every method, and a unittest test suite for it."
)
SHARES = (0.10, 0.25, 0.50, 1.0)
LONG_TOKENS = 3000  # parts 2 and 3: a generation that outlasts the measurement (4096-token context)


def quiet_chat(base: str, messages: list[dict[str, str]], max_tokens: int) -> Answer:
    """One streamed chat request, timed as a client sees it, with as little client work as can be
    while the answer streams: bytes are received and time-stamped, and parsed only at the end.

    Plain llama-cpp-python hands its tokens to the same process that computes them; a client
    parsing each server-sent event in Python (httpx + json) takes a share of these 2 cores from
    llama.cpp's 2 threads for every token, which here alone cost the node about 6% of its speed.
    """
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = json.dumps({"model": CODER_MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    raw = bytearray()
    arrived: list[tuple[int, float]] = []  # (bytes received so far, when)
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=600) as sock:
        sock.sendall(head + body)
        while data := sock.recv(1 << 16):
            raw += data
            arrived.append((len(raw), time.perf_counter()))
    header, _, rest = bytes(raw).partition(b"\r\n\r\n")
    if not header.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{base}: {header.splitlines()[0]!r} {rest[:300]!r}")
    offset = len(header) + 4
    ends: list[int] = []  # raw offset at which each event's last byte arrived
    events: list[bytes] = []
    pending = b""
    assert b"chunked" in header.lower(), "the node streams with chunked transfer encoding"
    while True:  # undo the chunked framing, noting where in the raw bytes each event ended
        size_line, _, _ = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        start_of_data = len(size_line) + 2
        pending += rest[start_of_data : start_of_data + size]
        offset += start_of_data + size
        rest = rest[start_of_data + size + 2 :]
        while b"\n\n" in pending:
            event, _, pending = pending.partition(b"\n\n")
            events.append(event)
            ends.append(offset)
        offset += 2
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    first = end = 0.0
    for event, at in zip(events, ends, strict=True):
        line = event.decode().strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if piece := choice["delta"].get("content"):
                when = arrived[bisect.bisect_left(arrived, (at, 0.0))][1]
                end = when
                first = first or when
                pieces.append(piece)
    return Answer(first - start, end - start, "".join(pieces), usage)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def quiet(timeout: float = 30) -> None:
    """Wait until the machine is idle: the previous system's work must not be this one's owner."""
    deadline = time.monotonic() + timeout
    while psutil.cpu_percent(interval=0.3) > 10 and time.monotonic() < deadline:
        pass


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def maximum(values: Sequence[float | None]) -> float | None:
    """The worst case; None (never reached) is worse than any time."""
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


class Hogs:
    """The owner at work: one busy process per core, kept by pid and killed by pid."""

    def __init__(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(N_CPUS)]

    def kill(self) -> float:
        """Kill every hog; returns the moment they were killed (monotonic)."""
        for proc in self.procs:
            proc.kill()
        killed = time.monotonic()
        for proc in self.procs:
            proc.wait()
        return killed


def owner_burst(seconds: float) -> None:
    """The owner's burst: every core busy for `seconds`."""
    hogs = Hogs()
    try:
        time.sleep(seconds)
    finally:
        hogs.kill()


@dataclass
class NodeProc:
    """A `dragon node` serving the bundled code model, started by `Launcher`."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    _children: list[psutil.Process] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.base + "/v1/node", timeout=30).json()
        return data

    def runner(self) -> psutil.Process:
        return psutil.Process(self.status()["models"][0]["runner_pid"])

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Answer:
        return quiet_chat(self.base, messages, max_tokens)

    def close(self) -> None:
        with contextlib.suppress(psutil.Error):
            self._children = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in self._children:  # a runner the node failed to stop
            with contextlib.suppress(psutil.Error):
                child.kill()
                child.wait(10)


@dataclass
class Launcher:
    """How to start one kind of node: which python, as whom, with which source and home."""

    name: str
    python: Path
    model: Path
    homes: Callable[[str], Path]  # a fresh DRAGON home, readable by whoever runs the node
    logs: Path
    env: dict[str, str] | None = None
    prefix: Sequence[str] = ()
    cwd: Path = REPO

    def command(self, flags: Sequence[str]) -> tuple[list[str], int]:
        port = free_port()
        home = self.homes(f"{self.name.split()[-1].strip('()')}-")
        return [*self.prefix, str(self.python), "-m", "dragonswarm.cli", "node", "--home", str(home), "--api-port",
                str(port), "--no-bundled-model", "--model", f"{CODER_MODEL_NAME}={self.model}:code,chat",
                *flags], port  # fmt: skip

    def start(self, *flags: str) -> NodeProc:
        args, port = self.command(flags)
        log = Path(tempfile.mkstemp(prefix="node-", suffix=".log", dir=self.logs)[1])
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        node = NodeProc(self.name, proc, port, log)
        try:
            wait_http(node.base + "/health", proc)
            warm = {"model": CODER_MODEL_NAME, "prompt": "def", "max_tokens": 1}  # loads the runner
            httpx.post(node.base + "/v1/completions", json=warm, timeout=120).raise_for_status()
        except Exception:
            node.close()
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        return node

    def refusal(self, *flags: str) -> str:
        """Start a node that is expected to refuse its flags; what it said when it exited."""
        args, _port = self.command(flags)
        done = subprocess.run(args, capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=120)
        said = (done.stdout + done.stderr).strip().splitlines()
        return f"exit {done.returncode}: {said[-1] if said else ''}"


class Generation:
    """Keeps the model generating: long streamed completions, back to back, until closed."""

    def __init__(self, node: NodeProc, temperature: float = 0.7):
        self.node = node
        self.body = {"model": CODER_MODEL_NAME, "prompt": CODE_PROMPT, "max_tokens": LONG_TOKENS,
                     "temperature": temperature, "stream": True}  # fmt: skip
        self.pieces = 0
        self.times: list[float] = []  # when each piece of text arrived (monotonic)
        self.ends: list[float] = []  # when each request ended (monotonic): the runner paused there
        self.first = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()
        if not self.first.wait(120):
            raise RuntimeError(f"{node.name}: no token after 120 s ({self.error!r})")

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=300) as client:
                while not self._stop.is_set():
                    with client.stream("POST", self.node.base + "/v1/completions", json=self.body) as response:
                        response.raise_for_status()
                        for line in response.iter_lines():
                            if line.startswith("data: {"):
                                self.pieces += 1
                                self.times.append(time.monotonic())
                                self.first.set()
                            if self._stop.is_set():
                                break  # leaving the stream cancels the job
                    self.ends.append(time.monotonic())
        except BaseException as exc:  # reported by close(): a thread's exception is lost otherwise
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise RuntimeError(f"{self.node.name}: generation failed") from self.error


# --- 1. owner recovery ------------------------------------------------------------------------


def bench_recovery(systems: dict[str, Any], plain: PlainChat, rounds: int) -> dict[str, Any]:
    """Burst, quiet, then one timed request, for each system in turn; the order flips every round."""
    messages = [{"role": "user", "content": RECOVERY_PROMPT}]
    for system in systems.values():  # untimed: page faults, template compilation, prompt cache
        system.chat(messages, 8)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(rounds):
        for position, name in enumerate(names if r % 2 == 0 else names[::-1]):
            system = systems[name]
            quiet()
            if name != STEADY:  # the same node with no owner before it: what full recovery looks like
                owner_burst(BURST_S)
            time.sleep(QUIET_S)  # for STEADY too: the system asked before it was this node's owner
            gov = system.status()["governor"] if isinstance(system, NodeProc) else {}
            a: Answer = system.chat(messages, RECOVERY_TOKENS)
            counted = plain.count_tokens(a.text)
            tokens = a.usage.get("completion_tokens") or counted  # the server's count; plain has none
            runs[name].append({
                "round": r, "position": position, "ttft": a.ttft, "total": a.total, "tokens": tokens,
                "tokens_counted": counted, "decode_tokens_per_s": (tokens - 1) / (a.total - a.ttft),
                "tokens_per_s": tokens / a.total, "share_at_request": gov.get("share_in_force"),
                "threads_at_request": gov.get("threads"), "owner_load_at_request": gov.get("owner_load"),
                "text": a.text,
            })  # fmt: skip
            print(f"  round {r + 1}/{rounds} {name}: {runs[name][-1]['decode_tokens_per_s']:.1f} decode tok/s, "
                  f"{tokens} tokens, share at request {gov.get('share_in_force')}", flush=True)  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(x[k] for x in rs) for k in ("decode_tokens_per_s", "tokens_per_s")}
        summary[name]["ttft_ms"] = statistics.median(x["ttft"] for x in rs) * 1000
        summary[name]["tokens"] = statistics.median(x["tokens"] for x in rs)
        shares = [x["share_at_request"] for x in rs if x["share_at_request"] is not None]
        summary[name]["share_at_request"] = statistics.median(shares) if shares else None
    for name in summary:
        summary[name]["ratio"] = summary[name]["decode_tokens_per_s"] / summary[PLAIN]["decode_tokens_per_s"]
        summary[name]["ratio_per_round"] = statistics.median(
            x["decode_tokens_per_s"] / p["decode_tokens_per_s"] for x, p in zip(runs[name], runs[PLAIN], strict=True)
        )
    texts = {x["text"] for rs in runs.values() for x in rs}
    return {"rounds": rounds, "burst_s": BURST_S, "quiet_s": QUIET_S, "max_tokens": RECOVERY_TOKENS,
            "prompt": RECOVERY_PROMPT, "threads": N_CPUS, "same_text": len(texts) == 1, "systems": summary,
            "runs": runs}  # fmt: skip


# --- 2. share accuracy ------------------------------------------------------------------------


def share_run(launcher: Launcher, share: float, mechanism: str, seconds: float) -> dict[str, Any]:
    """CPU of the runner, and of node + runner, over `seconds` of generation at `share`."""
    node = launcher.start("--local-share", str(share), "--cap-mechanism", mechanism)
    try:
        gov = node.status()["governor"]
        runner, parent, me = node.runner(), psutil.Process(node.proc.pid), psutil.Process()
        quiet()
        gen = Generation(node)
        try:
            pieces0 = gen.pieces
            r0, n0, b0, t0 = cpu_seconds(runner), cpu_seconds(parent), cpu_seconds(me), time.monotonic()
            time.sleep(seconds)
            r1, n1, b1, t1 = cpu_seconds(runner), cpu_seconds(parent), cpu_seconds(me), time.monotonic()
            pieces = gen.pieces - pieces0
            status = node.status()
            affinity = runner.cpu_affinity()
        finally:
            gen.close()
    finally:
        node.close()
    machine = (t1 - t0) * N_CPUS
    after = status["governor"]
    return {
        "share": share, "mechanism": gov["mechanism"], "mechanism_reason": gov.get("mechanism_reason"),
        "seconds": t1 - t0, "runner": (r1 - r0) / machine, "node_and_runner": (r1 - r0 + n1 - n0) / machine,
        "bench_itself": (b1 - b0) / machine, "tokens_per_s": pieces / (t1 - t0), "requests": len(gen.ends),
        "share_in_force_after": after["share_in_force"], "owner_load_after": after["owner_load"],
        "threads": status["models"][0].get("threads"), "runner_affinity": affinity,
    }  # fmt: skip


def bench_share(volunteer: Launcher, root: Launcher, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": seconds, "runs": {}}
    for label, launcher, mechanism in (("volunteer (not root)", volunteer, "auto"), ("root", root, "cgroup")):
        runs = []
        for share in SHARES:
            run = share_run(launcher, share, mechanism, seconds)
            runs.append(run)
            print(f"  {label} share {share:.2f}: runner {run['runner']:.3f}, node + runner "
                  f"{run['node_and_runner']:.3f} ({run['mechanism']})", flush=True)  # fmt: skip
        out["runs"][label] = runs
    # Delegated cgroup v2 needs the cpu controller on the v2 hierarchy; the node says why it cannot.
    out["cgroup_v2_delegated"] = volunteer.refusal("--local-share", "0.5", "--cap-mechanism", "cgroup")
    print(f"  volunteer --cap-mechanism cgroup: {out['cgroup_v2_delegated']}", flush=True)
    return out


# --- 3. backoff and release -------------------------------------------------------------------


class Watch:
    """The runner's CPU every TICK_S and the node's /v1/node as often, each in its own thread."""

    def __init__(self, node: NodeProc, runner: psutil.Process):
        self.node, self.runner = node, runner
        self.offset = time.time() - time.monotonic()  # wall clock to monotonic, for `sampled_at`
        self.cpu: list[tuple[float, float]] = []
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._sample, self._poll)]
        for thread in self._threads:
            thread.start()

    def _sample(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self.cpu.append((time.monotonic(), cpu_seconds(self.runner)))
            due += TICK_S
            time.sleep(max(0.0, due - time.monotonic()))

    def _poll(self) -> None:
        with httpx.Client(base_url=self.node.base, timeout=30) as client:
            while not self._stop.is_set():
                status = client.get("/v1/node").json()
                now, gov, model = time.monotonic(), status["governor"], status["models"][0]
                at = gov.get("sampled_at")  # the node before has none: the answer's time stands in
                self.seen.append({"t": now, "at": now if at is None else at - self.offset,
                                  "share": gov["share_in_force"], "governor_threads": gov["threads"],
                                  "runner_threads": model.get("threads"), "owner_load": gov["owner_load"],
                                  "cpu_total": gov["cpu_total"], "contended": gov.get("contended")})  # fmt: skip
                time.sleep(TICK_S)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def window_fraction(cpu: Sequence[tuple[float, float]], times: Sequence[float], i: int) -> float | None:
    """The runner's CPU over the window of at least WINDOW_S ending at sample `i`, as a fraction of the machine."""
    j = bisect.bisect_right(times, times[i] - WINDOW_S) - 1
    if j < 0:
        return None
    return (cpu[i][1] - cpu[j][1]) / ((cpu[i][0] - cpu[j][0]) * N_CPUS)


def burst_metrics(cpu: Sequence[tuple[float, float]], seen: Sequence[dict[str, Any]], tokens: Sequence[float],
                  t0: float, killed: float, end: float) -> dict[str, Any]:  # fmt: skip
    """Backoff and release of one burst, from the samples taken around it (plain values in, plain values out)."""
    times = [t for t, _ in cpu]
    room = MIN_SHARE + TOLERANCE
    backoff, lowest = None, 1.0
    for i in range(bisect.bisect_left(times, t0), bisect.bisect_right(times, killed)):
        fraction = window_fraction(cpu, times, i)
        if fraction is None:
            continue
        lowest = min(lowest, fraction)
        if backoff is None and fraction < room:
            backoff = times[i] - t0
    before = window_fraction(cpu, times, max(0, bisect.bisect_right(times, t0) - 1))
    late = [(t, c) for t, c in cpu if t0 + BURST_S - 2.5 <= t <= killed]
    in_burst = [s for s in seen if t0 <= s["at"] <= killed]
    after = [s for s in seen if killed <= s["at"] <= end]
    share_back = next((s for s in after if s["share"] >= 1.0), None)
    computing = [s["runner_threads"] for s in in_burst if s["runner_threads"] is not None]
    dropped = min(computing) < N_CPUS if computing else None  # None: the node does not report it
    threads_back = None
    if dropped:  # a runner that never left N_CPUS threads has nothing to come back from
        threads_back = next((s for s in seen if killed <= s["t"] <= end and s["runner_threads"] == N_CPUS), None)
    down = next((s for s in in_burst if s["share"] <= MIN_SHARE + 1e-9), None)
    floor = [s["share"] for s in in_burst if down is not None and s["at"] >= down["at"]]
    rises = sum(1 for a, b in itertools.pairwise(floor) if b > a)  # up again while the owner still works
    flaps = 0
    if share_back is not None:  # back at 1.0, then down again before the next burst: the share flapped
        rest = [s["share"] for s in after if s["at"] >= share_back["at"]]
        flaps = sum(1 for a, b in itertools.pairwise(rest) if a >= 1.0 > b)
    over = []  # the runner above the room once the share was at the floor: the cap let it run on
    if down is not None:
        for i in range(bisect.bisect_left(times, down["at"] + WINDOW_S), bisect.bisect_right(times, killed)):
            fraction = window_fraction(cpu, times, i)
            if fraction is not None and fraction >= room:
                over.append([round(times[i] - t0, 3), round(fraction, 3)])
    return {
        "runner_before": before,
        "backoff_s": backoff,
        "over_room_after_floor": over,
        "lowest_runner": lowest,
        "runner_late_in_burst": (late[-1][1] - late[0][1]) / ((late[-1][0] - late[0][0]) * N_CPUS)
        if len(late) > 1 else None,
        "share_down_s": None if down is None else down["at"] - t0,
        "lowest_share": min((s["share"] for s in in_burst), default=None),
        "fewest_threads": min((s["runner_threads"] or s["governor_threads"] for s in in_burst), default=None),
        "release_share_s": None if share_back is None else share_back["at"] - killed,
        "threads_dropped": dropped,
        "release_threads_s": None if threads_back is None else threads_back["t"] - killed,
        "share_at_end": after[-1]["share"] if after else None,
        "rises_in_burst": rises,
        "highest_share_after_floor": max(floor, default=None),
        "flaps_after_release": flaps,
        "tokens_in_burst": bisect.bisect_right(tokens, killed) - bisect.bisect_left(tokens, t0),
        "tokens_in_burst_last_3s": bisect.bisect_right(tokens, killed) - bisect.bisect_left(tokens, killed - 3.0),
        "tokens_per_s_before": (bisect.bisect_left(tokens, t0) - bisect.bisect_left(tokens, t0 - 1.0)) / 1.0,
        "trace": trace(seen, tokens, t0, end),
    }  # fmt: skip


def trace(seen: Sequence[dict[str, Any]], tokens: Sequence[float], t0: float, end: float) -> list[list[Any]]:
    """The node's answers that changed the picture, from just before t0 to `end`: [t from t0, share in
    force, the runner's threads, the governor's threads, owner load, machine busy, contended, tokens since t0]."""
    rows, last = [], None
    for s in seen:
        if not t0 - 0.25 <= s["t"] <= end:
            continue
        key = (s["share"], s["runner_threads"], s["governor_threads"], s["contended"])
        if key != last:
            rows.append([round(s["t"] - t0, 3), *key[:3], s["owner_load"], s["cpu_total"], s["contended"],
                         bisect.bisect_right(tokens, s["t"]) - bisect.bisect_left(tokens, t0)])  # fmt: skip
            last = key
    return rows


def timeline(cpu: Sequence[tuple[float, float]], seen: Sequence[dict[str, Any]], tokens: Sequence[float], t0: float,
             end: float) -> list[dict[str, Any]]:  # fmt: skip
    """One burst as rows (t from the hogs' start): runner CPU, tokens streamed since t0 and the node's
    latest answer then."""
    times = [t for t, _ in cpu]
    rows = []
    for i in range(max(1, bisect.bisect_left(times, t0 - 0.5)), bisect.bisect_right(times, end)):
        t, c = cpu[i]
        last = [s for s in seen if s["t"] <= t]
        s = last[-1] if last else {}
        tick = (c - cpu[i - 1][1]) / ((t - cpu[i - 1][0]) * N_CPUS)
        rows.append({"t": round(t - t0, 3), "runner_cpu": round(tick, 3),
                     "runner_cpu_250ms": None if (w := window_fraction(cpu, times, i)) is None else round(w, 3),
                     "tokens_since_t0": bisect.bisect_right(tokens, t) - bisect.bisect_left(tokens, t0),
                     "share_in_force": s.get("share"), "threads": s.get("runner_threads"),
                     "governor_threads": s.get("governor_threads"), "owner_load": s.get("owner_load"),
                     "cpu_total": s.get("cpu_total"), "contended": s.get("contended")})  # fmt: skip
    return rows


def backoff_run(launcher: Launcher, mechanism: str, bursts: int) -> dict[str, Any]:
    node = launcher.start("--local-share", "1.0", "--cap-mechanism", mechanism)
    try:
        gov = node.status()["governor"]
        runner, me = node.runner(), psutil.Process()
        quiet()
        gen = Generation(node)
        watch = Watch(node, runner)
        try:
            time.sleep(2.0)  # the runner at full speed, the governor settled
            b0, w0 = cpu_seconds(me), time.monotonic()
            windows: list[dict[str, Any]] = []
            while sum(w["valid"] for w in windows) < bursts and len(windows) < bursts + 3:
                t0 = time.monotonic()
                hogs = Hogs()
                try:
                    time.sleep(max(0.0, t0 + BURST_S - time.monotonic()))
                finally:
                    killed = hogs.kill()
                time.sleep(max(0.0, killed + GAP_S - time.monotonic()))
                # A request that ended in the burst left the runner idle for a moment: not a backoff.
                clean = not any(t0 - 0.5 <= e <= killed + GAP_S for e in gen.ends)
                windows.append({"t0": t0, "killed": killed, "end": killed + GAP_S, "valid": clean})
                print(f"  {node.name} burst {len(windows)}{'' if clean else ' (a request ended in it: repeated)'}",
                      flush=True)  # fmt: skip
            bench_itself = (cpu_seconds(me) - b0) / ((time.monotonic() - w0) * N_CPUS)
        finally:
            watch.close()
            gen.close()
    finally:
        node.close()
    results = []
    for w in windows:
        m = burst_metrics(watch.cpu, watch.seen, gen.times, w["t0"], w["killed"], w["end"])
        results.append({**m, "valid": w["valid"], "at_s": w["t0"] - windows[0]["t0"]})
    valid = [r for r in results if r["valid"]]
    keep = next(i for i, w in enumerate(windows) if w["valid"]) if valid else 0
    w = windows[keep]
    dropped = [r for r in valid if r["threads_dropped"]]
    summary = {f"{k}_{agg.__name__}": agg([r[k] for r in (dropped if k == "release_threads_s" else valid)])
               for k in ("backoff_s", "release_share_s", "release_threads_s") for agg in (median, maximum)}  # fmt: skip
    # The owner's load the node saw with no hogs, once the hold after a burst was over: its noise floor.
    calm = [s["owner_load"] for w in windows for s in watch.seen if w["killed"] + 2.5 <= s["at"] <= w["end"]]
    floor = {"median": median(calm), "max": max(calm, default=None),
             "over_noise": sum(q >= 0.10 for q in calm) / max(1, len(calm))}  # fmt: skip
    return {"mechanism": gov["mechanism"], "mechanism_reason": gov.get("mechanism_reason"),
            "has_runner_threads": watch.seen[0]["runner_threads"] is not None, "bursts": results, **summary,
            "threads_kept_bursts": sum(r["threads_dropped"] is False for r in valid), "quiet_owner_load": floor,
            "lowest_runner_max": max((r["lowest_runner"] for r in valid), default=None),
            "bench_itself": bench_itself, "curve_burst": keep + 1,
            "curve": timeline(watch.cpu, watch.seen, gen.times, w["t0"], w["end"])}  # fmt: skip


def bench_backoff(launchers: dict[str, tuple[Launcher, str]], bursts: int) -> dict[str, Any]:
    out: dict[str, Any] = {"bursts": bursts, "burst_s": BURST_S, "gap_s": GAP_S, "tick_s": TICK_S,
                           "window_s": WINDOW_S, "room": MIN_SHARE + TOLERANCE, "systems": {}}  # fmt: skip
    for label, (launcher, mechanism) in launchers.items():
        r = out["systems"][label] = backoff_run(launcher, mechanism, bursts)
        print(f"  {label}: backoff {r['backoff_s_median']} s, share back {r['release_share_s_median']} s, "
              f"threads back {r['release_threads_s_median']} s", flush=True)  # fmt: skip
    return out


# --- setup and report -------------------------------------------------------------------------


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """The source tree of `commit`, checked out beside the repository and removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="dragon-before-"))
    path = parent / commit
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


def tree_digest(source: Path) -> str:
    """A short digest of the package's source files, to tell which state of the tree was measured."""
    digest = hashlib.sha256()
    for path in sorted((source / "dragonswarm").rglob("*.py")):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def fmt(value: float | None, spec: str = ".2f", unit: str = "", none: str = "never") -> str:
    return none if value is None else f"{value:{spec}}{unit}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    out = [
        "# Volunteer benchmark results",
        "",
        f"Machine: {results['machine']}. Model: {results['model']}. Date: {results['date']}. "
        f"Command: `{results['command']}` ({results['run_time_s'] / 60:.1f} min). Source: {results['source']}.",
        "",
        'The owner is played by CPU hogs, `python -c "while True: pass"`, one per core, started and killed by '
        f"the bench. {BEFORE}: the node of commit {results['before_commit']}, run from a git worktree with the "
        "same venv (sampling once a second, smoothed owner load, threads fixed per job).",
    ]
    if "recovery" in results:
        rc = results["recovery"]
        s = rc["systems"]
        out += [
            "",
            f"## 1. Owner recovery ({rc['rounds']} rounds, order flipped each round)",
            "",
            f"Each run: {rc['burst_s']:.0f} s of hogs on every core, {rc['quiet_s']:.0f} s of quiet, then one chat "
            f"request of {rc['max_tokens']} tokens at temperature 0, streamed (“{rc['prompt']}”). Nodes at "
            f"`--local-share 1.0` ({results['mechanisms']['recovery']}); llama-cpp-python a child process calling "
            f"the library (bench/plain_chat_worker.py); {rc['threads']} threads for all (every core). {STEADY}: "
            "the same node asked with no burst before, in the same rounds: the speed that recovery comes back to. "
            "The nodes are read by a client that only receives and time-stamps bytes while the answer streams and "
            "parses them afterwards (`quiet_chat`): llama-cpp-python's tokens reach their reader in the process "
            "that computes them, while a client parsing every event in Python (httpx) takes CPU from llama.cpp's "
            "threads on these 2 cores at every token (0.92× instead of 1.06× in one trial run). Decode "
            "tokens/s: (tokens − 1) / (time from the first to the last token); tokens as the node reports them "
            "(usage), for llama-cpp-python its text tokenized again. Same text from every system in every run: "
            f"{rc['same_text']}.",
            "",
            "| system | decode tokens/s | tokens/s | time to first token | share in force at the request | "
            "ratio to llama-cpp-python (medians) | median of per-round ratios |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in s.items():
            share = fmt(r["share_at_request"], none="—")
            out.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['ttft_ms']:.0f} ms "
                       f"| {share} | {r['ratio']:.3f} | {r['ratio_per_round']:.3f} |")  # fmt: skip
        out += ["", f"Target: node ≥ {RECOVERY_TARGET}× llama-cpp-python after the burst: {s[NODE]['ratio']:.3f}× — "
                    f"{verdict(s[NODE]['ratio'] >= RECOVERY_TARGET)}. After the burst against no burst: "
                    f"{s[NODE]['decode_tokens_per_s'] / s[STEADY]['decode_tokens_per_s']:.3f}×.", "",
                "Per round (decode tokens/s; share in force when the request was sent):", "",
                "| round | " + " | ".join(s) + f" | {NODE} / {PLAIN} |", "|---|" + "---|" * (len(s) + 1)]  # fmt: skip
        for r in range(rc["rounds"]):
            cells = []
            for name in s:
                x = rc["runs"][name][r]
                share = "" if x["share_at_request"] is None else f" (share {x['share_at_request']:.2f})"
                cells.append(f"{x['decode_tokens_per_s']:.1f}{share}")
            ratio = rc["runs"][NODE][r]["decode_tokens_per_s"] / rc["runs"][PLAIN][r]["decode_tokens_per_s"]
            out.append(f"| {r + 1} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    if "share" in results:
        sh = results["share"]
        out += [
            "",
            f"## 2. Share accuracy ({sh['seconds']:.0f} s of generation per share)",
            "",
            "CPU used (user + system, psutil `cpu_times`) over exactly the window, as a fraction of the machine "
            f"({N_CPUS} cores × wall time), while long completions stream back to back. Target: within "
            f"+{TOLERANCE} of the share.",
            "",
            "| node run by | mechanism | share | runner | over by | node + runner | over by | tokens/s | runner "
            "threads | runner's cores | |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, runs in sh["runs"].items():
            for r in runs:
                ok = r["runner"] <= r["share"] + TOLERANCE
                ok_all = r["node_and_runner"] <= r["share"] + TOLERANCE
                out.append(f"| {label} | {r['mechanism']} | {r['share']:.2f} | {r['runner']:.3f} "
                           f"| {r['runner'] - r['share']:+.3f} | {r['node_and_runner']:.3f} "
                           f"| {r['node_and_runner'] - r['share']:+.3f} | {r['tokens_per_s']:.1f} | {r['threads']} "
                           f"| {','.join(map(str, r['runner_affinity']))} "
                           f"| runner {verdict(ok)}, node + runner {verdict(ok_all)} |")  # fmt: skip
        reason = sh["runs"]["volunteer (not root)"][0]["mechanism_reason"]
        out += [
            "",
            f"Not root, `--cap-mechanism auto` fell to the duty cycle; the node's reason: “{reason}”.",
            "",
            f"cgroup v2, delegated: not available on this machine. A volunteer node with `--cap-mechanism cgroup` "
            f"refuses to start: “{sh['cgroup_v2_delegated']}”. The delegated quota is tested in a virtual machine "
            "with cgroup v2 instead (`scripts/test-in-vm tests/test_volunteer.py -k delegated`): there the runner "
            "holds 0.25 within the test's bound, emulated, so without a timing figure.",
            "",
            "The duty cycle holds the runners only; the node process (HTTP, the governor) is never suspended, so "
            "node + runner is the runner plus the node's own work. The cgroup quota holds both.",
        ]
    if "backoff" in results:
        bo = results["backoff"]
        room = bo["room"]
        out += [
            "",
            f"## 3. Backoff and release ({bo['bursts']} bursts of {bo['burst_s']:.0f} s, {bo['gap_s']:.0f} s apart)",
            "",
            "The node generates (long streamed completions at `--local-share 1.0`); hogs start on every core at "
            f"t0. The bench reads the runner's CPU every {bo['tick_s'] * 1000:.0f} ms (psutil, 10 ms ticks) and "
            "polls `/v1/node`. Backoff: from t0 to the first moment the runner's CPU over a sliding "
            f"{bo['window_s'] * 1000:.0f} ms window is under {room:.2f} of the machine (the {MIN_SHARE} the node "
            f"should hold with the owner filling the machine, + {TOLERANCE}); target ≤ {BACKOFF_TARGET_S:.0f} s. "
            "Release: from killing the hogs to (a) `share_in_force` back at 1.0 (the governor's `sampled_at`; for "
            "the node before, the poll's time) and (b) the model's `threads` back at "
            f"{N_CPUS}; target ≤ {RELEASE_TARGET_S:.0f} s.",
            "",
            "| system | mechanism | backoff median | max | | share back median | max | | threads back median | max | |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        stalled = []
        for label, r in bo["systems"].items():
            valid = [b for b in r["bursts"] if b["valid"]]
            judged = []
            for key, limit in (("backoff_s", BACKOFF_TARGET_S), ("release_share_s", RELEASE_TARGET_S)):
                worst = r[f"{key}_maximum"]
                judged.append(verdict(worst is not None and worst <= limit))
            if not r["has_runner_threads"]:
                threads = "n/a | n/a | no per-model `threads`"
            else:
                worst, kept = r["release_threads_s_maximum"], r["threads_kept_bursts"]
                none = "—" if kept == len(valid) else "never"  # "—": no burst to measure it on
                threads = (f"{fmt(r['release_threads_s_median'], unit=' s', none=none)} "
                           f"| {fmt(worst, unit=' s', none=none)} "
                           f"| {verdict(worst is not None and worst <= RELEASE_TARGET_S and not kept)}")  # fmt: skip
                if kept:
                    threads += f" (threads stayed {N_CPUS} in {kept} of {len(valid)} bursts)"
                    stalled.append(f"{label}: in {kept} of {len(valid)} bursts")
            out.append(f"| {label} | {r['mechanism']} | {fmt(r['backoff_s_median'], unit=' s')} "
                       f"| {fmt(r['backoff_s_maximum'], unit=' s')} | {judged[0]} "
                       f"| {fmt(r['release_share_s_median'], unit=' s')} "
                       f"| {fmt(r['release_share_s_maximum'], unit=' s')} | {judged[1]} | {threads} |")  # fmt: skip
        out += [
            "",
            "During the bursts (medians over bursts): when the share in force reached the floor, the runner's CPU "
            "over the burst's last 2.5 s, the tokens streamed in the burst (all 4 s, and its last 3 s) against "
            "tokens per second just before it, the fewest threads the runner computed with (lowest–highest over "
            "the bursts); over all bursts, rises (the share up again from the floor while the hogs still ran; "
            "the highest it rose to) and flaps (the share back at 1.0, then down again before the next burst):",
            "",
            "| system | share at the floor after | runner CPU late in burst | tokens in burst | in its last 3 s | "
            "tokens/s before | fewest threads | rises in bursts (to) | flaps after release |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in bo["systems"].items():
            valid = [b for b in r["bursts"] if b["valid"]]
            counts = sorted({b["fewest_threads"] for b in valid if b["fewest_threads"] is not None})
            fewest = "–".join(str(c) for c in counts[:: max(1, len(counts) - 1)]) or "—"  # lowest–highest
            highest = max((b["highest_share_after_floor"] for b in valid if b["highest_share_after_floor"]),
                          default=None)  # fmt: skip
            out.append(f"| {label} | {fmt(median([b['share_down_s'] for b in valid]), unit=' s')} "
                       f"| {fmt(median([b['runner_late_in_burst'] for b in valid]), '.3f')} "
                       f"| {fmt(median([b['tokens_in_burst'] for b in valid]), '.0f')} "
                       f"| {fmt(median([b['tokens_in_burst_last_3s'] for b in valid]), '.0f')} "
                       f"| {fmt(median([b['tokens_per_s_before'] for b in valid]), '.0f')} "
                       f"| {fewest}{'' if r['has_runner_threads'] else ' (governor)'} "
                       f"| {sum(b['rises_in_burst'] for b in valid)} ({fmt(highest, none='no floor')}) "
                       f"| {sum(b['flaps_after_release'] for b in valid)} |")  # fmt: skip
        out += ["", "Each burst:", "",
                "| system | burst | backoff | lowest runner CPU (250 ms) | windows over the room after the floor | "
                "share back | threads back | tokens in burst | fewest threads |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, r in bo["systems"].items():
            for i, b in enumerate(r["bursts"]):
                note = "" if b["valid"] else " (a request ended in it: not counted)"
                back = "n/a" if b["threads_dropped"] is None else fmt(b["release_threads_s"], unit=" s")
                if b["threads_dropped"] is False:
                    back = f"— (stayed {N_CPUS})"
                over = b["over_room_after_floor"]
                worst = f" (up to {max(f for _, f in over):.3f})" if over else ""
                out.append(f"| {label} | {i + 1}{note} | {fmt(b['backoff_s'], unit=' s')} | {b['lowest_runner']:.3f} "
                           f"| {len(over)}{worst} | {fmt(b['release_share_s'], unit=' s')} | {back} "
                           f"| {b['tokens_in_burst']} | {b['fewest_threads']} |")  # fmt: skip
        if stalled:
            out += ["", f"**The runner's threads did not follow the share down** ({'; '.join(stalled)}): the "
                        f"model's `threads` stayed {N_CPUS} all burst while the governor's went to 1; “threads back” "
                        "is over the other bursts. See the tokens streamed in those bursts, and each burst's `trace` "
                        "in the JSON."]  # fmt: skip
        own = ", ".join(f"{label} {r['bench_itself']:.3f}" for label, r in bo["systems"].items())
        floors = [(label, r["quiet_owner_load"]) for label, r in bo["systems"].items()]
        floor = "; ".join(f"{label}: median {fmt(q['median'], '.3f')}, max {fmt(q['max'], '.3f')}, at or over 0.10 "
                          f"in {q['over_noise']:.0%} of the answers" for label, q in floors)  # fmt: skip
        out += [
            "",
            "“never”: not within the burst (backoff, share at the floor) or before the next burst (release). "
            "Tokens: streamed pieces of text, one per token. The bench's own CPU (reading the stream, sampling, "
            f"polling), which the node counts as the owner's: {own} of the machine. The owner's load the node "
            "reported (`owner_load`, the highest of the last second) with no hogs, from 2.5 s after each burst to "
            f"the next (the node's noise threshold is 0.10): {floor}.",
            "",
            "Release curve: `share_in_force` (threads) seen at times from the hogs' start, one burst per system "
            "(the full timelines, with the runner's CPU, are in the JSON):",
            "",
        ]
        marks = (-0.25, 0.25, 0.5, 1.0, 2.0, 3.9, 4.25, 4.5, 5.0, 5.25, 5.5, 6.0, 7.0, 7.9)
        out += ["| system | " + " | ".join(f"{m:+.2f} s" for m in marks) + " |", "|---|" + "---|" * len(marks)]
        for label, r in bo["systems"].items():
            cells = []
            for m in marks:
                row = next((x for x in r["curve"] if x["t"] >= m), None)
                if row is None or row["share_in_force"] is None:
                    cells.append("")
                    continue
                threads = row["threads"] if row["threads"] is not None else row["governor_threads"]
                cells.append(f"{row['share_in_force']:.2f} ({threads})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += ["", f"The hogs are killed at +{BURST_S:.2f} s. For {BEFORE} the threads shown are the governor's: "
                    "its runner keeps the thread count its job started with."]  # fmt: skip
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="part 1: rounds (each system once a round)")
    parser.add_argument("--share-seconds", type=float, default=30.0, help="part 2: seconds of generation per share")
    parser.add_argument("--bursts", type=int, default=5, help="part 3: bursts per system")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    parser.add_argument("--out", type=Path, default=RESULTS / "volunteer")
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",")}
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench starts nodes as root (cgroup quota) and as the volunteer user")
    volunteer_python = built_venv()
    if volunteer_python is None:
        raise SystemExit("the volunteer's venv is not built: run `.venv/bin/python -m pytest tests/test_volunteer.py "
                         "-k run_as_the_volunteer` once")  # fmt: skip

    started = time.monotonic()
    model = bundled_coder(Path.home() / ".dragonswarm" / "models").path  # reused across runs
    results: dict[str, Any] = {
        "machine": f"{N_CPUS} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "model": f"{CODER_MODEL_NAME} (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), llama-cpp-python "
                 f"{importlib.metadata.version('llama_cpp_python')}",
        "command": "python -m bench.volunteer_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": f"{git('describe', '--always', '--dirty')} (the working tree; changed: "
                  f"{git('diff', '--name-only', 'HEAD', '--', 'src').replace(chr(10), ' ') or 'nothing'})",
        "before_commit": git("rev-parse", BEFORE_COMMIT),
        "volunteer_python": f"{volunteer_python} (Python {platform.python_version()} for root's nodes)",
        "mechanisms": {},
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="dragon-volunteer-bench-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        logs = work / "logs"
        logs.mkdir()

        def root_home(prefix: str) -> Path:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=work))

        before_src = stack.enter_context(worktree(BEFORE_COMMIT)) / "src"
        user: Volunteer = stack.enter_context(volunteer_session(pwd.getpwnam(USER), volunteer_python))
        # Every node of this change runs the copy of src/ the volunteer's session took at the start:
        # edits to the working tree during the run do not reach nodes started later.
        results["source"] += f", src/ copied at the start: sha256 {tree_digest(user.source)}"
        root = Launcher(NODE, Path(sys.executable), model, root_home, logs,
                        env={**os.environ, "PYTHONPATH": str(user.source)})  # fmt: skip
        before = Launcher(BEFORE, Path(sys.executable), model, root_home, logs,
                          env={**os.environ, "PYTHONPATH": str(before_src)})  # fmt: skip
        volunteer = Launcher(VOLUNTEER, user.python, user.share(model), user.make_dir, logs, env=user.env(),
                             prefix=user.prefix(), cwd=user.home)  # fmt: skip
        if 1 in parts:
            print("owner recovery...", flush=True)
            nodes = [stack.enter_context(contextlib.closing(launcher.start("--local-share", "1.0")))
                     for launcher in (root, before)]  # fmt: skip
            results["mechanisms"]["recovery"] = ", ".join(
                f"{n.name}: {n.status()['governor']['mechanism']}" for n in nodes
            )
            plain = PlainChat(model, N_CPUS)
            stack.callback(plain.close)
            systems: dict[str, Any] = {NODE: nodes[0], PLAIN: plain, BEFORE: nodes[1], STEADY: nodes[0]}
            results["recovery"] = bench_recovery(systems, plain, args.rounds)
            for node in nodes:
                node.close()
            plain.close()
        if 2 in parts:
            print("share accuracy...", flush=True)
            results["share"] = bench_share(volunteer, root, args.share_seconds)
        if 3 in parts:
            print("backoff and release...", flush=True)
            launchers = {f"{NODE}, root": (root, "cgroup"), f"{NODE}, not root": (volunteer, "auto"),
                         f"{BEFORE}, root": (before, "cgroup")}  # fmt: skip
            results["backoff"] = bench_backoff(launchers, args.bursts)
    results["run_time_s"] = time.monotonic() - started
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
