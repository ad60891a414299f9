"""`dragon orchestrator` with a loop-lag probe added, for `loop_bench`: the same probe for this
change's orchestrator and for an older one, which has no monitor of its own.

    python -m bench.loop_probe orchestrator ...    # LOOP_PROBE_FILE=path: "monotonic lag_s" lines

It also times the garbage collector's passes, written to `LOOP_PROBE_FILE.gc` as
"monotonic generation seconds" lines: a pass stops the loop for as long as it runs.

Like `orchestrator.looplag`, it sleeps 20 ms and records how late it woke; it writes its samples
once a second (a few kB), with the system-wide monotonic clock, so the benchmark can take any
window of them (the join storm, the steady minute) after the run.

And it says where the loop was stuck: a thread looks every 50 ms, and when the probe has not
woken for `STUCK_S`, it writes the event loop thread's stack to `LOOP_PROBE_FILE.stuck`
(once per stretch, then again each second it lasts).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import traceback

from dragonswarm.cli import main

PERIOD_S = 0.02
STUCK_S = 0.2
_woke = [time.monotonic()]  # when the probe last woke (a list: the watchdog thread reads it)
_tasks: set[asyncio.Task[None]] = set()  # held, so the probe is not collected


async def probe(path: str) -> None:
    lines: list[str] = []
    flushed = time.monotonic()
    with open(path, "a") as f:
        while True:
            start = time.monotonic()
            await asyncio.sleep(PERIOD_S)
            now = _woke[0] = time.monotonic()
            lines.append(f"{now:.4f} {max(0.0, now - start - PERIOD_S):.5f}\n")
            if now - flushed >= 1.0:
                f.write("".join(lines))
                f.flush()
                lines.clear()
                flushed = now


def time_gc(path: str) -> None:
    """Record every collection's generation and duration (buffered, written about once a second)."""
    lines: list[str] = []
    state = {"start": 0.0, "flushed": time.monotonic()}
    out = open(path, "a")  # noqa: SIM115  # open for the process's life

    def callback(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            state["start"] = now
            return
        lines.append(f"{now:.4f} {info['generation']} {now - state['start']:.5f}\n")
        if now - state["flushed"] >= 1.0:
            out.write("".join(lines))
            out.flush()
            lines.clear()
            state["flushed"] = now

    gc.callbacks.append(callback)


def watch(path: str, loop_thread: int) -> None:
    """Write the loop thread's stack while the probe is `STUCK_S` late (a daemon thread)."""
    reported = 0.0
    with open(path, "a") as out:
        while True:
            time.sleep(0.05)
            now, woke = time.monotonic(), _woke[0]
            if now - woke < STUCK_S + PERIOD_S or now - reported < 1.0:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                continue
            reported = now
            out.write(f"--- {now:.4f} stuck {now - woke:.2f} s\n{''.join(traceback.format_stack(frame))}")
            out.flush()


def _start_with_probe(start: object, path: str) -> object:
    def patched(self: object) -> None:
        start(self)  # type: ignore[operator]
        _tasks.add(asyncio.get_running_loop().create_task(probe(path), name="loop-probe"))
        threading.Thread(target=watch, args=(path + ".stuck", threading.get_ident()), daemon=True).start()

    return patched


def _lifespan_class() -> type:
    """What the app's lifespan starts on the server's loop: `Housekeeping` now, `Swarm` before it."""
    try:
        from dragonswarm.orchestrator.housekeeping import Housekeeping

        return Housekeeping
    except ImportError:
        from dragonswarm.orchestrator.swarm import Swarm

        return Swarm


if __name__ == "__main__":
    cls = _lifespan_class()
    cls.start = _start_with_probe(cls.start, os.environ["LOOP_PROBE_FILE"])  # type: ignore[attr-defined]
    time_gc(os.environ["LOOP_PROBE_FILE"] + ".gc")
    sys.exit(main(sys.argv[1:]))
