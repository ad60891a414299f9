"""The orchestrator's Prometheus metrics (`GET /metrics`), named in vLLM's style with a
`dragon:` prefix.

Counters and histograms move as requests end (`request_done`, fed by the request log, so
the log line and the metrics tell the same story), as fragments fail over and as limits
refuse. What is a state rather than an event (queue depth, nodes by state, each node's
CPU and share) is read from the swarm when scraped, not copied on a timer.

The registry is this object's own, not the process-wide default: two orchestrators in one
process (the tests) keep separate counts.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dragonswarm.orchestrator.registry import Registry
from dragonswarm.web.requestlog import RequestFacts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Time to first token and per output token: from a warm GPU (tens of ms) to a cold
# 10% share on a laptop (tens of seconds), as vLLM's buckets with a longer tail.
TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

# Why a fragment moved to another worker (`Swarm.fail_over`'s cause).
FAILOVER_CAUSES = ("stalled", "connection_lost", "runner_error", "cancelled_by_node", "context_too_small",
                   "node_busy")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dragon:requests", "Inference requests ended, by model and outcome (HTTP "
                                "status, or the error code that ended a stream)", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("dragon:prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.generation_tokens = Counter("dragon:generation_tokens", "Tokens generated and relayed to clients",
                                         ["model"], registry=r)  # fmt: skip
        self.ttft = Histogram("dragon:time_to_first_token_seconds", "From the request's arrival to its first "
                              "generated token", ["model"], buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("dragon:time_per_output_token_seconds", "Mean time between generated tokens after the "
                              "first, per request", ["model"], buckets=TPOT_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("dragon:e2e_request_latency_seconds", "From the request's arrival to its last byte",
                             ["model"], buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.failovers = Counter("dragon:failovers", "Fragments moved to another worker, by cause", ["cause"],
                                 registry=r)  # fmt: skip
        self.refusals = Counter("dragon:rate_limit_refusals", "Requests refused by a key's limits (429) or a "
                                "full queue", ["key", "limit"], registry=r)  # fmt: skip
        # Only requests the cache may answer (orchestrator/cache.py: `wanted`) are looked up.
        self.cache_hits = Counter("dragon:response_cache_hits", "Requests answered from the response cache",
                                  ["model"], registry=r)  # fmt: skip
        self.cache_misses = Counter("dragon:response_cache_misses", "Requests the response cache could have "
                                    "answered but did not hold", ["model"], registry=r)  # fmt: skip
        # Per key, for the dashboard: counter values are not meant to be read back.
        self.refused_by_key: Tally[str] = Tally()
        self.tokens_out = 0  # all generated tokens relayed, for tokens/s
        self.failover_count = 0
        self.errors = 0  # inference requests that ended in an error
        self._state = _StateCollector()
        r.register(self._state)

    def request_done(self, facts: RequestFacts) -> None:
        """An inference request ended (the request log's hook); other API calls are not counted."""
        if not facts.inference or facts.model is None:
            return
        model = facts.model
        self.requests.labels(model, facts.outcome()).inc()
        if facts.error or facts.status >= 400:
            self.errors += 1
        if facts.prompt_tokens:
            self.prompt_tokens.labels(model).inc(facts.prompt_tokens)
        if (ttft := facts.ttft()) is not None:
            self.ttft.labels(model).observe(ttft)
        if (tpot := facts.tpot()) is not None:
            self.tpot.labels(model).observe(tpot)
        self.e2e.labels(model).observe(facts.duration())

    def tokens(self, model: str, count: int) -> None:
        """Tokens relayed as they go, so tokens/s follows a long stream, not its end."""
        self.generation_tokens.labels(model).inc(count)
        self.tokens_out += count

    def cache_hit(self, model: str) -> None:
        self.cache_hits.labels(model).inc()

    def cache_miss(self, model: str) -> None:
        self.cache_misses.labels(model).inc()

    def failover(self, cause: str) -> None:
        self.failovers.labels(cause).inc()
        self.failover_count += 1

    def refused(self, key: str, limit: str) -> None:
        self.refusals.labels(key, limit).inc()
        self.refused_by_key[key] += 1

    def render(self, state: SwarmState) -> bytes:
        """The text exposition, with the state gauges read from `state` (on the loop: the
        registry is the loop's)."""
        self._state.state = state
        try:
            return generate_latest(self.registry)
        finally:
            self._state.state = None


class SwarmState:
    """What the state gauges read: the registry, the queue and the running work, now."""

    def __init__(self, registry: Registry, waiting: Iterable[str], running_requests: int, running_fragments: int,
                 gone: int) -> None:  # fmt: skip
        self.registry = registry
        self.waiting = Tally(waiting)  # model of each fragment waiting for a worker
        self.running_requests = running_requests
        self.running_fragments = running_fragments
        self.gone = gone


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.state: SwarmState | None = None

    def describe(self) -> Iterable[Metric]:
        return ()  # families are known only once there is a state to read

    def collect(self) -> Iterable[Metric]:
        s = self.state
        if s is None:
            return
        yield _gauge("dragon:num_requests_running", "Inference requests in progress", s.running_requests)
        waiting = GaugeMetricFamily("dragon:num_requests_waiting", "Fragments waiting for a worker, by model",
                                    labels=["model"])  # fmt: skip
        for model in s.registry.model_tags():
            waiting.add_metric([model], s.waiting.get(model, 0))
        for model, count in s.waiting.items():
            if model not in s.registry.model_tags():
                waiting.add_metric([model], count)
        yield waiting
        yield _gauge("dragon:fragments_running", "Fragments placed on a worker now", s.running_fragments)
        nodes = GaugeMetricFamily("dragon:nodes", "Nodes by state (gone: known, not connected)", labels=["state"])
        for state, count in {**s.registry.states(), "gone": s.gone}.items():
            nodes.add_metric([state], count)
        yield nodes
        per_node = {
            "cpu_total": ("dragon:node_cpu_total", "The machine's CPU use (0-1)"),
            "cpu_ours": ("dragon:node_cpu_ours", "The swarm's CPU use on the machine (0-1)"),
            "owner_load": ("dragon:node_owner_load", "The owner's own CPU load (0-1)"),
            "share_in_force": ("dragon:node_share_in_force", "The share of the machine lent to the swarm now (0-1)"),
            "ram_available": ("dragon:node_ram_available_bytes", "The machine's available RAM"),
        }
        families = {field: GaugeMetricFamily(name, text, labels=["node"]) for field, (name, text) in per_node.items()}
        owner_busy = GaugeMetricFamily("dragon:node_owner_busy", "1 while the owner needs the machine", labels=["node"])
        running = GaugeMetricFamily("dragon:node_fragments_running", "Fragments running on the node", labels=["node"])
        for name, conn in s.registry.conns.items():
            running.add_metric([name], len(conn.jobs))
            hb = conn.heartbeat
            if hb is None:
                continue
            for field, family in families.items():
                family.add_metric([name], float(getattr(hb, field)))
            owner_busy.add_metric([name], 1.0 if hb.owner_busy else 0.0)
        yield from families.values()
        yield owner_busy
        yield running


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
