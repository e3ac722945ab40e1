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

With a prefix cache (`espc.planner.sim.prefix_cache`), a request that finishes is kept for
its KV (its full blocks, where they are) instead of being freed, and a plan's `PrefixHit`
gives a waiting request read-only views of a cached prefix: they count in the request's
`kv` (the scheduler reads them as context: decode shards, ring members) but not in `used`,
which counts what each pool owns for running requests and for the cached entries they
read. Cached memory no running request reads is `cached` per instance: `free` counts it
as free, and `start` evicts it (least recently used first) where a plan needs the room.
The runtime driver mirrors evictions in its page tables: `take_evictions`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace

from espc.planner.plan import (
    DecodeBatch,
    IterationPlan,
    KVState,
    Migration,
    PlanError,
    PrefillBatch,
    PrefillItem,
    PrefixHit,
    TokenRange,
)
from espc.planner.sim.prefix_cache import PrefixCache, PrefixMatch, chain
from espc.planner.sim.workload import Request

# A token position past any sequence: releases "from here to the end".
_END = 1 << 62


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
    # Prefix caching: chained keys of the request's known blocks (prompt, then output), the
    # cached entry it reads its prefix from, and the views of it it holds (instance -> ranges).
    block_keys: list[int] = field(default_factory=list)
    source: int | None = None
    borrowed: dict[int, list[list[int]]] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens its last prefill read from the cache

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

    def owned_on(self, instance: int) -> int:
        """Tokens the request's KV takes on `instance`: what it holds less its views."""
        return self.tokens_on(instance) - sum(end - start for start, end in self.borrowed.get(instance, ()))


class StateError(RuntimeError):
    """A plan that does not fit the state (a scheduler bug), with the plan dump."""


class ClusterState:
    """Requests and KV pools of `len(capacity)` instances; capacities are in tokens."""

    def __init__(self, capacity: Iterable[int], check: bool = False, prefix: PrefixCache | None = None):
        self.capacity = list(capacity)
        self.used = [0] * len(self.capacity)  # owned by running requests and the entries they read
        self.cached = [0] * len(self.capacity)  # owned by cached entries nobody reads: evictable
        self.prefix = prefix
        # Cached requests evicted since the runtime's tables last released them, in order.
        self._evicted: list[int] = []
        self.idle: set[int] = set(range(len(self.capacity)))
        self.prefilling: set[int] = set()  # instances running a prefill batch
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
        if self.prefix is not None:
            state.block_keys = chain(request.prefix_hashes)
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
        Fail the requests holding KV on it first (`cache_readers` too): the cached entries
        it holds part of are evicted."""
        if self.prefix is not None:
            for entry in [e for e in self.prefix.entries if self.requests[e].kv_tokens.get(instance)]:
                if entry in self.prefix.entries:
                    self._evict_subtree(entry)
        if self.used[instance]:
            raise StateError(f"instance {instance} still holds {self.used[instance]} tokens of KV")
        self.retired.add(instance)
        self.idle.discard(instance)
        self.prefilling.discard(instance)
        self.capacity[instance] = 0

    # ------------------------------------------------------------------------ prefix cache

    def add_block(self, state: RequestState, block_id: int) -> None:
        """The request's sequence grew by a full block (the runtime's generated tokens)."""
        if self.prefix is not None:
            state.block_keys.extend(chain((block_id,), state.block_keys[-1] if state.block_keys else 0))

    def prefix_match(self, state: RequestState) -> PrefixMatch | None:
        """The longest cached prefix a waiting request could read instead of computing."""
        if self.prefix is None or state.kv_len or not state.prefilling:
            return None
        return self.prefix.match(state.block_keys, state.pending_target)

    def hit_holders(self, match: PrefixMatch) -> dict[int, int]:
        """Where a match's prefix lives: instance -> tokens of [0, match.tokens) it holds."""
        holders = {}
        for instance, ranges in self.requests[match.source].kv.items():
            tokens = sum(max(0, min(end, match.tokens) - start) for start, end in ranges)
            if tokens:
                holders[instance] = tokens
        return holders

    def pinned_by(self, match: PrefixMatch, covered: Collection[int] = ()) -> dict[int, int]:
        """Room a hit on `match` takes: the tokens of the cached entries it would read that
        no running request reads yet (they stop being evictable), per instance. `covered`:
        entries (with their ancestors) that other hits of the same plan pin already."""
        assert self.prefix is not None  # a match comes from the cache
        taken: dict[int, int] = {}
        for cached in self.prefix.lineage(match.source):
            if cached.pins or cached.id in covered:
                break  # pins reach every ancestor: the rest are pinned too
            owner = self.requests[cached.id]
            for instance in owner.kv_tokens:
                taken[instance] = taken.get(instance, 0) + owner.owned_on(instance)
        return taken

    def cache_readers(self, instance: int) -> list[RequestState]:
        """Running requests that read a cached entry holding KV on `instance`."""
        if self.prefix is None:
            return []
        return [
            state for state in self.running.values()
            if state.source is not None
            and any(self.requests[e.id].kv_tokens.get(instance) for e in self.prefix.lineage(state.source))
        ]

    def evict(self, entry: int) -> None:
        """Evict a cached request and every entry below it now (none may be read)."""
        if self.prefix is None or entry not in self.prefix.entries:
            raise StateError(f"request {entry} is not cached")
        self._evict_subtree(entry)

    def take_evictions(self) -> list[int]:
        """Cached requests evicted since the last call: the runtime's page tables release them."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def with_evictions(self, plan: IterationPlan) -> IterationPlan:
        """The plan with the cached entries it must evict to fit: on every instance where the
        plan's peak (see `espc.planner.plan`) exceeds the capacity, least recently used
        unpinned entries go, each with the entries below it. Entries the plan's hits read are
        kept. Pure: `start` applies them."""
        if self.prefix is None or plan.evictions:
            return plan
        need = [used + cached - cap for used, cached, cap in zip(self.used, self.cached, self.capacity)]
        for request_id in plan.frees:
            for instance in self.requests[request_id].kv_tokens:
                need[instance] -= self.requests[request_id].owned_on(instance)
        for batch in plan.batches:
            for item in batch.items:
                if isinstance(item, PrefillItem):
                    for kept in item.retention:
                        need[kept.instance] += len(kept.range)
                else:
                    need[item.master] += 1
        for migration in plan.migrations:
            need[migration.dst] += len(migration.range)
        if all(n <= 0 for n in need):
            return plan
        read = {entry.id for hit in plan.hits for entry in self.prefix.lineage(hit.source)}
        evicted: list[int] = []
        for entry in self.prefix.lru_unpinned():
            if entry in read or entry in evicted:
                continue
            held = self.requests[entry].kv_tokens
            if not any(need[instance] > 0 and held.get(instance) for instance in range(len(need))):
                continue
            subtree = self.prefix.subtree(entry)
            if read.intersection(subtree):
                continue
            for member in subtree:
                if member in evicted:
                    continue
                evicted.append(member)
                owner = self.requests[member]
                for instance in owner.kv_tokens:
                    need[instance] -= owner.owned_on(instance)
            if all(n <= 0 for n in need):
                break
        return replace(plan, evictions=tuple(evicted))

    # ------------------------------------------------------------------------ applying plans

    def kv_state(self) -> KVState:
        owners: Iterator[RequestState] = iter(self.running.values())
        if self.prefix is not None:  # cached entries, and waiting requests a plan's hits gave views
            waiting = (state for state in self.waiting.values() if state.kv_len)
            owners = itertools.chain(self.running.values(), waiting, (self.requests[e] for e in self.prefix.entries))
        held, shared = {}, {}
        for state in owners:
            for instance, ranges in state.kv.items():
                if ranges:
                    held[instance, state.id] = tuple(TokenRange(start, end) for start, end in ranges)
            for instance, ranges in state.borrowed.items():
                if ranges:
                    shared[instance, state.id] = tuple(TokenRange(start, end) for start, end in ranges)
        return KVState(dict(enumerate(self.capacity)), held, shared)

    def start(self, plan: IterationPlan) -> IterationPlan:
        """Reserve the plan's KV and mark its instances and requests busy. Returns the plan as
        applied: with the cache evictions it needs (`with_evictions`)."""
        plan = self.with_evictions(plan)
        for entry in plan.evictions:
            if self.prefix is None or entry not in self.prefix.entries:
                raise StateError(f"plan evicts request {entry}, which is not cached:\n{plan}")
            self._evict_subtree(entry)
        if self.prefix is not None:
            self.prefix.queried_tokens += sum(
                self.requests[item.request_id].pending_target
                for batch in plan.batches if isinstance(batch, PrefillBatch)
                for item in batch.items if not self.requests[item.request_id].kv_len
            )
        for hit in plan.hits:
            self._hit(hit, plan)
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
            if isinstance(batch, PrefillBatch):
                self.prefilling.update(batch.instances)
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
        return plan

    def complete(self, batch: PrefillBatch | DecodeBatch) -> list[RequestState]:
        """Apply a finished batch: progress, first tokens, completions (their KV is freed)."""
        done = []
        for instance in batch.instances:
            if instance not in self.retired:
                self.idle.add(instance)
        if isinstance(batch, PrefillBatch):
            self.prefilling.difference_update(batch.instances)
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
        viewed = state.borrowed.get(instance)
        if viewed:  # views in the span are dropped, not freed: the cached entry owns them
            overlap = sum(max(0, min(end, span.end) - max(start, span.start)) for start, end in viewed)
            self.used[instance] += overlap  # cancels the decrement below, which counts them
            state.borrowed[instance] = _cut(viewed, span)
            if not state.borrowed[instance]:
                del state.borrowed[instance]
        kept = _cut(state.kv.get(instance, ()), span)
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
        for instance in state.kv_tokens:
            self.used[instance] -= state.owned_on(instance)
        state.kv.clear()
        state.kv_tokens.clear()
        state.kv_len = 0
        state.borrowed.clear()
        if state.source is not None:
            self._pin(state.source, -1)
            state.source = None

    def _finish(self, state: RequestState) -> None:
        state.finish_s = self.now
        del self.running[state.id]
        if not self._keep(state):
            self._free_all(state)

    def _keep(self, state: RequestState) -> bool:
        """Cache a finished request where its KV is, when it computed at least one full
        block of its own; True when it did. Its KV past its last full block stays with it
        (fewer than a block's tokens, evicted with it): releasing a span out of a page
        table compacts it, which would move slots a later hit reads (espc.backend.kvpool)."""
        prefix = self.prefix
        if prefix is None:
            return False
        blocks = min(len(state.block_keys), state.kv_len // prefix.block_tokens)
        start = state.cached_tokens if state.source is not None else 0
        if blocks * prefix.block_tokens <= start:
            return False
        prefix.insert(state.id, state.block_keys[:blocks], start, state.source)
        for instance in state.kv_tokens:  # the running request's KV becomes cached memory
            owned = state.owned_on(instance)
            self.used[instance] -= owned
            self.cached[instance] += owned
        if state.source is not None:
            self._pin(state.source, -1)  # the running reader leaves; the child entry stays
        while len(prefix.entries) > prefix.max_entries:
            victims = [e for e in prefix.lru_unpinned() if e != state.id] or [state.id]
            self._evict_subtree(victims[0])
        return True

    def _hit(self, hit: PrefixHit, plan: IterationPlan) -> None:
        """Give a waiting request views of a cached prefix [0, hit.tokens)."""
        state, prefix = self.requests[hit.request_id], self.prefix
        if prefix is None or hit.source not in prefix.entries:
            raise StateError(f"{hit}: request {hit.source} is not cached:\n{plan}")
        if state.kv_len or not state.prefilling:
            raise StateError(f"{hit}: the request already holds {state.kv_len} tokens of KV:\n{plan}")
        if hit.tokens > prefix.tokens(hit.source):
            raise StateError(f"{hit}: the entry holds only [0, {prefix.tokens(hit.source)}):\n{plan}")
        for instance, ranges in self.requests[hit.source].kv.items():
            views = _cut(ranges, TokenRange(hit.tokens, _END))
            if not views:
                continue
            tokens = sum(end - start for start, end in views)
            state.kv[instance] = [list(r) for r in views]
            state.borrowed[instance] = [list(r) for r in views]
            state.kv_tokens[instance] = tokens
            state.kv_len += tokens
        state.source = hit.source
        state.cached_tokens = hit.tokens
        self._pin(hit.source, +1)
        prefix.touch(hit.source)
        prefix.hit_tokens += hit.tokens

    def _pin(self, entry: int, delta: int) -> None:
        """A running reader of `entry` arrives (+1) or leaves (−1): entries move between
        cached (evictable) and used memory as their pin count leaves or reaches zero."""
        assert self.prefix is not None  # only requests that hit a cache have a source
        for cached in self.prefix.lineage(entry):
            was = cached.pins
            cached.pins += delta
            if bool(was) == bool(cached.pins):
                continue
            owner = self.requests[cached.id]
            sign = 1 if cached.pins else -1
            for instance in owner.kv_tokens:
                owned = owner.owned_on(instance)
                self.used[instance] += sign * owned
                self.cached[instance] -= sign * owned

    def _evict_subtree(self, entry: int) -> None:
        """Free a cached entry and every entry below it (none may be pinned)."""
        assert self.prefix is not None  # only cached entries are evicted
        for member in self.prefix.subtree(entry):
            owner = self.requests[member]
            cached = self.prefix.entries[member]
            if cached.pins:
                raise StateError(f"cached request {member} is read by a running request: it cannot be evicted")
            for instance in owner.kv_tokens:
                self.cached[instance] -= owner.owned_on(instance)
            self.prefix.remove(member)
            owner.kv.clear()
            owner.kv_tokens.clear()
            owner.borrowed.clear()
            owner.kv_len = 0
            owner.source = None
            self._evicted.append(member)

    def _preempt(self, state: RequestState) -> None:
        """Drop a request's KV and queue it to recompute (vLLM's recompute preemption)."""
        self._free_all(state)
        state.preemptions += 1
        state.prefill_target = state.request.prompt_len + state.generated
        del self.running[state.id]
        self.waiting[state.id] = state


def _cut(ranges: Iterable[list[int]], span: TokenRange) -> list[list[int]]:
    """`ranges` less `span`."""
    kept = []
    for start, end in ranges:
        if end <= span.start or span.end <= start:
            kept.append([start, end])
            continue
        if start < span.start:
            kept.append([start, span.start])
        if span.end < end:
            kept.append([span.end, end])
    return kept
