"""A request in flight and its fragments: what was asked, where it runs, what came back."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dragonswarm.protocol.runner import Event, Generation
from dragonswarm.protocol.swarm import JobEvent, RunFragment
from dragonswarm.scheduler.affinity import prefix_keys

if TYPE_CHECKING:
    from dragonswarm.orchestrator.registry import NodeConn

# The longest text one token may stand for: llama.cpp vocabularies hold pieces of a few
# dozen characters at most (runs of spaces or dashes); this leaves a wide margin.
MAX_TOKEN_CHARS = 256
IDLE_TEXT_EVENTS = 4  # text events of one attempt that may add no token (a runner needs one)


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
    deadline: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    attempt: int = 0
    node: NodeConn | None = None
    exclude: set[str] = field(default_factory=set)  # nodes that failed it (or handed it over)
    text: list[str] = field(default_factory=list)  # streamed to the client so far
    chars: int = 0  # ... its length
    tokens: int = 0  # completion tokens streamed so far, over every attempt
    base_tokens: int = 0  # ... by attempts before the current one
    base_chars: int = 0  # characters of text by attempts before the current one
    idle_events: int = 0  # text events of the current attempt that added no token
    prompt_tokens: int | None = None
    cached_tokens: int = 0  # ... of which the current worker took from its KV cache
    last_event: float = field(default_factory=time.monotonic)
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

    def remaining_tokens(self) -> int:
        return self.gen.max_tokens - self.tokens

    def overrun(self, ev: JobEvent) -> str | None:
        """Why an event is more than this attempt asked for, if it is: more tokens than its
        max_tokens, more text than that many tokens can be, or text events that add no
        token. A worker's events are thus bounded by the tokens asked of it, not by how fast
        it can send them: a fast model is no flood, and no node can make the orchestrator
        handle (or a request keep, for failover) more than the work justifies."""
        asked = self.gen.max_tokens - self.base_tokens
        count = ev.completion_tokens or 0
        if count > asked:
            return f"job {ev.job}: {count} tokens, {asked} asked for"
        if ev.ev != "text":
            return None
        chars = self.chars - self.base_chars + len(ev.text or "")
        if chars > asked * MAX_TOKEN_CHARS:
            return f"job {ev.job}: {chars} characters of text for {asked} tokens"
        before = self.tokens - self.base_tokens  # the attempt's count, as its last text event said
        if count < before:
            return f"job {ev.job}: its token count went back from {before} to {count}"
        if count == before:  # a runner sends one such event: the text it held back at the end
            self.idle_events += 1
            if self.idle_events > IDLE_TEXT_EVENTS:
                return f"job {ev.job}: {self.idle_events} text events that add no token"
        return None

    def message(self) -> RunFragment:
        """What the worker receives: its own fragment, continued after what was streamed."""
        assert self.request.sha256 is not None, "placed before its model file was chosen"
        gen = self.gen
        if self.attempt:
            gen = gen.model_copy(update={"prefix": "".join(self.text), "max_tokens": self.remaining_tokens()})
        return RunFragment(job=self.job_id, model=self.request.model, sha256=self.request.sha256, gen=gen)
