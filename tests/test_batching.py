"""The batching DP against exhaustive enumeration of the same search space.

With one cost function behind both (the DP reads it through `segment_costs`, the brute
force directly), the DP's objective must equal the brute force's bit for bit: both add
the batches' costs left to right from 0, and rounding is monotone, so the DP's prefix
minima cannot lose a better split. With the real cost model the DP reads prefix-sum
segment times, which agree with `prefill_time` to rounding only (tolerances table).
"""

from __future__ import annotations

import functools
import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import PLANNER_TOLERANCES

from espc.frontend.loader import parse_spec
from espc.planner.compile.batching import Batching, BatchingProblem, brute_force_batches, optimal_batches
from espc.planner.sim.costmodel import CostModel

# ----------------------------------------------------------------------------- cost functions


class SyntheticCost:
    """A prefill cost with random shape: fixed and per-instance overhead, linear and
    quadratic work divided by dop^speedup (speedup < 1: imperfect scaling), so that the
    optimum ranges from one batch on every instance to one prompt per instance."""

    def __init__(self, draw: random.Random):
        self.fixed = draw.choice([0.0, 0.5, 1.0, 3.0])
        self.per_instance = draw.choice([0.0, 0.1, 0.7, 2.0])
        self.linear = draw.choice([0.01, 0.05, 0.2])
        self.quadratic = draw.choice([0.0, 1e-4, 1e-3])
        self.speedup = draw.choice([0.5, 0.8, 1.0])
        self.cost = functools.lru_cache(maxsize=None)(self._cost)

    def _cost(self, lengths: tuple[int, ...], dop: int) -> float:
        if not lengths:
            return 0.0
        work = self.linear * sum(lengths) + self.quadratic * sum(n * n for n in lengths)
        return self.fixed + self.per_instance * (dop - 1) + work / dop**self.speedup

    def prefill(self, lengths, dop: int) -> float:
        return self.cost(tuple(lengths), dop)

    def segments(self, lengths, dop: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """[p] = prefill(lengths[starts[p]:ends[p]], dop): the same floats the brute force sees."""
        return np.array([self.prefill(lengths[k:i], dop) for k, i in zip(starts, ends)], dtype=float)


def random_problem(draw: random.Random) -> BatchingProblem:
    """Up to 6 prompts on up to 5 instances: every structure the search space allows —
    repeated lengths, non-monotone caps, budgets below one prompt, too few instances."""
    n = draw.randint(1, 6)
    pool = draw.choice([(1, 5), (1, 100), (50, 60), (7, 7)])
    lengths = tuple(sorted(draw.randint(*pool) for _ in range(n)))
    instances = draw.randint(0, 5) if draw.random() < 0.1 else draw.randint(1, 5)
    max_dop = tuple(draw.randint(1, 5) for _ in range(n))
    budget_scale = draw.choice([0, 1, 2, 4, 1000])
    token_budget = tuple(max(1, int(budget_scale * draw.uniform(0.5, 1.5) * max(lengths))) for _ in range(n))
    weight = draw.choice([0.0, 0.0, 0.5, 1.0, 3.7])
    ring_slots = None
    if draw.random() < 0.4:  # the pool's KV room: the d roomiest instances' free slots
        rooms = sorted((draw.randint(0, 2 * max(lengths)) for _ in range(5)), reverse=True)
        ring_slots = tuple(itertools.accumulate(rooms))
    return BatchingProblem(lengths, max_dop, token_budget, instances, weight, ring_slots)


# ------------------------------------------------------------------------------- checks


def assert_feasible(problem: BatchingProblem, found: Batching, prefill) -> None:
    """Batches are consecutive runs covering every prompt, within budgets, dop caps and
    the instances; the claimed objective is what the batches cost."""
    n = len(problem.lengths)
    expected_first = 0
    for first, end, dop in found.batches:
        assert first == expected_first and first < end, found
        assert problem.fits(first, end), (found, problem)
        assert problem.holds(first, end, dop), (found, problem)
        assert 1 <= dop <= min(problem.max_dop[end - 1], problem.instances), (found, problem)
        expected_first = end
    assert expected_first == n, found
    assert found.instances_used <= problem.instances
    total = sum(
        prefill(problem.lengths[first:end], dop) * (end - first + problem.instance_weight * dop)
        for first, end, dop in found.batches
    )
    assert total == found.cost, (total, found)


def check_against_brute_force(problem: BatchingProblem, cost: SyntheticCost, label: str) -> None:
    exact = brute_force_batches(problem, cost.prefill)
    found = optimal_batches(problem, cost.segments)
    if exact is None:
        assert found is None, f"{label}: the DP found {found} for an infeasible {problem}"
        return
    assert found is not None, f"{label}: the DP found nothing; brute force {exact} for {problem}"
    assert found.cost == exact.cost, f"{label}: DP {found} vs brute force {exact} for {problem}"
    assert_feasible(problem, found, cost.prefill)
    assert_feasible(problem, exact, cost.prefill)


# --------------------------------------------------------------------------- random instances

SEEDS = range(600)
CHUNK = 60


@pytest.mark.parametrize("chunk", range(len(SEEDS) // CHUNK))
def test_dp_matches_brute_force_on_random_instances(chunk):
    for seed in SEEDS[chunk * CHUNK:(chunk + 1) * CHUNK]:
        draw = random.Random(seed)
        problem = random_problem(draw)
        check_against_brute_force(problem, SyntheticCost(draw), f"seed {seed}")


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    lengths = tuple(sorted(draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))))
    max_dop = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    token_budget = tuple(draw(st.lists(st.integers(1, 200), min_size=n, max_size=n)))
    instances = draw(st.integers(0, 4))
    weight = draw(st.sampled_from([0.0, 0.25, 1.0, 4.0]))
    return BatchingProblem(lengths, max_dop, token_budget, instances, weight)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), seed=st.integers(0, 2**16))
def test_dp_matches_brute_force_hypothesis(problem, seed):
    check_against_brute_force(problem, SyntheticCost(random.Random(seed)), f"cost seed {seed}")


# ---------------------------------------------------------------------- the real cost model

SPEC = """
[model]
preset = "tiny"
[[cluster.nodes]]
device = "cpu"
devices = 4
[slo]
ttft = "3s"
tpot = "500ms"
[workload]
lengths = "uniform(1, 300)"
arrival = "poisson(1)"
"""


@functools.cache
def real_cost() -> CostModel:
    return CostModel.from_spec(parse_spec(SPEC, "test.toml"))


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force_with_the_cost_model(seed):
    """Segment times from prefix sums agree with prefill_time to rounding, so the
    optimum agrees within the table's tolerance and the DP's batches, costed by
    prefill_time, are an optimum too."""
    cost, tp = real_cost(), 1
    draw = random.Random(10_000 + seed)
    problem = random_problem(draw)
    problem = BatchingProblem(problem.lengths, tuple(min(d, 4) for d in problem.max_dop), problem.token_budget,
                              min(problem.instances, 4), problem.instance_weight)

    @functools.cache
    def prefill(lengths: tuple[int, ...], dop: int) -> float:
        return cost.prefill_time(lengths, dop, tp)

    exact = brute_force_batches(problem, prefill)
    found = optimal_batches(problem, lambda lengths, dop, starts, ends: cost.prefill_segment_times(lengths, dop, tp, starts, ends))
    if exact is None:
        assert found is None
        return
    assert found is not None
    assert found.cost == pytest.approx(exact.cost, **PLANNER_TOLERANCES["segment_times"])
    recosted = sum(
        prefill(problem.lengths[first:end], dop) * (end - first + problem.instance_weight * dop)
        for first, end, dop in found.batches
    )
    assert recosted == pytest.approx(exact.cost, **PLANNER_TOLERANCES["segment_times"])
    assert recosted >= exact.cost  # the brute force is the optimum under prefill_time


@pytest.mark.parametrize("seed", range(20))
def test_one_prompt_problems_match_brute_force_bit_for_bit_with_the_cost_model(seed):
    """One prompt (most scheduler decisions) takes a path without the DP's tables: with the
    segment times as the brute force's cost too, the same batch and the same float."""
    cost, tp = real_cost(), 1
    draw = random.Random(20_000 + seed)
    for _ in range(25):
        length, instances = draw.randint(1, 300), draw.randint(0, 4)
        ring_slots = tuple(itertools.accumulate(sorted((draw.randint(0, 200) for _ in range(4)), reverse=True)))
        problem = BatchingProblem(
            (length,), (draw.randint(1, 4),), (draw.randint(1, 300),), instances, draw.choice([0.0, 0.25, 1.0, 4.0]),
            draw.choice([None, ring_slots]),
        )

        def segments(lengths, dop, starts, ends):
            return cost.prefill_segment_times(lengths, dop, tp, starts, ends)

        def prefill(lengths, dop: int) -> float:
            return float(segments(lengths, dop, np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64))[0])

        assert optimal_batches(problem, segments) == brute_force_batches(problem, prefill), problem


# -------------------------------------------------------------------------------- edge cases


def synthetic() -> SyntheticCost:
    cost = SyntheticCost(random.Random(0))
    cost.fixed, cost.per_instance, cost.linear, cost.quadratic, cost.speedup = 1.0, 0.5, 0.1, 0.0, 1.0
    return cost


def test_empty_queue():
    for instances in (0, 3):
        problem = BatchingProblem((), (), (), instances, 1.0)
        assert optimal_batches(problem, synthetic().segments) == Batching((), 0.0)
        assert brute_force_batches(problem, synthetic().prefill) == Batching((), 0.0)


def test_one_request_takes_the_dop_that_minimises_time_plus_instance_charge():
    cost = synthetic()  # T(dop) = 1 + 0.5(dop − 1) + 10/dop for one 100-token prompt
    for weight in (0.0, 1.0, 5.0):
        problem = BatchingProblem((100,), (4,), (100,), 4, weight)
        found = optimal_batches(problem, cost.segments)
        best = min(range(1, 5), key=lambda d: cost.prefill([100], d) * (1 + weight * d))
        assert found.batches == ((0, 1, best),)
        assert found.cost == cost.prefill([100], best) * (1 + weight * best)
        check_against_brute_force(problem, cost, f"weight {weight}")
    # One instance, or a cap of 1: dop 1.
    assert optimal_batches(BatchingProblem((100,), (4,), (1,), 1), cost.segments).batches == ((0, 1, 1),)
    assert optimal_batches(BatchingProblem((100,), (1,), (1,), 4), cost.segments).batches == ((0, 1, 1),)


def test_no_instances_means_no_batching():
    problem = BatchingProblem((10, 20), (2, 2), (100, 100), 0)
    assert optimal_batches(problem, synthetic().segments) is None
    assert brute_force_batches(problem, synthetic().prefill) is None


def test_budget_smaller_than_one_request():
    """A prompt longer than its budget still forms a batch of one, never of two."""
    cost = synthetic()
    problem = BatchingProblem((50, 60, 70), (2, 2, 2), (10, 10, 10), 3)
    found = optimal_batches(problem, cost.segments)
    assert [(first, end) for first, end, _ in found.batches] == [(0, 1), (1, 2), (2, 3)]
    assert found.instances_used == 3
    check_against_brute_force(problem, cost, "tiny budgets")
    # Fewer instances than prompts that must run alone: infeasible.
    squeezed = BatchingProblem((50, 60, 70), (2, 2, 2), (10, 10, 10), 2)
    assert optimal_batches(squeezed, cost.segments) is None
    assert brute_force_batches(squeezed, cost.prefill) is None


def test_budget_is_that_of_the_longest_prompt_of_the_batch():
    cost = synthetic()
    # A large fixed cost and a charge per instance held: sharing one batch pays, if allowed
    # (two singles 2 × 104 s × (1 + 1), one pair 108 s × (2 + 1)).
    cost.fixed = 100.0
    roomy_last = BatchingProblem((40, 40), (1, 1), (10, 80), 2, 1.0)
    assert optimal_batches(roomy_last, cost.segments).batches == ((0, 2, 1),)
    roomy_first = BatchingProblem((40, 40), (1, 1), (80, 10), 2, 1.0)
    assert optimal_batches(roomy_first, cost.segments).batches == ((0, 1, 1), (1, 2, 1))
    for problem in (roomy_last, roomy_first):
        check_against_brute_force(problem, cost, str(problem))


def test_all_identical_lengths():
    cost = synthetic()
    for instances in range(1, 6):
        for budget in (7, 14, 21, 70):
            problem = BatchingProblem((7,) * 6, (3,) * 6, (budget,) * 6, instances, 0.5)
            check_against_brute_force(problem, cost, f"{instances} instances, budget {budget}")
            found = optimal_batches(problem, cost.segments)
            if found is not None:
                assert all(end - first <= max(1, budget // 7) for first, end, _ in found.batches)
    # Pure latency, one instance, free fixed cost: one prompt after another costs
    # 1+2+…+6 prompt times; one batch of six costs 6 × the batch time — the DP knows which.
    cost.fixed = 0.0
    problem = BatchingProblem((7,) * 6, (1,) * 6, (42,) * 6, 1)
    assert optimal_batches(problem, cost.segments).cost == brute_force_batches(problem, cost.prefill).cost


def test_dop_is_capped_by_the_bucket_of_the_longest_prompt():
    cost = synthetic()
    cost.per_instance, cost.fixed = 0.0, 0.0  # more instances are free: dop grows to its cap
    problem = BatchingProblem((10, 500), (4, 2), (10_000, 10_000), 8)
    found = optimal_batches(problem, cost.segments)
    for _first, end, dop in found.batches:
        assert dop <= problem.max_dop[end - 1]
    check_against_brute_force(problem, cost, "caps")


def test_invalid_problems_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        BatchingProblem((5, 3), (1, 1), (10, 10), 2)
    with pytest.raises(ValueError, match="differ in size"):
        BatchingProblem((3, 5), (1,), (10, 10), 2)
    with pytest.raises(ValueError, match="max_dop"):
        BatchingProblem((3,), (0,), (10,), 2)
    with pytest.raises(ValueError, match="≥ 0"):
        BatchingProblem((3,), (1,), (10,), -1)


def test_dp_scales_to_the_scheduler_sizes():
    """256 prompts × 8 instances with the real cost model: a feasible, self-consistent
    answer (the benchmark measures its speed)."""
    cost, tp = real_cost(), 1
    draw = random.Random(7)
    lengths = tuple(sorted(draw.randint(1, 300) for _ in range(256)))
    problem = BatchingProblem(lengths, (4,) * 256, (16_384,) * 256, 4, 2.0)
    found = optimal_batches(problem, lambda ls, dop, starts, ends: cost.prefill_segment_times(ls, dop, tp, starts, ends))
    assert found is not None and math.isfinite(found.cost)
    total = sum(
        cost.prefill_time(lengths[first:end], dop, tp) * (end - first + 2.0 * dop) for first, end, dop in found.batches
    )
    assert total == pytest.approx(found.cost, **PLANNER_TOLERANCES["segment_times"])
    assert [b[0] for b in found.batches][0] == 0 and found.batches[-1][1] == 256
