"""Discrete-event simulator: a scheduler, a request stream and a cost model -> latencies.

It drives the same `Scheduler` interface the runtime driver uses. Events are request
arrivals, batch completions and migration completions, processed in (time, priority, id)
order — completions before arrivals at the same instant, so freed instances and KV are
visible to the requests that arrive then — which makes every run deterministic. After each
instant the scheduler is asked for a plan; the plan's batches start at once and finish
after the time the cost model gives them; migrations run beside the batches (DMA over the
link between the two instances) and hold KV on both ends until they finish.

A `RunWatch` may stop a run early (a goodput trial whose attainment target can no longer
be met: metrics.TrialJudge); the requests left then end unfinished, as at the end of a run.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from espc.planner.plan import DecodeBatch, Migration, PrefillBatch
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.prefix_cache import PrefixCache
from espc.planner.sim.strategies import Scheduler
from espc.planner.sim.workload import PREFIX_BLOCK_TOKENS, Request

# Cached prefixes a simulated cluster keeps at most (see PrefixCache.max_entries): the
# runtime bounds them by its page tables; the simulator by the same order of magnitude.
MAX_CACHED_PREFIXES = 256

# Event priorities at one instant.
_BATCH_DONE, _MIGRATION_DONE, _ARRIVAL = 0, 1, 2
# A scheduler may first free KV (preemption) and then plan batches into the freed space.
_MAX_PLANS_PER_INSTANT = 8


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request (times in seconds)."""

    id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    first_scheduled_s: float | None
    first_token_s: float | None
    finish_s: float | None
    preemptions: int
    migrated_tokens: int
    rejected: str | None

    @property
    def completed(self) -> bool:
        return self.rejected is None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (0 for one-token outputs)."""
        if not self.completed or self.first_token_s is None:
            return None
        assert self.finish_s is not None  # completed
        return (self.finish_s - self.first_token_s) / max(self.output_len - 1, 1)

    @property
    def e2e_s(self) -> float | None:
        if not self.completed:
            return None
        assert self.finish_s is not None  # completed
        return self.finish_s - self.arrival_s

    @property
    def queueing_s(self) -> float | None:
        return None if self.first_scheduled_s is None else self.first_scheduled_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch on the timeline: which instances ran which requests when."""

    start_s: float
    end_s: float
    phase: str
    instances: tuple[int, ...]
    request_ids: tuple[int, ...]
    tokens: int


@dataclass
class SimulationResult:
    strategy: str
    records: list[RequestRecord]
    duration_s: float
    iterations: int
    instance_busy_s: list[float]
    migrated_tokens: int
    migrated_bytes: int
    timeline: list[BatchRecord] = field(default_factory=list)
    # The prefix cache's counters (0 without one): prompt tokens of fresh prefills looked up
    # in it and served from it.
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def utilisation(self) -> list[float]:
        return [busy / self.duration_s if self.duration_s else 0.0 for busy in self.instance_busy_s]

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the queried prompt tokens the prefix cache served."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


class RunWatch(Protocol):
    """Follows a run and may stop it: told of every arrival and every request that ends
    (completed or refused), asked after every instant whether to stop."""

    def arrived(self, request: RequestState) -> None: ...

    def ended(self, request: RequestState) -> None: ...

    def stop(self, now: float) -> str | None:
        """Why the run should stop at `now` (every request left ends unfinished with this
        reason), or None to go on."""
        ...


def request_record(state: RequestState) -> RequestRecord:
    request = state.request
    return RequestRecord(
        request.id, request.arrival_s, request.prompt_len, request.output_len,
        state.first_scheduled_s, state.first_token_s, state.finish_s,
        state.preemptions, state.migrated_tokens, state.rejected,
    )


def simulate(
    scheduler: Scheduler,
    requests: Sequence[Request],
    *,
    check: bool = False,
    record_timeline: bool = False,
    watch: RunWatch | None = None,
    prefix_caching: bool = False,
) -> SimulationResult:
    """Run `requests` through `scheduler` on its deployment; `check` verifies every plan;
    `watch` may stop the run early (see RunWatch); `prefix_caching`: finished requests' KV
    is kept and requests whose `prefix_hashes` repeat it may read it (espc.planner.sim.prefix_cache)."""
    deployment = scheduler.deployment
    cache = PrefixCache(PREFIX_BLOCK_TOKENS, MAX_CACHED_PREFIXES) if prefix_caching else None
    state = ClusterState(deployment.capacity, check=check, prefix=cache)
    events: list[tuple[float, int, int, object]] = []
    sequence = itertools.count()
    for request in requests:
        heapq.heappush(events, (request.arrival_s, _ARRIVAL, request.id, request))
    busy = [0.0] * deployment.num_instances
    timeline: list[BatchRecord] = []
    unfinished = "never scheduled: the run ended with the request still queued"

    while events:
        now = events[0][0]
        state.now = now
        while events and events[0][0] == now:
            _, kind, _, payload = heapq.heappop(events)
            # The kind says what the payload is (see the pushes below).
            if kind == _BATCH_DONE:
                ended = state.complete(cast("PrefillBatch | DecodeBatch", payload))
                if watch is not None:
                    for request_state in ended:
                        watch.ended(request_state)
            elif kind == _MIGRATION_DONE:
                state.complete_migration(cast(Migration, payload))
            else:
                arrived = state.arrive(cast(Request, payload))
                reason = scheduler.admit(state, arrived)
                if watch is not None:
                    watch.arrived(arrived)
                if reason is not None:
                    state.reject(arrived, reason)
                    if watch is not None:
                        watch.ended(arrived)
        stopped = watch.stop(now) if watch is not None else None
        if stopped is not None:
            unfinished = stopped
            for _, kind, _, payload in events:
                if kind == _ARRIVAL:  # arrives never: it ends unfinished too
                    state.arrive(cast(Request, payload))
            break
        for _ in range(_MAX_PLANS_PER_INSTANT):
            plan = scheduler.schedule(state)
            if plan is None:
                break
            plan = state.start(plan)
            for batch in plan.batches:
                seconds = scheduler.batch_seconds(batch)
                heapq.heappush(events, (now + seconds, _BATCH_DONE, next(sequence), batch))
                for instance in batch.instances:
                    busy[instance] += seconds
                if record_timeline:
                    timeline.append(_batch_record(batch, now, now + seconds))
            for migration in plan.migrations:
                seconds = scheduler.migration_seconds(migration)
                heapq.heappush(events, (now + seconds, _MIGRATION_DONE, next(sequence), migration))
            if plan.batches or plan.migrations:
                break

    for state_left in list(state.waiting.values()) + list(state.running.values()):
        state_left.rejected = state_left.rejected or unfinished
    records = sorted((request_record(s) for s in state.requests.values()), key=lambda record: record.id)
    duration = max((r.finish_s for r in records if r.finish_s is not None), default=0.0) - min(
        (r.arrival_s for r in records), default=0.0
    )
    return SimulationResult(
        scheduler.name, records, duration, state.iteration, busy, state.migrated_tokens,
        state.migrated_tokens * deployment.kv_bytes_per_token, timeline,
        cache.queried_tokens if cache is not None else 0, cache.hit_tokens if cache is not None else 0,
    )


def _batch_record(batch: PrefillBatch | DecodeBatch, start: float, end: float) -> BatchRecord:
    return BatchRecord(
        start, end, batch.phase, batch.instances, tuple(item.request_id for item in batch.items), batch.num_tokens
    )
