"""The node's Prometheus metrics (`GET /metrics`), in a registry of its own.

What the node served (requests, tokens, time to first token), for its owner and for the
swarm, is counted as each request ends here. The machine's figures are gauges read at
scrape time from the node's overview (what `GET /v1/node` says), so a scrape is never
older than the governor's last sample and no timer keeps them. Names follow vLLM's
(`vllm:prompt_tokens_total`, ...) with the prefix `dragon:`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dragonswarm.governor.governor import WorkKind
from dragonswarm.protocol.events import Event

PREFIX = "dragon:"
ORIGIN: dict[WorkKind, str] = {"local": "owner", "remote": "swarm"}  # who a request served here is for
STATUSES = ("ok", "error", "cancelled")
# From a warm tiny model's few milliseconds to a cold load at a small share, which takes minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class StreamRate:
    """Tokens/s per stream, as the streams running here at once get them: tokens generated over
    stream-seconds (one stream generating for one second, from its first token to its end).
    Read once per heartbeat; a reading covers at least `MIN_AREA_S` stream-seconds, else the last
    one stands, so a quiet node still tells what it did when it last worked."""

    MIN_AREA_S = 2.0

    def __init__(self, now: float):
        self.streams = 0
        self._tokens = 0
        self._area = 0.0  # stream-seconds since the last reading
        self._at = now
        self._since = now
        self.last: tuple[float | None, float] = (None, 0.0)  # tokens/s per stream, streams on average

    def _advance(self, now: float) -> None:
        self._area += self.streams * (now - self._at)
        self._at = now

    def started(self, now: float) -> None:
        self._advance(now)
        self.streams += 1

    def ended(self, now: float) -> None:
        self._advance(now)
        self.streams -= 1

    def generated(self, tokens: int) -> None:
        self._tokens += tokens

    def reading(self, now: float) -> tuple[float | None, float]:
        self._advance(now)
        if self._area >= self.MIN_AREA_S:
            self.last = (round(self._tokens / self._area, 2), round(self._area / max(now - self._since, 1e-9), 2))
            self._tokens, self._area, self._since = 0, 0.0, now
        elif not self.streams and not self._area:
            self._since = now  # idle time is no part of the next reading's average
        return self.last


class Course:
    """What one request served here came to, read off its events (pure: events in, figures out).

    A request is one call of `NodeService.run_jobs`: an owner's request (all its choices) or
    one fragment for the swarm.
    """

    def __init__(self, started: float, generations: int):
        self.started = started  # monotonic, when it arrived (its wait for the runner counts)
        self.generations = generations
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.first_token_s: float | None = None
        self.done = 0  # generations that ran to their end
        self.failed = False
        self.cancelled = False
        self._tokens = 0  # of the generation in progress, so far

    def see(self, event: Event, now: float) -> None:
        match event.get("ev"):
            case "start":
                self.prompt_tokens += event.get("prompt_tokens", 0)
            case "text":
                if self.first_token_s is None:
                    self.first_token_s = now - self.started
                self._tokens = event.get("completion_tokens", self._tokens)
            case "done":
                self.generation_tokens += event.get("completion_tokens", self._tokens)
                self._tokens = 0
                self.done += 1
                self.cancelled |= event.get("finish_reason") == "cancelled"
            case "error":
                self.failed = True

    @property
    def status(self) -> str:
        """How it ended: `ok`, `error`, or `cancelled` (also a client gone before the end)."""
        if self.failed:
            return "error"
        return "ok" if self.done == self.generations and not self.cancelled else "cancelled"

    @property
    def tokens(self) -> int:
        """Tokens generated, also those of a generation cut short before its `done`."""
        return self.generation_tokens + self._tokens


class NodeMetrics:
    """The tallies of what this node served, and the collector that exposes them with the gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Plain tallies, not the library's counters: the node's page shows them too.
        self.requests: dict[str, Counter[str]] = {origin: Counter() for origin in ORIGIN.values()}
        self.prompt_tokens: Counter[str] = Counter()
        self.generation_tokens: Counter[str] = Counter()
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds",
                              "Time from a request's arrival here (its wait for the runner included) to its first "
                              "token, by origin", ["origin"], buckets=TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        for origin in ORIGIN.values():  # both series from the start, as the counters have
            self.ttft.labels(origin)
        self._overview: Callable[[], Mapping[str, Any]] | None = None
        self.registry.register(self)  # its `collect` below

    def watch(self, overview: Callable[[], Mapping[str, Any]]) -> None:
        """Read the machine's gauges from `overview` at each scrape."""
        self._overview = overview

    def served(self, kind: WorkKind, course: Course) -> None:
        origin = ORIGIN[kind]
        self.requests[origin][course.status] += 1
        self.prompt_tokens[origin] += course.prompt_tokens
        self.generation_tokens[origin] += course.tokens
        if course.first_token_s is not None:
            self.ttft.labels(origin).observe(course.first_token_s)

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per origin: requests by how they ended, and tokens read and generated (for `GET /v1/node`)."""
        return {origin: {"requests": {s: counts[s] for s in STATUSES}, "prompt_tokens": self.prompt_tokens[origin],
                         "generation_tokens": self.generation_tokens[origin]}
                for origin, counts in self.requests.items()}  # fmt: skip

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors: this registry holds only ours

    def collect(self) -> Iterable[Metric]:
        """Counters from the tallies, gauges from the node's overview at the moment of the scrape."""
        requests = CounterMetricFamily(f"{PREFIX}requests", "Requests served on this node, by origin (owner, swarm) "
                                       "and how they ended", labels=["origin", "status"])  # fmt: skip
        prompt = CounterMetricFamily(f"{PREFIX}prompt_tokens", "Prompt tokens of the requests served here",
                                     labels=["origin"])  # fmt: skip
        generation = CounterMetricFamily(f"{PREFIX}generation_tokens", "Tokens generated here", labels=["origin"])
        for origin, counts in self.requests.items():
            for status in STATUSES:
                requests.add_metric([origin, status], counts[status])
            prompt.add_metric([origin], self.prompt_tokens[origin])
            generation.add_metric([origin], self.generation_tokens[origin])
        yield from (requests, prompt, generation)
        if self._overview is not None:
            yield from gauges(self._overview())


def gauges(overview: Mapping[str, Any]) -> list[Metric]:
    """The machine and the swarm's work here as gauges, from a `GET /v1/node` overview (pure)."""
    g = overview["governor"]
    swarm = overview.get("swarm") or {}
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(GaugeMetricFamily(PREFIX + name, doc, value=value))

    gauge("owner_load", "CPU used by the owner's other programs, as a fraction of the machine", g["owner_load"])
    gauge("owner_busy", "1 while the owner's programs are busy (work for others waits)", g["owner_busy"])
    gauge("gpu_owner_busy", "1 while the owner is using the GPU", g["gpu_owner_busy"])
    gauge("cpu_total", "CPU used on the cores we may use, all programs, as a fraction", g["cpu_total"])
    gauge("cpu_ours", "CPU used by this node and its runners, as a fraction of the machine", g["cpu_ours"])
    gauge("cpus", "Cores this node may use", g["cpus"])
    gauge("share_in_force", "Share of the machine this node holds itself to now", g["share_in_force"])
    gauge("local_share", "Share configured for the owner's own requests", g["local_share"])
    gauge("swarm_share", "Share configured for work done for others", g["share"])
    gauge("threads", "llama.cpp threads at the share in force", g["threads"])
    gauge("ram_total_bytes", "The machine's memory", g["ram_total"])
    gauge("ram_available_bytes", "Memory available to programs now", g["ram_available"])
    mechanism = GaugeMetricFamily(f"{PREFIX}cap_mechanism_info", "How the share is held (1 for the one in force)",
                                  labels=["mechanism"])  # fmt: skip
    mechanism.add_metric([g["mechanism"]], 1)
    out.append(mechanism)
    gauge("lending_paused", "1 while the owner has paused lending to the swarm", overview["lending"]["paused"])
    gauge("swarm_connected", "1 while linked to an orchestrator", bool(swarm.get("connected")))
    gauge("fragments_running", "Fragments running here for others now", swarm.get("fragments_running", 0))
    gpu_util = GaugeMetricFamily(f"{PREFIX}gpu_utilization", "Each GPU's utilization, all programs", labels=["gpu"])
    gpu_used = GaugeMetricFamily(f"{PREFIX}gpu_memory_used_bytes", "Each GPU's memory in use", labels=["gpu"])
    gpu_total = GaugeMetricFamily(f"{PREFIX}gpu_memory_total_bytes", "Each GPU's memory", labels=["gpu"])
    for gpu in g["gpus"]:
        index = str(gpu["index"])
        gpu_util.add_metric([index], gpu["util"])
        gpu_used.add_metric([index], gpu["mem_used"])
        gpu_total.add_metric([index], gpu["mem_total"])
    loaded = GaugeMetricFamily(f"{PREFIX}model_loaded", "1 while the model's runner is loaded", labels=["model"])
    waiting = GaugeMetricFamily(f"{PREFIX}requests_waiting", "Requests waiting for the model's runner",
                                labels=["model"])  # fmt: skip
    for model in overview["models"]:
        loaded.add_metric([model["name"]], model["loaded"])
        waiting.add_metric([model["name"]], model["waiting"])
    out += [gpu_util, gpu_used, gpu_total, loaded, waiting]
    return out
