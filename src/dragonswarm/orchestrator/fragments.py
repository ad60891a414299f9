"""A request in flight and its fragments: what was asked, where it runs, what came back."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from dragonswarm.orchestrator.registry import NodeConn
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.runner import Generation
from dragonswarm.protocol.swarm import JobEvent, RunFragment
from dragonswarm.scheduler.affinity import prefix_keys

# The longest text one token may stand for: llama.cpp vocabularies hold pieces of a few
# dozen characters at most (runs of spaces or dashes); this leaves a wide margin.
MAX_TOKEN_CHARS = 256
# Progress events (model loading, prompt reading) keep a worker from being taken for hung;
# a runner sends about one a second. More than this many, on average, is a flood.
PROGRESS_PER_S = 2.0
PROGRESS_BURST = 8


@dataclass(eq=False)
class Request:
    """One client request: its fragments and the single stream their events merge into."""

    user: str
    model: str
    origin: str | None  # the node that handed the request over, if any
    # The model file every fragment runs on, fixed at the first placement: nodes with
    # another file under the same name would give another answer.
    sha256: str | None = None
    out: asyncio.Queue[tuple[int, Event]] = field(default_factory=asyncio.Queue)
    fragments: list[Fragment] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # every node that worked on it, in order
    first_nodes: list[str] = field(default_factory=list)  # each fragment's first node
    closed: bool = False

    def route(self) -> dict[str, object]:
        return {"nodes": list(self.nodes), "fragments": len(self.fragments)}


@dataclass(eq=False)
class Fragment:
    """One unit of work (a prompt and a choice) that runs on one worker at a time."""

    request: Request
    index: int  # the choice index in the response
    gen: Generation
    deadline: float  # monotonic: the request's overall cap, whatever progress it makes
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    attempt: int = 0
    free_attempts: int = 0  # ... of which moved on for want of context: no failure of the worker
    node: NodeConn | None = None
    exclude: set[str] = field(default_factory=set)  # nodes that failed it (or handed it over)
    # The answer so far, token by token, as streamed to the client over every attempt: a
    # failover continues from these ids, and the usage counted is their number.
    ids: list[int] = field(default_factory=list)
    base_tokens: int = 0  # ... of which attempts before the current one streamed
    prompt_tokens: int | None = None
    cached_tokens: int = 0  # ... of which the current worker took from its KV cache
    min_ctx: int = 0  # the context a worker needs for it (prompt + max_tokens), once a worker has read the prompt
    placed: float = field(default_factory=time.monotonic)  # when the current attempt was placed
    last_progress: float = field(default_factory=time.monotonic)  # ... and when it last made progress
    progress_events: int = 0  # ... of this attempt: bounded by the time since it was placed
    orphaned_since: float | None = None  # queued while no connected node serves its model
    finished: bool = False
    keys: list[bytes] = field(init=False)  # its prompt's prefixes, for cache affinity

    def __post_init__(self) -> None:
        self.keys = prefix_keys(self.gen)

    @property
    def job_id(self) -> str:
        """The id of the current attempt: a fresh one per worker, so a slow old worker's
        late events can never be mistaken for the new worker's."""
        return f"{self.id}-{self.attempt}"

    @property
    def tokens(self) -> int:
        """Completion tokens streamed so far, over every attempt."""
        return len(self.ids)

    def remaining_tokens(self) -> int:
        return self.gen.max_tokens - self.tokens

    def placed_on(self, node: NodeConn, now: float) -> None:
        self.node = node
        self.placed = self.last_progress = now
        self.progress_events = 0

    def next_attempt(self) -> None:
        """The current worker failed: the next one continues after what was streamed."""
        self.node = None
        self.attempt += 1
        self.base_tokens = self.tokens

    def overrun(self, ev: JobEvent, now: float) -> str | None:
        """Why an event is more than this attempt may send, if it is: more tokens than its
        max_tokens, text events without their tokens or with more text than those tokens
        can be, or progress events faster than a worker reads a prompt. A worker's events
        are thus bounded by the work asked of it, not by how fast it can send them: no
        node can make the orchestrator handle (or a request keep, for failover) more."""
        asked = self.gen.max_tokens - self.base_tokens
        if ev.ev == "progress":
            self.progress_events += 1
            if self.progress_events > PROGRESS_BURST + (now - self.placed) * PROGRESS_PER_S:
                return f"job {ev.job}: {self.progress_events} progress events in {now - self.placed:.0f} s"
            return None
        if ev.ev == "done" and (ev.completion_tokens or 0) > asked:
            return f"job {ev.job}: {ev.completion_tokens} tokens, {asked} asked for"
        if ev.ev != "text":
            return None
        ids = ev.ids or []
        if not ids:
            return f"job {ev.job}: a text event without the ids of its tokens"
        if self.tokens - self.base_tokens + len(ids) > asked:
            return f"job {ev.job}: {self.tokens - self.base_tokens + len(ids)} tokens, {asked} asked for"
        if len(ev.text or "") > len(ids) * MAX_TOKEN_CHARS:
            return f"job {ev.job}: {len(ev.text or '')} characters of text for {len(ids)} tokens"
        return None

    def message(self) -> RunFragment:
        """What the worker receives: its own fragment, continued after what was streamed."""
        assert self.request.sha256 is not None, "placed before its model file was chosen"
        gen = self.gen
        if self.attempt:
            gen = gen.model_copy(update={"prefix_ids": list(self.ids), "max_tokens": self.remaining_tokens()})
        return RunFragment(job=self.job_id, model=self.request.model, sha256=self.request.sha256, gen=gen)
