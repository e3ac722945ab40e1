"""What the server measures itself, as Prometheus text for `GET /metrics`: latencies as its
clients see them and request outcomes, beside the engine's state from `Engine.stats()`."""

from __future__ import annotations

import time
from collections.abc import Sequence


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, name: str, help_: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the server observes itself (latencies as its clients see them, outcomes); the
    engine's state comes from `Engine.stats()` when /metrics is read."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            "espc_time_to_first_token_seconds", "Time from a completion request's arrival to its first token.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tpot = Histogram(
            "espc_time_per_output_token_seconds", "Mean time between a request's tokens after the first (requests with two or more).",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.outcomes: dict[str, int] = {}
        self.in_flight = 0

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def render(self, stats: dict | None, running: bool) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, int) else f"{name}{labels} {value!r}" for labels, value in samples)

        metric("espc_up", "gauge", "1 while the engine runs.", [("", int(running))])
        metric("espc_http_requests_in_flight", "gauge", "Completion requests being answered (streams until they end).", [("", self.in_flight)])
        metric(
            "espc_requests_total", "counter", "Completion requests by outcome (finish reason, rejected, error, cancelled, invalid).",
            [(f'{{outcome="{what}"}}', count) for what, count in sorted(self.outcomes.items())],
        )
        lines += self.ttft.lines() + self.tpot.lines()
        if stats is not None:
            instances = range(stats["instances"])
            used, capacity = stats["kv_used_tokens"], stats["kv_capacity_tokens"]
            metric("espc_queue_length", "gauge", "Requests waiting for their first prefill.", [("", stats["queued"] + stats["waiting"])])
            metric("espc_requests_running", "gauge", "Requests prefilled or decoding.", [("", stats["running"])])
            metric("espc_instances", "gauge", "Elastic instances of the deployment.", [("", stats["instances"])])
            metric("espc_instances_in_service", "gauge", "Instances whose worker has not failed.", [("", stats["in_service"])])
            metric(
                "espc_instance_dop", "gauge", "Degree of parallelism of the batch each instance runs (0: idle).",
                [(f'{{instance="{i}"}}', stats["dop"][i]) for i in instances],
            )
            metric("espc_kv_used_tokens", "gauge", "KV slots in use per instance.", [(f'{{instance="{i}"}}', used[i]) for i in instances])
            metric("espc_kv_capacity_tokens", "gauge", "KV slots per instance.", [(f'{{instance="{i}"}}', capacity[i]) for i in instances])
            metric(
                "espc_kv_usage_ratio", "gauge", "KV slots in use over all slots.",
                [("", sum(used) / sum(capacity) if sum(capacity) else 0.0)],
            )
            metric("espc_iterations_total", "counter", "Scheduling iterations dispatched.", [("", stats["iterations"])])
            metric("espc_migrations_total", "counter", "KV migrations between instances.", [("", stats["migrations"])])
            metric("espc_migrated_bytes_total", "counter", "KV bytes moved by migrations.", [("", stats["migrated_bytes"])])
            codes = {"queue_full": 0, "ttft_unreachable": 0, "unservable": 0} | stats["rejected"]
            metric(
                "espc_rejected_requests_total", "counter", "Requests refused by admission control, by reason.",
                [(f'{{code="{code}"}}', count) for code, count in sorted(codes.items())],
            )
            metric("espc_worker_failures_total", "counter", "Workers taken out of service.", [("", len(stats["failures"]))])
        return "\n".join(lines) + "\n"


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
