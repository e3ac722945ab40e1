"""The elastic sequence-parallelism scheduler: one IterationPlan whenever instances are idle.

It follows LoongServe's four steps, driven by a compiled `ElasticPolicy`, and adds what
LoongServe lacks (SLO input, hysteresis, staging memory, a fairness bound):

1. Dispatching. Queued requests are served earliest TTFT deadline first (arrival + the SLO's
   TTFT bound for that prompt), except that a request queued longer than the starvation
   bound goes first and is never bypassed. A request is admitted only when the cluster
   can hold its prompt plus the output it is expected to generate on top of what every
   running request is still expected to add (memory admission counting future KV).
   A policy with instance classes (buckets that name their instances) has one queue per
   class, each dispatched on its class's instances only, and refuses a request its class
   cannot hold (the elastic form of a static partition).
2. Elastic instance allocation. Prefills get the idle instances that hold no decoding KV.
   Instances of a decode group are lent to a prefill only when every request decoding on
   them is far enough ahead of its TPOT pace to absorb the prefill (SLO-aware), and only
   when the free instances cannot take the next request themselves.
3. Batching. The chosen prompts are split into batches, each with its own degree of
   parallelism, by the exact DP in `espc.planner.compile.batching` (DoP caps and token budgets
   per length bucket from the policy).
4. Scaling. Proactive scale-down: after a prefill, each request's KV is retained on as few
   ring instances as hold it, preferring instances already decoding (so others stay free
   for prefills) — zero extra bytes, the ring carried every block past them — but on
   enough of them for a long request to decode within its TPOT bound. Scale-up:
   a decode token goes to the request's least-loaded instance; past the policy's
   `decode_instance_tokens` (or when full) it goes to a free instance instead, which joins
   the decode group (multi-master decoding, no KV moves; within the group's instance
   classes). Explicit migration: when requests wait and no instance is free, a small KV
   fragment that pins an instance to a decode group moves to another instance of the
   group, if the move pauses its request for less than `migration_max_stall_s` and the
   request was not moved within `cooldown_iterations` (hysteresis: alternating traffic
   cannot make it thrash).
   Migration staging space is reserved on the destination (IterationPlan.verify checks it).

Prefix caching (Mooncake's cache-aware conductor, elastic). A queued request whose prompt
starts with a cached prefix (`ClusterState.prefix_match`) reads it where it lives: the
prefix may be spread over several instances by an earlier elastic prefill, and a continued
prefill attends to it in place, so its ring contains every holder. Before the batching DP,
such requests are dispatched first (`_hit_prefills`):
(a) holders all idle — free, in a lent group, or in an idle decode group whose requests can
    absorb the (short) prefill — and within the request's instance class: [P, target) is
    prefilled on a ring of the holders plus free instances up to its bucket's DoP for the
    uncached tokens, with the hit in the plan; requests with the same holders batch
    together (within the bucket's token budget); the hit pins the cached entries it reads,
    so their tokens are taken from the room the plan is made with;
(b) a holder busy: the holders' remaining batch time is unknown to the scheduler, so the
    request waits for them only as long as waiting can pay: for less than the prefill
    time the hit saves since it arrived, and while a recompute after that wait would
    still meet its TTFT deadline; otherwise it is recomputed from scratch now (without
    the hit). A starved request never waits, and no request is dispatched by the cache
    ahead of a starved one that is not.
The other requests then go through steps 1–4 on the instances left. Without a cache, or
with no match, this is exactly the scheduler above.

A decode group is a connected set of instances sharing decoding requests' KV; a decode
batch runs on the whole group (every shard holder computes its partial attention).
When a group has no slot for its next tokens, the latest-arrived request is preempted
(vLLM's recompute), so the scheduler never over-commits memory.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from espc.frontend.spec import SLOSpec
from espc.planner.compile.batching import Batching, BatchingProblem, optimal_batches
from espc.planner.compile.policy import DECODE_STALL_SHARE, ElasticPolicy, LengthBucket, format_instances
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
)
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.prefix_cache import PrefixMatch
from espc.planner.sim.strategies import Deployment, Scheduler

# The one batch of a one-prompt batching problem: prompts [0, 1).
_ONE_START, _ONE_END = np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)
_ONE_START.setflags(write=False)
_ONE_END.setflags(write=False)
# A decode group is lent to a prefill only if its tightest request keeps this much of its
# slack after the predicted prefill time (the cost model's error margin).
LEND_SAFETY = 1.5
# A starved request that needs more instances than are free holds back everyone else only
# when its TTFT deadline is this many isolated prefills away.
URGENT_PREFILLS = 2.0


@functools.lru_cache(maxsize=1 << 16)
def _one_prompt_times(cost: CostModel, tp: int, length: int, dop: int) -> np.ndarray:
    """`cost.prefill_segment_times` of one prompt alone, memoised across schedulers: a queued
    prompt is batched again at every decision until it starts, and a compile simulates the
    same workload under dozens of policies. (A CostModel does not change once built: it
    keeps its own derived tables likewise.)"""
    times = cost.prefill_segment_times((length,), dop, tp, _ONE_START, _ONE_END)
    times.setflags(write=False)  # shared by every call with these arguments
    return times


def _longest_prefix(count: int, acceptable: Callable[[int], bool]) -> int:
    """The largest k ≤ count with acceptable(k), for a predicate that holds for every k up to
    some point and for none after it (acceptable(0) is assumed)."""
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        if acceptable(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass
class _DecodeGroup:
    instances: set[int]
    requests: list[RequestState] = field(default_factory=list)

    def ready(self, idle: set[int]) -> bool:
        return self.instances <= idle and any(not r.busy for r in self.requests)


class _Room:
    """Free KV slots per instance for this plan, less what running requests are expected to
    add (their reserve), updated as the plan takes slots."""

    def __init__(self, state: ClusterState, reserve: dict[int, int]):
        self.free = dict(enumerate(map(operator.sub, state.capacity, state.used)))
        self.reserve = reserve

    def room(self, instance: int, use_reserve: bool = True) -> int:
        return self.free[instance] - (self.reserve.get(instance, 0) if use_reserve else 0)

    def take(self, instance: int, tokens: int) -> None:
        self.free[instance] -= tokens


class ElasticScheduler(Scheduler):
    """See the module docstring."""

    def __init__(
        self,
        deployment: Deployment,
        policy: ElasticPolicy,
        slo: SLOSpec,
        prefill_s: Callable[[int], float],
        name: str | None = None,
    ):
        super().__init__(deployment)
        if policy.tp != deployment.tp:
            raise ValueError(f"the policy is for tp({policy.tp}) but the deployment has tp({deployment.tp})")
        policy.verify(deployment.num_instances)
        self.policy = policy
        self.slo = slo
        self.prefill_s = prefill_s
        self.tpot_s = slo.tpot.target()
        self.last_migrated: dict[int, int] = {}  # request id -> iteration of its last migration
        # Ring instances of the prefills this scheduler planned -> their length bucket: each
        # counts toward its bucket's cap while its plan is being built and, once started,
        # while its instance runs a prefill (`ClusterState.prefilling`; no other prefill
        # starts there before it ends). A decision forgets the others first.
        self.prefilling_on: dict[int, LengthBucket] = {}
        self.name = name or f"elastic(tp={policy.tp})"
        self._decode_spread = functools.lru_cache(maxsize=None)(self._decode_spread_uncached)
        # Every queued request's priority reads its deadline on every decision, and lending
        # asks how long the head request's prefill takes.
        self._ttft_s = functools.lru_cache(maxsize=1 << 16)(self._ttft_s_uncached)
        self._alone_prefill_s = functools.lru_cache(maxsize=1 << 16)(
            lambda length, dop: deployment.cost.prefill_time([length], dop, deployment.tp)
        )
        # The prefill time a cached prefix saves a prompt (both at their buckets' DoP): read
        # for every queued request whose prefix lies on busy instances, on every decision.
        self._saved_s = functools.lru_cache(maxsize=1 << 16)(self._saved_s_uncached)
        self.class_of = {i: frozenset(members) for members in policy.instance_classes() for i in members}
        self._nothing_in_use = dict.fromkeys(policy.buckets, 0)  # copied: a copy does not hash the buckets again

    # ------------------------------------------------------------------------ interface

    def admit(self, state: ClusterState, request: RequestState) -> str | None:
        """Refuses, besides what the cluster cannot hold, what the request's instance class
        cannot: a class is the elastic form of a static group, and best-static refuses what
        its groups cannot hold too."""
        reason = super().admit(state, request)
        placement = self._placement(request)
        if reason is None and placement is not None:
            needed = request.request.prompt_len + request.request.output_len
            held = sum(self.deployment.capacity[i] for i in placement)
            if needed > held:
                reason = (
                    f"needs {needed:,} KV slots, more than the {held:,} of its instance class "
                    f"(instances {format_instances(tuple(sorted(placement)))})"
                )
        return reason

    def schedule(self, state: ClusterState) -> IterationPlan | None:
        if not state.idle:
            return None
        for instance in [i for i in self.prefilling_on if i not in state.prefilling]:
            del self.prefilling_on[instance]
        groups, reserve = self._running_view(state)
        held = {instance for group in groups for instance in group.instances}
        free_instances = [i for i in sorted(state.idle) if i not in held]
        room = _Room(state, reserve)

        # Each instance class (the policy's instance sets, disjoint) dispatches its own queue
        # on its own instances; a policy without classes has one queue over every instance.
        prefill_batches: list[PrefillBatch] = []
        hits: list[PrefixHit] = []
        for placement, queue, class_free, class_groups in self._dispatchable(state, free_instances, groups, room):
            lent, stall_budget_s = self._groups_to_lend(state, queue[0], class_free, class_groups, room)
            lent_instances = {i for group in lent for i in group.instances}
            pool = class_free + sorted(lent_instances)
            if pool:
                prefill_batches += self._prefills(
                    state, queue, pool, room, lent_instances, stall_budget_s, placement, class_groups, hits
                )

        used = {i for batch in prefill_batches for i in batch.instances}
        queued = bool(state.waiting)
        migrations = self._migrations(state, groups, queued, free_instances, room) if self.policy.migration else []
        migrating = {migration.request_id for migration in migrations}
        spare = [i for i in free_instances if i not in used]
        decode_batches, frees = [], []
        for group in groups:
            # A lent group the prefills left untouched decodes as usual.
            if group.instances & used or not group.ready(state.idle):
                continue
            batch, victims = self._decode(state, group, spare, room, migrating)
            frees += victims
            if batch is not None:
                decode_batches.append(batch)

        batches: list[Batch] = [*prefill_batches, *decode_batches]
        if not batches and not migrations and not frees:
            return None
        return IterationPlan(state.iteration, tuple(batches), tuple(migrations), tuple(frees), hits=tuple(hits))

    # ------------------------------------------------------------------------- state views

    def _running_view(self, state: ClusterState) -> tuple[list[_DecodeGroup], dict[int, int]]:
        """The decode groups — connected components of instances linked by decoding
        requests' KV, by lowest instance, each with its requests in `state.running` order —
        and the reserve — every running request's expected future KV, on the instance of
        its newest token — from one pass over the running requests (every decision reads
        both, and the running requests outnumber the instances)."""
        reserve: dict[int, int] = {}
        decoding: list[RequestState] = []
        group_of: dict[int, _DecodeGroup] = {}  # instance -> its group, merged as requests link them
        for request in state.running.values():
            kv = request.kv
            if not kv:
                continue
            if len(kv) == 1:  # (most requests: the iteration-time common case)
                (newest,) = kv
            else:
                newest = max(kv, key=lambda instance: kv[instance][-1][1])
            reserve[newest] = reserve.get(newest, 0) + self._future_tokens(request)
            if not request.decoding:
                continue
            decoding.append(request)
            if len(kv) == 1:  # links no instances
                if newest not in group_of:
                    group_of[newest] = _DecodeGroup({newest})
                continue
            group = None
            for instance in request.kv_tokens:
                other = group_of.get(instance)
                if other is None:
                    if group is None:
                        group = _DecodeGroup(set())
                    group.instances.add(instance)
                    group_of[instance] = group
                elif group is None:
                    group = other
                elif other is not group:
                    if len(other.instances) > len(group.instances):
                        group, other = other, group
                    group.instances |= other.instances
                    for member in other.instances:
                        group_of[member] = group
        for request in decoding:
            group_of[next(iter(request.kv_tokens))].requests.append(request)
        groups = sorted({id(group): group for group in group_of.values()}.values(), key=lambda group: min(group.instances))
        return groups, reserve

    def _future_tokens(self, request: RequestState) -> int:
        return max(self.policy.reserve_output_tokens - request.generated, 1)

    def _deadline(self, request: RequestState) -> float:
        return request.request.arrival_s + self._ttft_s(request.request.prompt_len)

    def _ttft_s_uncached(self, prompt_len: int) -> float:
        return self.slo.ttft.target(self.prefill_s(prompt_len))

    def _queue(self, state: ClusterState) -> list[RequestState]:
        """Waiting requests by priority: starved ones first (FCFS), then earliest deadline;
        requests already past their TTFT deadline after those, in arrival order (they can
        no longer meet their SLO, so they yield to those that can — until the starvation
        bound makes them first: a late request is never left behind for good)."""

        def priority(request: RequestState) -> tuple:
            arrival = request.request.arrival_s
            if self._starved(state, request):
                return (0, arrival, request.id)
            deadline = self._deadline(request)
            return (2, arrival, request.id) if state.now > deadline else (1, deadline, request.id)

        return sorted(state.waiting.values(), key=priority)

    def _placement(self, request: RequestState) -> frozenset[int] | None:
        """The instances the request prefills on: its prompt's bucket's class (by the prompt,
        not the prefill target, so that a preempted request keeps its class); None: any."""
        members = self.policy.bucket(request.request.prompt_len).instances
        return None if members is None else self.class_of[members[0]]

    def _queues_by_placement(self, queue: list[RequestState]) -> list[tuple[frozenset[int] | None, list[RequestState]]]:
        """The priority queue split by instance class, each part in priority order and the
        parts by their most urgent request; one part without classes."""
        if not self.class_of:
            return [(None, queue)] if queue else []
        parts: dict[frozenset[int] | None, list[RequestState]] = {}
        for request in queue:
            parts.setdefault(self._placement(request), []).append(request)
        return list(parts.items())

    def _starved(self, state: ClusterState, request: RequestState) -> bool:
        """Queued for the starvation bound: it goes first and nobody bypasses it, whether or
        not it can still meet its deadline (the fairness bound holds for every request)."""
        return state.now - request.request.arrival_s >= self.policy.starvation_bound_s

    def _urgent(self, state: ClusterState, request: RequestState) -> bool:
        """Whether the request must start within URGENT_PREFILLS of its isolated prefill
        time to meet its TTFT deadline."""
        prefill_s = self.prefill_s(request.request.prompt_len)
        return self._deadline(request) - state.now <= URGENT_PREFILLS * prefill_s

    def _slack(self, state: ClusterState, request: RequestState, step_s: float) -> float:
        """How long the request can pause and still meet its TPOT bound even if its next
        token is its last (the output length is unknown: a request expected to generate
        many tokens could pay a pause back over them, but one that stops early cannot).
        TPOT is the mean over the output, so the time banked by fast steps so far counts."""
        if request.first_token_s is None:
            return 0.0
        deadline = request.first_token_s + self.tpot_s * request.generated
        return deadline - state.now - step_s

    def _group_slack(self, state: ClusterState, group: _DecodeGroup) -> float:
        step_s = self.deployment.cost.decode_time(
            [r.kv_len for r in group.requests], len(group.instances), self.deployment.tp
        )
        return min(self._slack(state, r, step_s) for r in group.requests)

    # ---------------------------------------------------------------- instance allocation

    def _dispatchable(
        self, state: ClusterState, free_instances: list[int], groups: list[_DecodeGroup], room: _Room,
    ) -> Iterator[tuple[frozenset[int] | None, list[RequestState], list[int], list[_DecodeGroup]]]:
        """The parts of the queue (`_queues_by_placement`) that may start a prefill
        (`_may_prefill`), each with its class's free instances and decode groups; lazily, as
        the caller's prefills take room. The queue is put in priority order only when some
        part may prefill or a finished prefill's entry may have to be forgotten (below)."""

        def of_class(placement: frozenset[int] | None) -> tuple[list[int], list[_DecodeGroup]]:
            return (
                [i for i in free_instances if placement is None or i in placement],
                [g for g in groups if placement is None or g.instances <= placement],
            )

        if not state.waiting:
            return
        if not any(
            self._may_prefill(state, part, *of_class(placement), room)
            for placement, part in self._queues_by_placement(list(state.waiting.values()))
        ):
            return
        for placement, queue in self._queues_by_placement(self._queue(state)):
            class_free, class_groups = of_class(placement)
            if self._may_prefill(state, queue, class_free, class_groups, room):
                yield placement, queue, class_free, class_groups

    def _may_prefill(
        self, state: ClusterState, queue: list[RequestState], free_instances: list[int], groups: list[_DecodeGroup],
        room: _Room,
    ) -> bool:
        """Whether some prompt of `queue` fits the room of the free instances and the ready
        decode groups — every instance lending could add to the pool. When none does,
        `_prefills` would admit nothing whatever was lent, and the lending decision is
        skipped (the most common decision: a decode step while prompts wait for room).
        With cached prefixes, always: a hit reads its prefix where it lies."""
        if state.prefix is not None and state.prefix.entries:
            return True
        reachable = free_instances + [i for group in groups if group.ready(state.idle) for i in group.instances]
        room_left = sum(max(room.room(i), 0) for i in reachable)
        return any(request.pending_target <= room_left for request in queue)

    def _groups_to_lend(
        self, state: ClusterState, head: RequestState, free_instances: list[int], groups: list[_DecodeGroup], room: _Room
    ) -> tuple[list[_DecodeGroup], float]:
        """Decode groups whose requests can absorb the head request's prefill, when the free
        instances cannot hold that prompt themselves; and the longest prefill batch their
        requests can absorb (seconds: the tightest slack over LEND_SAFETY)."""
        need = head.pending_target
        if sum(max(room.room(i), 0) for i in free_instances) >= need:
            return [], math.inf
        slack = {id(g): self._group_slack(state, g) for g in groups if g.ready(state.idle)}
        candidates = sorted((g for g in groups if id(g) in slack), key=lambda g: -slack[id(g)])
        lent: list[_DecodeGroup] = []
        pool = list(free_instances)
        for group in candidates:
            pool += sorted(group.instances)
            dop = min(len(pool), self.policy.bucket(need).prefill_dop)
            predicted = self._alone_prefill_s(need, dop)
            if slack[id(group)] < LEND_SAFETY * predicted:
                break  # later groups have less slack
            lent.append(group)
            if sum(max(room.room(i), 0) for i in pool) >= need:
                break
        stall_budget_s = min((slack[id(group)] / LEND_SAFETY for group in lent), default=math.inf)
        return lent, stall_budget_s

    # ------------------------------------------------------------------- prefill batches

    def _admitted(
        self, state: ClusterState, queue: Iterable[RequestState], pool: list[int], room: _Room,
        placement: frozenset[int] | None, taken: int = 0,
    ) -> list[RequestState]:
        """Dispatching: queue order, while the cluster (the requests' instance class) holds
        their future KV — less `taken`, what the cache-hit dispatch admitted before — and
        the pool their prompts; a starved request that does not fit stops everyone behind it."""
        instances = range(state.num_instances) if placement is None else placement
        cluster_room = sum(state.free(i) - room.reserve.get(i, 0) for i in instances) - taken
        # A prompt whose expected output would not fit even an empty class still fits with
        # its own output (`admit` checked that): it is admitted when the class is empty.
        whole_class = sum(state.capacity[i] for i in instances)
        pool_room = sum(max(room.room(i), 0) for i in pool)
        max_budget = max(bucket.batch_tokens for bucket in self.policy.buckets)
        batch_room = len(pool) * max_budget
        chosen: list[RequestState] = []
        for request in queue:
            prompt = request.pending_target
            future = min(prompt + self._future_tokens(request), whole_class)
            fits = future <= cluster_room and prompt <= pool_room and (not chosen or prompt <= batch_room)
            if fits:
                chosen.append(request)
                cluster_room -= future
                pool_room -= prompt
                batch_room -= max(prompt, 1)
            elif self._starved(state, request):
                break  # the fairness bound: nobody bypasses a starved request
            if pool_room <= 0:
                break
        return chosen

    def _prefills(
        self, state: ClusterState, queue: list[RequestState], pool: list[int], room: _Room, lent: set[int],
        stall_budget_s: float, placement: frozenset[int] | None, groups: list[_DecodeGroup], hits: list[PrefixHit],
    ) -> list[PrefillBatch]:
        """Admit the queue's requests (all of one placement), batch them by the DP, place
        the batches on rings of `pool` and plan their retention. A batch on lent instances
        must finish within `stall_budget_s` (the decodes it pauses). Requests with a cached
        prefix go first (`_hit_prefills`: their hits go to `hits`)."""
        in_use = self._nothing_in_use.copy()
        for bucket in self.prefilling_on.values():
            in_use[bucket] += 1
        capacity = max(self.deployment.capacity)
        hit_batches: list[PrefillBatch] = []
        taken = 0
        if state.prefix is not None and state.prefix.entries:
            hit_batches, queue, taken = self._hit_prefills(
                state, queue, pool, room, lent, stall_budget_s, placement, groups, in_use, hits
            )
            ringed = {i for batch in hit_batches for i in batch.instances}
            pool = [i for i in pool if i not in ringed]
            lent = lent - ringed
            if not pool or not queue:
                return hit_batches

        def dop_limits(request: RequestState) -> tuple[int, int]:
            """(instances the prompt needs at least, most it may take now): the policy's
            caps never stop a prompt that needs more instances than they allow."""
            bucket = self.policy.bucket(request.pending_target)
            needed = -(-request.pending_target // capacity)
            allowed = max(bucket.max_instances, needed) - in_use[bucket]
            return needed, min(max(bucket.prefill_dop, needed), allowed, len(pool))

        limits_by_length: dict[int, tuple[int, int]] = {}  # before any batch is placed

        def eligible(request: RequestState) -> bool:
            length = request.pending_target
            if length not in limits_by_length:
                limits_by_length[length] = dop_limits(request)
            needed, most = limits_by_length[length]
            return needed <= most

        def admissible() -> Iterator[RequestState]:
            """The queue without the requests that cannot start now: too few instances in
            the pool, or none left under their bucket's cap; lazily, as admission usually
            stops long before the end of the queue. The fairness bound: a starved request
            waiting for its bucket's cap is bypassed by no request of its bucket (others do
            not delay it); one that needs more instances than the pool has is bypassed by
            nobody once it is urgent (the pool must grow for it). Holding instances idle
            for it earlier would cost everyone else their TTFT for no gain of its own."""
            blocked: set[LengthBucket] = set()
            for request in queue:
                bucket = self.policy.bucket(request.pending_target)
                if bucket in blocked:
                    continue
                if eligible(request):
                    yield request
                elif self._starved(state, request):
                    if limits_by_length[request.pending_target][0] > len(pool) and self._urgent(state, request):
                        return
                    blocked.add(bucket)

        pool_room = sum(max(room.room(i), 0) for i in pool)
        if all(request.pending_target > pool_room for request in queue):
            return hit_batches  # no prompt fits the pool: `_admitted` would admit none
        chosen = self._admitted(state, admissible(), pool, room, placement, taken)
        if not chosen:
            return hit_batches
        cost, tp = self.deployment.cost, self.deployment.tp
        if lent:
            # The decodes on lent instances pause for the whole batch: admit no more prompts
            # than the pool prefills within the stall budget (prefix of the priority order).
            def absorbable(count: int) -> bool:
                return cost.prefill_time([r.pending_target for r in chosen[:count]], len(pool), tp) <= stall_budget_s

            chosen = chosen[:_longest_prefix(len(chosen), absorbable)]

        # A batch at dop d may take the room of the d roomiest instances: the most urgent
        # batch, placed first on them, always fits; a later one may have to wait.
        rooms = sorted((max(room.room(i), 0) for i in pool), reverse=True)
        ring_slots = tuple(itertools.accumulate(rooms))

        def batching(count: int) -> tuple[list[RequestState], BatchingProblem, Batching | None]:
            ordered = sorted(chosen[:count], key=lambda r: (r.pending_target, r.id))
            problem = BatchingProblem(
                tuple(r.pending_target for r in ordered),
                tuple(limits_by_length[r.pending_target][1] for r in ordered),  # admitted: all eligible
                tuple(self.policy.bucket(r.pending_target).batch_tokens for r in ordered),
                len(pool),
                self.policy.instance_weight,
                ring_slots,
            )
            return ordered, problem, optimal_batches(problem, self._segment_times)

        # Fewer prompts never make batching infeasible, so the lowest-priority requests that
        # do not fit (too many batches for the pool) wait, found by bisection — after the
        # common case, where all of them fit.
        ordered, problem, found = batching(len(chosen))
        if found is None:
            count = _longest_prefix(len(chosen) - 1, lambda count: batching(count)[2] is not None)
            if count == 0:
                return hit_batches
            ordered, problem, found = batching(count)
            assert found is not None  # _longest_prefix returns a count > 0 only when batching it succeeded
        buckets = [self.policy.bucket(r.pending_target) for r in ordered]
        position = {request.id: index for index, request in enumerate(chosen)}

        batches = hit_batches
        available = list(pool)
        # Batches are placed in priority order (of their most urgent request), each on the
        # roomiest instances left, so a bucket's cap or a full pool makes the least urgent wait.
        by_priority = sorted(found.batches, key=lambda b: min(position[r.id] for r in ordered[b[0]:b[1]]))
        for first, end, dop in by_priority:
            requests = ordered[first:end]
            bucket = buckets[end - 1]
            if dop_limits(ordered[end - 1])[1] < dop:
                continue  # the bucket's other batches took its instances: these requests wait
            # Free instances before lent ones (those pause decodes), then the roomiest.
            ring = sorted(sorted(available, key=lambda i: (i in lent, -room.room(i), i))[:dop])
            if lent.intersection(ring) and cost.prefill_time([r.pending_target for r in requests], dop, tp) > stall_budget_s:
                continue  # it would stall the lent decodes past their slack: these requests wait
            retention = self._retention(state, requests, ring, room)
            if retention is None:
                continue  # fragmented: these requests wait
            in_use[bucket] += dop
            for instance in ring:
                available.remove(instance)
                self.prefilling_on[instance] = bucket
            items = tuple(
                PrefillItem(request.id, 0, request.pending_target, kept) for request, kept in zip(requests, retention)
            )
            batches.append(PrefillBatch(tuple(ring), items))
        return batches

    def _segment_times(self, lengths: Sequence[int], dop: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The batching DP's batch times (`CostModel.prefill_segment_times`); a one-prompt
        problem's (nine decisions in ten) from `_one_prompt_times`."""
        if len(lengths) == 1:
            return _one_prompt_times(self.deployment.cost, self.deployment.tp, lengths[0], dop)
        return self.deployment.cost.prefill_segment_times(lengths, dop, self.deployment.tp, starts, ends)

    def _hit_prefills(
        self, state: ClusterState, queue: list[RequestState], pool: list[int], room: _Room, lent: set[int],
        stall_budget_s: float, placement: frozenset[int] | None, groups: list[_DecodeGroup],
        in_use: dict[LengthBucket, int], hits: list[PrefixHit],
    ) -> tuple[list[PrefillBatch], list[RequestState], int]:
        """The cache-hit dispatch (module docstring, "Prefix caching"): prefill batches of
        requests that read a cached prefix, each on a ring containing the prefix's holders.
        Returns them, the queue left for the DP (priority order; requests waiting for busy
        holders are out of it) and the future KV those batches admitted (tokens)."""
        instances = range(state.num_instances) if placement is None else placement
        cluster_room = sum(state.free(i) - room.reserve.get(i, 0) for i in instances)
        in_pool = set(pool)
        # Idle decode groups outside the pool may lend instances to a hit prefill (checked
        # against their requests' slack when a ring takes them).
        borrowable = {i: g for g in groups if g.instances <= state.idle and not g.instances & in_pool for i in g.instances}
        ready: dict[frozenset[int], list[tuple[RequestState, PrefixMatch]]] = {}
        waiting: set[int] = set()  # out of this plan: they wait for their holders
        taken = 0
        for request in queue:
            if taken >= cluster_room:
                break  # no more future KV fits: nobody else is admitted in this plan
            match = state.prefix_match(request)
            if match is None:
                if self._starved(state, request):
                    break  # nobody is dispatched by the cache ahead of a starved request
                continue
            holders = frozenset(state.hit_holders(match))
            if placement is not None and not holders <= placement:
                continue  # its prefix lies outside its instance class: recomputed
            if holders <= in_pool | borrowable.keys():
                future = request.pending_target - match.tokens + self._future_tokens(request)
                if taken + future <= cluster_room:
                    taken += future
                    ready.setdefault(holders, []).append((request, match))
                    continue
            elif not self._starved(state, request) and self._worth_waiting(state, request, match):
                waiting.add(request.id)
                continue
            if self._starved(state, request):
                break

        batches: list[PrefillBatch] = []
        ringed: set[int] = set()
        covered: set[int] = set()  # cached entries this plan's hits pin already
        for holders, members in ready.items():
            while members:
                own = members[0][0].pending_target - members[0][1].tokens
                budget = self.policy.bucket(own).batch_tokens
                count = 1
                while count < len(members) and own + members[count][0].pending_target - members[count][1].tokens <= budget:
                    own += members[count][0].pending_target - members[count][1].tokens
                    count += 1
                chunk, members = members[:count], members[count:]
                taken_by_hits = bool(holders & ringed)  # an earlier batch of this plan runs on a holder
                batch = None
                if not taken_by_hits:
                    batch = self._hit_batch(state, chunk, holders, pool, room, lent, stall_budget_s, borrowable, ringed, covered, in_use)
                if batch is not None:
                    batches.append(batch)
                    ringed.update(batch.instances)
                    hits.extend(PrefixHit(request.id, match.source, match.tokens) for request, match in chunk)
                    continue
                for request, match in chunk:
                    taken -= request.pending_target - match.tokens + self._future_tokens(request)
                    # Busy holders are waited for (their batch ends: an event); idle ones that
                    # cannot take the batch (room, a lent group's slack) will not change by
                    # themselves, so the prompt is recomputed now.
                    if taken_by_hits and not self._starved(state, request) and self._worth_waiting(state, request, match):
                        waiting.add(request.id)
        started = {item.request_id for batch in batches for item in batch.items}
        return batches, [r for r in queue if r.id not in started and r.id not in waiting], taken

    def _hit_batch(
        self, state: ClusterState, chunk: list[tuple[RequestState, PrefixMatch]], holders: frozenset[int],
        pool: list[int], room: _Room, lent: set[int], stall_budget_s: float, borrowable: dict[int, _DecodeGroup],
        ringed: set[int], covered: set[int], in_use: dict[LengthBucket, int],
    ) -> PrefillBatch | None:
        """One prefill batch of requests reading prefixes on `holders`: a ring of the holders
        and free instances up to the bucket's DoP for the uncached tokens (all of them when
        that ring cannot hold the KV), retention of [P, target), the entries' pins taken from
        `room`; None when no such ring holds it or it would stall a lent group too long."""
        cost, tp = self.deployment.cost, self.deployment.tp
        lengths = [request.pending_target - match.tokens for request, match in chunk]
        context = [match.tokens for _, match in chunk]
        bucket = self.policy.bucket(max(lengths))
        extras = sorted(
            (i for i in pool if i not in lent and i not in ringed and i not in holders), key=lambda i: (-room.room(i), i)
        )
        wanted = max(min(bucket.prefill_dop, bucket.max_instances - in_use[bucket]) - len(holders), 0)
        assert state.prefix is not None  # matches come from the cache
        pins: dict[int, int] = {}
        pinned: set[int] = set()
        for _, match in chunk:
            for instance, tokens in state.pinned_by(match, covered | pinned).items():
                pins[instance] = pins.get(instance, 0) + tokens
            pinned.update(entry.id for entry in state.prefix.lineage(match.source))
        for instance, tokens in pins.items():
            room.take(instance, tokens)
        starts = {request.id: match.tokens for request, match in chunk}
        requests = [request for request, _ in chunk]
        for extra in dict.fromkeys((wanted, len(extras))):
            ring = sorted(holders.union(extras[:extra]))
            seconds = cost.prefill_time(lengths, len(ring), tp, context)
            if lent.intersection(ring) and seconds > stall_budget_s:
                continue
            touched = {id(borrowable[i]): borrowable[i] for i in ring if i in borrowable}
            if any(LEND_SAFETY * seconds > self._group_slack(state, group) for group in touched.values()):
                continue
            retention = self._retention(state, requests, ring, room, starts)
            if retention is None:
                continue
            covered.update(pinned)
            in_use[bucket] += len(ring)
            for instance in ring:
                self.prefilling_on[instance] = bucket
            items = tuple(
                PrefillItem(request.id, starts[request.id], request.pending_target, kept)
                for request, kept in zip(requests, retention)
            )
            return PrefillBatch(tuple(ring), items)
        for instance, tokens in pins.items():  # give the pins' room back
            room.take(instance, -tokens)
        return None

    def _worth_waiting(self, state: ClusterState, request: RequestState, match: PrefixMatch) -> bool:
        """Whether a request whose cached prefix lies on busy instances waits for them (the
        holders' remaining batch time is unknown here): while it has waited less than the
        prefill time the hit saves (past that, recomputing at once would have been done
        sooner) and its deadline leaves that much slack after a recompute (so falling back
        after the wait still meets it)."""
        target = request.pending_target
        full_s, saved_s = self._saved_s(target, match.tokens)
        waited_s = state.now - request.request.arrival_s
        return waited_s < saved_s and self._deadline(request) - state.now - full_s >= saved_s

    def _saved_s_uncached(self, target: int, cached: int) -> tuple[float, float]:
        """(seconds to prefill `target` tokens, seconds a cached prefix of `cached` of them
        saves), each prefill at its bucket's DoP."""
        cost, tp = self.deployment.cost, self.deployment.tp
        full_s = self._alone_prefill_s(target, self.policy.bucket(target).prefill_dop)
        hit_s = cost.prefill_time([target - cached], self.policy.bucket(target - cached).prefill_dop, tp, [cached])
        return full_s, full_s - hit_s

    def _retention(
        self, state: ClusterState, requests: Sequence[RequestState], ring: list[int], room: _Room,
        starts: Mapping[int, int] | None = None,
    ) -> list[tuple[Retention, ...]] | None:
        """Proactive scale-down: each request's KV on as few ring instances as hold it,
        instances already decoding first; None if the ring cannot hold them (then nothing
        is taken from `room`). `starts`: request id -> the token its prefill starts at (a
        cached prefix it reads; 0 when absent): only [start, target) is retained."""
        starts = starts or {}

        def own(request: RequestState) -> int:
            return request.pending_target - starts.get(request.id, 0)

        decoding = {i for r in state.running.values() if r.decoding for i in r.kv_tokens}
        for use_reserve in (True, False):
            taken: dict[int, int] = {}
            left = {i: room.room(i, use_reserve) for i in ring}  # less what `taken` holds

            def take(instance: int, tokens: int) -> None:
                taken[instance] = taken.get(instance, 0) + tokens
                left[instance] -= tokens

            plan: list[tuple[Retention, ...]] = []
            for request in sorted(requests, key=lambda r: -own(r)):
                length, offset = own(request), starts.get(request.id, 0)
                whole = min(
                    (i for i in ring if left[i] >= length), key=lambda i: (i not in decoding, -left[i], i), default=None
                )
                pieces: list[Retention] = []
                spread = self._decode_spread(length, len(ring))
                by_room = sorted(ring, key=lambda i: (-left[i], i))
                roomiest = by_room[:spread]
                if spread > 1 and all(left[i] >= -(-length // spread) for i in roomiest):
                    # A long request keeps its KV on enough instances to decode within TPOT.
                    bounds = [length * part // spread for part in range(spread + 1)]
                    for instance, start, end in zip(sorted(roomiest), bounds, bounds[1:]):
                        pieces.append(Retention(instance, TokenRange(offset + start, offset + end)))
                        take(instance, end - start)
                elif whole is not None:
                    pieces.append(Retention(whole, TokenRange(offset, offset + length)))
                    take(whole, length)
                else:
                    start = 0
                    for instance in by_room:
                        size = min(left[instance], length - start)
                        if size <= 0:
                            continue
                        pieces.append(Retention(instance, TokenRange(offset + start, offset + start + size)))
                        take(instance, size)
                        start += size
                        if start == length:
                            break
                    if start < length:
                        break
                plan.append(tuple(pieces))
            else:
                for instance, tokens in taken.items():
                    room.take(instance, tokens)
                by_id = {request.id: kept for request, kept in zip(sorted(requests, key=lambda r: -own(r)), plan)}
                return [by_id[request.id] for request in requests]
        return None

    def _decode_spread_uncached(self, context: int, most: int) -> int:
        """The fewest instances (≤ most) over which a request with `context` cached tokens
        decodes alone within the TPOT bound, less the share prefills may stall it."""
        step_budget = (1 - DECODE_STALL_SHARE) * self.tpot_s
        cost, tp = self.deployment.cost, self.deployment.tp
        for spread in range(1, most + 1):
            if cost.decode_time([context + self.policy.reserve_output_tokens], spread, tp) <= step_budget:
                return spread
        return most

    # --------------------------------------------------------------------- decode batches

    def _decode(
        self, state: ClusterState, group: _DecodeGroup, spare: list[int], room: _Room, migrating: set[int]
    ) -> tuple[DecodeBatch | None, list[int]]:
        """One decode step of the group's requests that are not in flight or migrating;
        scale-up takes instances from `spare`."""
        instances = set(group.instances)
        ready = sorted(
            (r for r in group.requests if not r.busy and r.id not in migrating), key=lambda r: (r.request.arrival_s, r.id)
        )
        threshold = self.policy.decode_instance_tokens
        items: list[DecodeItem] = []
        victims: list[int] = []
        for request in ready:
            master = self._master(state, request, room, threshold)
            # Scale-up stays within the instance classes the group's KV lies in.
            joinable = [i for i in spare if self._joinable(instances, i)] if master is None and self.policy.scale_up else []
            if joinable:
                master = max(joinable, key=lambda i: (room.room(i, False), -i))
                if room.room(master, False) < 1:
                    master = None
                else:
                    spare.remove(master)
                    instances.add(master)
            if master is None:
                master = self._master(state, request, room, None)  # past the threshold, if room is left
            if master is None:
                continue
            room.take(master, 1)
            items.append(DecodeItem(request.id, master, request.shards()))
        if not items and ready:
            # Not one slot for the group's next tokens: preempt the latest arrival (recompute).
            victims.append(ready[-1].id)
        if not items:
            return None, victims
        return DecodeBatch(tuple(sorted(instances)), tuple(items)), victims

    def _joinable(self, group: set[int], instance: int) -> bool:
        """Whether `instance` may join a decode group: any may without instance classes."""
        if not self.class_of:
            return True
        return any(instance in self.class_of.get(member, (member,)) for member in group)

    @staticmethod
    def _master(state: ClusterState, request: RequestState, room: _Room, threshold: int | None) -> int | None:
        """The request's instance with the most free slots (under `threshold` tokens in use)."""
        best = None
        for instance in request.kv_tokens:
            if room.room(instance, False) < 1:
                continue
            if threshold is not None and state.used[instance] >= threshold:
                continue
            if best is None or room.room(instance, False) > room.room(best, False):
                best = instance
        return best

    # ------------------------------------------------------------------------ migrations

    def _migrations(
        self, state: ClusterState, groups: list[_DecodeGroup], queued: bool, free_instances: list[int], room: _Room,
    ) -> list[Migration]:
        """Free an instance for queued requests by moving the small KV fragment pinning it to
        its decode group (see the module docstring)."""
        if not queued or free_instances:
            return []
        cost, tp, policy = self.deployment.cost, self.deployment.tp, self.policy
        for group in groups:
            if len(group.instances) < 2 or not group.instances <= state.idle:
                continue
            for instance in sorted(group.instances, key=lambda i: (state.used[i], i)):
                residents = [r for r in group.requests if instance in r.kv_tokens]
                if any(r.busy or state.iteration - self.last_migrated.get(r.id, -10**9) < policy.cooldown_iterations for r in residents):
                    continue
                moves = []
                for request in residents:
                    destinations = [i for i in request.kv_tokens if i != instance and room.room(i, False) >= request.tokens_on(instance) + 1]
                    if not destinations:
                        break
                    destination = max(destinations, key=lambda i: (room.room(i, False), -i))
                    for start, end in request.kv[instance]:
                        seconds = cost.migration_time(end - start, src=instance, dst=destination, tp=tp)
                        if seconds > policy.migration_max_stall_s:
                            break
                        moves.append(Migration(request.id, instance, destination, TokenRange(start, end)))
                        room.take(destination, end - start)
                    else:
                        continue
                    break
                else:
                    if moves:
                        for move in moves:
                            self.last_migrated[move.request_id] = state.iteration
                        return moves
                for move in moves:  # give back the staging room of an abandoned set of moves
                    room.take(move.dst, -len(move.range))
                break  # one attempt per group: its lightest instance
        return []
