"""The orchestrators alone under many users: every user streaming at once, each with its own key.

    PYTHONPATH=src .venv/bin/python -m bench.users_bench [--users 1000]    # bench/results/users.{md,json}

The workers are simulated (`bench/load_generator.py`): real node connections (TLS WebSocket,
the real protocol) that answer `run` with a fixed text at a fixed rate, one token per `text`
event, so that what is measured is the orchestrators' work, not a model's. The users are
`--users` asyncio clients (httpx, one connection each) in a few client processes, each user
with its own key, streaming `/v1/completions` back to back for `--duration-s`: all of them
start at the same instant, then each sends its next request after a pause of 0 to 2 × `--think-s`
(without it they would stay in step, one burst of all of them after another).

Variants, each in turn on the same machine, with the same users, workers and load:

- `one`: the reference, one orchestrator without Redis (its own SQLite file), every worker
  and every user on it;
- `split`: two replicas on one Redis (as `dragon up --replicas 2`), half the workers and half
  the users on each; a request runs on whichever worker placement picks, on either replica;
- `local` / `cross` (for the costs in `docs/scale.md`): two replicas, every user on A, every
  worker on A (no work crosses) or on B (all of it crosses through Redis).

Measured per variant: requests served, refused whole (429 with `Retry-After`) and failed
(anything else, or a stream that did not end with all its tokens and `[DONE]`); time to first
token p50 / p99 (the first round, when every user arrives at once, and after it); each
orchestrator's CPU and loop lag, Redis's CPU, commands and bytes; the token events relayed.
The time the replicas add is `split`'s time to first token minus `one`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.load_generator import MODEL, GenConfig, start_generators, totals
from bench.loop_bench import raise_open_files
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
from bench.stream_client import FIRST_TEXT, StreamClient
from bench.swarm_procs import Processes, wait_until
from bench.users_report import summarize, write_markdown

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"errors": 0, "p99_added_ms": 100.0}
# variant -> (replicas, the replica each worker joins, the replica each user calls), by index
def _first(i: int) -> int:
    return 0


def _second(i: int) -> int:
    return 1


def _alternate(i: int) -> int:
    return i % 2


LAYOUTS: dict[str, tuple[int, Callable[[int], int], Callable[[int], int]]] = {
    "one": (1, _first, _first),
    "split": (2, _alternate, _alternate),
    "local": (2, _first, _first),
    "cross": (2, _second, _first),
}

# --- the users -------------------------------------------------------------------------------------------

# One request, as the client saw it: user, replica called, sent, first token, end (monotonic
# seconds), HTTP status, Retry-After, the nodes header, tokens received, ended with [DONE], error.
Row = tuple[int, int, float, float, float, int, str, str, int, bool, str]


def _row(user: int, replica: int, sent: float, status: int, headers: dict[str, str], body: bytes,
         first: float) -> Row:  # fmt: skip
    """What one answer came to, parsed after it ended."""
    got = body.count(b'"text":"') - body.count(b'"text":""')
    at = body.find(b'"error"')
    error = body[max(0, at):][:300].decode(errors="replace") if status != 200 or at >= 0 else ""
    done = body.rstrip().endswith(b"[DONE]")
    if not done and not error:
        error = "ended without [DONE], last: " + body[-200:].decode(errors="replace")
    return (user, replica, sent, first, time.monotonic(), status, headers.get("retry-after", ""),
            headers.get("x-dragon-nodes", ""), got, done, error)  # fmt: skip


async def _lean(client: StreamClient, key: str, user: int, replica: int, body: dict[str, Any]) -> Row:
    sent = time.monotonic()
    try:
        answer = await client.post(body, key)
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
        await client.close()
        return (user, replica, sent, 0.0, time.monotonic(), 0, "", "", 0, False, f"{type(exc).__name__}: {exc}"[:200])
    return _row(user, replica, sent, answer.status, answer.headers, answer.body, answer.first)


async def _httpx(client: httpx.AsyncClient, url: str, key: str, user: int, replica: int, body: dict[str, Any]) -> Row:
    sent = time.monotonic()
    first = 0.0
    try:
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            chunks = []
            async for chunk in response.aiter_raw():  # only received and time-stamped while it streams
                if not first and FIRST_TEXT.search(chunk):
                    first = time.monotonic()
                chunks.append(chunk)
            return _row(user, replica, sent, response.status_code, dict(response.headers), b"".join(chunks), first)
    except httpx.HTTPError as exc:
        return (user, replica, sent, 0.0, time.monotonic(), 0, "", "", 0, False, f"{type(exc).__name__}: {exc}"[:200])


async def _user(user: int, key: str, url: str, replica: int, verify: ssl.SSLContext, cfg: dict[str, Any]
                ) -> list[Row]:  # fmt: skip
    """One user: its own connection, one streamed request after another until the run's end."""
    rows: list[Row] = []
    lean = StreamClient(url, verify)
    async with httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120, connect=60),
                                 limits=httpx.Limits(max_connections=1)) as client:  # fmt: skip
        end = cfg["start"] + cfg["duration_s"]
        k = 0
        while not rows or time.monotonic() < end:
            body = {"model": MODEL, "prompt": f"user {user}, request {k}: say something", "max_tokens": cfg["tokens"],
                    "stream": True}  # fmt: skip
            if cfg["client"] == "httpx":
                row = await _httpx(client, url, key, user, replica, body)
            else:
                row = await _lean(lean, key, user, replica, body)
            rows.append(row)
            k += 1
            if row[5] == 429 and row[6]:  # refused whole: come back when it says
                await asyncio.sleep(min(float(row[6]), 5.0))
            elif row[10] and row[5] != 200:
                await asyncio.sleep(0.5)
            else:  # a user reads the answer a moment: without it, all of them would stay in step, wave after wave
                await asyncio.sleep(random.uniform(0, 2 * cfg["think_s"]))
    await lean.close()
    return rows


def client_process(users: list[tuple[int, str, int]], urls: list[str], ca: str, cfg: dict[str, Any], ready: Any,
                   go: Any, start: Any, out: Any) -> None:  # fmt: skip
    """A client process: its share of the users, all starting at `go`."""
    raise_open_files(len(users) * 2 + 256)
    os.nice(cfg["nice"])

    async def main() -> list[Row]:
        verify = ssl.create_default_context(cafile=ca)  # one context: loading the CA once, not per user
        ready.set()
        while not go.is_set():
            await asyncio.sleep(0.005)
        cfg["start"] = start.value
        cpu = sum(os.times()[:2])
        batches = await asyncio.gather(*(_user(u, key, urls[r], r, verify, cfg) for u, key, r in users))
        cpu_s.append(sum(os.times()[:2]) - cpu)
        return [row for rows in batches for row in rows]

    cpu_s: list[float] = []
    rows = asyncio.run(main())
    out.put((rows, cpu_s[0]))


def run_users(users: list[tuple[int, str, int]], urls: list[str], ca: str, cfg: dict[str, Any], processes: int,
              on_start: Any) -> tuple[list[Row], float, float]:  # fmt: skip
    """Every user in `processes` client processes; (the rows, their CPU seconds from the start, the start time)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(processes)]
    go, out, start = ctx.Event(), ctx.Queue(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=client_process, daemon=True,
                         args=(users[k::processes], urls, ca, cfg, ready[k], go, start, out))
             for k in range(processes)]  # fmt: skip
    for p in procs:
        p.start()
    for e in ready:
        if not e.wait(120):
            raise RuntimeError("a client process did not start")
    on_start()
    start.value = t0 = time.monotonic()
    go.set()
    rows: list[Row] = []
    cpu = 0.0
    for _ in procs:
        got, cpu_s = out.get(timeout=cfg["duration_s"] + 600)
        rows += got
        cpu += cpu_s
    for p in procs:
        p.join(30)
    return rows, cpu, t0


# --- one variant -----------------------------------------------------------------------------------------


def run_variant(label: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n_replicas, worker_at, user_at = LAYOUTS[label]
    print(f"[{label}] {args.users} users, {args.workers} workers, {n_replicas} orchestrator(s)", flush=True)
    result: dict[str, Any] = {"label": label, "replicas": n_replicas}
    home = root / label
    with Processes(home) as procs:
        redis = start_redis(home) if n_replicas > 1 else None
        gens = None
        try:
            names = ["replica-a", "replica-b"][:n_replicas] if redis else ["orchestrator"]
            keys, user_keys = create_keys(redis.url if redis else None, home / names[0], args.users)
            reps = start_replicas(procs, names, keys, redis.url if redis else None)
            client = redis_client(redis.url) if redis else None
            cfg = GenConfig(urls=[r.ws_url for r in reps], key=keys["node"], ca=str(reps[0].orch.ca), serve=True,
                            tokens=args.tokens, rate=args.rate, first_token_s=args.first_token_ms / 1000,
                            capacity=args.capacity, nice=args.nice)  # fmt: skip
            held = [worker_at(i) for i in range(args.workers)]
            workers = [(f"w{held[i]}-{i:04d}", i, [held[i], *[k for k in range(n_replicas) if k != held[i]]])
                       for i in range(args.workers)]  # fmt: skip
            gens = start_generators(workers, cfg, args.generators)
            gens.start()
            wait_until(lambda: sum(gens.connected(k) for k in range(n_replicas)) >= args.workers, 300,
                       f"{args.workers} workers linked", interval=0.1)  # fmt: skip
            for r in reps:
                wait_until(functools.partial(_sees, r, args.workers), 120, f"{r.name} to see every worker",
                           interval=0.25)  # fmt: skip
            result["workers_held"] = [gens.connected(k) for k in range(n_replicas)]
            time.sleep(args.settle_s)  # the join storm's garbage and freezes are over
            pids = {r.name: r.pid for r in reps} | ({"redis": redis.process.pid} if redis else {}) | \
                {f"generator-{k}": p.pid for k, p in enumerate(gens.procs)}  # fmt: skip
            before: dict[str, Any] = {}

            def at_start() -> None:
                result["loadavg_before"] = loadavg()
                before["reading"] = read(pids, client)

            users = [(u, user_keys[u], user_at(u)) for u in range(args.users)]
            ucfg = {"duration_s": args.duration_s, "tokens": args.tokens, "think_s": args.think_s,
                    "client": args.client, "nice": args.nice}  # fmt: skip
            rows, client_cpu, t0 = run_users(users, [r.orch.api + "/completions" for r in reps], str(reps[0].orch.ca),
                                              ucfg, args.client_procs, at_start)  # fmt: skip
            t1 = time.monotonic()
            result["load"] = load = between(before["reading"], read(pids, client))
            cores = load["cpu_cores"]
            cores["generators"] = round(sum(cores.pop(k) for k in list(cores) if k.startswith("generator-")), 3)
            cores["clients"] = round(client_cpu / load["seconds"], 3)
            result["loadavg_after"] = loadavg()
            result["window"] = [t0, t1]
            result["rows"] = rows
            result["probe"] = {r.name: probe_windows(r, {"load": (t0, t1)})["load"] for r in reps}
            procs.check_alive()
        finally:
            stats = gens.stop() if gens is not None else []
            procs.close()  # the orchestrators first: they write to Redis until they stop
            if redis is not None:
                redis.stop()
            if args.logs:  # the processes' logs, kept for a run worth reading
                shutil.copytree(home / "logs", args.logs / label, dirs_exist_ok=True)
        result["workers"] = totals(stats)
    return result


def _sees(replica: Replica, n: int) -> bool:
    return _live(replica) >= n


def _live(replica: Replica) -> int:
    r = httpx.get(replica.orch.api + "/nodes", params={"summary": "true"}, headers=replica.orch.auth("admin"),
                  timeout=60, verify=replica.orch.verify)  # fmt: skip
    r.raise_for_status()
    return int(r.json()["states"].get("live", 0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, help="simulated workers (default: as many as users)")
    parser.add_argument("--capacity", type=int, default=1, help="fragments each worker runs at once")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each answer")
    parser.add_argument("--rate", type=float, default=4.0, help="tokens per second of each answer")
    parser.add_argument("--first-token-ms", type=float, default=50.0, help="a worker's run -> first token")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--think-s", type=float, default=0.5, help="mean pause between a user's requests")
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--variants", default="one,split", help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--client", choices=("lean", "httpx"), default="lean",
                        help="the users' HTTP client: bench/stream_client.py, or httpx (about twice its CPU)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the client and worker processes, which "
                        "stand in for other machines")
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "users")
    parser.add_argument("--logs", type=Path, help="keep each variant's process logs in this folder")
    args = parser.parse_args(argv)
    args.workers = args.workers or args.users
    limit = raise_open_files((args.users + args.workers) * 3 + 4096)
    if limit < (args.users + args.workers) * 2:
        raise SystemExit(f"the open-file limit is {limit}: too low for {args.users} users")
    results: dict[str, Any] = {
        "machine": machine(), "source": git("describe", "--always", "--dirty"), "targets": TARGETS,
        "command": " ".join(["python -m bench.users_bench", *(argv if argv is not None else sys.argv[1:])]),
        "users": args.users, "workers": args.workers, "capacity": args.capacity, "tokens": args.tokens,
        "rate": args.rate, "think_s": args.think_s, "first_token_ms": args.first_token_ms,
        "duration_s": args.duration_s, "client_procs": args.client_procs, "client": args.client, "nice": args.nice,
        "generators": args.generators, "variants": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="users-bench-") as tmp:
        for label in args.variants.split(","):
            try:
                raw = run_variant(label, Path(tmp), args)
            except Exception as exc:  # the other variants still run, and the failure is reported
                raw = {"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"[{label}] failed: {raw['error']}", flush=True)
            results["variants"][label] = summarize(raw)
            print(f"[{label}] {results['variants'][label].get('summary', '')}", flush=True)
    save(results, args.out, write_markdown)


if __name__ == "__main__":
    main()
