"""The policy MILP: valid policies, infeasible SLOs named, and the optimum of the fluid
model checked by enumerating every choice on small clusters.

The reference below rebuilds the fluid model of `espc.planner.compile.ilp` from the module's
constants (options per bucket, decode thresholds, the per-request work, KV and migration
terms) and maximises the rate by enumeration: for fixed one-hot choices and caps every
constraint bounds the rate linearly, so the best rate is a minimum of ratios. It checks
what the MILP adds on top of that model — the McCormick linearisation of rate × choice,
the integer caps, the served/best-effort split and the slow/fast blocking constraint.
The reference follows the model as `solve` builds it (which folds the migration term into
the instance-time constraint, where the module docstring lists it as a constraint of its
own); a change to the model must change both.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tolerances import PLANNER_TOLERANCES

from espc import load_spec
from espc.frontend.loader import parse_spec
from espc.frontend.spec import Spec
from espc.planner.compile import ilp
from espc.planner.compile.evaluation import Evaluator
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import isolated_prefill
from espc.planner.sim.workload import Request, generate

TINY = """
[model]
preset = "tiny"
max_context = 4096
[cluster]
tp = 1
[[cluster.nodes]]
device = "cpu"
devices = {devices}
[slo]
ttft = "{ttft}"
tpot = "{tpot}"
[workload]
lengths = "zipf(1.2, 8, 2K)"
outputs = "uniform(1, 32)"
arrival = "poisson(2.0)"
requests = 64
seed = 0
[runtime]
memory_fraction = 0.5
[policy]
length_buckets = {buckets}
{policy}
"""

# LoongServe's model on a few A800s: prefills of seconds, prompts longer than one
# instance's KV, so TTFT bounds prune options and DoPs start above 1.
A800 = """
[model]
preset = "lwm-text-1m"
max_context = "{max_context}"
[cluster]
tp = 1
[[cluster.nodes]]
device = "A800-80G"
devices = {devices}
[slo]
ttft = "{ttft}"
tpot = "{tpot}"
attainment = "{attainment}"
[workload]
lengths = "{lengths}"
outputs = "uniform(1, 200)"
arrival = "poisson(0.5)"
requests = 60
seed = {seed}
[policy]
length_buckets = {buckets}
{policy}
"""


@dataclass(frozen=True)
class Case:
    spec: Spec
    cost: CostModel
    requests: tuple[Request, ...]

    @property
    def instances(self) -> int:
        return len(self.cost.cluster.instances(1))

    def solve(self) -> ilp.MilpSolution:
        return ilp.solve(self.cost, 1, self.requests, self.spec.slo, self.spec.policy, isolated_prefill(self.cost))


@functools.cache
def case(template: str, **fields) -> Case:
    defaults = {"devices": 4, "ttft": "max(25x prefill, 2s)", "tpot": "200ms", "buckets": 4, "policy": "",
                "lengths": "zipf(1.1, 1K, 200K)", "seed": 0,
                "max_context": "200K", "attainment": "90%"}
    spec = parse_spec(template.format(**(defaults | fields)), "test.toml")
    return Case(spec, CostModel.from_spec(spec), tuple(generate(spec.workload)))


# ------------------------------------------------------------------- reference fluid model


def reference_optimum(c: Case, fixed: dict | None = None) -> tuple[float, dict | None]:
    """(best rate, the choice reaching it) by enumerating every prefill option per bucket,
    decode threshold, served/best-effort split and cap vector of the fluid model; `fixed`
    holds some of them to given values (keys "options": [(dop, budget)] per bucket,
    "tau", "caps", "served")."""
    fixed = fixed or {}
    cost, tp, slo, policy = c.cost, 1, c.spec.slo, c.spec.policy
    prefill_s = isolated_prefill(cost)
    n = c.instances
    capacity = cost.kv_capacity_tokens(tp)
    max_dop = min(n, policy.max_dop or n)
    tpot_s = slo.tpot.target()
    buckets = ilp.length_buckets(c.requests, policy.length_buckets, cost.model.max_context)
    options, slow_seconds, bounds = [], [], []
    for bucket in buckets:
        length = max(1, round(bucket.mean_prompt))
        needed = -(-bucket.max_prompt // capacity)
        bound = slo.ttft.target(prefill_s(length))
        offered = []
        for budgets in (ilp.BATCH_BUDGETS, (ilp.ONE_PROMPT,)):  # one prompt only when no budget fits
            for dop in range(max(1, needed), max_dop + 1):  # every DoP ≤ 8: _dop_choices offers all
                for budget in budgets:
                    batch = max(1, budget // length)
                    seconds = cost.prefill_time([length] * batch, dop, tp)
                    if (1 + ilp.QUEUEING_MARGIN) * seconds <= bound:
                        offered.append((dop, budget, seconds, dop * seconds / batch))
            if offered:
                break
        assert offered, "the reference cases are feasible"
        options.append(offered)
        slow_seconds.append(min(o[2] for o in offered))
        bounds.append(bound)
    mean_context = sum(b.share * (b.mean_prompt + b.mean_output / 2) for b in buckets)
    mean_output = sum(b.share * b.mean_output for b in buckets)
    thresholds = []
    for share in ilp.DECODE_THRESHOLD_SHARES:
        tau = max(1, int(capacity * share))
        batch = max(1, int(tau / max(mean_context, 1)))
        step = cost.decode_time([round(mean_context)] * batch, 1, tp)
        if step <= (1 - ilp.DECODE_STALL_SHARE) * tpot_s:
            thresholds.append((tau, batch, step))
    if not thresholds:  # one request per instance, when that still meets the bound
        step = cost.decode_time([round(mean_context)], 1, tp)
        assert step <= tpot_s, "the reference cases decode within the TPOT bound"
        thresholds.append((max(1, int(capacity * ilp.DECODE_THRESHOLD_SHARES[0])), 1, step))
    fabric = cost.device.link_bandwidth * cost.parameters.link_efficiency
    decode_terms = []
    for tau, batch, step in thresholds:
        decode_work = mean_output * step / batch
        kv_seconds = sum(b.share * (b.mean_prompt + b.mean_output / 2) * b.mean_output * step for b in buckets)
        migration = sum(b.share * cost.migration_time(min(tau, round(b.mean_prompt)), bandwidth=fabric)
                        for b in buckets if b.mean_prompt + b.mean_output > tau)
        decode_terms.append((tau, decode_work + migration, kv_seconds))
    # Best effort: buckets that may miss their SLOs within the attainment's slack; those
    # that cannot decode within TPOT even alone over every instance are best effort by force.
    hopeless = {
        k for k, b in enumerate(buckets)
        if min(cost.decode_time([round(b.mean_prompt + b.mean_output / 2)], d, tp) for d in range(1, max_dop + 1)) > tpot_s
    }
    hopeless_share = sum(buckets[k].share for k in hopeless)
    assert hopeless_share <= 1 - slo.attainment, "the reference cases are feasible"
    best_effort_room = max(ilp.BEST_EFFORT_SHARE * (1 - slo.attainment), hopeless_share)
    splits = [
        served for served in itertools.product((True, False), repeat=len(buckets))
        if not any(served[k] for k in hopeless)
        and sum(b.share for b, is_served in zip(buckets, served) if not is_served) <= best_effort_room + 1e-12
    ]
    least_work = sum(b.share * min(o[3] for o in opts) for b, opts in zip(buckets, options))
    rate_bound = 2 * n / max(least_work, 1e-9)
    rho = ilp.LOAD_CEILING
    slow_of = [[j for j in range(len(buckets)) if j != k and slow_seconds[j] > bounds[k] / 2] for k in range(len(buckets))]

    def most(coefficient: float, room: float) -> float:
        """The largest rate ≥ 0 with rate · coefficient ≤ room (−inf: none)."""
        if room < 0:
            return -math.inf
        return math.inf if coefficient <= 0 else room / coefficient

    best_rate, best_choice = -math.inf, None
    for chosen in itertools.product(*options):
        if "options" in fixed and [o[:2] for o in chosen] != list(fixed["options"]):
            continue
        work = [b.share * o[3] for b, o in zip(buckets, chosen)]  # per unit of rate
        for tau, decode_per_request, kv_seconds in decode_terms:
            if "tau" in fixed and tau != fixed["tau"]:
                continue
            kv_rate = most(kv_seconds, (1 - ilp.KV_HEADROOM) * n * capacity)
            for served in splits:
                if "served" in fixed and list(served) != list(fixed["served"]):
                    continue
                served_work = [w if is_served else 0.0 for w, is_served in zip(work, served)]
                cap_ranges = [range(o[0], n + 1) for o in chosen]  # caps ≥ the chosen dop, ≤ n
                for caps in itertools.product(*cap_ranges):
                    if "caps" in fixed and caps != tuple(fixed["caps"]):
                        continue
                    held = sum(cap for cap, is_served in zip(caps, served) if not is_served)
                    rate = min(rate_bound, kv_rate, most(sum(served_work) + decode_per_request, rho * (n - held)))
                    for k in range(len(buckets)):
                        rate = min(rate, most(served_work[k], rho * caps[k]))
                        if slow_of[k]:
                            fast = [j for j in range(len(buckets)) if j not in slow_of[k]]
                            largest_slow = max(caps[j] for j in slow_of[k])
                            rate = min(rate, most(sum(served_work[j] for j in fast), rho * (n - largest_slow)))
                    if rate > best_rate:
                        best_rate = rate
                        best_choice = {"options": [o[:2] for o in chosen], "tau": tau, "caps": caps, "served": served}
    return best_rate, best_choice


# ----------------------------------------------------------------------------------- tests


def check_policy(c: Case, solution: ilp.MilpSolution) -> None:
    policy, n = solution.policy, c.instances
    policy.verify(n)
    assert policy.tp == 1 and solution.tp == 1
    assert solution.rate > 0 and 0 <= solution.load <= 0.95
    buckets = policy.buckets
    assert buckets[0].low == 0 and buckets[-1].high > c.cost.model.max_context
    assert all(a.high == b.low for a, b in zip(buckets, buckets[1:]))
    assert sum(b.share for b in buckets) == pytest.approx(1.0)
    # Best-effort buckets fit in the attainment's slack.
    assert sum(b.share for b in buckets if not b.within_slo) <= 1 - c.spec.slo.attainment + 1e-9
    for request in c.requests:
        bucket = policy.bucket(request.prompt_len)
        assert bucket.low <= request.prompt_len < bucket.high
    max_dop = min(n, c.spec.policy.max_dop or n)
    capacity = c.cost.kv_capacity_tokens(1)
    for bucket in buckets:
        assert 1 <= bucket.prefill_dop <= max_dop, bucket
        assert bucket.prefill_dop <= bucket.max_instances <= n, bucket
        assert bucket.batch_tokens in (*ilp.BATCH_BUDGETS, ilp.ONE_PROMPT)
    # Each bucket's choice meets its TTFT bound with the queueing margin, in the fluid model.
    prefill_s = isolated_prefill(c.cost)
    # The buckets are the fluid model's, with the heavy tail split or (when that is infeasible) not.
    bucketings = [
        ilp.length_buckets(c.requests, c.spec.policy.length_buckets, c.cost.model.max_context, split_tail)
        for split_tail in (True, False)
    ]
    ranges = [(b.low, b.high) for b in buckets]
    fluid_buckets = next(fluid for fluid in bucketings if [(b.low, b.high) for b in fluid] == ranges)
    for bucket, fluid in zip(buckets, fluid_buckets):
        length = max(1, round(fluid.mean_prompt))
        seconds = c.cost.prefill_time([length] * max(1, bucket.batch_tokens // length), bucket.prefill_dop, 1)
        assert (1 + ilp.QUEUEING_MARGIN) * seconds <= c.spec.slo.ttft.target(prefill_s(length)), bucket
    # Every prompt of the workload fits the KV of its bucket's DoP.
    for request in c.requests:
        assert request.prompt_len <= policy.bucket(request.prompt_len).prefill_dop * capacity
    assert policy.instance_weight == pytest.approx(solution.load / (1 - solution.load), abs=1e-3)


def test_tiny_cpu_spec_policy_verifies():
    c = case(TINY, buckets=8)
    check_policy(c, c.solve())


def test_tiny_cpu_spec_file_policy_verifies():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml")
    solutions = Evaluator(spec).milp_policies()
    assert [s.tp for s in solutions] == [1]
    (solution,) = solutions
    sample = Evaluator(spec).workload(requests=spec.workload.requests)
    check_policy(Case(spec, CostModel.from_spec(spec), tuple(sample)), solution)


@pytest.mark.parametrize("max_dop", [1, 2, 3])
def test_dop_choices_respect_max_dop_and_instances(max_dop):
    c = case(A800, devices=3, policy=f"max_dop = {max_dop}", lengths="zipf(1.1, 1K, 100K)")
    solution = c.solve()
    check_policy(c, solution)
    assert all(bucket.prefill_dop <= max_dop for bucket in solution.policy.buckets)


def test_dop_choices_are_every_dop_up_to_eight_then_sparse():
    assert ilp._dop_choices(1, 4) == [1, 2, 3, 4]
    choices = ilp._dop_choices(1, 64)
    assert choices[:8] == list(range(1, 9)) and choices[-1] == 64 and choices == sorted(set(choices))
    assert ilp._dop_choices(3, 3) == [3]
    assert ilp._dop_choices(5, 4) == []


def test_long_prompts_need_several_instances():
    """Prompts longer than one instance's KV get a DoP that holds them."""
    c = case(A800, devices=4, lengths="uniform(150K, 200K)", ttft="max(25x prefill, 60s)", buckets=2)
    capacity = c.cost.kv_capacity_tokens(1)
    assert max(r.prompt_len for r in c.requests) > capacity  # the case is what it claims
    check_policy(c, c.solve())


def test_prompts_beyond_the_largest_group_are_infeasible():
    c = case(A800, devices=2, lengths="uniform(150K, 200K)", ttft="max(25x prefill, 600s)", buckets=2,
             policy="max_dop = 1")
    with pytest.raises(ilp.InfeasibleSLO, match=r"prompts need 2 instances of [\d,]+ KV slots at tp\(1\); at most 1 may form a group"):
        c.solve()


def test_infeasible_ttft_names_the_constraint_and_the_best_value():
    c = case(A800, devices=4, lengths="uniform(50K, 60K)", ttft="100ms", buckets=1)
    with pytest.raises(ilp.InfeasibleSLO) as caught:
        c.solve()
    message = str(caught.value)
    assert message.startswith("TTFT 100ms at p90 is infeasible for "), message
    found = re.search(r"for ([\d,]+)-token prompts: best is ([\d.e+-]+) s at DoP (\d+) on 4 instances of tp\(1\)", message)
    assert found, message
    length, best, dop = int(found[1].replace(",", "")), float(found[2]), int(found[3])
    # The best value is the fastest single-prompt prefill over the DoPs offered.
    times = {d: c.cost.prefill_time([length], d, 1) for d in range(1, 5)}
    fastest = min(times, key=times.get)
    assert dop == fastest and best == pytest.approx(times[fastest], rel=1e-2)  # printed to 3 digits
    assert "the bound is 0.1 s" in message


def test_infeasible_ttft_best_value_misses_the_bound():
    """Short prompts under a tight TTFT: one 25-token prompt prefills in 2.3 ms, within
    the 5 ms bound with the queueing margin (2 × 2.3 ms). Either the MILP offers a batch
    that meets the bound, or its InfeasibleSLO quotes a best value that misses it — not
    a "best" that meets the bound it calls infeasible."""
    c = case(TINY, devices=3, buckets=2, ttft="max(2x prefill, 5ms)")
    try:
        solution = c.solve()
    except ilp.InfeasibleSLO as error:
        found = re.search(r"best is ([\d.e+-]+) s .*\(the bound is ([\d.e+-]+) s", str(error))
        assert found, str(error)
        best, bound = float(found[1]), float(found[2])
        assert (1 + ilp.QUEUEING_MARGIN) * best > bound, f"the quoted best meets the bound: {error}"
    else:
        check_policy(c, solution)


def test_no_positive_rate_is_infeasible_and_the_enumeration_agrees():
    """The longest bucket's prefills must hold both instances, so the others can never be
    served beside them: the enumerated optimum is rate 0 and the MILP says why."""
    c = case(A800, devices=2, buckets=3, lengths="zipf(1.0, 1K, 200K)", ttft="max(5x prefill, 8s)", attainment="50%")
    best_rate, _ = reference_optimum(c)
    assert best_rate <= PLANNER_TOLERANCES["milp_rate"]["abs"]
    with pytest.raises(ilp.InfeasibleSLO, match=r"no positive rate meets the TTFT bounds at tp\(1\)"):
        c.solve()


def test_infeasible_tpot_names_the_constraint_and_the_step_time():
    c = case(TINY, tpot="1us")
    with pytest.raises(ilp.InfeasibleSLO, match=r"^TPOT 1us at p90 is infeasible: one decode step over a [\d,]+-token context takes [\d.]+ ms at tp\(1\)"):
        c.solve()


@pytest.mark.parametrize(
    "template, fields",
    [
        (TINY, {"devices": 2, "buckets": 2}),
        (TINY, {"devices": 3, "buckets": 2, "ttft": "max(2x prefill, 60ms)"}),
        (A800, {"devices": 2, "buckets": 3, "lengths": "zipf(1.1, 1K, 150K)", "ttft": "max(25x prefill, 15s)"}),
        (A800, {"devices": 3, "buckets": 2, "lengths": "zipf(1.0, 1K, 200K)", "ttft": "max(5x prefill, 8s)"}),
        (A800, {"devices": 2, "buckets": 2, "lengths": "uniform(2K, 40K)", "ttft": "max(3x prefill, 4s)", "tpot": "40ms", "seed": 3}),
        (A800, {"devices": 3, "buckets": 3, "lengths": "uniform(2K, 40K)", "ttft": "max(3x prefill, 3s)", "tpot": "40ms", "seed": 3}),
        (A800, {"devices": 3, "buckets": 3, "lengths": "zipf(1.1, 1K, 150K)", "ttft": "max(25x prefill, 15s)", "attainment": "50%"}),
        (A800, {"devices": 2, "buckets": 3, "lengths": "uniform(1K, 150K)", "ttft": "max(5x prefill, 8s)", "attainment": "50%"}),
    ],
    ids=["tiny-2", "tiny-3-tight-ttft", "a800-2-long", "a800-3-dop2", "a800-2-tight-tpot", "a800-3-three-buckets",
         "a800-3-best-effort-longest", "a800-2-best-effort-shortest"],
)
def test_milp_reaches_the_enumerated_optimum(template, fields):
    c = case(template, **fields)
    solution = c.solve()
    check_policy(c, solution)
    best_rate, best_choice = reference_optimum(c)
    assert math.isfinite(best_rate) and best_rate > 0
    assert solution.rate == pytest.approx(best_rate, **PLANNER_TOLERANCES["milp_rate"]), best_choice
    # The policy is the MILP's choice: the reference, held to it, sustains the solved rate.
    policy = solution.policy
    held, _ = reference_optimum(c, fixed={
        "options": [(b.prefill_dop, b.batch_tokens) for b in policy.buckets],
        "tau": policy.decode_instance_tokens,
        "caps": tuple(b.max_instances for b in policy.buckets),
        "served": tuple(b.within_slo for b in policy.buckets),
    })
    assert held == pytest.approx(solution.rate, **PLANNER_TOLERANCES["milp_rate"])


def test_a_heavy_tail_gets_buckets_of_its_own():
    """Zipf(1.4) prompts: the last of 8 equal-count buckets spans 1K to 180K tokens, so it
    is split at the 95th and 99th percentiles; uniform prompts keep 8 equal-count buckets."""
    heavy = case(A800, lengths="zipf(1.4, 10, 200K)")
    requests = generate(heavy.spec.workload, requests=1000)
    prompts = np.array([r.prompt_len for r in requests])
    lows = [b.low for b in ilp.length_buckets(requests, 8, heavy.cost.model.max_context)]
    whole = ilp.length_buckets(requests, 8, heavy.cost.model.max_context, split_tail=False)
    assert prompts.max() > ilp.TAIL_SPREAD * whole[-1].low
    assert lows == [b.low for b in whole] + [int(q) + 1 for q in np.quantile(prompts, ilp.TAIL_QUANTILES)]
    light = case(A800, lengths="uniform(1K, 8K)")
    assert len(ilp.length_buckets(generate(light.spec.workload, requests=1000), 8, light.cost.model.max_context)) == 8


def test_tpot_feasibility_counts_requests_not_bucket_means():
    """TPOT is infeasible exactly when more of the sample's requests than the attainment's
    slack cannot decode within the bound even alone on every instance (brute force over the
    requests) — including bounds where a heavy bucket's mean context cannot, but most of
    its requests can (the bucket is then best effort, not the whole tp infeasible)."""
    base = case(A800, lengths="zipf(1.0, 1K, 200K)", ttft="max(25x prefill, 60s)", buckets=8)
    tp, instances = 1, base.instances

    def best_decode_s(context: int) -> float:
        return min(base.cost.decode_time([context], d, tp) for d in range(1, instances + 1))

    contexts = [round(r.prompt_len + r.output_len / 2) for r in base.requests]
    slack = 1 - base.spec.slo.attainment
    buckets = ilp.length_buckets(base.requests, 8, base.cost.model.max_context)
    bounds = sorted({float(np.quantile([best_decode_s(c) for c in contexts], q)) for q in (0.8, 0.86, 0.92, 0.97)})
    regimes = set()
    for bound in bounds:
        tpot = f"{math.ceil(bound * 1e7) / 10:.1f}us"
        c = case(A800, lengths="zipf(1.0, 1K, 200K)", ttft="max(25x prefill, 60s)", buckets=8, tpot=tpot)
        limit = c.spec.slo.tpot.target()
        missing = sum(best_decode_s(context) > limit for context in contexts) / len(contexts)
        mean_hopeless = sum(
            b.share for b in buckets if best_decode_s(round(b.mean_prompt + b.mean_output / 2)) > limit
        )
        regimes.add((missing > slack, mean_hopeless > slack))
        if missing > slack:
            with pytest.raises(ilp.InfeasibleSLO, match=r"^TPOT .* is infeasible"):
                c.solve()
        else:
            c.solve().policy.verify(instances)
    assert (False, True) in regimes and (True, True) in regimes, regimes


# ------------------------------------------------------------------------ prefix caching

PREFIX_SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu-prefix.toml"


@functools.cache
def prefix_case(caching: bool) -> Case:
    """The tiny CPU spec whose prompts open with one of two 1,536-token system prompts."""
    text = PREFIX_SPEC.read_text()
    assert "prefix_caching = true" in text
    spec = parse_spec(text.replace("prefix_caching = true", f"prefix_caching = {str(caching).lower()}"), "prefix.toml")
    sample = Evaluator(spec).workload(requests=spec.workload.requests)
    return Case(spec, CostModel.from_spec(spec), tuple(sample))


def solve_prefix(c: Case, requests=None) -> ilp.MilpSolution:
    return ilp.solve(
        c.cost, 1, c.requests if requests is None else requests, c.spec.slo, c.spec.policy, isolated_prefill(c.cost),
        prefix_caching=c.spec.runtime.prefix_caching,
    )


def fluid_buckets_of(c: Case, policy) -> list[ilp.Bucket]:
    """The fluid model's buckets behind a policy's (the heavy tail split or not)."""
    ranges = [(b.low, b.high) for b in policy.buckets]
    bucketings = [
        ilp.length_buckets(c.requests, c.spec.policy.length_buckets, c.cost.model.max_context, split_tail)
        for split_tail in (True, False)
    ]
    return next(fluid for fluid in bucketings if [(b.low, b.high) for b in fluid] == ranges)


def test_prefix_hits_lower_the_priced_prefill_work_and_raise_the_rate():
    """With caching on, each bucket's work is the chosen option's uncached work × the
    bucket's hit discount: the float64 sum over its requests of the prefill time of their
    uncached tokens with the cached ones as context, over that of their whole prompts. The
    hits are the spec's structure: every request but the first of each system prompt reads
    its 1,536 tokens (the LRU replay over the cluster's 4 × 2,093 KV tokens keeps them)."""
    on, off = prefix_case(True), prefix_case(False)
    cached, plain = solve_prefix(on), solve_prefix(off)
    check_policy(on, cached)
    check_policy(off, plain)
    assert plain.prefix_hit_share is None
    seen: set[tuple[int, ...]] = set()
    hits = {}
    for r in sorted(on.requests, key=lambda r: r.arrival_s):
        system = r.prefix_hashes[:3]
        hits[r.id] = 1536 if system in seen else 0
        seen.add(system)
    assert cached.prefix_hit_share == pytest.approx(sum(hits.values()) / sum(r.prompt_len for r in on.requests), rel=1e-12)
    assert 0.8 < cached.prefix_hit_share < 1

    def prefill_seconds(length: int, dop: int, context: int = 0) -> float:
        return on.cost.prefill_time([length], dop, 1, context=[context])

    for solution, discounted in ((cached, True), (plain, False)):
        for bucket, fluid, work in zip(solution.policy.buckets, fluid_buckets_of(on, solution.policy), solution.prefill_work_s):
            dop, length = bucket.prefill_dop, max(1, round(fluid.mean_prompt))
            batch = max(1, bucket.batch_tokens // length)
            expected = dop * on.cost.prefill_time([length] * batch, dop, 1) / batch
            if discounted:
                inside = [r for r in on.requests if bucket.low <= r.prompt_len < bucket.high]
                expected *= math.fsum(prefill_seconds(r.prompt_len - hits[r.id], dop, hits[r.id]) for r in inside) / math.fsum(
                    prefill_seconds(r.prompt_len, dop) for r in inside
                )
            assert work == pytest.approx(expected, rel=1e-9), bucket

    def mean_work(solution: ilp.MilpSolution) -> float:
        return sum(b.share * w for b, w in zip(solution.policy.buckets, solution.prefill_work_s))

    assert mean_work(cached) < 0.75 * mean_work(plain)
    assert cached.rate > plain.rate * 1.05


def test_caching_off_ignores_the_reuse_and_no_reuse_changes_nothing():
    """prefix_caching = false solves the problem of the same prompts naming no blocks, through
    the evaluator too; with caching on, a workload that repeats nothing solves the problem
    of caching off, to the bit."""
    off = prefix_case(False)
    anonymous = tuple(dataclasses.replace(r, prefix_hashes=()) for r in off.requests)
    ignored, reference = solve_prefix(off), solve_prefix(off, anonymous)
    (evaluated,) = Evaluator(off.spec).milp_policies()
    for solution in (ignored, evaluated):
        assert (solution.rate, solution.policy, solution.prefill_work_s, solution.load) == (
            reference.rate, reference.policy, reference.prefill_work_s, reference.load
        )
        assert solution.prefix_hit_share is None

    tiny = case(TINY, buckets=8)
    assert not any(r.prefix_hashes for r in tiny.requests)
    args = (tiny.cost, 1, tiny.requests, tiny.spec.slo, tiny.spec.policy, isolated_prefill(tiny.cost))
    on, without = ilp.solve(*args, prefix_caching=True), ilp.solve(*args, prefix_caching=False)
    assert (on.rate, on.policy, on.prefill_work_s, on.load) == (without.rate, without.policy, without.prefill_work_s, without.load)
    assert on.prefix_hit_share == 0.0 and without.prefix_hit_share is None
