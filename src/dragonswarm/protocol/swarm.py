"""Messages between a node and the orchestrator over the node's one WebSocket.

Every message is a JSON object with a `type`. The node opens the connection (so a
volunteer's machine needs no inbound port), says `hello` with the protocol version,
then sends `heartbeat`s about once a second and `event`s for the fragments it runs.
The orchestrator answers `welcome` (with a new credential the first time, which the node
keeps and then `confirm`s), then sends `run` (one fragment) and `cancel`.
Everything is validated here, strictly, in one place; anything else is a protocol
error and ends the connection.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError

from dragonswarm.protocol.events import Event
from dragonswarm.protocol.runner import Generation

# 2: models named by sha256, fragments carry a whole Generation; 3: heartbeats carry the
# network, the CPU cap in force and the owner's GPU use (an older orchestrator would refuse them);
# 4: text events carry token ids, failover continues from them, workers report progress; names are
# confirmed; `welcome` allows quiet nodes a longer heartbeat period.
VERSION = 4
NODE_HEADER = "X-Dragon-Node"  # the node's name, at the WebSocket handshake
CREDENTIAL_PREFIX = "dnc_"  # a node credential, as opposed to an API key ("dsk_")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ProtocolError(Exception):
    """A message that is not valid JSON, not a known type, or not well-formed."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ModelInfo(_Message):
    name: str = Field(min_length=1, max_length=128)
    # The GGUF file's sha256: a model's identity. One request's fragments, and a failover's
    # continuation, only go to nodes holding the same file.
    sha256: str = Field(pattern=SHA256_PATTERN)
    tags: list[str] = Field(default_factory=list, max_length=16)
    loaded: bool = False
    n_ctx: int = Field(default=0, ge=0)  # the context it runs with: the most tokens a fragment may span


# Node -> orchestrator


class Hello(_Message):
    type: Literal["hello"] = "hello"
    v: int
    name: str = Field(pattern=NAME_PATTERN)
    models: list[ModelInfo] = Field(max_length=64)
    share: float = Field(gt=0.0, le=1.0)
    local_share: float = Field(gt=0.0, le=1.0)
    cpus: int = Field(ge=1)
    ram_total: int = Field(ge=0)
    capacity: int = Field(default=1, ge=1, le=64)  # fragments it runs at once


class Confirm(_Message):
    """The node has kept the credential its welcome carried: bind its name to it."""

    type: Literal["confirm"] = "confirm"
    credential: str = Field(min_length=1, max_length=128)


class GpuRecord(_Message):
    """One GPU as a node reports it: the fields of `governor.gpus.GpuSample`, bounded."""

    index: int = Field(ge=0, le=255)
    name: str = Field(max_length=128)
    util: float = Field(ge=0.0, le=1.0)
    mem_used: int = Field(ge=0)
    mem_total: int = Field(ge=0)
    ours_mem: int = Field(default=0, ge=0)
    owner_mem: int = Field(default=0, ge=0)
    owner_util: float | None = Field(default=None, ge=0.0, le=1.0)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    cpu_total: float = Field(ge=0.0, le=1.0)
    cpu_ours: float = Field(ge=0.0, le=1.0)
    owner_load: float = Field(ge=0.0, le=1.0)
    owner_busy: bool
    ram_available: int = Field(ge=0)
    gpus: list[GpuRecord] = Field(default_factory=list, max_length=16)
    share_in_force: float = Field(ge=0.0, le=1.0)
    local_busy: int = Field(ge=0)  # runners serving the owner's own requests now
    loaded: list[str] = Field(default_factory=list, max_length=64)
    running: list[str] = Field(default_factory=list, max_length=64)  # fragments in progress here
    # The network, defaulted so that nodes older than these fields still validate. Bytes per second:
    # the machine's on its real interfaces (loopback left out), and our own messages on this link.
    net_sent_bps: float = Field(default=0.0, ge=0.0)
    net_recv_bps: float = Field(default=0.0, ge=0.0)
    net_link_bps: float = Field(default=0.0, ge=0.0)  # the links' speed; 0 when unknown
    swarm_sent_bps: float = Field(default=0.0, ge=0.0)
    swarm_recv_bps: float = Field(default=0.0, ge=0.0)
    swarm_sent_bytes: int = Field(default=0, ge=0)  # our messages' bytes since the node started
    swarm_recv_bytes: int = Field(default=0, ge=0)
    rtt_ms: float | None = Field(default=None, ge=0.0)  # WebSocket ping to pong; None before the first
    net_busy: bool = False  # the owner's traffic fills the link: no work for others, it needs the network
    # How the share is held: the mechanism, and why a stronger one was not available.
    cap_mechanism: str = Field(default="", max_length=64)
    cap_reason: str = Field(default="", max_length=500)
    threads: int = Field(default=0, ge=0, le=4096)  # llama.cpp threads at the share in force
    gpu_owner_busy: bool = False  # the owner is using the GPU (also counted in owner_busy)
    # The owner paused lending (`node.lending`): place nothing new here; what runs here finishes.
    lending_paused: bool = False
    # Tokens/s each stream generated over the last beats, while `streams` ran on average (None: no
    # stream ran yet): the orchestrator adds streams to a node only while each keeps its floor.
    stream_tps: float | None = Field(default=None, ge=0.0, le=1e6)
    streams: float = Field(default=0.0, ge=0.0, le=4096.0)


class Logprob(_Message):
    """One generated token's log-probability, and the most likely tokens at that step."""

    token: str = Field(max_length=256)
    logprob: float
    bytes: list[int] = Field(max_length=256)
    # Not strict: JSON has no tuples, and strict mode takes only a tuple for one.
    top: list[Annotated[tuple[str, float, list[int]], Strict(False)]] = Field(default_factory=list, max_length=20)


class JobEvent(_Message):
    """A `protocol.events.Event` of one fragment on the wire: the same fields, and its job."""

    type: Literal["event"] = "event"
    job: str = Field(min_length=1, max_length=64)
    ev: Literal["progress", "start", "text", "done", "error"]
    text: str | None = Field(default=None, max_length=65536)
    ids: list[int] | None = Field(default=None, max_length=65536)  # on `text`: the tokens `text` is made of
    prompt_done: int | None = Field(default=None, ge=0)  # on `progress`: prompt tokens read so far
    logprobs: list[Logprob] | None = Field(default=None, max_length=4096)  # one per token in `text`
    finish_reason: str | None = Field(default=None, max_length=32)
    prompt_tokens: int | None = Field(default=None, ge=0)
    cached_tokens: int | None = Field(default=None, ge=0)  # prompt tokens reused from the KV cache
    completion_tokens: int | None = Field(default=None, ge=0)  # so far, on `text`; in all, on `done`
    code: str | None = Field(default=None, max_length=64)
    message: str | None = Field(default=None, max_length=4096)
    param: str | None = Field(default=None, max_length=64)  # the request field an error is about

    @classmethod
    def of(cls, job: str, event: Event) -> JobEvent:
        fields: dict[str, Any] = {k: v for k, v in event.items() if k != "id"}  # the runner's id is the job
        return cls(job=job, **fields)

    def event(self) -> Event:
        return cast(Event, self.model_dump(exclude_none=True, exclude={"type", "job"}))


# Orchestrator -> node


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    v: int
    name: str
    heartbeat_s: float = Field(gt=0.0)
    # A quiet node (nothing running, nothing changed) may report this rarely: see `protocol.cadence`.
    idle_heartbeat_s: float | None = Field(default=None, gt=0.0)
    # Sent when a node key admits a name nobody holds: the node keeps it and answers
    # `confirm`; from then on it proves who it is with this credential, and the shared node
    # key can no longer speak for that name.
    credential: str | None = None


class RunFragment(_Message):
    """One fragment: what to generate for one choice, nothing else.

    Its `gen.prefix_ids` are the tokens already streamed to the client by a worker that
    failed: the new worker continues after them, so the client sees no gap and no repeat.
    """

    type: Literal["run"] = "run"
    job: str = Field(min_length=1, max_length=64)
    model: str
    sha256: str = Field(pattern=SHA256_PATTERN)  # the model file it must run on
    gen: Generation


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    job: str


NodeMessage = Annotated[Hello | Confirm | Heartbeat | JobEvent, Field(discriminator="type")]
OrchestratorMessage = Annotated[Welcome | RunFragment | Cancel, Field(discriminator="type")]

_node_messages: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)
_orchestrator_messages: TypeAdapter[OrchestratorMessage] = TypeAdapter(OrchestratorMessage)


def _parse(adapter: TypeAdapter[Any], raw: str | bytes) -> Any:
    try:
        return adapter.validate_python(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise ProtocolError("message is not valid JSON") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid message ({where}: {first['msg']})") from None


def parse_node_message(raw: str | bytes) -> Hello | Confirm | Heartbeat | JobEvent:
    message: Hello | Confirm | Heartbeat | JobEvent = _parse(_node_messages, raw)
    return message


def parse_orchestrator_message(raw: str | bytes) -> Welcome | RunFragment | Cancel:
    message: Welcome | RunFragment | Cancel = _parse(_orchestrator_messages, raw)
    return message


def dump(message: _Message) -> str:
    return orjson.dumps(message.model_dump(exclude_none=True)).decode()
