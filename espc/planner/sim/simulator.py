"""Discrete-event simulator: a scheduler, a request stream and a cost model -> latencies.

It drives the same `Scheduler` interface the runtime driver uses. Events are request
arrivals, batch completions and migration completions, processed in (time, priority, id)
order — completions before arrivals at the same instant, so freed instances and KV are
visible to the requests that arrive then — which makes every run deterministic. After each
instant the scheduler is asked for a plan; the plan's batches start at once and finish
after the time the cost model gives them; migrations run beside the batches (DMA over the link between the two instances)
and hold KV on both ends until they finish.

Contention: where `espc profile` measured instances that share CPU cores (the cost model's
`contention` table), a batch progresses at 1 / `contention_factor(phase, dop, others)` of
its cost-model time per second while `others` instances besides its own are busy, and every
batch in flight is re-timed whenever one starts or ends (`_InFlight`). Without a table
each batch simply takes its cost-model time.

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


@dataclass(slots=True)
class _InFlight:
    """A batch running on a machine with measured contention: `work_s` of its cost-model
    time is left as of `since_s`, done at 1 / `factor` per second; `event` is the id of its
    current completion event (earlier ones are stale)."""

    batch: PrefillBatch | DecodeBatch
    start_s: float
    work_s: float
    since_s: float
    factor: float = 0.0
    event: int = -1


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
    for request in requests:  # taken in after the runtime's admission time (0 without a calibration)
        heapq.heappush(events, (request.arrival_s + deployment.cost.admission_s, _ARRIVAL, request.id, request))
    busy = [0.0] * deployment.num_instances
    timeline: list[BatchRecord] = []
    unfinished = "never scheduled: the run ended with the request still queued"
    cost = deployment.cost
    in_flight: dict[int, _InFlight] | None = {} if cost.contention else None  # by the first instance

    def retime(now: float) -> None:
        """Every batch in flight at the pace of the instances busy now (see the module docstring)."""
        assert in_flight is not None
        running = sum(len(flight.batch.instances) for flight in in_flight.values())
        for flight in in_flight.values():
            flight.work_s = max(0.0, flight.work_s - (now - flight.since_s) / flight.factor) if flight.factor else flight.work_s
            flight.since_s = now
            dop = len(flight.batch.instances)
            factor = cost.contention_factor(flight.batch.phase, dop, running - dop)
            if factor != flight.factor:
                flight.factor, flight.event = factor, next(sequence)
                heapq.heappush(events, (now + flight.work_s * factor, _BATCH_DONE, flight.event, flight))

    while events:
        if in_flight is not None:
            while events and events[0][1] == _BATCH_DONE and events[0][2] != cast(_InFlight, events[0][3]).event:
                heapq.heappop(events)  # re-timed since
            if not events:
                break
        now = events[0][0]
        state.now = now
        changed = False
        while events and events[0][0] == now:
            _, kind, event, payload = heapq.heappop(events)
            # The kind says what the payload is (see the pushes below).
            if kind == _BATCH_DONE:
                if isinstance(payload, _InFlight):
                    if event != payload.event:
                        continue  # re-timed since
                    assert in_flight is not None
                    del in_flight[payload.batch.instances[0]]
                    changed = True
                    for instance in payload.batch.instances:
                        busy[instance] += now - payload.start_s
                    if record_timeline:
                        timeline.append(_batch_record(payload.batch, payload.start_s, now))
                    payload = payload.batch
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
        if changed:
            retime(now)
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
                if in_flight is not None:
                    in_flight[batch.instances[0]] = _InFlight(batch, now, seconds, now)
                    continue
                heapq.heappush(events, (now + seconds, _BATCH_DONE, next(sequence), batch))
                for instance in batch.instances:
                    busy[instance] += seconds
                if record_timeline:
                    timeline.append(_batch_record(batch, now, now + seconds))
            if in_flight is not None and plan.batches:
                retime(now)
            for migration in plan.migrations:
                seconds = scheduler.migration_seconds(migration)
                heapq.heappush(events, (now + seconds, _MIGRATION_DONE, next(sequence), migration))
            if plan.batches or plan.migrations:
                break

    if in_flight is not None:
        timeline.sort(key=lambda record: record.start_s)  # recorded as they ended
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
