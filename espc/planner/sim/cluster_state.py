"""The global table a scheduler plans against: requests, their KV placement, idle instances.

The simulator owns one (virtual clock) and so will the runtime driver (real clock): both
call `Scheduler.schedule(state)` whenever instances are idle, `start()` the plan it returns,
and `complete()` each batch when it finishes. Schedulers never mutate the state; they read
it and return an IterationPlan, which `start()` applies (and, in checked mode, verifies
against the pool first).

Token accounting of one request: a prefill processes the request's known sequence
(prompt, plus what it generated before a preemption) and produces one new token; each
decode step appends the KV of the last generated token and produces the next one. So
while decoding a request holds `prompt_len + generated - 1` tokens of KV.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from espc.planner.plan import (
    DecodeBatch,
    IterationPlan,
    KVState,
    Migration,
    PlanError,
    PrefillBatch,
    PrefillItem,
    TokenRange,
)
from espc.planner.sim.workload import Request


@dataclass(eq=False)
class RequestState:
    """A request's progress and where its KV lives."""

    request: Request
    id: int = field(init=False)
    generated: int = 0
    prefill_target: int | None = None  # KV length the pending prefill must reach; None: decoding
    # instance -> [start, end) ranges held, as mutable pairs: a decode step extends the last.
    kv: dict[int, list[list[int]]] = field(default_factory=dict)
    # Token counts kept beside the ranges: schedulers read them on every decode step.
    kv_tokens: dict[int, int] = field(default_factory=dict)  # instance -> tokens held
    kv_len: int = 0
    busy: bool = False  # in a running batch or migration
    migrations_in_flight: int = 0  # a plan may move several ranges of one request at once
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    migrated_tokens: int = 0
    rejected: str | None = None  # the reason, when refused

    def __post_init__(self) -> None:
        self.id = self.request.id
        if self.prefill_target is None and self.generated == 0:
            self.prefill_target = self.request.prompt_len

    @property
    def decoding(self) -> bool:
        return self.prefill_target is None and self.finish_s is None

    @property
    def done(self) -> bool:
        """Finished or refused: it will never be scheduled again."""
        return self.finish_s is not None

    @property
    def prefilling(self) -> bool:
        return self.prefill_target is not None

    @property
    def pending_target(self) -> int:
        """`prefill_target` of a request known to be prefilling: every waiting request is
        (it arrives with its prompt as the target; a preempted one gets it back)."""
        assert self.prefill_target is not None, f"request {self.id} is not prefilling"
        return self.prefill_target

    def tokens_on(self, instance: int) -> int:
        return self.kv_tokens.get(instance, 0)

    def shards(self) -> tuple[tuple[int, int], ...]:
        """(instance, tokens) for every instance holding KV of the request."""
        return tuple(self.kv_tokens.items())


class StateError(RuntimeError):
    """A plan that does not fit the state (a scheduler bug), with the plan dump."""


class ClusterState:
    """Requests and KV pools of `len(capacity)` instances; capacities are in tokens."""

    def __init__(self, capacity: Iterable[int], check: bool = False):
        self.capacity = list(capacity)
        self.used = [0] * len(self.capacity)
        self.idle: set[int] = set(range(len(self.capacity)))
        self.now = 0.0
        self.check = check  # verify every plan against the pool before applying it
        self.requests: dict[int, RequestState] = {}
        # Not started, or preempted; in arrival order, except that a preempted request
        # rejoins at the end (schedulers that serve FCFS sort by arrival).
        self.waiting: dict[int, RequestState] = {}
        self.running: dict[int, RequestState] = {}  # hold KV or are in flight
        self.iteration = 0
        self.migrated_tokens = 0
        # Instances taken out of service (a runtime worker that died): never idle again.
        self.retired: set[int] = set()
        # Requests ended by `fail` so far: a scheduler that indexes the queue itself re-reads
        # it when this changes (every other change of the queue comes from its own plans).
        self.failures = 0

    @property
    def num_instances(self) -> int:
        return len(self.capacity)

    def free(self, instance: int) -> int:
        return self.capacity[instance] - self.used[instance]

    # ------------------------------------------------------------------ arrivals, refusals

    def arrive(self, request: Request) -> RequestState:
        state = RequestState(request)
        self.requests[request.id] = state
        self.waiting[state.id] = state
        return state

    def reject(self, state: RequestState, reason: str) -> None:
        state.rejected = reason
        state.finish_s = self.now
        del self.waiting[state.id]

    # ------------------------------------------------- the runtime's early ends and faults

    def finish(self, state: RequestState) -> None:
        """End a request before its output length (a stop token); frees its KV."""
        if state.busy or state.done:
            raise StateError(f"request {state.id} cannot finish now: it is {'in flight' if state.busy else 'done'}")
        self._finish(state)

    def fail(self, state: RequestState, reason: str) -> None:
        """End a request with an error (cancelled, or its instance failed), wherever it is:
        its KV is freed now, and a batch or migration still in flight that carries it
        completes without it."""
        if state.done:
            return
        self._free_all(state)
        state.rejected = reason
        state.finish_s = self.now
        state.busy = False
        self.failures += 1
        self.waiting.pop(state.id, None)
        self.running.pop(state.id, None)

    def retire(self, instance: int) -> None:
        """Take an instance out of service: it is never idle again and holds nothing.
        Fail the requests holding KV on it first."""
        if self.used[instance]:
            raise StateError(f"instance {instance} still holds {self.used[instance]} tokens of KV")
        self.retired.add(instance)
        self.idle.discard(instance)
        self.capacity[instance] = 0

    # ------------------------------------------------------------------------ applying plans

    def kv_state(self) -> KVState:
        held = {
            (instance, state.id): tuple(TokenRange(start, end) for start, end in ranges)
            for state in self.running.values()
            for instance, ranges in state.kv.items()
            if ranges
        }
        return KVState(dict(enumerate(self.capacity)), held)

    def start(self, plan: IterationPlan) -> None:
        """Reserve the plan's KV and mark its instances and requests busy."""
        if self.check:
            try:
                plan.verify(self.kv_state())
            except PlanError as error:
                raise StateError(f"invalid plan at t={self.now:.6f}s:\n{plan}\n{error}") from None
        for request_id in plan.frees:
            self._preempt(self.requests[request_id])
        for batch in plan.batches:
            for instance in batch.instances:
                if instance not in self.idle:
                    raise StateError(f"plan uses busy instance {instance}:\n{plan}")
                self.idle.discard(instance)
            for item in batch.items:
                state = self.requests[item.request_id]
                if state.busy:
                    raise StateError(f"request {state.id} is already in flight:\n{plan}")
                state.busy = True
                if state.first_scheduled_s is None:
                    state.first_scheduled_s = self.now
                self.waiting.pop(state.id, None)
                self.running[state.id] = state
                if isinstance(item, PrefillItem):
                    for kept in item.retention:
                        self._hold(state, kept.instance, kept.range.start, kept.range.end)
                else:
                    self._hold(state, item.master, state.kv_len, state.kv_len + 1)
        for migration in plan.migrations:
            state = self.requests[migration.request_id]
            state.busy = True
            state.migrations_in_flight += 1
            self._hold(state, migration.dst, migration.range.start, migration.range.end)
        self.iteration += 1

    def complete(self, batch: PrefillBatch | DecodeBatch) -> list[RequestState]:
        """Apply a finished batch: progress, first tokens, completions (their KV is freed)."""
        done = []
        for instance in batch.instances:
            if instance not in self.retired:
                self.idle.add(instance)
        for item in batch.items:
            state = self.requests[item.request_id]
            if state.done:
                continue  # failed while the batch ran
            state.busy = False
            if isinstance(item, PrefillItem) and state.prefill_target is not None:
                if item.end < state.prefill_target:
                    continue  # a chunk of a longer prefill
                state.prefill_target = None
                if state.first_token_s is None:
                    state.first_token_s = self.now
            state.generated += 1
            if state.generated >= state.request.output_len:
                self._finish(state)
                done.append(state)
        return done

    def complete_migration(self, migration: Migration) -> None:
        state = self.requests[migration.request_id]
        if state.done:
            return  # failed while the migration ran; its KV is already freed
        state.migrations_in_flight -= 1
        # Busy until the last of its migrations lands: its KV is held on both ends until then.
        state.busy = state.migrations_in_flight > 0
        self._release(state, migration.src, migration.range)
        state.migrated_tokens += len(migration.range)
        self.migrated_tokens += len(migration.range)

    # ------------------------------------------------------------------------------ helpers

    def _hold(self, state: RequestState, instance: int, start: int, end: int) -> None:
        ranges = state.kv.get(instance)
        if ranges is None:
            state.kv[instance] = [[start, end]]
        elif ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
        tokens = end - start
        state.kv_tokens[instance] = state.kv_tokens.get(instance, 0) + tokens
        state.kv_len += tokens
        self.used[instance] += tokens
        if self.used[instance] > self.capacity[instance]:
            raise StateError(
                f"instance {instance} over capacity: {self.used[instance]} > {self.capacity[instance]} "
                f"(request {state.id} [{start}, {end}))"
            )

    def _release(self, state: RequestState, instance: int, span: TokenRange) -> None:
        kept = []
        for start, end in state.kv.get(instance, ()):
            if end <= span.start or span.end <= start:
                kept.append([start, end])
                continue
            if start < span.start:
                kept.append([start, span.start])
            if span.end < end:
                kept.append([span.end, end])
        released = state.tokens_on(instance) - sum(end - start for start, end in kept)
        self.used[instance] -= released
        state.kv_len -= released
        if kept:
            state.kv[instance] = kept
            state.kv_tokens[instance] -= released
        else:
            state.kv.pop(instance, None)
            state.kv_tokens.pop(instance, None)

    def _free_all(self, state: RequestState) -> None:
        for instance, tokens in state.kv_tokens.items():
            self.used[instance] -= tokens
        state.kv.clear()
        state.kv_tokens.clear()
        state.kv_len = 0

    def _finish(self, state: RequestState) -> None:
        self._free_all(state)
        state.finish_s = self.now
        del self.running[state.id]

    def _preempt(self, state: RequestState) -> None:
        """Drop a request's KV and queue it to recompute (vLLM's recompute preemption)."""
        self._free_all(state)
        state.preemptions += 1
        state.prefill_target = state.request.prompt_len + state.generated
        del self.running[state.id]
        self.waiting[state.id] = state
