"""The node's side of a runner: start, supervise, talk to and stop one child process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import orjson

from dragonswarm.errors import RunnerFailed
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.runner import RunJob, RunnerStatus, SetThreads, decode, encode

log = logging.getLogger("dragonswarm.runner")

LOAD_TIMEOUT_S = 120.0
CANCEL_TIMEOUT_S = 5.0


class RunnerProcess:
    """One model loaded in one child process, running up to `parallel` jobs at once.

    Events for each job arrive on its own queue. If the process dies, every job it
    held gets an `error` event with code `runner_failed`; the node lives on.
    """

    def __init__(self, model_name: str, model_path: Path, n_ctx: int, threads: int, log_path: Path,
                 stats: Counter[str], gpu_budget: int | None = None, env: dict[str, str] | None = None,
                 on_threads: Callable[[int, int], None] | None = None, parallel: int = 1):  # fmt: skip
        self.model_name = model_name
        self.model_path = model_path
        self.n_ctx = n_ctx  # per sequence
        self.parallel = parallel  # sequences decoded together (continuous batching)
        self.threads = threads  # the count last asked for
        self.threads_in_force = threads  # ... and the count the runner last said it computes with
        self.gpu_budget = gpu_budget  # bytes of video memory the model may fill; None: no GPU
        self.env = env  # None: the node's own
        self.on_threads = on_threads  # told (pid, threads) when the runner changes its thread count
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._jobs: dict[str, asyncio.Queue[Event]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[RunnerStatus] | None = None
        self.exited = asyncio.Event()
        self.stopping = False
        self.stats = stats  # the model's counters, kept across runner restarts

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    async def start(self, on_spawn: Callable[[int], None] | None = None) -> None:
        """Spawn the child and wait until the model is loaded."""
        config = {"model_path": str(self.model_path), "n_ctx": self.n_ctx, "threads": self.threads,
                  "gpu_budget": self.gpu_budget, "parallel": self.parallel}  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dragonswarm.engines.runner_main", orjson.dumps(config).decode(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                limit=1 << 20, env=self.env,
            )  # fmt: skip
        if on_spawn:
            on_spawn(self.proc.pid)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name=f"runner-{self.model_name}")
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), LOAD_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise RunnerFailed(f"model {self.model_name!r} did not load within {LOAD_TIMEOUT_S:.0f} s") from None
        if ready.get("ev") != "ready":
            await self.stop()
            raise RunnerFailed(f"model {self.model_name!r}: {ready.get('message', 'runner exited while loading')}")
        self.info = dict(ready)

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            async for line in self.proc.stdout:
                message: Event | RunnerStatus = decode(line)
                kind = message.get("ev")
                if kind in ("ready", "fatal", "threads"):
                    self._status(cast(RunnerStatus, message))
                    continue
                event = cast(Event, message)
                if kind in ("done", "error"):
                    self._count(event)
                queue = self._jobs.get(event.get("id", ""))
                if queue is not None:
                    queue.put_nowait(event)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("runner %s sent an unreadable message: %s", self.model_name, exc)
        finally:
            await self._on_exit()

    def _status(self, status: RunnerStatus) -> None:
        if status.get("ev") == "threads":
            self.threads_in_force = int(status.get("n", 0))
            if self.on_threads and self.pid is not None:
                self.on_threads(self.pid, self.threads_in_force)
        elif self._ready and not self._ready.done():
            self._ready.set_result(status)

    async def _on_exit(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await self.proc.wait() if self.proc else None
        self.exited.set()
        if self._ready and not self._ready.done():
            self._ready.set_result({"ev": "fatal", "message": f"runner exited with code {code} while loading"})
        if not self.stopping:
            log.warning("runner for %s exited unexpectedly (code %s)", self.model_name, code)
        for job_id, queue in list(self._jobs.items()):
            event: Event = {"ev": "error", "id": job_id, "code": "runner_failed",
                            "message": f"the runner for model {self.model_name!r} stopped (exit code {code}); "
                                       "retry the request"}  # fmt: skip
            self._count(event)
            queue.put_nowait(event)

    def _count(self, event: Event) -> None:
        if event.get("ev") == "error":
            self.stats["failed"] += 1
            return
        self.stats["tokens"] += event.get("completion_tokens", 0)
        self.stats["cancelled" if event.get("finish_reason") == "cancelled" else "completed"] += 1

    def set_threads(self, n: int) -> None:
        """Tell the runner the thread count in force; it changes between two tokens, also mid-job."""
        if n == self.threads or self.proc is None or self.exited.is_set() or not self.proc.stdin:
            return
        self.threads = n
        # Also while the model loads: the runner reads it once it is ready.
        self.proc.stdin.write(encode(SetThreads(op="threads", n=n)))

    def _send(self, message: dict[str, Any] | RunJob | SetThreads) -> None:
        if not self.alive or not self.proc or not self.proc.stdin:
            raise RunnerFailed(f"the runner for model {self.model_name!r} is not running")
        self.proc.stdin.write(encode(message))

    async def run(self, job: RunJob, stall_s: float, deadline: float) -> AsyncIterator[Event]:
        """Run a job; yields its events up to and including `done` or `error`.

        A runner that sends nothing for `stall_s` (it reports progress while it reads a
        prompt) is hung: the job ends with `runner_stalled` and the runner is killed (its
        supervisor starts it again). At `deadline` (monotonic) the job is cancelled and
        ends with `timeout`. Leaving early (client gone, task cancelled) cancels the job
        in the runner and waits until the runner confirms, so its sequence is free before
        the caller lets another job in.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job_id = job["id"]
        self._jobs[job_id] = queue
        finished = False
        try:
            self._send(job)
            while True:
                left = deadline - time.monotonic()
                try:
                    # Not `wait_for`: on Python 3.11 it loses a cancel that lands as an event arrives
                    # (it returns the event instead), and a client gone would leave the job running.
                    async with asyncio.timeout(max(0.0, min(stall_s, left))):
                        event = await queue.get()
                except TimeoutError:
                    if left <= stall_s:
                        break  # the deadline: cancelled below like any job left early
                    log.error("runner for %s made no progress for %.0f s; restarting it", self.model_name, stall_s)
                    finished = True
                    await self.kill()
                    yield {"ev": "error", "id": job_id, "code": "runner_stalled",
                           "message": f"the model made no progress for {stall_s:.0f} s"}  # fmt: skip
                    return
                finished = event.get("ev") in ("done", "error")
                yield event
                if finished:
                    return
            yield {"ev": "error", "id": job_id, "code": "timeout", "message": "the request ran out of time"}
        finally:
            if not finished:
                await asyncio.shield(self._cancel(job_id, queue))
            self._jobs.pop(job_id, None)

    async def _cancel(self, job_id: str, queue: asyncio.Queue[Event]) -> None:
        try:
            self._send({"op": "cancel", "id": job_id})
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                while (await queue.get()).get("ev") not in ("done", "error"):
                    pass
        except RunnerFailed:
            return
        except TimeoutError:
            log.error("runner for %s ignored a cancel; killing it", self.model_name)
            await self.stop()

    async def kill(self) -> None:
        """End a hung child now (SIGKILL also ends a stopped one); its supervisor restarts it."""
        if self.proc is not None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.exited.wait()

    async def stop(self) -> None:
        """Ask the child to exit, then make sure it has."""
        self.stopping = True
        if self.proc is None or self.exited.is_set():
            return
        with contextlib.suppress(RunnerFailed, ConnectionError):
            self._send({"op": "exit"})
        try:
            await asyncio.wait_for(self.exited.wait(), 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.exited.wait()
