"""Many machines across two orchestrator replicas, and one replica killed.

    PYTHONPATH=src .venv/bin/python -m bench.replicas_bench [--nodes 2000]    # bench/results/replicas.{md,json}

A real Redis (started as `dragon up --replicas` starts it: loopback, a password, an
append-only file) and two real orchestrators on it, sharing one CA, each with the loop-lag
probe of `bench/loop_probe.py`. N simulated nodes (`bench/load_generator.py`: the real node
protocol, one TLS WebSocket each, from a few load-generator processes on the same cores) are
given both replicas' URLs, half of them replica A's first, half B's; on a lost link each
moves to the next URL after `node.link.reconnect_delay` (0.2 s), as a real node does.

Measured: the time until every node has its welcome, and until each replica sees all N live
(its own and the other's, `GET /v1/nodes?summary=true`); a steady phase (each replica's CPU
and loop lag, Redis's CPU, commands, network, memory and append-only file); then replica A
is killed (SIGKILL) and the time until every node is linked to B again, as the nodes see it
(their welcome) and as B publishes it in Redis (its node hash holds all N, all live), with
the reconnects and failed connects that took; and a steady phase with B alone. The machine's
load average is recorded before and after: other work shares these 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.load_generator import GenConfig, start_generators, totals
from bench.loop_bench import BEAT, hello, raise_open_files
from bench.outputs import save
from bench.replica_procs import (
    Replica,
    between,
    create_keys,
    git,
    loadavg,
    machine,
    probe_windows,
    read,
    redis_client,
    start_redis,
    start_replicas,
)
from bench.swarm_procs import Processes, wait_until
from dragonswarm.store import rediskeys as K

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"recovered_s": 10.0}


def seen_live(replica: Replica) -> int:
    """Nodes live in a replica's view: its own and those the other replica publishes."""
    r = httpx.get(replica.orch.api + "/nodes", params={"summary": "true"}, headers=replica.orch.auth("admin"),
                  timeout=60, verify=replica.orch.verify)  # fmt: skip
    r.raise_for_status()
    return int(r.json()["states"].get("live", 0))


def _sees(replica: Replica, n: int) -> bool:
    return seen_live(replica) >= n


def published(client: Any, replica: Replica, count_live: bool = False) -> int:
    """Nodes a replica publishes as held by it (HLEN), or of those the ones it calls live."""
    key = K.replica_nodes(replica.id)
    if not count_live:
        return int(client.hlen(key))
    return sum(1 for v in client.hvals(key) if orjson.loads(v)["live"])


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    def pick(q: int) -> float:
        return values[min(len(values) - 1, int(len(values) * q / 100))]

    return {"p50": round(pick(50), 2), "p90": round(pick(90), 2), "p99": round(pick(99), 2),
            "max": round(values[-1], 2), "n": len(values)}  # fmt: skip


def memory_per_node(client: Any, replicas: list[Replica], name: str) -> dict[str, Any]:
    """What Redis holds per node: its entry in its replica's published hash, its record and its identity."""
    out: dict[str, Any] = {}
    for r in replicas:
        key = K.replica_nodes(r.id)
        n = client.hlen(key)
        if n:
            out[f"published_hash_{r.name}"] = {"nodes": n, "bytes": client.memory_usage(key, samples=0),
                                               "bytes_per_node": round(client.memory_usage(key, samples=0) / n)}
            out["published_value_bytes"] = client.hstrlen(key, client.hkeys(key)[0])  # fmt: skip
    out["node_record_bytes"] = client.memory_usage(K.node(name), samples=0)
    out["identity_bytes"] = client.memory_usage(K.identity(name), samples=0)
    return out


def publish_cost(n: int = 1000) -> dict[str, float]:
    """What federation's publisher and reader cost per node, alone: building one local node's
    published entry (`federation.published`, done for every local node at each publish, twice
    a second), and reading one changed remote entry (JSON, then its hello and heartbeat validated)."""
    from dragonswarm.orchestrator.federation import published
    from dragonswarm.orchestrator.registry import NodeConn
    from dragonswarm.protocol.cadence import Cadence
    from dragonswarm.protocol.swarm import Heartbeat, Hello

    conns = []
    for i in range(n):
        conn = NodeConn(hello=Hello.model_validate_json(hello(f"sim-{i:05d}", 4, i)), send=lambda text: None,
                        close=lambda code, reason: None, cadence=Cadence(1.0, 5.0))  # fmt: skip
        conn.heartbeat = Heartbeat.model_validate_json(BEAT)
        conns.append(conn)
    t0 = time.perf_counter()
    values = [published(c, True, {}) for c in conns]
    t1 = time.perf_counter()
    for value in values:
        state = orjson.loads(value)
        Hello.model_validate(state["hello"])
        Heartbeat.model_validate(state["hb"])
    t2 = time.perf_counter()
    return {"publish_us_per_node": round((t1 - t0) / n * 1e6, 1), "read_us_per_node": round((t2 - t1) / n * 1e6, 1),
            "entry_bytes": len(values[0])}  # fmt: skip


def hgetall_ms(client: Any, replica: Replica) -> float:
    """One read of a replica's whole node hash, as every other replica makes when it first sees it and
    every 30 s (redis-py, decoded)."""
    t0 = time.perf_counter()
    client.hgetall(K.replica_nodes(replica.id))
    return round((time.perf_counter() - t0) * 1000, 1)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The run, its figures put in `result` as they come (a run that stops early keeps them)."""
    n = args.nodes
    result |= {"nodes": n, "generators": args.generators, "generator_nice": args.generator_nice}
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="replicas-bench-") as tmp, Processes(Path(tmp)) as procs:
        root = Path(tmp)
        redis = start_redis(root)
        gens = None
        try:
            keys, _ = create_keys(redis.url, root)
            a, b = start_replicas(procs, ["replica-a", "replica-b"], keys, redis.url)
        except BaseException:
            redis.stop()
            raise
        try:
            client = redis_client(redis.url)
            pids = {"replica-a": a.pid, "replica-b": b.pid, "redis": redis.process.pid}
            cfg = GenConfig(urls=[a.ws_url, b.ws_url], key=keys["node"], ca=str(a.orch.ca), nice=args.generator_nice)
            nodes = [(f"sim-{i:05d}", i, [i % 2, 1 - i % 2]) for i in range(n)]  # half try A first, half B
            gens = start_generators(nodes, cfg, args.generators)
            time.sleep(2.0)  # the replicas' loops settle after start-up
            result["loadavg_before"] = loadavg()
            r0 = read(pids, client)
            t0 = marks["t0"] = gens.start()
            wait_until(lambda: gens.connected(0) + gens.connected(1) >= n, args.join_timeout_s,
                       f"{n} nodes welcomed", interval=0.05)  # fmt: skip
            result["all_welcomed_s"] = round(time.monotonic() - t0, 2)
            print(f"all {n} welcomed after {result['all_welcomed_s']} s", flush=True)
            result["all_live_s"] = {}
            for r in (a, b):
                wait_until(functools.partial(_sees, r, n), args.join_timeout_s, f"{r.name} to see {n} live",
                           interval=0.25)  # fmt: skip
                result["all_live_s"][r.name] = round(time.monotonic() - t0, 2)
            marks["joined"] = time.monotonic()
            result["held"] = {"replica-a": gens.connected(0), "replica-b": gens.connected(1)}
            print(f"all live on both: {result['all_live_s']}, held {result['held']}", flush=True)
            r1 = read(pids, client)
            result["join"] = between(r0, r1)
            time.sleep(args.steady_s)
            marks["steady_end"] = time.monotonic()
            r2 = read(pids, client)
            result["steady"] = between(r1, r2)
            result["redis_memory"] = memory_per_node(client, [a, b], nodes[0][0])
            result["hgetall_ms"] = hgetall_ms(client, a)
            result["redis_memory"]["used_memory_before_nodes"] = r0.redis["used_memory"]
            result["redis_memory"]["used_memory_with_nodes"] = r2.redis["used_memory"]
            print(f"steady: {result['steady']}", flush=True)

            # Replica A dies at once: no goodbye to its nodes, its liveness key left to expire.
            t_kill = marks["kill"] = time.monotonic()
            os.kill(a.pid, signal.SIGKILL)
            a.orch.started.proc.wait()
            wait_until(lambda: gens.connected(1) >= n, args.recover_timeout_s, f"{n} nodes linked to B",
                       interval=0.02)  # fmt: skip
            result["recovered_s"] = round(time.monotonic() - t_kill, 2)
            wait_until(lambda: published(client, b) >= n, args.recover_timeout_s, f"B to publish {n} nodes",
                       interval=0.05)  # fmt: skip
            t_pub = time.monotonic()
            wait_until(lambda: published(client, b, count_live=True) >= n, args.recover_timeout_s,
                       f"B to publish {n} live nodes", interval=0.1)  # fmt: skip
            result["published_s"] = round(t_pub - t_kill, 2)
            result["published_live_s"] = round(time.monotonic() - t_kill, 2)
            marks["recovered"] = time.monotonic()
            print(f"recovered: linked {result['recovered_s']} s, published {result['published_s']} s", flush=True)
            r3 = read(pids, client)
            result["recovery"] = between(r2, r3)
            result["seen_live_by_b"] = seen_live(b)
            time.sleep(args.after_s)
            marks["after_end"] = time.monotonic()
            result["after"] = between(r3, read(pids, client))
        except Exception as exc:  # a run that misses a deadline is reported with what it measured
            result["error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(result["error"], flush=True)
        finally:
            result["loadavg_after"] = loadavg()
            stats = gens.stop() if gens is not None else []
            procs.close()  # the orchestrators first: they write to Redis until they stop
            redis.stop()
        result["clients"] = totals(stats)
        kill = marks.get("kill")
        if kill is not None:
            moved = [i for i in range(n) if i % 2 == 0]  # the nodes that started on A
            back = {}
            for s in stats:
                for t, i, url in s["welcomes"]:
                    if t > kill and url == 1 and i not in back:
                        back[i] = t - kill
            result["reconnect_s"] = quantiles([back[i] for i in moved if i in back])
            result["moved_nodes"] = len(moved)
            result["after_kill"] = {
                "connects": sum(1 for s in stats for t, _, _ in s["welcomes"] if t > kill),
                "lost_links": sum(1 for s in stats for t, _, _ in s["losses"] if t > kill),
            }  # fmt: skip
        result["connects_before_kill"] = sum(1 for s in stats for t, _, _ in s["welcomes"] if t <= (kill or 1e18))
        if "t0" not in marks:
            return
        windows = {"join": (marks["t0"], marks.get("joined", time.monotonic()))}
        if "steady_end" in marks:
            windows["steady"] = (marks["joined"], marks["steady_end"])
        probes = {"replica-a": probe_windows(a, windows)}
        if "recovered" in marks:
            windows |= {"recovery": (marks["kill"], marks["recovered"]),
                        "after": (marks["recovered"], marks.get("after_end", marks["recovered"]))}  # fmt: skip
        probes["replica-b"] = probe_windows(b, windows)
        result["probe"] = probes


def write_markdown(results: dict[str, Any], path: Path) -> None:
    r = results
    n = r["nodes"]

    def lag(name: str, phase: str) -> str:
        w = r["probe"].get(name, {}).get(phase)
        return f"{w['lag']['p50_ms']:.1f} / {w['lag']['p99_ms']:.1f} / {w['lag']['max_ms']:.0f}" if w else "-"

    def cores(phase: str, who: str) -> str:
        v = r.get(phase, {}).get("cpu_cores", {}).get(who)
        return "-" if v is None or v != v else f"{v:.2f}"

    def redis_row(phase: str) -> str:
        x = r.get(phase, {}).get("redis")
        if not x:
            return "-"
        return (f"{x['cpu_cores']:.3f} cores, {x['commands_per_s']:,.0f} commands/s, "
                f"in {x['in_bytes_per_s'] / 1e3:,.0f} kB/s, out {x['out_bytes_per_s'] / 1e3:,.0f} kB/s, "
                f"AOF +{x['aof_bytes_per_s'] / 1e3:,.0f} kB/s, "
                f"memory {x['used_memory'] / 2**20:.1f} MiB")  # fmt: skip

    c = r.get("clients", {})
    mem = r.get("redis_memory", {})
    rec = r.get("reconnect_s", {})
    lines = [
        "# Many machines across two replicas, one of them killed",
        "",
        f"{n} simulated nodes (`bench/load_generator.py`: the real protocol, one TLS WebSocket each) from "
        f"{r['generators']} load-generator processes at niceness {r['generator_nice']}, given both replicas' URLs "
        "(half A's first, half B's; a lost link moves to the next after 0.2 s, as `node/link.py`). Two "
        "orchestrators on one local Redis (loopback, password, append-only file, as `dragon up --replicas`), one CA. "
        f"**Every process shares the same 2 cores.** Machine: {r['machine']}. Source: {r['source']}. "
        f"Command: `{r['command']}`.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| all {n} welcomed (s) | {r.get('all_welcomed_s', '-')} | |",
        f"| all {n} live as each replica sees them, A / B (s) | "
        f"{' / '.join(str(v) for v in r.get('all_live_s', {}).values()) or '-'} | |",
        f"| nodes held by A / B | {r.get('held', {}).get('replica-a', '-')} / {r.get('held', {}).get('replica-b', '-')}"
        " | |",
        f"| **A killed → every node linked to B again** (the nodes' welcomes) | **{r.get('recovered_s', '-')} s** | "
        f"≤ {TARGETS['recovered_s']:.0f} s |",
        f"| A killed → B publishes all {n} in Redis / all of them live | {r.get('published_s', '-')} / "
        f"{r.get('published_live_s', '-')} s | |",
        f"| per moved node: kill → welcome on B, p50 / p90 / p99 / max (s), of {r.get('moved_nodes', '-')} | "
        f"{rec.get('p50', '-')} / {rec.get('p90', '-')} / {rec.get('p99', '-')} / {rec.get('max', '-')} | |",
        f"| connects after the kill / links lost / failed connects in the whole run | "
        f"{r.get('after_kill', {}).get('connects', '-')} / {r.get('after_kill', {}).get('lost_links', '-')} / "
        f"{c.get('failures', '-')} | |",
        f"| CPU (cores), join: A / B / Redis | {cores('join', 'replica-a')} / {cores('join', 'replica-b')} / "
        f"{cores('join', 'redis')} | |",
        f"| CPU (cores), steady {r.get('steady', {}).get('seconds', '-')} s: A / B / Redis | "
        f"{cores('steady', 'replica-a')} / {cores('steady', 'replica-b')} / {cores('steady', 'redis')} | |",
        f"| CPU (cores), recovery: B / Redis | {cores('recovery', 'replica-b')} / {cores('recovery', 'redis')} | |",
        f"| CPU (cores), B alone with all {n}, {r.get('after', {}).get('seconds', '-')} s: B / Redis | "
        f"{cores('after', 'replica-b')} / {cores('after', 'redis')} | |",
        f"| loop lag p50 / p99 / max (ms), join: A; B | {lag('replica-a', 'join')}; {lag('replica-b', 'join')} | |",
        f"| loop lag, steady: A; B | {lag('replica-a', 'steady')}; {lag('replica-b', 'steady')} | |",
        f"| loop lag, recovery; after: B | {lag('replica-b', 'recovery')}; {lag('replica-b', 'after')} | |",
        f"| Redis, steady (both replicas) | {redis_row('steady')} | |",
        f"| Redis, B alone | {redis_row('after')} | |",
        f"| Redis memory: before the nodes → with them | {mem.get('used_memory_before_nodes', 0) / 2**20:.1f} → "
        f"{mem.get('used_memory_with_nodes', 0) / 2**20:.1f} MiB | |",
        f"| Redis memory per node: published entry (value bytes) / node record / identity | "
        f"{mem.get('published_hash_replica-a', {}).get('bytes_per_node', '-')} B "
        f"({mem.get('published_value_bytes', '-')} B) / {mem.get('node_record_bytes', '-')} B / "
        f"{mem.get('identity_bytes', '-')} B | |",
        f"| one read of A's whole node hash (HGETALL, {r.get('held', {}).get('replica-a', '-')} nodes; each replica "
        f"reads every other's when it first sees it and every 30 s) | {r.get('hgetall_ms', '-')} ms | |",
        f"| federation per node, alone: publishing a changed local node / reading a changed remote "
        f"one | {r['publish_cost']['publish_us_per_node']} / {r['publish_cost']['read_us_per_node']} µs | |",
        f"| heartbeats / pings sent by all nodes | {c.get('beats', 0):,} / {c.get('pings', 0):,} | |",
        f"| load average (1 min) before → after | {r.get('loadavg_before', ['-'])[0]} → "
        f"{r.get('loadavg_after', ['-'])[0]} | |",
    ]  # fmt: skip
    steady_calls = r.get("steady", {}).get("redis", {}).get("calls_per_s", {})
    if steady_calls:
        lines += ["", "Redis commands per second, steady phase: " +
                  ", ".join(f"{k} {v:,.0f}" for k, v in list(steady_calls.items())[:8]) + "."]  # fmt: skip
    if r.get("error"):
        lines += ["", f"The run stopped early: {r['error']}"]
    if c.get("last_errors"):
        lines += ["", "Last connection errors seen by the nodes: " + "; ".join(f"`{e}`" for e in c["last_errors"])]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes")
    parser.add_argument("--generator-nice", type=int, default=0)
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--after-s", type=float, default=20.0)
    parser.add_argument("--join-timeout-s", type=float, default=180.0)
    parser.add_argument("--recover-timeout-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas")
    args = parser.parse_args(argv)
    limit = raise_open_files(args.nodes * 2 + 4096)
    if limit < args.nodes * 2 + 256:
        raise SystemExit(f"the open-file limit is {limit}; {args.nodes} nodes need more")
    results: dict[str, Any] = {"machine": machine(), "source": git("describe", "--always", "--dirty"),
                               "command": " ".join(["python -m bench.replicas_bench", *(argv or sys.argv[1:])]),
                               "targets": TARGETS, "publish_cost": publish_cost()}  # fmt: skip
    run(args, results)
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
