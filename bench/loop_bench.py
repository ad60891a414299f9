"""The orchestrator's event loop under many nodes: a join storm, then steady heartbeats.

    .venv/bin/python -m bench.loop_bench [--nodes 10000]    # writes bench/results/loop.{json,md}

A real orchestrator process (TLS, its own store and keys) and N simulated nodes: each a
small client speaking the real node protocol over its own TLS WebSocket (`websockets`),
spread over a few load-generator processes. All N open their connections at once, say
hello with a model or two, read `welcome`, and heartbeat at the cadence it gives: a quiet
node (nothing runs there) every `idle_heartbeat_s`, and, like a real node, a WebSocket ping
every 2 of its periods to measure the round trip (`--no-pings` leaves them out).

Measured: time until all N are live (every node has read its welcome, then the
orchestrator's `GET /v1/nodes` shows all live), the orchestrator's loop lag (its own
monitor, p50 / p99 / max) over the join storm and over a steady minute after it, the
orchestrator's CPU, and the machine's load average before and after (other programs share
these cores; the generators run on uvloop, as the orchestrator does, so that their own TLS
takes less of them). The reference, in the same run: the orchestrator of the commit before
this change (`BEFORE_COMMIT`: uvicorn's own listener, which accepts every waiting connection
and starts every handshake at once, and the garbage collector's automatic middle passes),
from `git archive` with the same venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.outputs import save
from bench.swarm_procs import Orchestrator, Processes, start_orchestrator, wait_until

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
# The commit before this change: uvicorn's listener and the collector's automatic middle passes.
BEFORE_COMMIT = "4c9c5c4"
TARGETS = {"all_live_s": 30.0, "p99_ms": 50.0}
SHAS = ["1" * 64, "2" * 64]
PING_EVERY_BEATS = 2  # as `node.link`: a round trip every other heartbeat period


def raise_open_files(wanted: int) -> int:
    """Lift this process's open-file limit towards `wanted` (children inherit it); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- a simulated node ------------------------------------------------------------------------------------


def hello(name: str, version: int, i: int) -> str:
    # A model or two, as a volunteer's machine would have: every node the chat model, every other one a coder too.
    models = [{"name": "chat", "sha256": SHAS[0], "tags": ["chat"]}]
    if i % 2:
        models.append({"name": "coder", "sha256": SHAS[1], "tags": ["code"]})
    return json.dumps({"type": "hello", "v": version, "name": name, "models": models, "share": 0.25,
                       "local_share": 0.8, "cpus": 4, "ram_total": 16 << 30, "capacity": 1})  # fmt: skip


# A quiet node's heartbeat, about the size a real one has (figures, no GPU).
BEAT = json.dumps({"type": "heartbeat", "cpu_total": 0.12, "cpu_ours": 0.0, "owner_load": 0.12, "owner_busy": False,
                   "ram_available": 9 << 30, "share_in_force": 0.25, "local_busy": 0, "loaded": [], "running": [],
                   "net_sent_bps": 1234.5, "net_recv_bps": 2345.6, "net_link_bps": 125e6, "swarm_sent_bps": 160.0,
                   "swarm_recv_bps": 0.0, "swarm_sent_bytes": 123456, "swarm_recv_bytes": 2345, "rtt_ms": 0.4,
                   "net_busy": False, "cap_mechanism": "duty-cycle", "cap_reason": "", "threads": 1,
                   "gpu_owner_busy": False})  # fmt: skip


@dataclass
class GenStats:
    welcomed: list[float]  # monotonic time of each first welcome
    connects: int = 0
    failures: int = 0  # connection attempts that failed (refused, timed out, reset)
    drops: int = 0  # established connections the orchestrator closed
    beats: int = 0
    pings: int = 0
    last_error: str = ""


async def sim_node(name: str, i: int, cfg: dict[str, Any], ssl_ctx: Any, stats: GenStats, welcomed: Any,
                   stop: asyncio.Event) -> None:  # fmt: skip
    """One node: connect, hello, welcome, then heartbeats (and pings) until stopped; reconnect when dropped."""
    from websockets.asyncio.client import connect

    from dragonswarm.protocol.cadence import Cadence
    from dragonswarm.protocol.swarm import Heartbeat

    credential: str | None = None
    first = True
    quiet = Heartbeat.model_validate_json(BEAT)
    while not stop.is_set():
        headers = {"Authorization": f"Bearer {credential or cfg['key']}", "X-Dragon-Node": name}
        stats.connects += 1
        try:
            async with connect(cfg["url"], additional_headers=headers, ssl=ssl_ctx, open_timeout=300,
                               ping_interval=None, close_timeout=2, max_size=1 << 20) as ws:  # fmt: skip
                await ws.send(hello(name, cfg["version"], i))
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 300))
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"expected welcome, got {welcome.get('type')}")
                if welcome.get("credential") and cfg["version"] >= 4:  # kept, then confirmed, as a node does
                    await ws.send(json.dumps({"type": "confirm", "credential": welcome["credential"]}))
                credential = welcome.get("credential") or credential
                if first:
                    first = False
                    stats.welcomed.append(time.monotonic())
                    with welcomed.get_lock():
                        welcomed.value += 1
                # What the node's own loop does for a quiet node that changes nothing: the period its
                # welcome allows (the real node ticks each heartbeat_s and sends at the tick nearest it).
                cadence = Cadence(welcome["heartbeat_s"], welcome.get("idle_heartbeat_s"))
                period = cadence.period(quiet)
                # Pings as the node sends them: every 2 periods, a quiet node's own period since version 4.
                ping_period = period if cfg["version"] >= 4 else welcome["heartbeat_s"]
                ping_every = ping_period * PING_EVERY_BEATS if cfg["pings"] else None
                reader = asyncio.create_task(_drain(ws))
                try:
                    now = time.monotonic()
                    next_beat, next_ping = now, now + (ping_every or 0)
                    while not stop.is_set() and not reader.done():
                        now = time.monotonic()
                        if now >= next_beat:
                            await ws.send(BEAT)
                            stats.beats += 1
                            next_beat = now + period
                        if ping_every is not None and now >= next_ping:
                            await ws.ping()  # its pong is not awaited: the round trip is not what we measure
                            stats.pings += 1
                            next_ping = now + ping_every
                        wake = min(next_beat, next_ping) if ping_every is not None else next_beat
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), max(0.0, wake - time.monotonic()))
                finally:
                    reader.cancel()
                if not stop.is_set():
                    stats.drops += 1
        except Exception as exc:  # every failure is counted, and the node tries again as a real one would
            if stop.is_set():
                return
            stats.failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"[:200]
            await asyncio.sleep(1.0 + (i % 100) / 100)


async def _drain(ws: Any) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass  # an idle node is sent nothing but pings, which the library answers


def generator(index: int, names: list[tuple[str, int]], cfg: dict[str, Any], ready: Any, go: Any,
              stop_flag: Any, welcomed: Any, out: Any) -> None:  # fmt: skip
    """A load-generator process: its share of the nodes, all opened at `go`."""
    raise_open_files(len(names) + 256)
    os.nice(cfg["nice"])
    from dragonswarm.tls import client_context

    async def main() -> GenStats:
        ssl_ctx = client_context(Path(cfg["ca"]))
        stats = GenStats(welcomed=[])
        stop = asyncio.Event()
        ready.set()
        while not go.is_set():  # a busy wait of 10 ms steps: the start is the same instant for every process
            await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(sim_node(n, i, cfg, ssl_ctx, stats, welcomed, stop)) for n, i in names]
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        return stats

    # On uvloop, as the orchestrator: the generators stand for ten thousand other machines, and the
    # less of these cores their own TLS takes, the less it skews what the orchestrator is measured to do.
    from dragonswarm.web import eventloop

    stats = eventloop.run(main())
    out.put((index, stats.__dict__))


# --- one run ---------------------------------------------------------------------------------------------


def nodes_view(orch: Orchestrator, summary: bool = True) -> tuple[dict[str, Any], float]:
    """`GET /v1/nodes`: live and stale counts, the loop summary, and how long the call took. The
    summary (counts only) where the orchestrator has it; the whole list costs seconds at 10,000 nodes."""
    t0 = time.monotonic()
    r = httpx.get(orch.api + "/nodes", params={"summary": "true"} if summary else None, headers=orch.auth("admin"),
                  timeout=300, verify=orch.verify)  # fmt: skip
    took = time.monotonic() - t0
    r.raise_for_status()
    body = r.json()
    states: dict[str, int] = body.get("states") or {}
    for n in body.get("data", []):  # an orchestrator without the summary sends the list
        states[n["state"]] = states.get(n["state"], 0) + 1
    return {"states": states, "loop": body.get("loop"), "get_nodes_s": round(took, 3)}, took


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def run_variant(label: str, root: Path, src: Path, version: int, nodes: int, procs_n: int, steady_s: float,
                pings: bool, join_timeout: float, nice: int = 0) -> dict[str, Any]:  # fmt: skip
    print(f"[{label}] {nodes} nodes over {procs_n} processes", flush=True)
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {"label": label, "nodes": nodes, "generators": procs_n, "pings": pings}
    home = root / label.split()[0]
    probe_file = home / "loop-probe.txt"
    with Processes(home) as procs:
        env = {"PYTHONPATH": f"{src}{os.pathsep}{REPO}", "LOOP_PROBE_FILE": str(probe_file)}
        orch = start_orchestrator(procs, "orchestrator", env=env, module="bench.loop_probe")
        pid = orch.started.proc.pid
        key_ws = orch.url.replace("https://", "wss://") + "/v1/swarm"
        cfg = {"url": key_ws, "key": orch.keys["node"], "ca": str(orch.ca), "version": version, "pings": pings,
               "nice": nice}
        ready_events, go, stop_flag = [ctx.Event() for _ in range(procs_n)], ctx.Event(), ctx.Event()
        marks: dict[str, float] = {}
        welcomed = ctx.Value("i", 0)  # nodes that have read their first welcome, all generators together
        out = ctx.Queue()
        everyone = [(f"sim-{i:05d}", i) for i in range(nodes)]
        gens = [ctx.Process(target=generator, daemon=True,
                            args=(k, everyone[k::procs_n], cfg, ready_events[k], go, stop_flag, welcomed, out))
                for k in range(procs_n)]  # fmt: skip
        for g in gens:
            g.start()
        try:
            for e in ready_events:
                if not e.wait(120):
                    raise RuntimeError("a load generator did not start")
            time.sleep(2.0)  # the orchestrator's loop settles after start-up before the storm
            result["loadavg_before"] = os.getloadavg()
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            marks["t0"] = t0
            go.set()
            try:
                wait_until(lambda: welcomed.value >= nodes or procs.check_alive(), join_timeout,
                           f"{nodes} welcomes", interval=0.05)  # fmt: skip
                result["all_welcomed_s"] = round(time.monotonic() - t0, 2)
            except RuntimeError:
                result["all_welcomed_s"] = f"not within {join_timeout:.0f} s ({welcomed.value} welcomed)"
            print(f"[{label}] all welcomed after {result['all_welcomed_s']} s", flush=True)
            join_view: dict[str, Any] = {}

            def all_live() -> bool:
                view, _ = nodes_view(orch)
                join_view.update(view)
                return view["states"].get("live", 0) >= nodes

            # An orchestrator without the summary sends the whole list (seconds of its loop at 10,000 nodes).
            try:
                left = max(10.0, join_timeout - (time.monotonic() - t0))
                wait_until(all_live, left, f"{nodes} nodes live", interval=0.5 if version > 3 else 5.0)
                t_live = marks["live"] = time.monotonic() - join_view["get_nodes_s"]  # when the last call was asked
                result["all_live_s"] = round(t_live - t0, 2)
            except RuntimeError:  # not all live by the deadline: the steady phase shows whether it recovers
                marks["live"] = time.monotonic()
                result["all_live_s"] = f"not within {join_timeout:.0f} s ({join_view.get('states')})"
            join_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            result["join"] = join_view | {"orchestrator_cpu": round(join_cpu, 3)}
            print(f"[{label}] all live after {result['all_live_s']} s: {join_view}", flush=True)
            # A minute and a little: the monitor's window then holds only steady heartbeats.
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            marks["t1"] = t1
            time.sleep(steady_s)
            t2 = marks["t2"] = time.monotonic()
            steady_cpu = (cpu_seconds(pid) - cpu1) / (t2 - t1)
            view, _ = nodes_view(orch)
            result["steady"] = view | {"seconds": steady_s, "orchestrator_cpu": round(steady_cpu, 3),
                                       "get_full_list_s": nodes_view(orch, summary=False)[0]["get_nodes_s"]}
            result["loadavg_after"] = os.getloadavg()
            print(f"[{label}] steady: {result['steady']}", flush=True)
        except Exception as exc:  # a run that misses a deadline is reported with what it measured
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"[{label}] {result['error']}", flush=True)
            marks.setdefault("live", time.monotonic())
        finally:
            stop_flag.set()
            gen_stats = []
            with contextlib.suppress(Exception):
                for _ in gens:
                    gen_stats.append(out.get(timeout=60)[1])
            for g in gens:
                g.join(10)
                if g.is_alive():
                    g.kill()
        beats = sum(s["beats"] for s in gen_stats)
        result["clients"] = {
            "connects": sum(s["connects"] for s in gen_stats), "failures": sum(s["failures"] for s in gen_stats),
            "drops": sum(s["drops"] for s in gen_stats), "beats": beats, "pings": sum(s["pings"] for s in gen_stats),
            "last_errors": sorted({s["last_error"] for s in gen_stats if s["last_error"]})[:3],
        }  # fmt: skip
        # The probe's samples, in exactly the storm's window and the steady one.
        samples = [tuple(map(float, line.split())) for line in probe_file.read_text().splitlines() if line]
        result["probe"] = {"join": window(samples, marks["t0"], marks["live"])}
        # When in the storm the loop stalled past the target: (seconds after the start, lag ms).
        result["probe"]["join_stalls"] = [(round(when - marks["t0"], 2), round(lag * 1000))
                                          for when, lag in samples
                                          if marks["t0"] <= when <= marks["live"] and lag * 1000 > TARGETS["p99_ms"]]
        gc_file = probe_file.with_name(probe_file.name + ".gc")
        passes = [tuple(map(float, line.split())) for line in gc_file.read_text().splitlines() if line] \
            if gc_file.exists() else []  # fmt: skip
        result["gc"] = {"join": gc_window(passes, marks["t0"], marks["live"])}
        stuck_file = probe_file.with_name(probe_file.name + ".stuck")
        stuck = stuck_reports(stuck_file.read_text()) if stuck_file.exists() else []
        result["stuck"] = {"join": stuck_window(stuck, marks["t0"], marks["live"])}
        if "t2" in marks:
            result["probe"]["steady"] = window(samples, marks["t1"], marks["t2"])
            result["gc"]["steady"] = gc_window(passes, marks["t1"], marks["t2"])
            result["stuck"]["steady"] = stuck_window(stuck, marks["t1"], marks["t2"])
        times = sorted(t - marks["t0"] for s in gen_stats for t in s["welcomed"])
        if times:
            result["welcome_s"] = {q: round(times[min(len(times) - 1, int(len(times) * q / 100))], 2)
                                   for q in (50, 90, 99)} | {"max": round(times[-1], 2)}  # fmt: skip
    return result


def window(samples: list[tuple[float, ...]], start: float, end: float) -> dict[str, Any]:
    """Loop-lag p50 / p99 / max over the probe's samples between two monotonic times."""
    from dragonswarm.orchestrator.looplag import summarize

    return dict(summarize([lag for when, lag in samples if start <= when <= end], round(end - start, 1)))


def stuck_reports(text: str) -> list[tuple[float, str]]:
    """The probe's reports of a stuck loop (`loop_probe.watch`): when, and the innermost frame
    of ours in the loop thread's stack (or the innermost frame at all)."""
    out = []
    for block in text.split("--- ")[1:]:
        head, *lines = block.splitlines()
        frames = [ln.strip() for ln in lines if ln.startswith("  File ")]
        ours = [f for f in frames if "/dragonswarm/" in f and "loop_probe" not in f]
        where = (ours or frames or ["?"])[-1].replace("File ", "")
        out.append((float(head.split()[0]), where.split("/src/")[-1].split("/site-packages/")[-1]))
    return out


def stuck_window(reports: list[tuple[float, str]], start: float, end: float) -> list[tuple[str, int]]:
    """Where the loop was stuck between two monotonic times: the five most reported places."""
    counts: dict[str, int] = {}
    for when, where in reports:
        if start <= when <= end:
            counts[where] = counts.get(where, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:5]


def gc_window(passes: list[tuple[float, ...]], start: float, end: float) -> dict[str, Any]:
    """The garbage collector's passes between two monotonic times, by generation: how many,
    their time in all (s) and the longest (ms). Each pass held the event loop."""
    out: dict[str, Any] = {}
    for gen in (0, 1, 2):
        times = [t for when, g, t in passes if start <= when <= end and int(g) == gen]
        out[f"gen{gen}"] = {"passes": len(times), "total_s": round(sum(times), 3),
                            "max_ms": round(max(times, default=0.0) * 1000, 1)}  # fmt: skip
    return out


def identity_cost(n: int = 1000) -> dict[str, float]:
    """What a first join costs in the store, alone: the key lookup, the offer and the confirm."""
    from dragonswarm.store.sqlite import open_store

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp))
        key = store.create_key("node", "bench")[0]
        t0 = time.perf_counter()
        for i in range(n):
            store.find_key(key)
            credential = store.offer_identity(f"n{i}")
            assert credential is not None
            store.confirm_identity(f"n{i}", credential)
        per = (time.perf_counter() - t0) / n
        store.close()
    return {"per_first_join_ms": round(per * 1000, 3), "for_10000_s": round(per * 10_000, 2)}


def before_source(root: Path) -> Path:
    """The source tree of `BEFORE_COMMIT`, unpacked from `git archive` (no worktree to clean up)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_COMMIT, "src"], check=True,
                          capture_output=True).stdout  # fmt: skip
    target = root / "before"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def write_markdown(results: dict[str, Any], path: Path) -> None:
    pinging = ", with a ping every 2 heartbeat periods as real nodes send" if results["pings"] else ""
    lines = [
        "# Orchestrator loop lag under many nodes",
        "",
        f"{results['nodes']} simulated nodes (TLS WebSocket each, the real protocol) over {results['generators']} "
        f"load-generator processes (niceness {results.get('generator_nice', 0)}), all connecting at once; "
        f"then {results['steady_s']:.0f} s of heartbeats at the "
        f"cadence `welcome` gives{pinging}. "
        f"Machine: {results['machine']}. Source: {results['source']}, on the event loop "
        f"{results.get('event_loop', 'asyncio')}. Reference: the orchestrator of "
        f"{results['before_commit']}, same venv, same run. Loop lag: a probe in the orchestrator (20 ms sleeps), "
        "from connecting to all live, and over the steady phase; the same probe in both orchestrators "
        "(`bench/loop_probe.py`).",
        "",
        "| measure | " + " | ".join(r["label"] for r in results["runs"]) + " | target |",
        "|---|" + "---|" * len(results["runs"]) + "---|",
    ]  # fmt: skip

    def cell(r: dict[str, Any], path: str) -> str:
        value: Any = r
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                return "-"
            value = value[part]
        return str(value)

    rows = [
        ("all nodes have their welcome (s)", "all_welcomed_s", ""),
        ("all nodes live in `GET /v1/nodes` (s)", "all_live_s", f"≤ {TARGETS['all_live_s']:.0f} s"),
        ("join storm: loop lag p50 / p99 / max (ms)", "probe.join", f"p99 ≤ {TARGETS['p99_ms']:.0f} ms"),
        ("join storm: orchestrator CPU (cores)", "join.orchestrator_cpu", ""),
        ("steady: loop lag p50 / p99 / max (ms)", "probe.steady", f"p99 ≤ {TARGETS['p99_ms']:.0f} ms"),
        ("steady: the orchestrator's own monitor, last 60 s (`GET /v1/nodes`)", "steady.loop", ""),
        ("join storm: garbage collector, passes / total s / longest ms by generation", "gc.join", ""),
        ("steady: garbage collector, passes / total s / longest ms by generation", "gc.steady", ""),
        ("join storm: where the loop was stuck ≥ 0.2 s (innermost frame of ours, reports)", "stuck.join", ""),
        ("steady: where the loop was stuck ≥ 0.2 s", "stuck.steady", ""),
        ("steady: orchestrator CPU (cores)", "steady.orchestrator_cpu", ""),
        ("steady: node states", "steady.states", ""),
        ("`GET /v1/nodes` at the end: counts / the whole list (s)", "steady.get_nodes_s", ""),
        ("heartbeats / pings sent by all nodes", "clients", ""),
        ("load average before → after (1 min)", "loadavg", ""),
    ]
    for title, key, target in rows:
        cells = []
        for r in results["runs"]:
            if key.startswith("probe.") or key.endswith(".loop"):
                first, second = key.split(".")
                loop = r.get(first, {}).get(second)
                cells.append(f"{loop['p50_ms']:.1f} / **{loop['p99_ms']:.1f}** / {loop['max_ms']:.0f}" if loop else "-")
            elif key.startswith("gc."):
                passes = r.get("gc", {}).get(key.split(".")[1])
                cells.append(", ".join(f"{g}: {v['passes']} / {v['total_s']} / {v['max_ms']}"
                                       for g, v in passes.items()) if passes else "-")  # fmt: skip
            elif key.startswith("stuck."):
                places = r.get("stuck", {}).get(key.split(".")[1])
                cells.append("; ".join(f"`{where}` ×{n}" for where, n in places) if places else "none")
            elif key == "clients":
                c = r.get("clients", {})
                cells.append(f"{c.get('beats', 0):,} / {c.get('pings', 0):,} (failed connects {c.get('failures', 0)}, "
                             f"drops {c.get('drops', 0)})")  # fmt: skip
            elif key == "steady.get_nodes_s":
                st = r.get("steady", {})
                cells.append(f"{st.get('get_nodes_s', '-')} / {st.get('get_full_list_s', '-')}")
            elif key == "loadavg":
                before, after = r.get("loadavg_before"), r.get("loadavg_after")
                cells.append(f"{before[0]:.2f} → {after[0]:.2f}" if before and after else "-")
            else:
                cells.append(cell(r, key))
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {target} |")
    ident = results["identity"]
    lines += ["", f"A first join's store work alone (key lookup, credential offer and confirm; SQLite WAL): "
              f"{ident['per_first_join_ms']} ms, {ident['for_10000_s']} s for 10,000 nodes, off the event loop."]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"\n{r['label']}: {r['error']}")
    path.write_text("\n".join(lines) + "\n")


def event_loop_name() -> str:
    """The loop the orchestrators and the load generators run on (`web.eventloop`)."""
    from dragonswarm.web.eventloop import loop_factory

    if loop_factory() is None:
        return "asyncio"
    import uvloop

    return f"uvloop {uvloop.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--generators", type=int, default=4, help="load-generator processes")
    parser.add_argument("--steady-s", type=float, default=65.0)
    parser.add_argument("--join-timeout-s", type=float, default=300.0)
    parser.add_argument("--no-pings", action="store_true", help="nodes send no WebSocket pings")
    parser.add_argument("--generator-nice", type=int, default=0,
                        help="niceness of the load generators, which stand in for other machines")
    parser.add_argument("--no-reference", action="store_true", help=f"skip the orchestrator of {BEFORE_COMMIT}")
    parser.add_argument("--out", type=Path, default=RESULTS / "loop")
    args = parser.parse_args(argv)
    limit = raise_open_files(args.nodes + 4096)
    if limit < args.nodes + 256:
        sys.exit(f"the open-file limit is {limit}; {args.nodes} nodes need more")
    from dragonswarm.protocol.swarm import VERSION

    results: dict[str, Any] = {
        "nodes": args.nodes, "generators": args.generators, "steady_s": args.steady_s, "pings": not args.no_pings,
        "generator_nice": args.generator_nice,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        "source": git("describe", "--always", "--dirty"), "before_commit": git("rev-parse", BEFORE_COMMIT),
        "event_loop": event_loop_name(),
        "targets": TARGETS, "identity": identity_cost(), "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        root = Path(tmp)
        variants = [("this change", REPO / "src", VERSION)]
        if not args.no_reference:
            variants.append((f"before ({BEFORE_COMMIT})", before_source(root), VERSION))
        for label, src, version in variants:
            try:
                run = run_variant(label, root, src, version, args.nodes, args.generators, args.steady_s,
                                  not args.no_pings, args.join_timeout_s, args.generator_nice)  # fmt: skip
            except Exception as exc:  # the other variant still runs, and the failure is reported
                run = {"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"[{label}] failed: {run['error']}", flush=True)
            results["runs"].append(run)
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
