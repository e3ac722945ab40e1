"""The elastic scheduler's shortcuts change no decision.

`ElasticScheduler.schedule` reads the running requests in one pass (`_running_view`: the
decode groups and the reserve), skips the lending decision and the prefill dispatch for
the parts of the queue that no prompt of can fit (`_may_prefill`), and memoises one-prompt
batch times. Against references on the random workloads and policies of
tests/test_scheduler.py:

- the view equals a from-scratch recomputation — union-find over every decoding request's
  KV instances, the reserve summed request by request — at every decision of a run;
- a scheduler whose every part goes through lending and `_prefills` (no shortcut) makes the
  same plans, so the same run, request for request and batch for batch;
- wherever the shortcut skips a part, the full dispatch on copies admits nothing.
"""

from __future__ import annotations

import copy

from hypothesis import given

from espc.planner.compile.policy import ElasticPolicy
from espc.planner.compile.scheduler import ElasticScheduler, _DecodeGroup, _Room
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.simulator import simulate
from espc.planner.sim.strategies import Deployment
from espc.planner.sim.workload import Request, generate
from tests.test_scheduler import INSTANCES, PROPERTY, cases, cost, milp_policy, prefill_s, spec


def reference_view(state: ClusterState, policy: ElasticPolicy) -> tuple[list[tuple[list[int], list[int]]], dict[int, int]]:
    """Decode groups as (sorted instances, request ids in `state.running` order), by lowest
    instance, from union-find over the decoding requests' instances; and the reserve: each
    running request's expected future tokens on the instance holding its newest token."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    decoding = [r for r in state.running.values() if r.decoding and r.kv_tokens]
    for request in decoding:
        first, *rest = request.kv_tokens
        for other in rest:
            parent[find(other)] = find(first)
    members: dict[int, list[int]] = {}
    for instance in {i for r in decoding for i in r.kv_tokens}:
        members.setdefault(find(instance), []).append(instance)
    groups = {root: (sorted(instances), []) for root, instances in members.items()}
    for request in decoding:
        groups[find(next(iter(request.kv_tokens)))][1].append(request.id)
    reserve: dict[int, int] = {}
    for request in state.running.values():
        if request.kv:
            newest = max(request.kv, key=lambda instance: request.kv[instance][-1][1])
            reserve[newest] = reserve.get(newest, 0) + max(policy.reserve_output_tokens - request.generated, 1)
    return sorted(groups.values()), reserve


class Checked(ElasticScheduler):
    """Checks the running view at every decision, and that every part `_may_prefill` skips
    would have prefilled nothing (the full dispatch run on copies of what it changes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.views = 0
        self.skipped = 0

    def schedule(self, state: ClusterState):
        groups, reserve = self._running_view(state)
        assert ([(sorted(g.instances), [r.id for r in g.requests]) for g in groups], reserve) == reference_view(
            state, self.policy
        )
        self.views += 1
        return super().schedule(state)

    def _may_prefill(
        self, state: ClusterState, queue: list[RequestState], free_instances: list[int], groups: list[_DecodeGroup],
        room: _Room,
    ) -> bool:
        may = super()._may_prefill(state, queue, free_instances, groups, room)
        if not may:
            self.skipped += 1
            prefilling_on, room = dict(self.prefilling_on), copy.deepcopy(room)
            ordered = [r for r in self._queue(state) if r in queue]  # the part in priority order
            lent, stall_budget_s = self._groups_to_lend(state, ordered[0], free_instances, groups, room)
            lent_instances = {i for group in lent for i in group.instances}
            pool = free_instances + sorted(lent_instances)
            placement = self._placement(ordered[0])
            if pool:
                assert self._prefills(state, ordered, pool, room, lent_instances, stall_budget_s, placement, groups, []) == []
            self.prefilling_on = prefilling_on
        return may


class Unskipping(ElasticScheduler):
    """The scheduler without the shortcut: every part of the queue goes through lending and
    `_prefills`."""

    def _may_prefill(self, *args) -> bool:
        return True


def deployment(capacity: int) -> Deployment:
    return Deployment(1, (capacity,) * INSTANCES, cost())


def assert_same_run(requests: tuple[Request, ...], capacity: int, policy: ElasticPolicy) -> Checked:
    checked = Checked(deployment(capacity), policy, spec().slo, prefill_s())
    result = simulate(checked, requests, check=True, record_timeline=True)
    reference = simulate(Unskipping(deployment(capacity), policy, spec().slo, prefill_s()), requests, record_timeline=True)
    assert checked.views > 0
    assert result.records == reference.records
    assert result.timeline == reference.timeline
    assert (result.iterations, result.migrated_tokens, result.instance_busy_s) == (
        reference.iterations, reference.migrated_tokens, reference.instance_busy_s
    )
    return checked


@PROPERTY
@given(case=cases())
def test_the_shortcuts_change_no_decision(case):
    requests, capacity, policy = case
    assert_same_run(requests, capacity, policy or milp_policy())


def test_a_spec_workload_past_the_clusters_rate_skips_dispatches_and_decides_the_same():
    """The spec's workload at 10× its rate with the MILP's policy: prompts queue behind
    decode steps, so most decisions skip the dispatch."""
    requests = tuple(generate(spec().workload, seed=1, rate=2000.0, requests=40))
    checked = assert_same_run(requests, 900, milp_policy())
    assert checked.skipped > checked.views // 10, (checked.skipped, checked.views)
