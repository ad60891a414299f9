"""The event loop a server runs on: uvloop where it is installed, the standard one elsewhere.

uvloop (libuv, with TLS and transports in C; `uvicorn[standard]` installs it on Linux and
macOS, it does not exist for Windows) serves the same asyncio programs at a fraction of the
CPU: at ten thousand node connections the standard loop's TLS, written in Python, was a
third of the orchestrator's work. `DRAGON_EVENT_LOOP=asyncio` keeps the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, or None for asyncio's own (no uvloop here, or it was asked for)."""
    if os.environ.get("DRAGON_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
