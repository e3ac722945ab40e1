"""The policy MILP: the elastic policy that sustains the highest request rate within the SLOs.

A fluid model of the workload, bucketed by prompt length (equal-count buckets of a sample
of the declared workload, a heavy tail split further). Per bucket k (share p_k, mean
prompt L_k, mean output O_k):

    x[k,o] ∈ {0,1}, Σ_o x[k,o] = 1   one prefill option o = (dop d, batch budget b):
                                     n = max(1, ⌊b / L_k⌋) prompts of L_k per batch take
                                     T_o = prefill_time(n × L_k, d) seconds on d instances,
                                     i.e. W_o = d·T_o / n instance-seconds per request.
                                     Options with (1 + queueing margin)·T_o above the bucket's
                                     TTFT bound are not offered.
    c[k] ∈ {1..N}, c[k] ≥ Σ_o d_o·x[k,o]   instances the bucket's prefills may hold at once.
    u[j] ∈ {0,1}, Σ_j u[j] = 1       decode scale-up threshold τ_j (KV tokens per instance):
                                     an instance decodes B_j = τ_j / context requests at once,
                                     one step takes S_j = decode_time(B_j) seconds; only
                                     thresholds with S_j ≤ (1 − stall share)·TPOT bound are offered.
    r ≥ 0                            the request rate, maximised.
    s[k] ∈ {0,1}                     bucket k is served within the SLOs; Σ_k p_k·(1 − s[k]) ≤
                                     80% of (1 − attainment). A best-effort bucket (s = 0)
                                     need not be sustainable but is assumed to keep its cap
                                     c[k] of instances busy (P90 goodput allows it, and
                                     serving the longest prompts in full can cost everyone
                                     else their SLOs; with equal-count buckets this needs
                                     `policy.length_buckets` > 1 / (1 − attainment)).
                                     Buckets whose typical request cannot decode within the
                                     TPOT bound even spread over every instance are best
                                     effort by force (InfeasibleSLO when more of the
                                     sample's requests than the slack cannot).

Products of the rate with a one-hot choice are linearised exactly (McCormick with a binary):
w[k,o] = r·x[k,o] and v[j] = r·u[j], with 0 ≤ w ≤ R·x, w ≤ r, w ≥ r − R·(1 − x).

    Σ_{k served} p_k Σ_o W_o·w[k,o] + Σ_j (D_j + A_j)·v[j] ≤ ρ·(N − Σ_{k best effort} c[k])
                                                                 instance time (load ≤ ρ)
    p_k Σ_o W_o·w[k,o] ≤ ρ·c[k]  (k served)                      a bucket within its instances
    Σ_{k' fast for k} p_k' Σ_o W_o·w[k',o] ≤ ρ·(N − max_{k' slow for k} c[k'])
                                     prefills of buckets that hold instances longer than half
                                     of bucket k's TTFT bound ("slow for k") can block k, so
                                     the others must fit beside the largest of their caps
    Σ_j M_j·v[j] ≤ (1 − headroom)·N·C                            KV by Little's law

D_j = Σ_k p_k·O_k·S_j / B_j is decode instance-seconds per request; M_j = Σ_k p_k·(L_k +
O_k/2)·O_k·S_j is the KV a request holds over its life (tokens × seconds); A_j charges the
instance time of the expected scale-up fragment migrations: a request whose KV outgrows τ_j
moves one fragment.

Prefix caching (`solve(prefix_caching=True)`, the spec's `runtime.prefix_caching`): when the
sample's prompts repeat earlier ones' blocks, a request's first c tokens may come from the
cache. c per request is estimated by an LRU replay of the sample through a cache of the
cluster's KV capacity at that tp (espc.planner.sim.reuse.prefix_hits: no timing, no
placement, no room taken by running requests: an optimistic estimate, at most the
reusable-prefix upper bound). Each option's work W_o is then scaled by its bucket's hit
discount at its DoP, Σ_i prefill_time([L_i − c_i], d, context=[c_i]) / Σ_i
prefill_time([L_i], d) over the bucket's requests: the uncached tokens computed with the
cached ones as context. The options offered and the slow/fast split still use the
uncached T_o: a miss must meet its TTFT bound too. Without hits nothing changes.

Then `instance_weight` for the batching DP is the queue length an M/M/1 server at the
solved load would see, ρ_solved / (1 − ρ_solved), and admission reserves the mean output.
The MILP is solved per tp; compile keeps the tp with the highest rate. The simulator then
has the last word (see `espc.planner.compile.compiler`).
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from espc.frontend.spec import PolicySpec, SLOSpec
from espc.planner.compile.policy import DECODE_STALL_SHARE, ElasticPolicy, LengthBucket, SolverStats
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.reuse import prefix_hits, prompt_share
from espc.planner.sim.workload import Request

LOAD_CEILING = 0.85  # ρ: queues explode as the load approaches 1
QUEUEING_MARGIN = 1.0  # a request may wait about one batch before its own
KV_HEADROOM = 0.1
BEST_EFFORT_SHARE = 0.8  # of the attainment's slack (1 − attainment) that may be given up
BATCH_BUDGETS = (2_048, 8_192, 16_384, 65_536, 262_144)
ONE_PROMPT = 1  # the budget of a batch of one prompt (any prompt fits alone)
DECODE_THRESHOLD_SHARES = (0.125, 0.25, 0.5, 0.75, 1.0)  # τ as shares of an instance's KV
# A last equal-count bucket whose longest prompt is TAIL_SPREAD× its shortest (a heavy tail,
# as Zipf's) is split at these quantiles: P90 goodput is decided by the slowest tenth of the
# requests, and one DoP for prompts from 1K to 180K tokens fits neither end (on zipf(1.4)
# the elastic scheduler given prompts ≥ 6,375 tokens at DoP 2 on two instances reached
# best-static's 81–83 req/s; the MILP's one DoP-1 bucket for them held it to about 41).
TAIL_SPREAD = 16
TAIL_QUANTILES = (0.95, 0.99)


class InfeasibleSLO(ValueError):
    """No policy meets the SLOs; the message names the binding constraint and the best value."""


@dataclass(frozen=True)
class Bucket:
    low: int
    high: int
    share: float
    mean_prompt: float
    max_prompt: int
    mean_output: float


@dataclass(frozen=True)
class MilpSolution:
    tp: int
    rate: float
    policy: ElasticPolicy
    solver: SolverStats
    load: float
    # Per bucket: the chosen prefill option's work W_o (instance-seconds per request; with
    # prefix caching, what the cache hits leave).
    prefill_work_s: tuple[float, ...]
    # The share of the sample's prompt tokens priced as prefix-cache hits (module
    # docstring); None when prefix caching is off.
    prefix_hit_share: float | None = None


def length_buckets(requests: Sequence[Request], count: int, max_context: int, split_tail: bool = True) -> list[Bucket]:
    """Up to `count` equal-count buckets of the prompt lengths (fewer when lengths repeat),
    tiling [0, max_context]; with `split_tail`, a heavy tail's last bucket is split further
    (TAIL_QUANTILES)."""
    prompts = np.array([r.prompt_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    quantiles = list(np.quantile(prompts, np.linspace(0, 1, count + 1)[1:-1])) if count > 1 else []
    tail_start = max(quantiles, default=0)
    if split_tail and tail_start > 0 and prompts.max() > TAIL_SPREAD * tail_start:
        quantiles += [q for q in np.quantile(prompts, TAIL_QUANTILES) if q > tail_start]
    edges = sorted({0, *(int(q) + 1 for q in quantiles)})
    edges.append(max(int(prompts.max()) + 1, edges[-1] + 1))
    buckets = []
    for low, high in zip(edges, edges[1:]):
        inside = (prompts >= low) & (prompts < high)
        if not inside.any():
            continue
        buckets.append(
            Bucket(low, high, float(inside.mean()), float(prompts[inside].mean()), int(prompts[inside].max()),
                   float(outputs[inside].mean()))
        )
    # Buckets must tile [0, ∞): an empty bucket's range goes to its successor.
    tiled: list[Bucket] = []
    for index, bucket in enumerate(buckets):
        low = 0 if index == 0 else tiled[-1].high
        high = max(max_context + 1, bucket.high) if index == len(buckets) - 1 else buckets[index + 1].low
        tiled.append(Bucket(low, high, bucket.share, bucket.mean_prompt, bucket.max_prompt, bucket.mean_output))
    return tiled


def solve(
    cost: CostModel,
    tp: int,
    requests: Sequence[Request],
    slo: SLOSpec,
    policy_spec: PolicySpec,
    prefill_s,
    prefix_caching: bool = False,
) -> MilpSolution:
    """The MILP of the module docstring for one tp; InfeasibleSLO names what cannot be met.
    `prefix_caching`: price the prefix-cache hits the sample's `prefix_hashes` promise.

    A heavy tail's own buckets are tried first; where they make the SLOs infeasible (say,
    a tail that meets a tight TTFT only on every instance, leaving none to the rest), the
    tail stays in the last equal-count bucket, as its mean prompt."""
    count, max_context = policy_spec.length_buckets, cost.model.max_context
    whole = length_buckets(requests, count, max_context, split_tail=False)
    split = length_buckets(requests, count, max_context)
    contexts = sorted(round(r.prompt_len + r.output_len / 2) for r in requests)
    hits: list[tuple[int, int]] = []  # (prompt_len, cached tokens) of the requests with a hit
    hit_share = None
    if prefix_caching:
        cached = prefix_hits(requests, len(cost.cluster.instances(tp)) * cost.kv_capacity_tokens(tp))
        hits = [(r.prompt_len, c) for r, c in zip(requests, cached) if c]
        hit_share = prompt_share(cached, requests)
    prompts = [r.prompt_len for r in requests]
    if split != whole:
        try:
            return _solve(cost, tp, split, contexts, slo, policy_spec, prefill_s, prompts, hits, hit_share)
        except InfeasibleSLO:
            pass
    return _solve(cost, tp, whole, contexts, slo, policy_spec, prefill_s, prompts, hits, hit_share)


def _hit_discount(cost: CostModel, tp: int, bucket: Bucket, prompts: Sequence[int], hits: Sequence[tuple[int, int]]):
    """dop -> the share of the bucket's prefill time left when its requests' hits are read
    from the cache (module docstring); None when none of its requests hits."""
    inside = [(length, cached) for length, cached in hits if bucket.low <= length < bucket.high]
    if not inside:
        return None
    lengths = [length for length in prompts if bucket.low <= length < bucket.high]

    @functools.cache
    def discount(dop: int) -> float:
        # Requests without a hit cost the same either way: only those with one differ.
        full = sum(cost.prefill_time([length], dop, tp) for length in lengths)
        saved = sum(
            cost.prefill_time([length], dop, tp) - cost.prefill_time([length - cached], dop, tp, context=[cached])
            for length, cached in inside
        )
        return (full - saved) / full

    return discount


def _solve(
    cost: CostModel, tp: int, buckets: list[Bucket], contexts: Sequence[int], slo: SLOSpec, policy_spec: PolicySpec,
    prefill_s, prompts: Sequence[int], hits: Sequence[tuple[int, int]], hit_share: float | None,
) -> MilpSolution:
    """`solve` on these buckets; `contexts`: the sample's mean decode contexts (prompt +
    half the output), sorted; `prompts`: the sample's prompt lengths, `hits` (prompt
    length, cached tokens) of its requests with a prefix-cache hit, `hit_share` the share
    of its prompt tokens they make up (None: caching off)."""
    instances = len(cost.cluster.instances(tp))
    capacity = cost.kv_capacity_tokens(tp)
    max_dop = min(instances, policy_spec.max_dop or instances)
    slo_slack = 1 - slo.attainment
    tpot_s = slo.tpot.target()

    # --- prefill options per bucket
    options: list[list[tuple[int, int, float, float]]] = []  # (dop, budget, seconds, work per request)
    slow_seconds = []
    for bucket in buckets:
        length = max(1, round(bucket.mean_prompt))
        discount = _hit_discount(cost, tp, bucket, prompts, hits)
        needed = -(-bucket.max_prompt // max(capacity, 1))
        bound = slo.ttft.target(prefill_s(length))
        offered, fastest = [], (math.inf, 0)
        # One prompt per batch only when no batch budget meets the bound: otherwise the
        # MILP, indifferent between options of a bucket whose load does not bind, could
        # pick it and give up batching for nothing.
        for budgets in (BATCH_BUDGETS, (ONE_PROMPT,)):
            for dop in _dop_choices(max(1, needed), max_dop):
                for budget in budgets:
                    batch = max(1, budget // length)
                    seconds = cost.prefill_time([length] * batch, dop, tp)
                    fastest = min(fastest, (cost.prefill_time([length], dop, tp), dop))
                    if (1 + QUEUEING_MARGIN) * seconds <= bound:
                        work = dop * seconds / batch
                        offered.append((dop, budget, seconds, work if discount is None else work * discount(dop)))
            if offered:
                break
        if needed > max_dop:
            raise InfeasibleSLO(
                f"{bucket.max_prompt:,}-token prompts need {needed} instances of {capacity:,} KV slots at tp({tp}); "
                f"at most {max_dop} may form a group"
            )
        if not offered:
            raise InfeasibleSLO(
                f"TTFT {slo.ttft.shorthand()} is infeasible for {length:,}-token prompts: best is "
                f"{fastest[0]:.3g} s at DoP {fastest[1]} on {instances} instances of tp({tp}) "
                f"(the bound is {bound:.3g} s, with a queueing margin of {QUEUEING_MARGIN:g} batch)"
            )
        options.append(offered)
        slow_seconds.append(min(seconds for _, _, seconds, _ in offered))

    # --- decode thresholds
    mean_context = sum(b.share * (b.mean_prompt + b.mean_output / 2) for b in buckets)
    mean_output = sum(b.share * b.mean_output for b in buckets)
    thresholds = []
    fastest_step = math.inf
    for share in DECODE_THRESHOLD_SHARES:
        tau = max(1, int(capacity * share))
        batch = max(1, int(tau / max(mean_context, 1)))
        step = cost.decode_time([round(mean_context)] * batch, 1, tp)
        fastest_step = min(fastest_step, cost.decode_time([round(mean_context)], 1, tp))
        if step <= (1 - DECODE_STALL_SHARE) * tpot_s:
            thresholds.append((tau, batch, step))
    if not thresholds:
        # Even one request per instance is too slow at every threshold tried: decode alone.
        step = cost.decode_time([round(mean_context)], 1, tp)
        if step > tpot_s:
            raise InfeasibleSLO(
                f"TPOT {slo.tpot.shorthand()} is infeasible: one decode step over a {round(mean_context):,}-token "
                f"context takes {step * 1e3:.3g} ms at tp({tp})"
            )
        thresholds.append((max(1, int(capacity * DECODE_THRESHOLD_SHARES[0])), 1, step))

    # --- the model
    started = time.perf_counter()
    least_work = sum(b.share * min(work for *_, work in opts) for b, opts in zip(buckets, options))
    rate_bound = 2 * instances / max(least_work, 1e-9)
    rate = cp.Variable(nonneg=True, name="rate")
    constraints = [rate <= rate_bound]
    choice, product = [], []
    for k, opts in enumerate(options):
        x = cp.Variable(len(opts), boolean=True, name=f"prefill_option_{k}")
        w = cp.Variable(len(opts), nonneg=True, name=f"rate_option_{k}")
        constraints += [cp.sum(x) == 1, w <= rate_bound * x, w <= rate, w >= rate - rate_bound * (1 - x)]
        choice.append(x)
        product.append(w)
    caps = cp.Variable(len(buckets), integer=True, name="max_instances")
    u = cp.Variable(len(thresholds), boolean=True, name="decode_threshold")
    v = cp.Variable(len(thresholds), nonneg=True, name="rate_threshold")
    constraints += [cp.sum(u) == 1, v <= rate_bound * u, v <= rate, v >= rate - rate_bound * (1 - u)]
    constraints += [caps >= 1, caps <= instances]

    def bucket_work(k: int):
        return buckets[k].share * (np.array([work for *_, work in options[k]]) @ product[k])

    # Best effort: buckets whose requests may miss their SLOs, within the attainment's slack.
    # Their work need not be sustainable, but they are assumed to hold all the instances
    # their cap allows (a backlog keeps them busy); a served bucket's work counts in full.
    shares = np.array([b.share for b in buckets])
    served = cp.Variable(len(buckets), boolean=True, name="served")
    # A bucket whose typical request cannot decode within the TPOT bound even alone, with
    # its KV spread over every instance (multi-master), is best effort whatever the policy.
    def decodable(context: int) -> bool:
        return min(cost.decode_time([context], d, tp) for d in range(1, max_dop + 1)) <= tpot_s

    hopeless = [k for k, b in enumerate(buckets) if not decodable(round(b.mean_prompt + b.mean_output / 2))]
    hopeless_share = float(shares[hopeless].sum()) if hopeless else 0.0
    # The slack is spent by requests, not buckets: a heavy tail's bucket mean can be hopeless
    # while most of its requests are not (decode time grows with the context).
    first_hopeless = bisect.bisect_left(contexts, True, key=lambda context: not decodable(context))
    hopeless_requests = (len(contexts) - first_hopeless) / max(len(contexts), 1)
    if hopeless_requests > slo_slack:
        raise InfeasibleSLO(
            f"TPOT {slo.tpot.shorthand()} is infeasible for decode contexts of {contexts[first_hopeless]:,}+ tokens "
            f"at tp({tp}) ({hopeless_requests:.1%} of the workload; attainment {slo.attainment:.0%} leaves {slo_slack:.1%})"
        )
    constraints += [served[k] == 0 for k in hopeless]
    served_work = cp.Variable(len(buckets), nonneg=True, name="served_work")
    held = cp.Variable(len(buckets), nonneg=True, name="held_by_best_effort")
    constraints.append(shares @ (1 - served) <= max(BEST_EFFORT_SHARE * slo_slack, hopeless_share))
    for k, opts in enumerate(options):
        most_work = buckets[k].share * max(work for *_, work in opts) * rate_bound
        constraints += [
            served_work[k] >= bucket_work(k) - most_work * (1 - served[k]),
            held[k] >= caps[k] - instances * served[k],
        ]

    decode_work = np.array([mean_output * step / batch for _, batch, step in thresholds])
    kv_seconds = np.array([
        sum(b.share * (b.mean_prompt + b.mean_output / 2) * b.mean_output * step for b in buckets)
        for _, _, step in thresholds
    ])
    migration_work = np.array([
        sum(b.share * cost.migration_time(min(tau, round(b.mean_prompt)), bandwidth=_fabric_bandwidth(cost))
            for b in buckets if b.mean_prompt + b.mean_output > tau)
        for tau, _, _ in thresholds
    ])
    total_prefill = cp.sum(served_work)
    constraints.append(
        total_prefill + decode_work @ v + migration_work @ v <= LOAD_CEILING * (instances - cp.sum(held))
    )
    constraints.append(kv_seconds @ v <= (1 - KV_HEADROOM) * instances * capacity)
    for k, opts in enumerate(options):
        constraints.append(caps[k] >= np.array([dop for dop, *_ in opts]) @ choice[k])
        constraints.append(served_work[k] <= LOAD_CEILING * caps[k])
        bound = slo.ttft.target(prefill_s(max(1, round(buckets[k].mean_prompt))))
        slow = [j for j in range(len(buckets)) if j != k and slow_seconds[j] > bound / 2]
        if slow:
            # Slow buckets rarely all hold their caps at once; requiring the fast ones to fit
            # beside the largest of them keeps a short prompt from waiting behind a long one
            # without reserving instances that sit idle.
            fast = [j for j in range(len(buckets)) if j not in slow]
            largest_slow_cap = cp.Variable(nonneg=True, name=f"largest_slow_cap_{k}")
            constraints += [largest_slow_cap >= caps[j] for j in slow]
            constraints.append(
                sum(served_work[j] for j in fast) <= LOAD_CEILING * (instances - largest_slow_cap)
            )
    problem = cp.Problem(cp.Maximize(rate), constraints)
    solver_options = {"time_limit": float(policy_spec.solver_time_limit)} if policy_spec.solver == "HIGHS" else {}
    try:
        problem.solve(solver=getattr(cp, policy_spec.solver), **solver_options)
    except cp.error.SolverError as error:
        raise InfeasibleSLO(f"solver {policy_spec.solver} failed: {error}") from None
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT) or rate.value is None:
        raise InfeasibleSLO(
            f"no rate meets the KV and load constraints at tp({tp}) (solver status {problem.status})"
        )
    seconds = time.perf_counter() - started

    solved_rate = float(rate.value)
    if solved_rate <= 1e-9:
        raise InfeasibleSLO(
            f"no positive rate meets the TTFT bounds at tp({tp}): the longest prompts' prefills would hold "
            f"every one of the {instances} instances that shorter prompts need"
        )
    chosen = [opts[int(np.argmax(_solved(x)))] for opts, x in zip(options, choice)]
    threshold = thresholds[int(np.argmax(_solved(u)))]
    load = (
        sum(b.share * work for b, (*_, work) in zip(buckets, chosen)) * solved_rate
        + mean_output * threshold[2] / threshold[1] * solved_rate
    ) / instances
    load = min(load, 0.95)
    elastic = ElasticPolicy(
        tp=tp,
        buckets=tuple(
            LengthBucket(b.low, b.high, b.share, dop, budget, int(round(cap)), bool(round(is_served)))
            for b, (dop, budget, _, _), cap, is_served in zip(buckets, chosen, _solved(caps), _solved(served))
        ),
        instance_weight=round(load / (1 - load), 3),
        decode_instance_tokens=threshold[0],
        reserve_output_tokens=max(1, round(mean_output)),
        scale_up=policy_spec.scale_up,
        migration=policy_spec.migration,
        cooldown_iterations=policy_spec.cooldown_iterations,
        migration_max_stall_s=tpot_s,
        starvation_bound_s=policy_spec.starvation_bound,
    )
    elastic.verify(instances)
    stats = SolverStats(
        solver=policy_spec.solver,
        status=problem.status,
        objective=float(problem.value),
        gap=_mip_gap(problem),
        seconds=seconds,
        variables=sum(variable.size for variable in problem.variables()),
        constraints=len(problem.constraints),
    )
    return MilpSolution(tp, solved_rate, elastic, stats, load, tuple(work for *_, work in chosen), hit_share)


def _dop_choices(low: int, high: int) -> list[int]:
    """DoPs the MILP offers: all up to 8, then about 1.5× apart (large clusters stay small)."""
    choices, dop = set(), low
    while dop <= high:
        choices.add(dop)
        dop = dop + 1 if dop < 8 else math.ceil(dop * 1.5)
    if high >= low:
        choices.add(high)
    return sorted(choices)


def _fabric_bandwidth(cost: CostModel) -> float:
    """Bytes/s a migration gets inside a node (the common case the MILP charges)."""
    return cost.device.link_bandwidth * cost.parameters.link_efficiency


def _solved(variable: cp.Variable) -> np.ndarray:
    """A variable's value once the problem has a solution (cvxpy loads every variable's value
    with it; `value` is None only without one, which `_solve` rules out first)."""
    value = variable.value
    assert value is not None, "the problem has a solution"
    return value


def _mip_gap(problem: cp.Problem) -> float | None:
    """HiGHS reports its MIP gap in `HighsInfo`; other solvers give none through cvxpy."""
    info = problem.solver_stats.extra_stats if problem.solver_stats else None
    gap = getattr(info, "mip_gap", None)
    return None if gap is None or not math.isfinite(gap) else float(gap)
