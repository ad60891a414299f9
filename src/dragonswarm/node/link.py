"""The node's one outbound WebSocket to the orchestrator.

It announces the node, sends a heartbeat about every second, runs the fragments it is
given at the work-for-others share (`--share`), and reconnects with backoff when the
connection drops. Nothing listens on the volunteer's machine for this.

It also measures the link: the bytes of its own messages each way, and the round-trip
time to the orchestrator by WebSocket ping, so that heartbeats tell the orchestrator
when the owner's traffic leaves no room for ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from ssl import SSLContext
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from dragonswarm.errors import DragonError, RunnerFailed
from dragonswarm.governor.network import NetworkMeter, Rates, RttTracker, held_busy, link_saturated, owner_bps
from dragonswarm.node.lending import Lending
from dragonswarm.node.service import ModelSlot, NodeService
from dragonswarm.protocol.cadence import Cadence
from dragonswarm.protocol.events import Event
from dragonswarm.protocol.swarm import (
    NODE_HEADER,
    VERSION,
    Cancel,
    Confirm,
    Heartbeat,
    Hello,
    JobEvent,
    ModelInfo,
    ProtocolError,
    RunFragment,
    Welcome,
    dump,
    parse_orchestrator_message,
)
from dragonswarm.secrets_file import write_private

log = logging.getLogger("dragonswarm.link")

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
RETRY_NEXT_S = 0.2  # before trying the next replica
WS_PATH = "/v1/swarm"
# A round trip every other heartbeat: often enough that a queue on the link shows within seconds,
# rare enough that the pings are no traffic to speak of.
PING_EVERY_BEATS = 2
# These pings are the link's keepalive too (the library's own is off: one ping less per node
# every 20 s for the orchestrator): no pong this long, and the connection is taken for dead.
PONG_TIMEOUT_S = 20.0
LOADING_TICK_S = 2.0  # progress while a model loads for a fragment; the runner reports its own after that
# A session welcomed this long ends a run of failures however it ends (a replica killed under it
# included); one cut sooner counts as a failure, so a node cut on arrival backs off all the same.
STABLE_S = 30.0


def reconnect_delay(failures: int, replicas: int) -> float:
    """Seconds before the next try, after `failures` in a row: the other replicas are tried
    at once (a replica that died must not keep its nodes away for a backoff), then each round
    of all of them waits longer."""
    if failures % replicas != replicas - 1 and replicas > 1:
        return RETRY_NEXT_S
    return BACKOFF_S[min(failures // replicas, len(BACKOFF_S) - 1)]


def failures_so_far(failures: int, welcomed_for_s: float | None) -> int:
    """Failures in a row, before a session that ended with an error: none after a session that
    stood `STABLE_S` (otherwise every later loss, a killed replica say, backed off longer)."""
    return 0 if welcomed_for_s is not None and welcomed_for_s >= STABLE_S else failures


def ws_url(base: str) -> str:
    """The WebSocket URL for an orchestrator given as http(s)://host:port."""
    base = base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + WS_PATH
    if base.startswith("http://"):
        return "ws://" + base.removeprefix("http://") + WS_PATH
    return base + WS_PATH if base.startswith(("ws://", "wss://")) else base


@dataclass(frozen=True, slots=True)
class NetworkReading:
    """The network at one heartbeat: bytes per second (the machine's, loopback left out, and our swarm
    link's messages), our bytes in all, and the round trip to the orchestrator in milliseconds."""

    net_sent_bps: float = 0.0
    net_recv_bps: float = 0.0
    net_link_bps: float = 0.0  # the links' speed in bytes per second; 0 when unknown
    swarm_sent_bps: float = 0.0
    swarm_recv_bps: float = 0.0
    swarm_sent_bytes: int = 0
    swarm_recv_bytes: int = 0
    rtt_ms: float | None = None  # None until the first pong
    rtt_floor_ms: float | None = None  # the lowest round trip of this connection
    owner_bps: float = 0.0  # the owner's traffic (the machine's less ours) in the busier direction
    net_busy: bool = False


class SwarmLink:
    # From the orchestrator we trust: a fragment may carry a prompt as big as its API accepts.
    def __init__(self, service: NodeService, lending: Lending, urls: list[str], key: str, ssl: SSLContext | None,
                 max_message_bytes: int = 64 << 20):  # fmt: skip
        self.service = service
        self.lending = lending  # the owner's switch: paused, no new work for others
        # One orchestrator, or several replicas of one swarm: a lost link moves to the next.
        self.urls = urls
        self.url = urls[0]
        self.ssl = ssl  # None for plain ws:// (only with --insecure)
        self.key = key
        self.credential_path = service.settings.home / "swarm-credential.json"
        self.max_message_bytes = max_message_bytes
        self.connected = False
        self._welcomed_at: float | None = None  # when the session in progress was welcomed
        self.refused: str | None = None  # why the orchestrator refused us for good
        self.cadence = Cadence()  # the reporting periods the orchestrator's welcome allows
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._begun: set[str] = set()  # jobs whose task has taken its first step
        self._answering: set[asyncio.Task[None]] = set()  # answers for jobs cancelled before that
        self._models: dict[str, str] = {}  # job -> model
        self._task: asyncio.Task[None] | None = None
        self.network = NetworkMeter()
        self.swarm_sent = 0  # bytes of the messages we sent on the swarm link, all connections
        self.swarm_recv = 0
        self._swarm_rates = Rates(0, 0, time.monotonic())
        self._rtt = RttTracker()  # replaced for each connection
        self._saturated_at: float | None = None  # when the owner's traffic last filled the link
        self._net = NetworkReading(net_link_bps=self.network.link_bps)  # as of the last heartbeat

    @property
    def name(self) -> str:
        return self.service.settings.name

    @property
    def running(self) -> int:
        """Fragments running here for others now."""
        return len(self._jobs)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="swarm-link")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        """Stay connected: reconnect with backoff for as long as the node runs."""
        await self.service.identified.wait()  # the swarm knows a model by its file's sha256
        failures = 0
        fell_back = False  # to the node key, once, after the orchestrator stopped knowing our credential
        while True:
            credential = self.credential()
            headers = {"Authorization": f"Bearer {credential or self.key}", NODE_HEADER: self.name}
            try:
                async with connect(ws_url(self.url), additional_headers=headers, max_size=self.max_message_bytes,
                                   open_timeout=10, ping_interval=None, ssl=self.ssl) as ws:  # fmt: skip
                    await self._session(ws)
                    failures, fell_back = 0, False
            except asyncio.CancelledError:
                raise
            except websockets.InvalidStatus as exc:
                status = exc.response.status_code
                reason = _error_message(exc.response.body)
                if status == 401 and credential and not fell_back:
                    log.warning("the orchestrator does not know this node's credential (%s): it was forgotten, or "
                                "the orchestrator's data was reset; joining once more with the node key", reason)
                    self.credential_path.unlink(missing_ok=True)
                    fell_back = True
                    continue
                log.error("the orchestrator refused this node (HTTP %d: %s)", status, reason)
                if status == 403:
                    self.refused = reason
                    return  # revoked, or the name belongs to another machine: retrying cannot help
            except (OSError, websockets.WebSocketException, ProtocolError, TimeoutError) as exc:
                log.warning("swarm link to %s lost: %s", self.url, exc or type(exc).__name__)
                welcomed_for = time.monotonic() - self._welcomed_at if self._welcomed_at is not None else None
                failures = failures_so_far(failures, welcomed_for)
            finally:
                self.connected = False
                self._welcomed_at = None
                self._cancel_all()
            delay = reconnect_delay(failures, len(self.urls)) * random.uniform(0.8, 1.2)
            failures += 1
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            await asyncio.sleep(delay)

    async def _send(self, ws: ClientConnection, text: str) -> None:
        """Send one message, counted as our traffic."""
        await ws.send(text)
        self.swarm_sent += _size(text)

    async def _session(self, ws: ClientConnection) -> None:
        await self._send(ws, dump(self._hello()))
        raw = await asyncio.wait_for(ws.recv(), 10)
        self.swarm_recv += _size(raw)
        welcome = parse_orchestrator_message(raw)
        if not isinstance(welcome, Welcome):
            raise ProtocolError("expected welcome")
        self.cadence = Cadence(welcome.heartbeat_s, welcome.idle_heartbeat_s)
        if welcome.credential:  # kept first, confirmed then: the name is ours only once we hold its credential
            self._save_credential(welcome.credential)
            await self._send(ws, dump(Confirm(credential=welcome.credential)))
        self.connected = True
        self._welcomed_at = time.monotonic()
        log.info("joined the swarm at %s as %s", self.url, welcome.name)
        self._rtt = RttTracker()  # a new connection may take another path, with a floor of its own
        beats = asyncio.create_task(self._heartbeats(ws), name="heartbeats")
        pings = asyncio.create_task(self._pings(ws, self._rtt), name="rtt-pings")
        try:
            async for raw in ws:
                self.swarm_recv += _size(raw)
                message = parse_orchestrator_message(raw)
                if isinstance(message, RunFragment):
                    self._start_job(ws, message)
                elif isinstance(message, Cancel):
                    task = self._jobs.get(message.job)
                    if task:
                        task.cancel()
                    else:  # already over (or never started): say so, so it is not counted busy
                        done: Event = {"ev": "done", "finish_reason": "cancelled"}
                        await self._send(ws, dump(JobEvent.of(message.job, done)))
        finally:
            beats.cancel()
            pings.cancel()

    def credential(self) -> str | None:
        """This machine's own credential for this orchestrator and name, once admitted."""
        try:
            data = json.loads(self.credential_path.read_text())
        except (OSError, ValueError):
            return None
        # Replicas share one store: a credential from one of them holds for all.
        if data.get("orchestrator") in self.urls and data.get("name") == self.name:
            return str(data["credential"])
        return None

    def _save_credential(self, credential: str) -> None:
        data = {"orchestrator": self.url, "name": self.name, "credential": credential}
        write_private(self.credential_path, json.dumps(data).encode())
        log.info("admitted to the swarm as %s; credential kept in %s", self.name, self.credential_path)

    def _hello(self) -> Hello:
        s = self.service
        status = s.governor.status()
        models = [ModelInfo(name=n, sha256=slot.sha256, tags=list(slot.spec.tags), loaded=slot.loaded,
                            n_ctx=s.settings.n_ctx) for n, slot in s.slots.items() if slot.sha256]  # fmt: skip
        return Hello(v=VERSION, name=self.name, models=models, share=s.settings.share, capacity=s.capacity(),
                     local_share=s.settings.local_share, cpus=status["cpus"], ram_total=status["ram_total"])

    def heartbeat(self) -> Heartbeat:
        """The next heartbeat; it samples the network, so call it once per beat."""
        g = self.service.governor.status()
        slots = self.service.slots.values()
        net = self._measure_network()
        stream_tps, streams = self.service.stream_rate.reading(time.monotonic())
        return Heartbeat(
            cpu_total=g["cpu_total"], cpu_ours=g["cpu_ours"], owner_load=min(1.0, g["owner_load"]),
            owner_busy=g["owner_busy"], ram_available=g["ram_available"], gpus=g["gpus"],
            share_in_force=min(1.0, g["share_in_force"]), local_busy=self.service.governor.active["local"],
            loaded=[s.spec.name for s in slots if s.loaded], running=list(self._jobs)[:64],
            net_sent_bps=net.net_sent_bps, net_recv_bps=net.net_recv_bps, net_link_bps=net.net_link_bps,
            swarm_sent_bps=net.swarm_sent_bps, swarm_recv_bps=net.swarm_recv_bps,
            swarm_sent_bytes=net.swarm_sent_bytes, swarm_recv_bytes=net.swarm_recv_bytes,
            rtt_ms=net.rtt_ms, net_busy=net.net_busy, threads=g["threads"], cap_mechanism=g["mechanism"],
            cap_reason=g["mechanism_reason"][:500], gpu_owner_busy=g["gpu_owner_busy"],
            lending_paused=self.lending.paused, stream_tps=stream_tps, streams=streams,
        )  # fmt: skip

    def _measure_network(self) -> NetworkReading:
        now = time.monotonic()
        machine = self.network.sample()
        sent_bps, recv_bps = self._swarm_rates.update(self.swarm_sent, self.swarm_recv, now)
        # Links are full duplex: the busier direction is the one that fills up.
        owner = max(owner_bps(machine.sent_bps, sent_bps), owner_bps(machine.recv_bps, recv_bps))
        rtt, floor = self._rtt.latest(now), self._rtt.floor
        saturated = link_saturated(owner, machine.link_bps, self._rtt.sustained(now), floor)
        if saturated:
            self._saturated_at = now
        busy = held_busy(saturated, self._saturated_at, now)
        # Rounded: digits past a tenth of a byte per second or a microsecond are noise that costs heartbeat bytes.
        self._net = NetworkReading(
            net_sent_bps=round(machine.sent_bps, 1), net_recv_bps=round(machine.recv_bps, 1),
            net_link_bps=machine.link_bps, swarm_sent_bps=round(sent_bps, 1), swarm_recv_bps=round(recv_bps, 1),
            swarm_sent_bytes=self.swarm_sent, swarm_recv_bytes=self.swarm_recv, rtt_ms=_ms(rtt),
            rtt_floor_ms=_ms(floor), owner_bps=round(owner, 1), net_busy=busy,
        )  # fmt: skip
        return self._net

    def network_status(self) -> dict[str, Any]:
        """The network as of the last heartbeat (bytes per second, milliseconds), for `GET /v1/node`."""
        return asdict(self._net)

    async def _heartbeats(self, ws: ClientConnection) -> None:
        # Read every heartbeat_s, so a change goes out within one; sent only when `Cadence.due` says.
        cadence = self.cadence
        last: Heartbeat | None = None
        sent_at = 0.0
        while True:
            try:
                self._leave_the_owners_gpu()
                beat = self.heartbeat()
            except Exception:  # a failed reading must not silence the node: the orchestrator would drop it
                log.exception("building a heartbeat failed; retrying at the next beat")
            else:
                now = time.monotonic()
                if cadence.due(last, beat, now - sent_at):
                    beat = cadence.averaged(last, beat, now - sent_at)
                    await self._send(ws, dump(beat))
                    last, sent_at = beat, now
            await asyncio.sleep(cadence.heartbeat_s)

    def _leave_the_owners_gpu(self) -> None:
        """The owner is using the GPU: work for others on models with layers there stops (the
        orchestrator moves it on, and sends no more while the heartbeat says the owner is busy)."""
        if not self.service.governor.gpu_owner_busy:
            return
        for name, slot in self.service.slots.items():
            if slot.gpu_layers() and self.preempt(name):
                log.info("the owner is using the GPU: work for others on %s moved off this machine", name)

    async def _pings(self, ws: ClientConnection, rtt: RttTracker) -> None:
        """Measure the round trip to the orchestrator every few heartbeats, by WebSocket ping:
        at the quiet cadence while this node runs nothing for the swarm (the round trip matters
        to the work placed here; ten thousand quiet nodes pinging every 2 s would be 5,000 pings
        a second for the orchestrator)."""
        # A closed connection fails the ping or its pong; the session ends by itself then.
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                rtt.sent(time.monotonic())
                try:
                    async with asyncio.timeout(PONG_TIMEOUT_S):
                        await (await ws.ping())
                except TimeoutError:
                    log.warning("no answer from the orchestrator to a ping in %.0f s: connecting again", PONG_TIMEOUT_S)
                    await ws.close(1011, "no pong")
                    return
                rtt.received(time.monotonic())
                await asyncio.sleep(self.cadence.period_when(not self._jobs) * PING_EVERY_BEATS)

    def _start_job(self, ws: ClientConnection, fragment: RunFragment) -> None:
        if fragment.job in self._jobs:
            return  # a duplicate `run` for a job we already hold: ignore it
        task = asyncio.create_task(self._run(ws, fragment), name=f"fragment-{fragment.job}")
        self._jobs[fragment.job] = task
        self._models[fragment.job] = fragment.model

        def forget(done: asyncio.Task[None]) -> None:
            self._jobs.pop(fragment.job, None)
            self._models.pop(fragment.job, None)
            if done.cancelled() and fragment.job not in self._begun:
                # Cancelled before its first step (a cancel or a preemption right behind its run, in
                # the same turn of the loop): `_run` never ran, so it could not say the job ended, and
                # the orchestrator would count it running here until its stall timeout.
                answer = asyncio.get_running_loop().create_task(self._cancelled_unstarted(ws, fragment.job))
                self._answering.add(answer)
                answer.add_done_callback(self._answering.discard)
            self._begun.discard(fragment.job)

        task.add_done_callback(forget)

    async def _cancelled_unstarted(self, ws: ClientConnection, job: str) -> None:
        with contextlib.suppress(websockets.WebSocketException):
            await self._send(ws, dump(JobEvent.of(job, {"ev": "done", "finish_reason": "cancelled",
                                                        "completion_tokens": 0})))  # fmt: skip

    async def _run(self, ws: ClientConnection, f: RunFragment) -> None:
        """Run one fragment at the work-for-others share and stream its events back."""

        self._begun.add(f.job)

        async def send(event: Event) -> None:
            await self._send(ws, dump(JobEvent.of(f.job, event)))

        ticks: asyncio.Task[None] | None = None
        try:
            if self.lending.paused:
                # Placed before our heartbeat said so: handed back as for the owner's preemption
                # (the orchestrator moves it to another worker), not run against the owner's wish.
                log.info("fragment %s handed back: lending is paused", f.job)
                await send({"ev": "done", "finish_reason": "cancelled", "completion_tokens": 0})
                return
            slot = self.service.slot(f.model)
            if slot.sha256 != f.sha256:  # another file under the same name: its answer would differ
                raise RunnerFailed(f"this node's {f.model!r} is another file than the one asked for",
                                   code="model_mismatch")  # fmt: skip
            ticks = asyncio.create_task(self._while_loading(slot, send), name=f"loading-{f.job}")
            async for _, event in self.service.run_jobs(slot, [f.gen], kind="remote", ids=[f.job]):
                ticks.cancel()
                await send(event)
        except DragonError as exc:
            with contextlib.suppress(websockets.WebSocketException):
                await send(exc.event())
        except asyncio.CancelledError:
            # Tell the orchestrator the runner is free again; it counts us busy until then.
            with contextlib.suppress(websockets.WebSocketException):
                await send({"ev": "done", "finish_reason": "cancelled", "completion_tokens": 0})
            raise
        except Exception as exc:  # anything else still ends the job with an answer, never silence
            log.exception("fragment %s failed", f.job)
            with contextlib.suppress(websockets.WebSocketException):
                await send({"ev": "error", "code": "internal_error",
                            "message": f"the worker failed: {type(exc).__name__}"})  # fmt: skip
        except websockets.WebSocketException:
            pass  # the connection is gone; the orchestrator moves the fragment elsewhere
        finally:
            if ticks is not None:
                ticks.cancel()

    async def _while_loading(self, slot: ModelSlot, send: Callable[[Event], Awaitable[None]]) -> None:
        """Tell the orchestrator the model is loading, which may outlast its stall timeout at a
        small share. Only then: a job waiting behind the owner's request makes no progress,
        and the orchestrator rightly moves it to a worker that is free."""
        with contextlib.suppress(websockets.WebSocketException):
            while True:
                await asyncio.sleep(LOADING_TICK_S)
                if slot.loading:
                    await send({"ev": "progress"})

    def _cancel_all(self) -> None:
        for task in list(self._jobs.values()):
            task.cancel()

    def preempt(self, model: str) -> int:
        """The owner wants this model's runner: stop the work done for others on it (the
        orchestrator moves it to another worker, continuing where it stopped)."""
        stopped = 0
        for job_id, task in list(self._jobs.items()):
            if self._models.get(job_id) == model:
                task.cancel()
                stopped += 1
        return stopped


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _size(message: str | bytes) -> int:
    """A message's size on the wire (UTF-8), without encoding it again when it is ASCII, as JSON mostly is."""
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode())


def _error_message(body: bytes | bytearray | None) -> str:
    try:
        return str(json.loads(body or b"")["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "no reason given"
