"""What the server measures itself, for `GET /metrics` in Prometheus' exposition format
(`prometheus_client`, one registry per app): latencies as its clients see them and request
outcomes, the engine's state from `Engine.stats()` read at each scrape (the prefix cache's
included), and the standard process, platform and garbage-collector metrics (`process_*`,
`python_*`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


class ServerMetrics:
    """What the server observes itself (latencies as its clients see them, outcomes), in a
    registry of its own (apps in one process do not share metrics); the engine's state comes
    from `Engine.stats()` when /metrics is read."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.ttft = Histogram(
            "espc_time_to_first_token_seconds", "Time from a completion request's arrival to its first token.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )
        self.tpot = Histogram(
            "espc_time_per_output_token_seconds", "Mean time between a request's tokens after the first (requests with two or more).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=self.registry,
        )
        self.in_flight = Gauge(
            "espc_http_requests_in_flight", "Completion requests being answered (streams until they end).", registry=self.registry,
        )
        self.requests = Counter(
            "espc_requests", "Completion requests by outcome: each choice's finish reason; rejected, error, cancelled, invalid.",
            ["outcome"], registry=self.registry,
        )
        self._engine = _EngineCollector()
        self.registry.register(self._engine)

    def outcome(self, what: str) -> None:
        self.requests.labels(what).inc()

    def count(self, what: str) -> int:
        """How many requests ended with the outcome `what` so far."""
        return int(self.registry.get_sample_value("espc_requests_total", {"outcome": what}) or 0)

    def render(self, stats: dict | None, running: bool) -> bytes:
        """The exposition text, with the engine's `stats` (None: not running or not answering).
        Called on the event loop: no other scrape runs between setting the snapshot and reading it."""
        self._engine.stats, self._engine.running = stats, running
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's state, as of the snapshot `ServerMetrics.render` sets before collecting."""

    def __init__(self) -> None:
        self.stats: dict | None = None
        self.running = False

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("espc_up", "1 while the engine runs.", value=int(self.running))
        stats = self.stats
        if stats is None:
            return
        instances = range(stats["instances"])
        used, capacity = stats["kv_used_tokens"], stats["kv_capacity_tokens"]
        yield GaugeMetricFamily("espc_queue_length", "Requests waiting for their first prefill.", value=stats["queued"] + stats["waiting"])
        yield GaugeMetricFamily("espc_requests_running", "Requests prefilled or decoding.", value=stats["running"])
        yield GaugeMetricFamily("espc_instances", "Elastic instances of the deployment.", value=stats["instances"])
        yield GaugeMetricFamily("espc_instances_in_service", "Instances whose worker has not failed.", value=stats["in_service"])
        for name, help_, values in (
            ("espc_instance_dop", "Degree of parallelism of the batch each instance runs (0: idle).", stats["dop"]),
            ("espc_kv_used_tokens", "KV slots in use per instance.", used),
            ("espc_kv_cached_tokens", "KV slots in use per instance held by cached prefixes no request reads (evicted when needed).",
             stats["kv_cached_tokens"]),
            ("espc_kv_capacity_tokens", "KV slots per instance.", capacity),
        ):
            family = GaugeMetricFamily(name, help_, labels=["instance"])
            for instance in instances:
                family.add_metric([str(instance)], values[instance])
            yield family
        yield GaugeMetricFamily("espc_kv_usage_ratio", "KV slots in use over all slots.", value=sum(used) / sum(capacity) if sum(capacity) else 0.0)
        yield CounterMetricFamily("espc_iterations", "Scheduling iterations dispatched.", value=stats["iterations"])
        yield CounterMetricFamily("espc_migrations", "KV migrations between instances.", value=stats["migrations"])
        yield CounterMetricFamily("espc_migrated_bytes", "KV bytes moved by migrations.", value=stats["migrated_bytes"])
        rejected = CounterMetricFamily("espc_rejected_requests", "Requests refused by admission control, by reason.", labels=["code"])
        for code, count in sorted(({"queue_full": 0, "ttft_unreachable": 0, "unservable": 0} | stats["rejected"]).items()):
            rejected.add_metric([code], count)
        yield rejected
        yield CounterMetricFamily("espc_worker_failures", "Workers taken out of service.", value=len(stats["failures"]))
        yield from _prefix_cache(stats["prefix_cache"])


def _prefix_cache(stats: dict) -> Iterator[Metric]:
    """The prefix cache's counters and state (`Driver.stats()["prefix_cache"]`, which holds
    only `enabled` when it is off: zeros then); its hit rate over a window is
    rate(hit_tokens) / rate(queried_tokens)."""
    cache = dict.fromkeys(("queried_tokens", "hit_tokens", "cached_tokens", "cached_blocks", "evicted_blocks", "entries"), 0) | stats
    queried, hit = cache["queried_tokens"], cache["hit_tokens"]
    yield GaugeMetricFamily("espc_prefix_cache_enabled", "1 when the spec's [runtime] prefix_caching is on.", value=int(cache["enabled"]))
    yield CounterMetricFamily(
        "espc_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", value=queried,
    )
    yield CounterMetricFamily(
        "espc_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache instead of prefilled.", value=hit,
    )
    yield GaugeMetricFamily(
        "espc_prefix_cache_hit_ratio", "Hit tokens over queried tokens since start (0 before any lookup).",
        value=hit / queried if queried else 0.0,
    )
    yield GaugeMetricFamily(
        "espc_prefix_cache_cached_tokens", "KV tokens held by prefix-cache entries no running request reads (evictable).",
        value=cache["cached_tokens"],
    )
    yield GaugeMetricFamily("espc_prefix_cache_cached_blocks", "KV blocks held by prefix-cache entries.", value=cache["cached_blocks"])
    yield GaugeMetricFamily("espc_prefix_cache_entries", "Finished requests kept as prefix-cache entries.", value=cache["entries"])
    yield CounterMetricFamily(
        "espc_prefix_cache_evicted_blocks", "KV blocks of prefix-cache entries evicted to make room.", value=cache["evicted_blocks"],
    )


class _Timing:
    """One request's token times, observed into the TTFT and TPOT histograms."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def token(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        self.last = now
        self.tokens += 1

    def done(self) -> None:
        if self.tokens >= 2:
            assert self.first is not None and self.last is not None  # token() set both on the first call
            self.metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))
