"""Deployments and the baseline schedulers, all behind the one `Scheduler` interface.

A Deployment fixes how devices form instances (tp devices each), their KV capacity and
the links between them. A Scheduler looks at the ClusterState whenever instances are idle
and returns an IterationPlan for them. The baselines are the systems LoongServe compares
against, configured as their authors ship them:

- `StaticScheduler`: fixed groups of `sp` instances, each group a replica with vLLM-style
  continuous batching (new prefills first, FCFS, then one decode step of everything
  running; recompute preemption when a decode finds no free KV slot). `sp = 1` and
  `tp = devices per node` is vLLM's TP deployment (static-tp); `sp > 1` prefills with ring
  attention across the group and shards the KV over it (static-sp). Groups may differ in
  size, with requests routed by prompt length — the heterogeneous configurations of
  best-static.
- `ChunkedScheduler`: Sarathi-Serve / vLLM chunked prefill on every instance: a token
  budget per iteration filled with decodes first, then the prefill in progress, then new
  prefills FCFS.
- `DisaggregatedScheduler`: DistServe's prefill and decode pools; after its prefill a
  request's KV moves to the decode instance with the most room, charged on the real link.

With prefix caching on (`simulate(prefix_caching=True)`), the static and chunked baselines
behave like vLLM's automatic prefix caching behind a KV-aware router (Dynamo's): a request
is routed to the group holding the longest cached prefix of its prompt unless that group's
load exceeds the least loaded one's by more than the tokens the hit saves, and a prefill
reads a cached prefix that lies inside its group instead of computing it
(`group_prefix_hit`). DistServe has no prefix cache (its prefill instances keep no KV).
"""

from __future__ import annotations

import bisect
import functools
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from espc.frontend.spec import PolicySpec
from espc.planner.plan import (
    Batch,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    PrefixHit,
    Retention,
    TokenRange,
    even_retention,
)
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.costmodel import CostModel, DecodeLoad

# vLLM's defaults (anchors/README.md): batched tokens per iteration and running sequences.
VLLM_MAX_BATCHED_TOKENS = 8192
VLLM_MAX_RUNNING = 256


@dataclass(frozen=True)
class Deployment:
    """The cluster cut into instances of `tp` devices (`ClusterSpec.instances(tp)` order),
    with the KV capacity of each in tokens."""

    tp: int
    capacity: tuple[int, ...]
    cost: CostModel

    @classmethod
    def build(cls, cost: CostModel, tp: int, kv_capacity: int | None = None) -> Deployment:
        """`kv_capacity`: tokens per instance, when not what the spec's memory allows (a
        runtime sized below the device, or a test)."""
        count = len(cost.cluster.instances(tp))
        return cls(tp, (kv_capacity or cost.kv_capacity_tokens(tp),) * count, cost)

    @property
    def num_instances(self) -> int:
        return len(self.capacity)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token


class Scheduler(ABC):
    """Plans iterations for idle instances. Implementations never mutate the state."""

    name: str

    def __init__(self, deployment: Deployment):
        self.deployment = deployment

    def admit(self, state: ClusterState, request: RequestState) -> str | None:
        """None to queue the request, or the reason it can never be served."""
        needed = request.request.prompt_len + request.request.output_len
        largest = self.largest_group_capacity()
        if needed > largest:
            return f"needs {needed:,} KV slots, more than the {largest:,} of the largest instance group"
        return None

    def largest_group_capacity(self) -> int:
        return sum(self.deployment.capacity)

    @abstractmethod
    def schedule(self, state: ClusterState) -> IterationPlan | None:
        """A plan for (some of) the idle instances, or None when there is nothing to do."""

    def batch_seconds(self, batch: Batch) -> float:
        cost, tp = self.deployment.cost, self.deployment.tp
        dop = len(batch.instances)
        if isinstance(batch, PrefillBatch):
            lengths = [item.end - item.start for item in batch.items]
            context = [item.start for item in batch.items]
            return cost.prefill_time(lengths, dop, tp, context, instances=batch.instances)
        return cost.decode_step_time(decode_loads(batch), tp, instances=batch.instances)

    def migration_seconds(self, migration: Migration) -> float:
        return self.deployment.cost.migration_time(
            len(migration.range), src=migration.src, dst=migration.dst, tp=self.deployment.tp
        )



def decode_loads(batch: DecodeBatch) -> list[DecodeLoad]:
    """Each instance's share of a decode step (in `batch.instances` order): the requests it
    masters, the context it holds, and the partial attentions it asks of its peers (one per
    other instance holding a shard of a request it masters) and serves for theirs."""
    position = {instance: index for index, instance in enumerate(batch.instances)}
    masters = [0] * len(position)
    context = [0] * len(position)
    requested = [0] * len(position)
    served = [0] * len(position)
    for item in batch.items:
        master = position[item.master]
        masters[master] += 1
        for instance, tokens in item.shards:
            if tokens == 0:
                continue  # an empty shard computes nothing (lse = −inf): nobody asks it
            context[position[instance]] += tokens
            if instance != item.master:
                requested[master] += 1
                served[position[instance]] += 1
    return [DecodeLoad(*load) for load in zip(masters, context, requested, served)]


def _decode_step(state: ClusterState, group: tuple[int, ...], decoding: list[RequestState]) -> tuple[list[DecodeItem], list[int]]:
    """One decode step for `decoding` on `group`; each new token goes to the freest instance.

    Returns the items and the requests to preempt (latest arrivals first) when the group
    has fewer free slots than requests.
    """
    free = {instance: state.free(instance) for instance in group}
    victims: list[int] = []
    keep = sorted(decoding, key=_arrival)
    while keep and sum(free.values()) < len(keep):
        victim = keep.pop()
        victims.append(victim.id)
        for instance, _ in victim.shards():
            # What it owns: its views of a cached prefix stay with the entry (evictable
            # only if no hit of the same plan reads it).
            free[instance] += victim.owned_on(instance)
    items = []
    for request in keep:
        master = max(group, key=lambda instance: (free[instance], -instance))
        free[master] -= 1
        items.append(DecodeItem(request.id, master, request.shards()))
    return items, victims


def group_prefix_hit(state: ClusterState, request: RequestState, group: Iterable[int]) -> tuple[PrefixHit, dict[int, int]] | None:
    """The cached prefix a waiting request can read when prefilled on `group` (APC: only a
    prefix held inside the group), and the room the hit takes per instance (`pinned_by`)."""
    match = state.prefix_match(request)
    if match is None or not set(state.hit_holders(match)) <= set(group):
        return None
    return PrefixHit(request.id, match.source, match.tokens), state.pinned_by(match)


def saved_tokens(state: ClusterState, request: RequestState, group: Iterable[int]) -> int:
    """Prompt tokens a request would read from the cache on `group` (KV-aware routing)."""
    found = group_prefix_hit(state, request, group)
    return found[0].tokens if found else 0


def _arrival(request: RequestState) -> tuple[float, int]:
    return request.request.arrival_s, request.id


class _Members:
    """The requests routed to each group, so a scheduler looks only at the groups that are
    idle instead of at every request (the simulator asks after every event).

    A group's queued members (waiting in the ClusterState) are indexed apart, in arrival
    order and with their prompt tokens summed: at overload a queue holds thousands of
    requests, and a scheduler reads only its head and its total. The index follows the
    requests the scheduler `touch`es while it builds a plan (a prefill it starts, a
    preemption): `sync`, before it looks at the next state, re-reads the state for them —
    plans are started as they are returned; a request failed from outside
    (ClusterState.failures) makes it re-read every member. Requests that are done are
    dropped lazily."""

    def __init__(self, groups: int):
        self._started: list[dict[int, RequestState]] = [{} for _ in range(groups)]  # out of the queue
        self._queued: list[dict[int, RequestState]] = [{} for _ in range(groups)]
        self._order: list[list[tuple[float, int]]] = [[] for _ in range(groups)]  # _arrival of the queued, sorted
        self._queued_tokens = [0] * groups
        self._counted: dict[int, int] = {}  # queued request -> its tokens in _queued_tokens
        self._group_of: dict[int, int] = {}
        self._touched: set[int] = set()
        self._failures = 0

    def add(self, group: int, request: RequestState) -> None:
        """Route the request to the group (queued or not: the next look reads which)."""
        self._group_of[request.id] = group
        self._started[group][request.id] = request
        self._touched.add(request.id)

    def touch(self, request_id: int) -> None:
        """The request leaves or rejoins its group's queue with the plan being built."""
        self._touched.add(request_id)

    def live(self, group: int) -> list[RequestState]:
        """The group's members out of its queue that are not done: after `sync`, those
        running (all of them for a scheduler that never syncs: it indexes no queue)."""
        members = self._started[group]
        for request_id in [i for i, request in members.items() if request.done]:
            del members[request_id]
            if self._group_of.get(request_id) == group:  # (a resident moved on is a member twice)
                del self._group_of[request_id]
                self._touched.discard(request_id)
        return list(members.values())

    def count(self, group: int) -> int:
        """Requests routed to the group, counting done ones not dropped yet (an upper bound)."""
        return len(self._started[group]) + len(self._queued[group])

    def queue(self, group: int) -> Iterator[RequestState]:
        """The group's queued members in arrival order (lazily: the caller stops at the
        head it cannot serve)."""
        queued = self._queued[group]
        return (queued[request_id] for _, request_id in self._order[group])

    def queued_tokens(self, group: int) -> int:
        """Prompt tokens routed to the group and not started yet."""
        return self._queued_tokens[group]

    def sync(self, state: ClusterState) -> None:
        """Re-read the state for the requests touched since the last sync (their plan has
        been started since); `live` then lists those running, `queue` those queued."""
        if state.failures != self._failures:
            self._failures = state.failures
            self._touched.update(self._group_of)
        for request_id in self._touched:
            group = self._group_of.get(request_id)
            if group is None:
                continue  # done and dropped
            request = self._started[group].pop(request_id, None) or self._queued[group].pop(request_id)
            counted = self._counted.pop(request_id, None)
            if counted is not None:
                self._queued_tokens[group] -= counted
                order = self._order[group]
                del order[bisect.bisect_left(order, _arrival(request))]
            if request_id in state.waiting:
                self._queued[group][request_id] = request
                self._counted[request_id] = request.pending_target
                self._queued_tokens[group] += request.pending_target
                bisect.insort(self._order[group], _arrival(request))
            elif request.done:
                del self._group_of[request_id]
            else:
                self._started[group][request_id] = request
        self._touched.clear()


class StaticScheduler(Scheduler):
    """Fixed instance groups, each a vLLM-style replica (see the module docstring)."""

    def __init__(
        self,
        deployment: Deployment,
        group_sizes: tuple[int, ...],
        long_prompt_threshold: int | None = None,
        max_batched_tokens: int = VLLM_MAX_BATCHED_TOKENS,
        name: str | None = None,
    ):
        super().__init__(deployment)
        if sum(group_sizes) != deployment.num_instances:
            raise ValueError(f"group sizes {group_sizes} do not add up to {deployment.num_instances} instances")
        starts = [sum(group_sizes[:index]) for index in range(len(group_sizes))]
        self.groups = [tuple(range(start, start + size)) for start, size in zip(starts, group_sizes)]
        self.group_capacity = [sum(deployment.capacity[i] for i in group) for group in self.groups]
        self.group_of = {instance: g for g, group in enumerate(self.groups) for instance in group}
        self.long_prompt_threshold = long_prompt_threshold
        self.max_batched_tokens = max_batched_tokens
        self.members = _Members(len(self.groups))
        self.routed = [0] * len(self.groups)  # requests sent to each group so far
        sizes = sorted(set(group_sizes))
        self.short_groups = [g for g, group in enumerate(self.groups) if len(group) == sizes[0]]
        self.long_groups = [g for g, group in enumerate(self.groups) if len(group) == sizes[-1]]
        self.name = name or f"static(tp={deployment.tp}, groups={'+'.join(map(str, group_sizes))})"

    def largest_group_capacity(self) -> int:
        return max(self.group_capacity)

    def admit(self, state: ClusterState, request: RequestState) -> str | None:
        reason = super().admit(state, request)
        if reason is None:
            self.members.sync(state)
            group = self._choose_group(state, request)
            if group is None:
                return f"no instance group in service can hold its {request.request.prompt_len + request.request.output_len:,} tokens"
            self.members.add(group, request)
        return reason

    def _choose_group(self, state: ClusterState, request: RequestState) -> int | None:
        """Length class first (long prompts to the large groups), then the least loaded group
        that can hold the request: KV in use plus prompts routed and waiting. Groups with a
        retired instance (a failed runtime worker) take no new requests."""
        long = self.long_prompt_threshold is not None and request.request.prompt_len >= self.long_prompt_threshold
        needed = request.request.prompt_len + request.request.output_len
        preferred = self.long_groups if long else self.short_groups
        usable = [
            g for g in range(len(self.groups))
            if self.group_capacity[g] >= needed and not state.retired.intersection(self.groups[g])
        ]
        fitting = [g for g in preferred if g in usable] or usable
        if not fitting:
            return None

        def load(g: int) -> tuple[int, int, int]:
            held = sum(state.used[i] for i in self.groups[g])
            # Ties (idle groups) go round-robin, so a light load spreads over the groups.
            # A cached prefix in the group counts as load it takes off (KV-aware routing).
            return held + self.members.queued_tokens(g) - saved_tokens(state, request, self.groups[g]), self.routed[g], g

        chosen = min(fitting, key=load)
        self.routed[chosen] += 1
        return chosen

    def schedule(self, state: ClusterState) -> IterationPlan | None:
        batches: list[Batch] = []
        frees: list[int] = []
        hits: list[PrefixHit] = []
        self.members.sync(state)
        for g in sorted({self.group_of[instance] for instance in state.idle}):
            group = self.groups[g]
            if not all(instance in state.idle for instance in group):
                continue
            running = self.members.live(g)
            waiting = self.members.queue(g)
            prefill = self._prefill(state, group, waiting, running, hits)
            if prefill is not None:
                for item in prefill.items:
                    self.members.touch(item.request_id)
                batches.append(prefill)
                continue
            decoding = [r for r in running if r.decoding and not r.busy]
            if decoding:
                items, victims = _decode_step(state, group, decoding)
                for victim in victims:
                    self.members.touch(victim)
                frees += victims
                if items:
                    batches.append(DecodeBatch(group, tuple(items)))
        if not batches and not frees:
            return None
        return IterationPlan(state.iteration, tuple(batches), frees=tuple(frees), hits=tuple(hits))

    def _prefill(
        self, state: ClusterState, group: tuple[int, ...], waiting: Iterable[RequestState], running: list[RequestState],
        hits: list[PrefixHit],
    ) -> PrefillBatch | None:
        """vLLM: new prefills first, FCFS (`waiting` in arrival order), while the KV fits
        with a slot left per running request; a cached prefix in the group is read, not
        computed (its hit goes to `hits`)."""
        free = {instance: state.free(instance) for instance in group}
        spare = sum(free.values()) - sum(1 for r in running if r.decoding)
        items: list[PrefillItem] = []
        tokens = 0
        for request in waiting:
            target = request.pending_target
            if len(running) + len(items) >= VLLM_MAX_RUNNING:
                break
            hit = group_prefix_hit(state, request, group)
            # A hit pins its cached entry whole: where that does not fit, the prompt is
            # computed instead (evicting the entry if need be), so a cached prefix never
            # leaves a request stuck.
            for found in (hit, None) if hit else (None,):
                start = found[0].tokens if found else 0
                taken = found[1] if found else {}
                retention = even_retention(start, target, group)
                need = {kept.instance: len(kept.range) for kept in retention}
                for instance, pinned in taken.items():
                    need[instance] = need.get(instance, 0) + pinned
                batched = not items or tokens + target - start <= self.max_batched_tokens
                if batched and target - start + sum(taken.values()) <= spare and all(n <= free[i] for i, n in need.items()):
                    break
            else:
                break  # FCFS: later requests wait behind the head of the queue
            for instance, n in need.items():
                free[instance] -= n
            spare -= target - start + sum(taken.values())
            tokens += target - start
            items.append(PrefillItem(request.id, start, target, retention))
            if found:
                hits.append(found[0])
        return PrefillBatch(group, tuple(items)) if items else None


class ChunkedScheduler(Scheduler):
    """Sarathi-Serve chunked prefill on every instance (see the module docstring)."""

    def __init__(self, deployment: Deployment, chunk_tokens: int, name: str | None = None):
        super().__init__(deployment)
        self.chunk_tokens = chunk_tokens
        self.members = _Members(deployment.num_instances)
        self.name = name or f"chunked(tp={deployment.tp}, chunk={chunk_tokens})"

    def largest_group_capacity(self) -> int:
        return max(self.deployment.capacity)

    def admit(self, state: ClusterState, request: RequestState) -> str | None:
        reason = super().admit(state, request)
        if reason is None:
            self.members.sync(state)
            load = {
                i: state.used[i] + self.members.queued_tokens(i) - saved_tokens(state, request, (i,))
                for i in range(self.deployment.num_instances)
            }
            self.members.add(min(load, key=lambda i: (load[i], i)), request)
        return reason

    def schedule(self, state: ClusterState) -> IterationPlan | None:
        batches: list[Batch] = []
        frees: list[int] = []
        hits: list[PrefixHit] = []
        self.members.sync(state)
        for instance in sorted(state.idle):
            started = [r for r in self.members.live(instance) if not r.busy]
            items, victims = self._iteration(state, instance, started, self.members.queue(instance), hits)
            first_chunks = {hit.request_id for hit in hits} | {item.request_id for item in items if item.start == 0}
            for request_id in [*victims, *(item.request_id for item in items if item.request_id in first_chunks)]:
                self.members.touch(request_id)  # preempted, or its first chunk starts
            frees += victims
            if items:
                batches.append(PrefillBatch((instance,), tuple(items)))
        if not batches and not frees:
            return None
        return IterationPlan(state.iteration, tuple(batches), frees=tuple(frees), hits=tuple(hits))

    def _iteration(
        self, state: ClusterState, instance: int, requests: list[RequestState], queue: Iterable[RequestState],
        hits: list[PrefixHit],
    ) -> tuple[list[PrefillItem], list[int]]:
        """One iteration of the instance: `requests` are its started ones not in flight,
        `queue` the queued ones in arrival order; a queued request whose cached prefix the
        instance holds starts after it (its hit goes to `hits`)."""
        budget = self.chunk_tokens
        free = state.free(instance)
        decoding = sorted((r for r in requests if r.decoding), key=_arrival)
        victims = []
        while decoding and free < len(decoding):
            victim = decoding.pop()
            victims.append(victim.id)
            free += victim.owned_on(instance)  # its views of a cached prefix stay with the entry
        items = []
        for request in decoding[:budget]:
            position = request.kv_len
            items.append(PrefillItem(request.id, position, position + 1, (Retention(instance, TokenRange(position, position + 1)),)))
        budget -= len(items)
        free -= len(items)
        # Prefills in progress first, then new ones, in arrival order; a prefill starts only
        # when the KV of its whole prompt fits next to the prefills already under way.
        under_way = sorted((r for r in requests if r.prefilling and r.id not in victims), key=_arrival)
        prefilling = itertools.chain(under_way, queue)
        owed = sum(r.pending_target - r.kv_len for r in under_way)
        for request in prefilling:
            start = request.kv_len
            found = group_prefix_hit(state, request, (instance,)) if start == 0 else None
            if found and owed + request.pending_target - found[0].tokens + sum(found[1].values()) > free:
                found = None  # pinning the entry whole does not fit: computed instead (never stuck on it)
            if found:
                start = found[0].tokens
            remaining = request.pending_target - start
            if request.kv_len == 0:
                pinned = sum(found[1].values()) if found else 0
                if owed + remaining + pinned > free:
                    break
                owed += remaining
                free -= pinned
            # Decodes grow after a prefill was admitted, so a chunk also stops at the free slots.
            chunk = min(budget, remaining, free)
            if chunk <= 0:
                break
            if found:
                hits.append(found[0])
            items.append(PrefillItem(request.id, start, start + chunk, (Retention(instance, TokenRange(start, start + chunk)),)))
            budget -= chunk
            free -= chunk
        return items, victims


class DisaggregatedScheduler(Scheduler):
    """DistServe: `prefill_instances` prefill, the rest decode (see the module docstring)."""

    def __init__(self, deployment: Deployment, prefill_instances: int, name: str | None = None):
        super().__init__(deployment)
        if not 0 < prefill_instances < deployment.num_instances:
            raise ValueError(f"prefill_instances({prefill_instances}) must leave both pools non-empty of {deployment.num_instances}")
        self.prefill_pool = tuple(range(prefill_instances))
        self.decode_pool = tuple(range(prefill_instances, deployment.num_instances))
        self.prefilled: dict[int, RequestState] = {}  # prefill started, KV not yet moved
        self.residents = _Members(deployment.num_instances)  # decode instance -> its requests
        self.name = name or f"disaggregated(tp={deployment.tp}, {prefill_instances}P+{len(self.decode_pool)}D)"

    def largest_group_capacity(self) -> int:
        return min(max(self.deployment.capacity[i] for i in pool) for pool in (self.prefill_pool, self.decode_pool))

    def schedule(self, state: ClusterState) -> IterationPlan | None:
        migrations = self._transfers(state)
        batches = self._prefills(state)
        frees: list[int] = []
        for instance in self.decode_pool:
            if instance not in state.idle:
                continue
            resident = [
                r for r in self.residents.live(instance) if r.decoding and not r.busy and r.kv.keys() == {instance}
            ]
            if resident:
                items, victims = _decode_step(state, (instance,), resident)
                frees += victims
                if items:
                    batches.append(DecodeBatch((instance,), tuple(items)))
        if not batches and not migrations and not frees:
            return None
        return IterationPlan(state.iteration, tuple(batches), tuple(migrations), tuple(frees))

    def _transfers(self, state: ClusterState) -> list[Migration]:
        """Finished prefills move to the decode instance with the most room, if one has it.

        Room keeps a slot for the next token of every request decoding there already (or
        moving there), so a transfer never starves this iteration's decode step."""
        migrations = []
        incoming = {i: self.residents.count(i) for i in self.decode_pool}
        for request in sorted(self.prefilled.values(), key=_arrival):
            if request.done:
                del self.prefilled[request.id]  # a one-token output finishes at its prefill
                continue
            if request.busy or not request.decoding:
                continue
            (source,) = request.kv
            destination = max(self.decode_pool, key=lambda i: (state.free(i) - incoming[i], -i))
            tokens = request.kv_len
            if state.free(destination) - incoming[destination] < tokens + 1:
                continue
            incoming[destination] += tokens
            migrations.append(Migration(request.id, source, destination, TokenRange(0, tokens)))
            del self.prefilled[request.id]
            self.residents.add(destination, request)
        return migrations

    def _prefills(self, state: ClusterState) -> list[Batch]:
        """New prefills FCFS on idle prefill instances, vLLM-style batches."""
        batches: list[Batch] = []
        queue = sorted(state.waiting.values(), key=_arrival)
        for instance in self.prefill_pool:
            if instance not in state.idle or not queue:
                continue
            items: list[PrefillItem]
            free, tokens, items = state.free(instance), 0, []
            while queue:
                target = queue[0].pending_target
                if target > free or (items and tokens + target > VLLM_MAX_BATCHED_TOKENS):
                    break
                request = queue.pop(0)
                items.append(PrefillItem(request.id, 0, target, (Retention(instance, TokenRange(0, target)),)))
                self.prefilled[request.id] = request
                free -= target
                tokens += target
            if items:
                batches.append(PrefillBatch((instance,), tuple(items)))
        return batches


# ------------------------------------------------------------------------------- catalog

BASELINES = ("static-tp", "static-sp", "chunked", "disaggregated", "best-static")


@dataclass(frozen=True)
class StaticLayout:
    """A static configuration's instance groups: `groups` SP group sizes at `tp`; with a
    `long_threshold`, prompts of at least that many tokens go to the largest group."""

    tp: int
    groups: tuple[int, ...]
    long_threshold: int | None = None


@dataclass(frozen=True)
class Candidate:
    """One concrete configuration of a strategy; `make` builds a fresh scheduler per run
    (schedulers keep per-run routing state)."""

    strategy: str
    label: str
    make: Callable[[], Scheduler]
    # What the scheduler is, across strategies: static-sp, static-tp and best-static share
    # deployments, and an evaluation of one stands for the others.
    key: str = ""
    layout: StaticLayout | None = None  # the static strategies' groups (compile seeds elastic with them)

    def identity(self) -> str:
        return self.key or f"{self.strategy}: {self.label}"


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def candidates(
    strategy: str, policy: PolicySpec, cost: CostModel, prompt_lens: Sequence[int] = (), kv_capacity: int | None = None
) -> list[Candidate]:
    """Every configuration `strategy` may take on this cluster (one when the policy pins it).

    static-tp: vLLM's deployment, one TP replica per node (tp = devices per node).
    static-sp: SP groups of `policy.sp_size` instances (every divisor when unset) at the
      cluster's tp (1 when unset).
    chunked: Sarathi-Serve / LightLLM SplitFuse on TP replicas of a node (at the cluster's tp
      when the spec sets one), `policy.chunk_tokens`.
    disaggregated: DistServe at the cluster's tp (1 when unset), every prefill:decode split
      unless `policy.prefill_instances` / `decode_instances` pin it.
    best-static: every tp (only the cluster's when the spec sets one), every homogeneous SP
      grouping, and two-class groupings — one SP group of `a` instances for long prompts
      beside single instances for short ones, with the length threshold at the workload's
      50th, 80th or 95th prompt percentile.
    """
    node_tp = min(node.devices for node in cost.cluster.nodes)
    cluster_tp = cost.cluster.tp or 1
    if strategy == "static-tp":
        deployment = Deployment.build(cost, node_tp, kv_capacity)
        groups = (1,) * deployment.num_instances
        return [Candidate(
            strategy, f"tp={node_tp}", lambda: StaticScheduler(deployment, groups, name=f"static-tp(tp={node_tp})"),
            key=_static_key(deployment, groups), layout=StaticLayout(node_tp, groups),
        )]
    if strategy == "chunked":
        tp = cost.cluster.tp or node_tp
        deployment = Deployment.build(cost, tp, kv_capacity)
        chunk = policy.chunk_tokens
        return [Candidate(strategy, f"tp={tp}, chunk={chunk}", lambda: ChunkedScheduler(deployment, chunk))]
    if strategy == "static-sp":
        deployment = Deployment.build(cost, cluster_tp, kv_capacity)
        sizes = [policy.sp_size] if policy.sp_size else _divisors(deployment.num_instances)
        return [_static_candidate(strategy, deployment, (sp,) * (deployment.num_instances // sp)) for sp in sizes]
    if strategy == "disaggregated":
        deployment = Deployment.build(cost, cluster_tp, kv_capacity)
        count = deployment.num_instances
        if policy.prefill_instances is not None:
            splits = [policy.prefill_instances]
        elif policy.decode_instances is not None:
            splits = [count - policy.decode_instances]
        else:
            splits = list(range(1, count))
        return [
            Candidate(strategy, f"tp={cluster_tp}, {p}P+{count - p}D", functools.partial(DisaggregatedScheduler, deployment, p))
            for p in splits
        ]
    if strategy == "best-static":
        found = []
        thresholds = sorted({int(np.percentile(prompt_lens, q)) for q in (50, 80, 95)}) if len(prompt_lens) else []
        for tp in [cost.cluster.tp] if cost.cluster.tp else cost.tp_choices():  # a spec that pins tp pins it here too
            deployment = Deployment.build(cost, tp, kv_capacity)
            count = deployment.num_instances
            found += [_static_candidate(strategy, deployment, (sp,) * (count // sp)) for sp in _divisors(count)]
            for large in range(2, count):
                for threshold in thresholds:
                    found.append(_static_candidate(strategy, deployment, (large,) + (1,) * (count - large), threshold))
        return found
    raise ValueError(f"unknown baseline {strategy!r}; baselines: {', '.join(BASELINES)}")


def _static_candidate(strategy: str, deployment: Deployment, groups: tuple[int, ...], threshold: int | None = None) -> Candidate:
    label = f"tp={deployment.tp}, groups={'+'.join(map(str, groups))}"
    if threshold is not None:
        label += f", long ≥ {threshold:,}"
    return Candidate(
        strategy, label, lambda: StaticScheduler(deployment, groups, threshold, name=f"{strategy}({label})"),
        key=_static_key(deployment, groups, threshold), layout=StaticLayout(deployment.tp, groups, threshold),
    )


def _static_key(deployment: Deployment, groups: tuple[int, ...], threshold: int | None = None) -> str:
    return f"static: tp={deployment.tp}, groups={'+'.join(map(str, groups))}, long ≥ {threshold}"
