"""The elastic scheduler driven through the simulator on small random workloads.

Every plan is verified against the KV pool (`simulate(check=True)`), and an observing
subclass records what the scheduler saw and decided at each iteration, so that the
properties below can be read off a run:

- every request is reported exactly once: completed, or refused with a reason — and a
  request that fits the cluster always completes (nothing is lost or stuck);
- KV is never over-committed (the pool before each decision, and each plan's peak);
- the fairness bound: a starved request (queued for at least `starvation_bound_s`) is
  never bypassed by a request behind it in the queue;
- runs are deterministic.

Times are the tiny model's (milliseconds), so arrivals within ~0.1 s contend for the
instances and KV capacities of a few hundred tokens force waiting, preemption,
scale-up and migration.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from espc.frontend.loader import parse_spec
from espc.planner.compile.ilp import solve
from espc.planner.compile.policy import ElasticPolicy, LengthBucket
from espc.planner.compile.scheduler import ElasticScheduler
from espc.planner.plan import IterationPlan, PrefillBatch, PrefillItem, PrefixHit, Retention, TokenRange
from espc.planner.sim.cluster_state import ClusterState
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import isolated_prefill
from espc.planner.sim.prefix_cache import PrefixCache
from espc.planner.sim.simulator import SimulationResult, simulate
from espc.planner.sim.strategies import Deployment
from espc.planner.sim.workload import PREFIX_BLOCK_TOKENS, Request, generate

INSTANCES = 4
SPEC = """
[model]
preset = "tiny"
[cluster]
tp = 1
[[cluster.nodes]]
device = "cpu"
devices = 4
[slo]
ttft = "max(25x prefill, 20ms)"
tpot = "5ms"
[workload]
lengths = "zipf(1.2, 8, 600)"
outputs = "uniform(1, 32)"
arrival = "poisson(200)"
requests = 40
seed = 0
"""


@functools.cache
def spec():
    return parse_spec(SPEC, "test.toml")


@functools.cache
def cost() -> CostModel:
    return CostModel.from_spec(spec())


@functools.cache
def prefill_s():
    return isolated_prefill(cost())


@functools.cache
def milp_policy() -> ElasticPolicy:
    s = spec()
    return solve(cost(), 1, generate(s.workload), s.slo, s.policy, prefill_s()).policy


class Observed(ElasticScheduler):
    """An ElasticScheduler that checks the pool before every decision and records, for
    every plan, who was waiting (with the scheduler's own starvation test) and who started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions: list[dict] = []

    def schedule(self, state: ClusterState):
        for instance in range(state.num_instances):
            assert 0 <= state.used[instance] <= state.capacity[instance], (instance, state.used, state.capacity)
        # Every token accounted to a request is in some pool.
        assert sum(r.kv_len for r in state.running.values()) == sum(state.used)
        queue = self._queue(state)
        placement = {r.id: self._placement(r) for r in queue}
        kv_classes = {
            r.id: set().union(*(self.class_of.get(i, {i}) for i in r.kv_tokens)) for r in state.running.values()
        }
        plan = super().schedule(state)
        if plan is not None:
            prefills = [batch for batch in plan.batches if batch.phase == "prefill"]
            # Instance classes: a prefill runs within its requests' class, and a decode token
            # stays within the classes of the request's KV.
            for batch in plan.batches:
                for item in batch.items:
                    if batch.phase == "prefill":
                        assert placement[item.request_id] is None or set(batch.instances) <= placement[item.request_id]
                    elif self.class_of:
                        assert item.master in kv_classes[item.request_id], (item, kv_classes[item.request_id])
            self.decisions.append({
                "esp_choices": esp_choices(plan, state, max(self.deployment.capacity)),
                "now": state.now,
                "iteration": state.iteration,
                "migrated": sorted({migration.request_id for migration in plan.migrations}),
                "queue": [r.id for r in queue],
                "starved": [r.id for r in queue if self._starved(state, r)],
                # A starved request is protected from every other bucket's requests only once
                # it is urgent (see ElasticScheduler._prefills).
                "urgent": [r.id for r in queue if self._urgent(state, r)],
                "bucket": {r.id: self.policy.bucket(r.prefill_target) for r in queue},
                "placement": placement,
                "started": [item.request_id for batch in prefills for item in batch.items if item.request_id in state.waiting],
            })
        return plan


def esp_choices(plan, state: ClusterState, capacity: int) -> list[str]:
    """What in `plan` only elastic SP does: a prefill on more instances than its longest
    prompt's KV needs, a decode token on an instance holding none of its request's KV
    (scale-up), a migration."""
    choices = []
    for batch in plan.batches:
        if batch.phase == "prefill":
            needed = max(-(-(item.end - item.start) // capacity) for item in batch.items)
            if len(batch.instances) > max(needed, 1):
                choices.append(f"prefill on {len(batch.instances)} instances, {needed} needed")
        else:
            for item in batch.items:
                held = state.running[item.request_id].kv_tokens
                if held and item.master not in held:
                    choices.append(f"request {item.request_id} scaled up to instance {item.master}")
    choices += [f"migration {migration}" for migration in plan.migrations]
    return choices


def scheduler(policy: ElasticPolicy, capacity: int) -> Observed:
    deployment = Deployment(1, (capacity,) * INSTANCES, cost())
    return Observed(deployment, policy, spec().slo, prefill_s())


@st.composite
def policies(draw, capacity: int) -> ElasticPolicy:
    edges = sorted(set(draw(st.lists(st.integers(1, 400), max_size=2))))
    lows = [0, *edges]
    highs = [*edges, 100_000]
    # Instance classes (half the policies): the instances split in two at a random point.
    split = draw(st.one_of(st.none(), st.integers(1, INSTANCES - 1)))
    classes = [None] if split is None else [tuple(range(split)), tuple(range(split, INSTANCES))]
    buckets = []
    for low, high in zip(lows, highs):
        members = draw(st.sampled_from(classes))
        size = INSTANCES if members is None else len(members)
        dop = draw(st.integers(1, size))
        buckets.append(LengthBucket(
            low, high, 1 / len(lows), dop, draw(st.integers(1, 1_500)), draw(st.integers(dop, size)), instances=members,
        ))
    return ElasticPolicy(
        tp=1,
        buckets=tuple(buckets),
        instance_weight=draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        decode_instance_tokens=draw(st.integers(1, capacity)),
        reserve_output_tokens=draw(st.integers(0, 40)),
        scale_up=draw(st.booleans()),
        migration=draw(st.booleans()),
        cooldown_iterations=draw(st.integers(0, 8)),
        migration_max_stall_s=draw(st.sampled_from([0.0, 1e-5, 1e-3, 1.0])),
        starvation_bound_s=draw(st.sampled_from([0.0, 0.002, 0.01, 0.05, 30.0])),
    )


@st.composite
def workloads(draw) -> tuple[Request, ...]:
    """Up to 30 requests in a burst of at most ~0.15 s (rates of ~50 to 1000 req/s)."""
    count = draw(st.integers(1, 30))
    span = draw(st.sampled_from([0.0, 0.01, 0.05, 0.15]))
    rows = draw(st.lists(
        st.tuples(st.floats(0, 1), st.integers(1, 300), st.integers(1, 40)), min_size=count, max_size=count
    ))
    rows = sorted((round(t * span, 6), p, o) for t, p, o in rows)
    return tuple(Request(i, t, p, o) for i, (t, p, o) in enumerate(rows))


@st.composite
def cases(draw):
    capacity = draw(st.integers(80, 800))
    policy = draw(st.one_of(policies(capacity), st.just(None)))
    return draw(workloads()), capacity, policy


def assert_starved_requests_are_bypassed_at_most_once(decisions: list[dict]) -> None:
    """The fairness bound, read off the decisions: a request behind a starved one (queued
    ≥ starvation_bound_s) of the same length bucket — of any
    bucket of its placement (instance class) once the starved one is urgent — may start
    first at one decision at most (the starved one then waits one prefill longer than its
    turn), never again. Other classes dispatch their own queues on their own instances."""
    bypassed: dict[int, list[tuple[float, list[int]]]] = {}
    for decision in decisions:
        started = set(decision["started"])
        for starved in decision["starved"]:
            if starved in started:
                continue
            behind = decision["queue"][decision["queue"].index(starved) + 1:]
            behind = [r for r in behind if decision["placement"][r] == decision["placement"][starved]]
            if starved not in decision["urgent"]:
                behind = [r for r in behind if decision["bucket"][r] == decision["bucket"][starved]]
            bypassing = sorted(started.intersection(behind))
            if bypassing:
                bypassed.setdefault(starved, []).append((decision["now"], bypassing))
    for starved, events in bypassed.items():
        assert len(events) <= 1, f"starved request {starved} was bypassed at {len(events)} decisions: {events[:5]}"


@functools.lru_cache(maxsize=512)
def run(requests: tuple[Request, ...], capacity: int, policy: ElasticPolicy) -> tuple[Observed, SimulationResult]:
    """One checked run (every plan verified against the pool), shared by the properties."""
    observed = scheduler(policy, capacity)
    return observed, simulate(observed, requests, check=True)


def assert_safe_and_reported(requests: tuple[Request, ...], capacity: int, policy: ElasticPolicy) -> None:
    _, result = run(requests, capacity, policy)
    # Reported exactly once: completed, or refused with a reason (possibly "still queued").
    assert [record.id for record in result.records] == [request.id for request in requests]
    for record, request in zip(result.records, requests):
        assert record.completed != (record.rejected is not None), record
        assert (record.prompt_len, record.output_len) == (request.prompt_len, request.output_len)
        if record.rejected is not None:
            assert record.rejected.strip(), record
            continue
        assert record.arrival_s <= record.first_scheduled_s <= record.first_token_s <= record.finish_s, record
    # Deterministic: a fresh scheduler on the same input gives the same run.
    again = simulate(scheduler(policy, capacity), requests, check=True)
    assert again.records == result.records
    assert (again.iterations, again.migrated_tokens, again.instance_busy_s, again.duration_s) == (
        result.iterations, result.migrated_tokens, result.instance_busy_s, result.duration_s)


def assert_everything_that_fits_completes(requests: tuple[Request, ...], capacity: int, policy: ElasticPolicy) -> None:
    _, result = run(requests, capacity, policy)
    for record, request in zip(result.records, requests):
        members = policy.bucket(request.prompt_len).instances  # its instance class, if any
        if request.prompt_len + request.output_len <= capacity * (INSTANCES if members is None else len(members)):
            assert record.completed, (record, capacity)
        else:
            assert record.rejected is not None and "KV slots" in record.rejected, record


SAFETY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# Found by the search (in a full-suite run): two migrations of one request in one plan; the
# first to land cleared its `busy` flag, so a decode step was planned while the other
# range was still held on both ends, and the token landed at a double-counted position.
TWO_MIGRATIONS_CASE = (
    (Request(0, 0.0, 60, 19), Request(1, 0.0, 241, 1)),
    80,
    ElasticPolicy(
        tp=1, buckets=(LengthBucket(0, 100_000, 1.0, 1, 1, 1),), instance_weight=0.0, decode_instance_tokens=1,
        reserve_output_tokens=0, scale_up=True, migration=True, cooldown_iterations=6, migration_max_stall_s=1e-5,
        starvation_bound_s=0.0,
    ),
)


@SAFETY
@example(case=TWO_MIGRATIONS_CASE)
@given(case=cases())
def test_every_plan_verifies_and_every_request_is_reported_once(case):
    requests, capacity, policy = case
    assert_safe_and_reported(requests, capacity, policy or milp_policy())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), rate=st.sampled_from([20.0, 200.0, 2000.0]), capacity=st.integers(700, 2000))
def test_spec_workloads_with_the_compiled_policy(seed, rate, capacity):
    """The spec's workload generator at random seeds and rates, with the MILP's policy."""
    requests = tuple(generate(spec().workload, seed=seed, rate=rate, requests=25))
    assert_safe_and_reported(requests, capacity, milp_policy())


@PROPERTY
@given(case=cases())
def test_every_request_that_fits_the_cluster_completes(case):
    """Liveness: nothing that the cluster can hold ends the run queued (regression cases
    below: a prompt's minimum DoP and the ring's KV room, which the batching DP knows)."""
    requests, capacity, policy = case
    assert_everything_that_fits_completes(requests, capacity, policy or milp_policy())


# Found by the search below: three starved requests (bound 0, FCFS) in a bucket of one
# instance; each decision gives it to the largest batch, so request 0 goes last.
FCFS_CAP_CASE = (
    (Request(0, 0.0, 1, 1), Request(1, 0.0, 2, 1), Request(2, 0.0, 2, 1)),
    80,
    ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 1, 1),), 0.0, 1, 0, False, False, 0, 0.0, 0.0),
)


@PROPERTY
@example(case=TWO_MIGRATIONS_CASE)
@given(case=cases())
def test_migration_hysteresis_moves_a_request_in_one_plan_per_cooldown_at_most(case):
    """Hysteresis: whatever the traffic, a request's KV moves in at most one plan per
    `cooldown_iterations`, so demand that alternates (a short prompt wanting an instance
    free, then a long one wanting the group whole) cannot make the scheduler thrash."""
    requests, capacity, policy = case
    policy = policy or milp_policy()
    observed, _ = run(requests, capacity, policy)
    moved: dict[int, list[int]] = {}
    for decision in observed.decisions:
        for request_id in decision["migrated"]:
            moved.setdefault(request_id, []).append(decision["iteration"])
    for request_id, iterations in moved.items():
        gaps = [later - earlier for earlier, later in zip(iterations, iterations[1:])]
        assert all(gap >= policy.cooldown_iterations for gap in gaps), (request_id, iterations, policy.cooldown_iterations)


@PROPERTY
@example(case=FCFS_CAP_CASE)
@given(case=cases())
def test_starved_requests_are_bypassed_at_most_once(case):
    """The fairness bound, as the scheduler defines "starved" (queued ≥ the bound, still
    within the TTFT deadline), pinned on FCFS_CAP_CASE (see also
    test_fcfs_with_a_bucket_cap_serves_the_head); requests past their deadline are
    outside this definition (test_a_request_past_its_deadline_...)."""
    requests, capacity, policy = case
    observed, _ = run(requests, capacity, policy or milp_policy())
    assert_starved_requests_are_bypassed_at_most_once(observed.decisions)


def test_compiled_policy_serves_the_spec_workload():
    requests = generate(spec().workload)
    policy = milp_policy()
    result = simulate(scheduler(policy, cost().kv_capacity_tokens(1)), requests, check=True)
    assert all(record.completed for record in result.records)


def test_requests_larger_than_the_cluster_are_refused_with_a_reason():
    requests = [Request(0, 0.0, 100, 10), Request(1, 0.0, 390, 20), Request(2, 0.001, 50, 5)]
    result = simulate(scheduler(milp_policy(), 100), requests, check=True)
    fits, too_big, small = result.records
    assert fits.completed and small.completed
    assert not too_big.completed and "410" in too_big.rejected


def test_a_prompt_longer_than_one_instance_spans_several():
    """A 350-token prompt on 100-token instances: the scheduler needs 4 instances even
    where the policy caps the bucket at 1."""
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 1_000, 1),), 0.0, 100, 1, True, True, 2, 1e-3, 1.0)
    result = simulate(scheduler(policy, 100), [Request(0, 0.0, 350, 3)], check=True)
    (record,) = result.records
    assert record.completed


def test_a_batch_is_not_planned_beyond_the_kv_of_its_ring():
    """Two prompts (2 and 132 tokens) on an idle cluster of 4 instances × 133 slots. The
    batching DP puts both in one batch on one instance (instances are charged, and a
    2,048-token budget allows it), but that instance holds only 133 of their 134 tokens:
    retention fails, the batch is dropped, and as nothing else runs nothing ever changes —
    both requests end the run queued."""
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 4, 2_048, 4),), 5.0, 100, 1, True, True, 2, 1e-3, 1.0)
    result = simulate(scheduler(policy, 133), [Request(0, 0.0, 2, 1), Request(1, 0.0, 132, 1)], check=True)
    assert [record.completed for record in result.records] == [True, True], result.records


@PROPERTY
@given(case=cases())
def test_the_rigid_ablation_makes_none_of_esps_choices_and_still_serves_everything(case):
    """ElasticPolicy.rigid: every prefill on the fewest instances its KV needs, no scale-up,
    no migration — and, like the policy it ablates, safe and live."""
    requests, capacity, policy = case
    policy = policy or milp_policy()
    rigid = policy.rigid()
    assert rigid.is_rigid() and not rigid.scale_up and not rigid.migration
    assert [(b.low, b.high, b.max_instances, b.instances) for b in rigid.buckets] == [
        (b.low, b.high, b.max_instances, b.instances) for b in policy.buckets
    ]
    assert_safe_and_reported(requests, capacity, rigid)
    assert_everything_that_fits_completes(requests, capacity, rigid)
    observed, _ = run(requests, capacity, rigid)
    assert [choice for decision in observed.decisions for choice in decision["esp_choices"]] == []


def test_the_elastic_policy_makes_esps_choices_where_its_ablation_does_not():
    """The same burst under the policy and its ablation: the policy spreads prefills and
    scales decodes up (what the ablation property above counts would catch), the ablation
    does neither."""
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 4, 2_048, 4),), 0.0, 40, 1, True, True, 2, 1e-3, 1.0)
    requests = tuple(Request(i, 0.001 * i, 60, 30) for i in range(3))
    choices = {
        name: [c for decision in run(requests, 400, p)[0].decisions for c in decision["esp_choices"]]
        for name, p in (("elastic", policy), ("rigid", policy.rigid()))
    }
    assert choices["rigid"] == [] and choices["elastic"], choices


def test_fcfs_with_a_bucket_cap_serves_the_head():
    """starvation_bound_s = 0: every request is starved at once, so the queue is FCFS and
    nobody may bypass request 0. Seven 1-token prompts in a bucket of 2-token batches that
    may hold one instance at a time: the DP leaves request 0 alone in a batch and pairs
    the others, and the placement loop (largest batches first, not queue order) gives the
    bucket's one instance to [1 2], then to [4 5] — request 0 is bypassed at two
    decisions by requests behind it."""
    policy = ElasticPolicy(1, (LengthBucket(0, 2, 0.5, 1, 2, 1), LengthBucket(2, 100_000, 0.5, 1, 1, 1)),
                           0.0, 1, 0, False, False, 0, 0.0, 0.0)
    observed, result = run(tuple(Request(i, 0.0, 1, 1) for i in range(7)), 80, policy)
    assert all(record.completed for record in result.records)
    assert_starved_requests_are_bypassed_at_most_once(observed.decisions)


def test_a_bucket_cap_counts_running_prefills_only():
    """A bucket that may prefill on one instance at a time: request 0's prefill ended and it
    decodes on that instance when request 1 arrives, mid-step. Nothing of the bucket is
    prefilling, so request 1 starts at once on a free instance (an instance that once
    prefilled and decodes now does not hold the bucket's cap)."""
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 4096, 1),), 0.0, 1, 0, False, False, 0, 0.0, 10.0)
    alone = simulate(scheduler(policy, 600), (Request(0, 0.0, 100, 40),), check=True, record_timeline=True)
    third_step = [batch for batch in alone.timeline if batch.phase == "decode"][2]
    arrival = (third_step.start_s + third_step.end_s) / 2
    _, result = run((Request(0, 0.0, 100, 40), Request(1, arrival, 100, 1)), 600, policy)
    record = next(record for record in result.records if record.id == 1)
    assert record.first_scheduled_s == arrival


def test_same_seed_same_metrics():
    requests = generate(spec().workload, seed=11, rate=500.0, requests=30)
    runs = [simulate(scheduler(milp_policy(), 600), requests, check=True) for _ in range(2)]
    assert runs[0].records == runs[1].records
    assert runs[0].duration_s == runs[1].duration_s and runs[0].iterations == runs[1].iterations


@pytest.mark.parametrize("bound", [0.2, 0.4])
def test_a_request_past_its_deadline_yields_only_to_requests_that_can_meet_theirs(bound):
    """Past its TTFT deadline a request can no longer meet its SLO: it yields to requests
    that still can (EDF for goodput), is served before any later arrival that is late too,
    and once queued for the starvation bound it goes first (the fairness bound holds for
    late requests too: it starts by then, give or take the one prefill in flight).
    One instance, one prompt per batch. Request 1
    (300 tokens, TTFT target ≈ 74 ms) arrives behind a burst of 40 short prompts with
    earlier deadlines (≈ 48 ms), then a steady stream of short prompts keeps the instance
    busy for 0.6 s."""
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 1, 1),), 0.0, 10_000, 1, False, False, 0, 0.0, bound)
    deployment = Deployment(1, (10_000,), cost())
    observed = Observed(deployment, policy, spec().slo, prefill_s())
    # A 10-token prompt takes ~2.15 ms alone: one every 2 ms keeps the instance busy.
    requests = [Request(0, 0.0, 10, 1), Request(1, 0.0001, 300, 1)]
    requests += [Request(i, 0.0002, 10, 1) for i in range(2, 42)]
    requests += [Request(i, 0.001 + 0.002 * (i - 42), 10, 1) for i in range(42, 342)]
    result = simulate(observed, requests, check=True)
    victim = result.records[1]
    assert victim.completed
    one_prefill_s = max(observed.prefill_s(10), observed.prefill_s(300))
    assert victim.first_scheduled_s <= victim.arrival_s + bound + one_prefill_s, (
        f"late request 1 waited {victim.first_scheduled_s - victim.arrival_s:.4f} s, past the {bound} s bound")

    def deadline(request: Request) -> float:
        return request.arrival_s + observed.slo.ttft.target(observed.prefill_s(request.prompt_len))

    late_since = deadline(requests[1])
    for decision in observed.decisions:
        if 1 not in decision["queue"] or 1 in decision["started"] or decision["now"] <= late_since:
            continue
        for started in decision["started"]:
            other = requests[started]
            assert decision["now"] <= deadline(other) or other.arrival_s <= requests[1].arrival_s, (
                f"at {decision['now']:.4f} s late request 1 was bypassed by request {started}, late as well "
                f"and arrived after it")


# ------------------------------------------------------------------------ prefix caching


def state_with_a_spread_prefix() -> ClusterState:
    """A cache entry left by an elastic prefill: request 0's 1,100 tokens, [0, 550) on
    instance 1 and [550, 1100) on instance 2; its blocks [0, 1024) are found by the index."""
    state = ClusterState([4000] * INSTANCES, check=True, prefix=PrefixCache(PREFIX_BLOCK_TOKENS, 16))
    state.arrive(Request(0, 0.0, 1100, 1, (1, 2, 3)))
    retention = (Retention(1, TokenRange(0, 550)), Retention(2, TokenRange(550, 1100)))
    for batch in state.start(IterationPlan(0, (PrefillBatch((1, 2), (PrefillItem(0, 0, 1100, retention),)),))).batches:
        state.complete(batch)
    return state


ONE_BUCKET = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 4000, INSTANCES),), 0.0, 4000, 1, False, False, 0, 0.0, 30.0)


def prefill_of(plan: IterationPlan | None, request_id: int) -> tuple[PrefillBatch, PrefillItem] | None:
    for batch in plan.batches if plan else ():
        for item in batch.items:
            if item.request_id == request_id and isinstance(batch, PrefillBatch):
                return batch, item
    return None


def test_a_cached_prefix_is_read_on_a_ring_holding_all_of_it():
    state = state_with_a_spread_prefix()
    state.arrive(Request(1, 0.0, 1300, 1, (1, 2, 9)))
    plan = ElasticScheduler(Deployment(1, (4000,) * INSTANCES, cost()), ONE_BUCKET, spec().slo, prefill_s()).schedule(state)
    found = prefill_of(plan, 1)
    assert plan is not None and found is not None
    batch, item = found
    assert plan.hits == (PrefixHit(1, 0, 1024),)
    # Both holders are in the ring (the bucket's DoP of 1 is for the 276 uncached tokens).
    assert {1, 2} <= set(batch.instances)
    assert (item.start, item.end) == (1024, 1300)
    assert sorted((kept.range.start, kept.range.end) for kept in item.retention)[0][0] == 1024
    applied = state.start(plan)  # verified against the pool (check=True)
    assert applied.evictions == ()
    assert state.requests[1].cached_tokens == 1024


def test_a_request_waits_for_a_busy_holder_only_while_the_hit_can_pay():
    full_s = cost().prefill_time([1300], 1, 1)
    saved_s = full_s - cost().prefill_time([1300 - 1024], 1, 1, [1024])
    assert saved_s > 0
    for now, waits in ((0.0, True), (1.01 * saved_s, False)):
        state = state_with_a_spread_prefix()
        # Instance 1, a holder, runs another request's prefill.
        state.arrive(Request(5, 0.0, 100, 4))
        state.start(IterationPlan(1, (PrefillBatch((1,), (PrefillItem(5, 0, 100, (Retention(1, TokenRange(0, 100)),)),)),)))
        state.arrive(Request(1, 0.0, 1300, 1, (1, 2, 9)))
        state.now = now
        plan = ElasticScheduler(Deployment(1, (4000,) * INSTANCES, cost()), ONE_BUCKET, spec().slo, prefill_s()).schedule(state)
        found = prefill_of(plan, 1)
        if waits:  # its deadline (≥ 20 ms) leaves the slack: it waits for instance 1
            assert found is None, plan
            continue
        # Waited as long as the hit saves: recomputed now, elsewhere, without the hit.
        assert plan is not None and found is not None, plan
        batch, item = found
        assert plan.hits == () and item.start == 0 and 1 not in batch.instances
        state.start(plan)
