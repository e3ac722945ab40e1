"""The simulator and the baseline schedulers: hand-computed timelines and invariants."""

import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espc.frontend.loader import load_spec, parse_spec
from espc.planner.compile.evaluation import DEFAULT_WINDOW_S, Evaluator
from espc.planner.sim.cluster_state import ClusterState
from espc.planner.sim.costmodel import CostModel, LinearFit
from espc.planner.sim.metrics import TrialJudge, find_goodput, length_classes, summarize
from espc.planner.sim.simulator import RequestRecord, SimulationResult, simulate
from espc.planner.sim.strategies import ChunkedScheduler, Deployment, DisaggregatedScheduler, StaticScheduler
from espc.planner.sim.workload import Request

SPEC = """
[model]
preset = "tiny"
[[cluster.nodes]]
device = "cpu"
devices = {devices}
[slo]
ttft = "3s"
tpot = "500ms"
[workload]
lengths = "uniform(1, 300)"
arrival = "poisson(1)"
"""


def fitted_cost(devices: int) -> CostModel:
    """Prefill of a batch on one instance: 1 s + 10 ms per token; a decode step: 100 ms."""
    spec = parse_spec(SPEC.format(devices=devices), "test.toml")
    return CostModel(
        spec.model, spec.cluster,
        prefill_fits={(1, 1): LinearFit(1.0, 0.01, 0.0, 0, 0.0)},
        decode_fits={(1, 1): LinearFit(0.1, 0.0, 0.0, 0, 0.0)},
    )


def static(devices: int, capacity: int | None = None) -> StaticScheduler:
    cost = fitted_cost(devices)
    deployment = Deployment(1, (capacity or cost.kv_capacity_tokens(1),) * devices, cost)
    return StaticScheduler(deployment, (1,) * devices)


def test_one_request():
    result = simulate(static(1), [Request(0, 0.0, 100, 3)], check=True)
    (record,) = result.records
    assert record.ttft_s == pytest.approx(2.0)  # 1 s + 100 × 10 ms
    assert record.finish_s == pytest.approx(2.2)  # two decode steps of 100 ms
    assert record.tpot_s == pytest.approx(0.1)
    assert result.iterations == 3


def test_contention_slows_batches_while_other_instances_run():
    """A measured contention table (espc profile on shared CPU cores): a batch progresses
    at 1 / its factor while another instance is busy, at full pace alone."""
    cost = fitted_cost(2)
    contended = CostModel(
        cost.model, cost.cluster, prefill_fits=cost.prefill_fits, decode_fits=cost.decode_fits,
        contention={("prefill", 1): (1.0, 1.5), ("decode", 1): (1.0, 2.0)},
    )
    deployment = Deployment(1, (10_000, 10_000), contended)
    together = [Request(0, 0.0, 100, 2), Request(1, 0.0, 100, 2)]  # one on each instance, at once
    result = simulate(StaticScheduler(deployment, (1, 1)), together, record_timeline=True, check=True)
    assert sorted(batch.instances for batch in result.timeline if batch.phase == "prefill") == [(0,), (1,)]
    for record in result.records:
        assert record.ttft_s == pytest.approx(1.5 * 2.0)  # (1 s + 100 × 10 ms) × 1.5
        assert record.finish_s == pytest.approx(3.0 + 2.0 * 0.1)
    (alone,) = simulate(StaticScheduler(deployment, (1, 1)), together[:1], check=True).records
    assert (alone.ttft_s, alone.finish_s) == (pytest.approx(2.0), pytest.approx(2.1))

    # A prefills alone for 1 s (1 of its 2 s done), then beside B at 1/1.5 until done at
    # 2.5 s; its decode step (0.1 s of work at 1/2 beside B) ends at 2.7 s. B did 1 s of its
    # 2 s by 2.5 s and 0.2/1.5 s more by 2.7 s, then the rest alone: done at 3.5667 s.
    a, b = simulate(
        StaticScheduler(deployment, (1, 1)), [Request(0, 0.0, 100, 2), Request(1, 1.0, 100, 1)], record_timeline=True,
        check=True,
    ).records
    assert (a.ttft_s, a.finish_s) == (pytest.approx(2.5), pytest.approx(2.7))
    assert b.first_token_s == pytest.approx(2.7 + 2.0 - 1.0 - 0.2 / 1.5)


def test_admission_time_delays_every_request():
    """The runtime's measured time from arrival to a request's first batch (espc profile)."""
    cost = fitted_cost(1)
    admitted = CostModel(cost.model, cost.cluster, prefill_fits=cost.prefill_fits, decode_fits=cost.decode_fits, admission_s=0.5)
    (record,) = simulate(StaticScheduler(Deployment(1, (10_000,), admitted), (1,)), [Request(0, 1.0, 100, 3)], check=True).records
    assert record.arrival_s == 1.0 and record.queueing_s == pytest.approx(0.5)
    assert record.ttft_s == pytest.approx(0.5 + 2.0) and record.tpot_s == pytest.approx(0.1)


def test_two_overlapping_requests_prefill_first():
    requests = [Request(0, 0.0, 100, 2), Request(1, 0.5, 50, 2)]
    a, b = simulate(static(1), requests, check=True).records
    # A prefills 0–2 s; B waited and prefills 2–3.5 s (vLLM: new prefills first); then one
    # decode step of both, 3.5–3.6 s.
    assert (a.ttft_s, b.ttft_s) == (pytest.approx(2.0), pytest.approx(3.0))
    assert b.queueing_s == pytest.approx(1.5)
    assert a.finish_s == b.finish_s == pytest.approx(3.6)
    assert a.tpot_s == pytest.approx(1.6)


def test_memory_full_admission_waits_and_impossible_requests_are_rejected():
    requests = [Request(0, 0.0, 100, 2), Request(1, 0.0, 100, 2), Request(2, 0.0, 400, 2)]
    a, b, c = simulate(static(1, capacity=150), requests, check=True).records
    assert a.completed and b.completed
    assert b.first_scheduled_s == pytest.approx(a.finish_s)  # B's KV fits only once A is freed
    assert c.rejected is not None and "402" in c.rejected and not c.completed


def test_preemption_when_decode_finds_no_slot():
    # Two requests that fit for their prefill but not for their whole generation.
    requests = [Request(0, 0.0, 60, 30), Request(1, 0.0, 60, 30)]
    result = simulate(static(1, capacity=130), requests, check=True)
    assert all(record.completed for record in result.records)
    assert sum(record.preemptions for record in result.records) >= 1


def test_goodput_bisection_brackets_the_knee():
    goodput = find_goodput(lambda rate: 1.0 if rate <= 3.3 else 0.5, 0.9, start_rate=1.0, relative_tolerance=0.01)
    assert 3.3 / 1.01 <= goodput.rate <= 3.3
    assert find_goodput(lambda rate: 0.0, 0.9, 1.0, max_doublings=5).rate == 0.0


def test_goodput_is_not_a_lucky_plateau():
    """Attainment that fails above 1.4 req/s but holds again on a narrow band at 2.3–2.5
    (a trial's requests change with the rate: zipf seeds measured such bands). Doubling
    from 0.3 meets the target at 2.4 and fails at 4.8, but a goodput must also hold at 0.9×
    itself, so the search goes on below the failure — wherever it started from."""

    def attainment(rate: float) -> float:
        return 0.95 if rate <= 1.4 or 2.3 <= rate <= 2.5 else 0.85

    for start in (0.3, 1.0, 2.5):
        found = find_goodput(attainment, 0.9, start_rate=start, relative_tolerance=0.01)
        assert 1.4 / 1.01 <= found.rate <= 1.4, (start, found)
        assert attainment(0.9 * found.rate) >= 0.9
    # Without the confirmation the band wins from 0.3: the check is what decides.
    assert find_goodput(attainment, 0.9, start_rate=0.3, relative_tolerance=0.01, confirm=1.0).rate > 2.0


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ([100] * 50 + [20_000] * 30 + [100_000] * 20, (0, 8_192, 65_536)),
        # 2% above 256K join the 64–256K class; 3% of 8–64K joins the short class.
        ([100] * 60 + [10_000] * 3 + [100_000] * 35 + [300_000] * 2, (0, 65_536)),
        # The shortest class is the one too small: it joins its longer neighbour.
        ([100] * 4 + [10_000] * 96, (0,)),
        ([100] * 10, (0,)),
        ([], (0,)),
    ],
)
def test_length_classes_merge_small_classes(lengths, expected):
    assert length_classes(lengths) == expected


def test_per_class_attainment_cannot_hide_the_long_requests():
    """90 short requests meet their SLOs and 10 long ones do not: P90 attainment is 0.9,
    the per-class measure 0 — a strategy may not drop the requests ESP is for."""

    def record(request_id: int, prompt_len: int, ttft_s: float) -> RequestRecord:
        return RequestRecord(request_id, 0.0, prompt_len, 2, 0.0, ttft_s, ttft_s + 0.1, 0, 0, None)

    short = [record(i, 1_000, ttft_s=0.1) for i in range(90)]
    long = [record(90 + i, 100_000, ttft_s=100.0) for i in range(10)]
    result = SimulationResult("toy", short + long, 200.0, 100, [200.0], 0, 0)
    slo = parse_spec(SPEC.format(devices=1), "test.toml").slo  # TTFT ≤ 3 s, TPOT ≤ 500 ms
    summary = summarize(result, slo, lambda prompt_len: 0.0, classes=length_classes([1_000] * 90 + [100_000] * 10))
    assert summary.attainment == pytest.approx(0.9)
    assert summary.class_attainment == ((0, 1.0), (65_536, 0.0))
    assert summary.attainment_of("per-class") == 0.0 and summary.attainment_of("p90") == pytest.approx(0.9)


def _schedulers(cost: CostModel, capacity: int):
    deployment = Deployment(1, (capacity,) * 4, cost)
    return [
        StaticScheduler(deployment, (1, 1, 1, 1)),
        StaticScheduler(deployment, (2, 2)),
        StaticScheduler(deployment, (2, 1, 1), long_prompt_threshold=150),
        ChunkedScheduler(deployment, chunk_tokens=64),
        DisaggregatedScheduler(deployment, prefill_instances=1),
    ]


# Bursts of up to 40 requests that each fit one instance (prompt + output ≤ 160 tokens),
# on capacities tight enough to force waiting, preemption and full decode instances.
WORKLOADS = st.lists(
    st.tuples(st.floats(0, 1), st.integers(1, 120), st.integers(1, 40)), min_size=1, max_size=40
).map(lambda rows: [Request(i, t, p, o) for i, (t, p, o) in enumerate(sorted(rows))])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=WORKLOADS, capacity=st.integers(170, 600), which=st.integers(0, 4))
def test_invariants(requests, capacity, which):
    cost = CostModel.from_spec(parse_spec(SPEC.format(devices=4), "test.toml"))
    result = simulate(_schedulers(cost, capacity)[which], requests, check=True)  # every plan verified
    assert [record.id for record in result.records] == [request.id for request in requests]
    for record, request in zip(result.records, requests):
        # Nothing lost: every request completes (each fits an instance group) exactly once.
        assert record.completed, record
        assert record.arrival_s <= record.first_scheduled_s <= record.first_token_s <= record.finish_s
        assert record.output_len == request.output_len
    again = simulate(_schedulers(cost, capacity)[which], requests)
    assert again.records == result.records  # deterministic


def test_timeline_and_summary():
    cost = fitted_cost(2)
    requests = [Request(i, 0.1 * i, 50 + 10 * i, 4) for i in range(6)]
    result = simulate(StaticScheduler(Deployment(1, (10_000, 10_000), cost), (1, 1)), requests, record_timeline=True)
    assert {batch.phase for batch in result.timeline} == {"prefill", "decode"}
    assert sum(batch.end_s - batch.start_s for batch in result.timeline) == pytest.approx(sum(result.instance_busy_s))
    slo = parse_spec(SPEC.format(devices=2).replace('"3s"', '"3.95s"').replace('"500ms"', '"1s"'), "test.toml").slo
    summary = summarize(result, slo, lambda prompt_len: 0.0)
    assert summary.completed == 6 and summary.rejected == 0
    met = [r.id for r in result.records if r.ttft_s <= 3.95 and r.tpot_s <= 1.0]
    assert met == [0, 2, 4]  # prefill-first: new prefills stall request 1's decodes, 3 and 5 queue
    assert summary.attainment == pytest.approx(0.5)
    assert summary.ttft.count == 6 and summary.ttft.p50 <= summary.ttft.p90 <= summary.ttft.max


def _searched_case(seed: int, capacities: tuple[int, int], arrival_span: float) -> tuple[int, list[Request]]:
    """The capacity and burst of requests that a random search drew with `seed`."""
    draw = random.Random(seed)
    capacity, count = draw.randint(*capacities), draw.randint(5, 40)
    rows = sorted((draw.uniform(0, arrival_span), draw.randint(10, 120), draw.randint(2, 40)) for _ in range(count))
    return capacity, [Request(i, t, p, o) for i, (t, p, o) in enumerate(rows)]


def test_disaggregated_transfers_leave_room_for_decode_steps():
    # Found by search: transfers filled the decode instance with the slots its decoding
    # requests needed in the same iteration (the plan failed verification).
    cost = CostModel.from_spec(parse_spec(SPEC.format(devices=2), "test.toml"))
    capacity, requests = _searched_case(0, (200, 600), 0.05)
    scheduler = DisaggregatedScheduler(Deployment(1, (capacity, capacity), cost), prefill_instances=1)
    result = simulate(scheduler, requests, check=True)
    assert all(record.completed for record in result.records)
    assert result.migrated_tokens > 0


def test_chunked_prefill_chunks_stop_at_free_slots():
    # Found by search: a prefill admitted earlier kept taking full chunks after its
    # instance's decodes had grown into the room it had counted on (over capacity).
    cost = CostModel.from_spec(parse_spec(SPEC.format(devices=4), "test.toml"))
    capacity, requests = _searched_case(3, (130, 500), 0.2)
    scheduler = ChunkedScheduler(Deployment(1, (capacity,) * 4, cost), chunk_tokens=64)
    assert all(record.completed for record in simulate(scheduler, requests, check=True).records)


def test_goodputs_are_remembered_per_policy_not_per_label():
    """Two elastic policies of one tp share a label; the evaluator's goodput memo must still
    tell them apart (a compile's local search measures neighbours of one tp)."""
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml")
    evaluator = Evaluator(spec, requests=40, window_s=0.0)
    policy = evaluator.milp_policies()[0].policy
    narrow = dataclasses.replace(
        policy, buckets=tuple(dataclasses.replace(b, max_instances=b.prefill_dop) for b in policy.buckets)
    )
    assert narrow != policy
    first, second = evaluator.elastic_candidate(policy), evaluator.elastic_candidate(narrow)
    assert first.label == second.label and first.identity() != second.identity()
    assert evaluator.goodput(first, 0) is evaluator.goodput(first, 0)
    assert evaluator.goodput(second, 0) is not evaluator.goodput(first, 0)


class _CheckedQueues(StaticScheduler):
    """A static scheduler that checks, whenever it plans, that its queue index (token sums
    and arrival order per group) is what a rescan of the state gives."""

    def __init__(self, deployment: Deployment, groups: tuple[int, ...]):
        super().__init__(deployment, groups)
        self.routed_to: dict[int, int] = {}
        self.checks = 0

    def admit(self, state, request):
        counts = [self.members.count(g) for g in range(len(self.groups))]
        reason = super().admit(state, request)
        if reason is None:
            (group,) = [g for g in range(len(self.groups)) if self.members.count(g) > counts[g]]
            self.routed_to[request.id] = group
        return reason

    def schedule(self, state):
        self.members.sync(state)
        for group in range(len(self.groups)):
            waiting = sorted(
                (r for r in state.waiting.values() if self.routed_to.get(r.id) == group),
                key=lambda r: (r.request.arrival_s, r.id),
            )
            assert [r.id for r in self.members.queue(group)] == [r.id for r in waiting]
            assert self.members.queued_tokens(group) == sum(r.pending_target for r in waiting)
        self.checks += 1
        return super().schedule(state)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=WORKLOADS, capacity=st.integers(170, 400))
def test_static_queue_index_follows_the_state(requests, capacity):
    """Preemptions on tight capacities requeue requests: the index sees them rejoin."""
    cost = CostModel.from_spec(parse_spec(SPEC.format(devices=4), "test.toml"))
    scheduler = _CheckedQueues(Deployment(1, (capacity,) * 4, cost), (2, 1, 1))
    assert all(record.completed for record in simulate(scheduler, requests, check=True).records)
    assert scheduler.checks > 0


def test_static_queue_index_drops_a_request_failed_while_queued():
    """The runtime fails requests from outside the scheduler (a cancel, a dead worker)."""
    cost = CostModel.from_spec(parse_spec(SPEC.format(devices=1), "test.toml"))
    scheduler = StaticScheduler(Deployment(1, (400,), cost), (1,))
    state = ClusterState((400,), check=True)
    queued = [state.arrive(Request(i, 0.0, 300, 4)) for i in range(3)]
    for request in queued:
        assert scheduler.admit(state, request) is None
    state.fail(queued[0], "cancelled")
    plan = scheduler.schedule(state)
    assert [item.request_id for batch in plan.batches for item in batch.items] == [1]
    state.start(plan)
    scheduler.members.sync(state)
    assert scheduler.members.queued_tokens(0) == 300 and [r.id for r in scheduler.members.queue(0)] == [2]


def test_a_judged_trial_has_the_full_runs_verdict():
    """TrialJudge stops a trial once it cannot reach the target; the verdict is the full
    run's, and the stopped trial's attainment at most the full run's."""
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml")
    evaluator = Evaluator(spec, requests=200)
    (candidate,) = [c for c in evaluator.candidates("static-sp") if c.label.endswith("groups=2+2")]
    target = spec.slo.attainment
    verdicts = set()
    for rate in (20.0, 80.0, 320.0):
        requests = evaluator.workload(rate, 0, 200)
        full = evaluator.run(candidate, requests)[1].attainment
        judge = TrialJudge(requests, spec.slo, evaluator.prefill_s, "p90", target)
        judged = evaluator.run(candidate, requests, watch=judge)[1].attainment
        assert (judged >= target) == (full >= target) and judged <= full, (rate, judged, full)
        verdicts.add(full >= target)
    assert verdicts == {True, False}  # both kinds of trial were judged


def test_goodput_stops_halving_where_no_lower_rate_can_meet_it():
    trials = []

    def attainment(rate: float) -> float:
        trials.append(rate)
        return 0.5

    found = find_goodput(attainment, 0.9, 8.0, hopeless_below=lambda rate: rate <= 4.0)
    assert found.rate == 0.0 and trials == [8.0, 4.0]


def test_trials_span_what_a_bisection_needs():
    """A window past settle_s only repeats the verdict: tiny-cpu's 0.2 s TTFT bounds settle
    in seconds, while LoongServe's 15 s bounds keep the whole 60 s window (the benchmarks'
    trial shapes on lwm7b-a800x8 are unchanged)."""
    specs = Path(__file__).resolve().parent.parent / "specs"
    tiny = Evaluator(load_spec(specs / "tiny-cpu.toml"))
    assert tiny.settle_s(0.08) == pytest.approx(tiny.median_ttft_s() / (0.08 * 0.9)) and tiny.settle_s(0.08) < 5.0
    lwm = Evaluator(load_spec(specs / "lwm7b-a800x8.toml"))
    assert lwm.settle_s(0.03) > lwm.settle_s(0.08) > DEFAULT_WINDOW_S
