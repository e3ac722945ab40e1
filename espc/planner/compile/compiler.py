"""`espc compile`: Spec → Policy, as one flat pipeline of named stages.

    workload   sample the declared workload (seeded)
    milp       the elastic-policy MILP for every tp the spec allows (espc.planner.compile.ilp)
    metric     the goodput compile maximises (the spec's `policy.goodput_metric`; auto:
               per-class when some prompt needs more than one instance's KV, else P90)
    verify     simulate each MILP policy's goodput; the simulator, not the fluid model,
               ranks them
    seed       (when searching) screen best-static's groupings and simulate the elastic
               policies that route as the best SEED_LAYOUTS of them do, partitioned into
               instance classes as the groups are and shared: the fluid model misprices
               heavy tails, and elastic's policy space contains static length routing and
               partitions, so the search also starts from them
    search     local search around the best two policies so far: one instance moved between
               instance classes or the classes dropped, per-bucket instance caps and DoP
               caps ± 1, the batching DP's instance weight × ½ / × 2 — kept when the
               simulated goodput improves by more than the bisection tolerance (a neighbour
               that misses the attainment target at that bar is rejected by that one trial,
               without a bisection), within a time budget shared between them
    ablate     the best policy without ESP's choices (ElasticPolicy.rigid: fewest instances
               per prefill, no scale-up, no migration); kept instead when it measures
               as high or higher — compile never turns ESP on where it earns nothing
    strategies with strategy = "auto", every baseline's goodput on the same workload, seed
               and trial shape (each family screened as in `espc compare`, but only
               its best screened configuration measured; `espc compare` and the
               benchmarks measure at full length and tolerance)
    choose     the strategy with the highest goodput, and the reason, with the numbers

Every stage sees only the candidates the compile's `Limits` allow (a pinned tp, the
calibrated tps and, when compiling to run, the runtime's limits:
espc.planner.compile.feasibility); the others are listed in the policy's `skipped` with the
reason, and compile fails (NothingFeasible) only when no candidate is left.

Every stage reports progress through `on_progress(stage, message)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from espc._version import __version__
from espc.frontend.spec import Spec
from espc.planner.compile.evaluation import FINALISTS, Evaluator, StrategyGoodput
from espc.planner.compile.feasibility import Limits, NothingFeasible
from espc.planner.compile.ilp import MilpSolution
from espc.planner.compile.parallel import available_workers, fork_map
from espc.planner.compile.policy import (
    POLICY_SCHEMA_VERSION,
    ElasticPolicy,
    LengthBucket,
    Policy,
    StrategyPrediction,
    format_instances,
)
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import GOODPUT_LABELS
from espc.planner.sim.reuse import prompt_share, reusable_prefix
from espc.planner.sim.strategies import BASELINES, Deployment, StaticLayout

VERIFY_TOLERANCE = 0.08  # relative width of the goodput bisection while compiling
TRIAL_REQUESTS = 300  # requests per simulated trial (at least; high rates simulate a window)
# A trial covers evaluation.DEFAULT_WINDOW_S of arrivals at high rates, as `espc compare` and
# the benchmarks measure: a shorter window hides queues that build slowly (on zipf(1.4)
# lengths, 20 s windows rated a policy that sustains 7.4 req/s at 39.9) — or what settles
# the bisection's verdict when that is shorter (Evaluator.settle_s: seconds for TTFT bounds
# of 0.2 s). At most this many requests, unless that covers less than
# evaluation.MIN_SPAN_TTFTS TTFT bounds of arrivals (a burst any strategy absorbs within a
# loose bound).
MAX_TRIAL_REQUESTS = 3_000
BASELINE_FINALISTS = 1  # configurations of a baseline family measured after screening
# Static groupings, best screened first, whose elastic equivalents are simulated: as many
# as best-static's measurement takes from the same screen, so that elastic starts from
# the grouping that best-static ends up with (the screen's ranking is noisy).
SEED_LAYOUTS = FINALISTS
SEARCH_STARTS = 2  # the local search starts from the best this many verified policies

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class CompileOptions:
    search_seconds: float = 20.0
    trial_requests: int = TRIAL_REQUESTS
    seed: int | None = None  # the spec's workload seed when None
    # Hold the candidates to the runtime's limits (espc.planner.compile.feasibility); None:
    # when the spec's devices are CPUs.
    runnable: bool | None = None
    # Processes that simulate independent candidates at once (espc.planner.compile.parallel;
    # the policy does not depend on it); None: every core this process may use.
    workers: int | None = None


@dataclass(frozen=True)
class Trial:
    """One simulated candidate during verification and search; `goodput_rps` None: a
    seed or search neighbour rejected by one trial at the rate it had to beat (its label
    says which and the attainment there)."""

    stage: str
    label: str
    goodput_rps: float | None


@dataclass(frozen=True)
class CompileResult:
    policy: Policy
    milp: tuple[MilpSolution, ...]
    trials: tuple[Trial, ...]


def compile_spec(
    spec: Spec,
    spec_hash: str,
    base_dir: Path | None = None,
    options: CompileOptions = CompileOptions(),
    cost: CostModel | None = None,
    on_progress: Progress | None = None,
) -> CompileResult:
    """Compile `spec` (see the module docstring) among the candidates its `Limits` allow
    (the others are listed in the policy's `skipped`); raises ilp.InfeasibleSLO when the
    SLOs cannot be met by the elastic strategy, NothingFeasible when no candidate is left."""
    started = time.perf_counter()

    def progress(stage: str, message: str) -> None:
        if on_progress:
            on_progress(stage, message)

    strategy = spec.policy.strategy
    seed = spec.workload.seed if options.seed is None else options.seed
    cost = cost or CostModel.from_spec(spec)
    limits = Limits.of(spec, cost, options.runnable)
    evaluator = Evaluator(
        spec, base_dir, requests=options.trial_requests, cost=cost, max_trial_requests=MAX_TRIAL_REQUESTS,
        tolerance=VERIFY_TOLERANCE, limits=limits,
        workers=options.workers if options.workers is not None else available_workers(),
    )
    progress("metric", "choosing the goodput metric")
    evaluator.metric = goodput_metric(spec, evaluator)
    trials: list[Trial] = []
    predictions: list[StrategyPrediction] = []
    milp: list[MilpSolution] = []
    best_elastic: tuple[float, ElasticPolicy] | None = None

    if strategy in ("elastic", "auto"):
        progress("milp", "solving the policy MILP")
        milp = evaluator.milp_policies()
    if milp:  # empty when the limits leave out every tp (evaluator.skipped lists them)
        verified: list[tuple[float, ElasticPolicy]] = []
        for solution in milp:
            progress("verify", f"simulating the MILP policy for tp={solution.tp}")
            rate = _goodput(evaluator, solution.policy, seed, start_rate=solution.rate)
            trials.append(Trial("verify", f"milp tp={solution.tp}", rate))
            verified.append((rate, solution.policy))
        if options.search_seconds > 0:
            verified += _static_seeds(evaluator, milp, verified, seed, trials, progress)
        # The starts' verified goodputs are often within the simulation's noise of each
        # other, and a neighbour can be worth far more than the difference: search around
        # the best SEARCH_STARTS, each for its share of the time.
        verified.sort(key=lambda pair: -pair[0])
        searched = verified[:SEARCH_STARTS]
        for start in searched:
            deadline = time.perf_counter() + options.search_seconds / len(searched)
            improved = _local_search(evaluator, start, seed, deadline, trials, progress)
            if best_elastic is None or improved[0] > best_elastic[0]:
                best_elastic = improved
    # The ablation and the baseline families are independent of each other: they run on
    # the evaluator's workers together (each family's screen then runs on one).
    requested = BASELINES if strategy == "auto" else () if strategy == "elastic" else (strategy,)
    # A family with every configuration left out is listed in evaluator.skipped.
    baselines = [baseline for baseline in requested if evaluator.candidates(baseline)]
    rigid = best_elastic[1].rigid() if best_elastic and not best_elastic[1].is_rigid() else None
    start_rate = best_elastic[0] if best_elastic else None
    jobs: list[str | ElasticPolicy] = [*([rigid] if rigid else []), *baselines]
    if rigid:
        progress("ablate", "simulating elastic-rigid, the policy without ESP's choices")
    if baselines:
        cores = f" on {min(evaluator.workers, len(jobs))} cores" if evaluator.workers > 1 and len(jobs) > 1 else ""
        progress("strategies", f"measuring the baseline families {', '.join(baselines)}{cores}")

    compiling = os.getpid()

    def measure(job: str | ElasticPolicy) -> float | StrategyGoodput:
        if isinstance(job, ElasticPolicy):
            return _goodput(evaluator, job, seed, start_rate=start_rate)

        def family_progress(message: str) -> None:
            if os.getpid() == compiling:  # a forked worker leaves the terminal to this process
                progress("strategies", f"{job}: {message}")

        return evaluator.strategy_goodput(
            job, seed, on_progress=family_progress, finalists=BASELINE_FINALISTS, start_rate=start_rate
        )

    measured = fork_map(measure, jobs, evaluator.workers)
    if rigid:
        assert best_elastic is not None
        rigid_rate = measured.pop(0)
        assert not isinstance(rigid_rate, StrategyGoodput)
        trials.append(Trial("ablate", "elastic-rigid", rigid_rate))
        # A tie goes to rigid: choices that earned nothing on the compile seed only risk
        # the held-out ones (benchmarks/results/policy_quality_pcie.txt, uniform seed 1).
        if rigid_rate >= best_elastic[0]:
            best_elastic = (rigid_rate, rigid)
    if best_elastic:
        predictions.append(StrategyPrediction("elastic", f"tp={best_elastic[1].tp}", best_elastic[0], len(trials)))
    for found in measured:
        assert isinstance(found, StrategyGoodput)
        predictions.append(StrategyPrediction(found.strategy, found.configuration, found.goodput.rate, found.configurations_searched))

    progress("choose", "choosing the strategy")
    if not predictions:
        raise NothingFeasible(evaluator.skipped)
    chosen = max(predictions, key=lambda p: (p.goodput_rps, p.strategy == "elastic"))
    best_solution = next((s for s in milp if best_elastic and s.tp == best_elastic[1].tp), None)
    reusable_share = None
    if spec.runtime.prefix_caching:
        sample = evaluator.workload(requests=spec.workload.requests)  # the MILP's sample
        reusable_share = prompt_share(reusable_prefix(sample), sample)
    policy = Policy(
        schema_version=POLICY_SCHEMA_VERSION,
        espc_version=__version__,
        spec_hash=spec_hash,
        strategy=chosen.strategy,
        configuration=chosen.configuration,
        reason=_reason(chosen, predictions, strategy, evaluator.metric),
        cost_parameters=evaluator.cost.to_dict(),
        elastic=best_elastic[1] if best_elastic else None,
        solver=best_solution.solver if best_solution else None,
        predictions=tuple(sorted(predictions, key=lambda p: -p.goodput_rps)),
        milp_predicted_rps=best_solution.rate if best_solution else None,
        compile_seconds=round(time.perf_counter() - started, 3),
        goodput_metric=evaluator.metric,
        runnable=limits.runnable,
        skipped=tuple(evaluator.skipped),
        prefix_reusable_share=reusable_share,
        prefix_hit_share=best_solution.prefix_hit_share if best_solution else None,
    )
    policy.verify(len(evaluator.cost.cluster.instances(policy.elastic.tp)) if policy.elastic else None)
    return CompileResult(policy, tuple(milp), tuple(trials))


def static_equivalent(
    layout: StaticLayout, template: ElasticPolicy, prompt_lens: Sequence[int], instance_tokens: int,
    partitioned: bool = True,
) -> ElasticPolicy:
    """The elastic policy that routes as the static `layout` does, with `template`'s decode,
    admission and migration settings. The short class keeps `template`'s length buckets
    below the layout's threshold (and their batch budgets) and prefills on one instance at a
    time. The long class is one bucket — an instance cap holds per bucket — whose prompts
    span up to the large group's size and hold at most that many instances at once. It
    starts at the layout's threshold or at the first prompt that a short group's KV
    (`instance_tokens` per instance) cannot hold with its expected output, whichever is
    shorter: StaticScheduler sends those to the large group too.

    `partitioned`: each class keeps to its instances as the static layout's groups do (the
    long class to the large groups', StaticScheduler's first instances; the short class to
    the rest), so no short request's KV sits where a long prompt must prefill. Otherwise
    the short class may use any instance (elastic lends the long class's while they are
    idle). A layout of equal groups spans up to their size in every bucket, on any instance."""
    if layout.tp != template.tp:
        raise ValueError(f"layout tp={layout.tp} and template tp={template.tp} differ")
    instances = sum(layout.groups)
    largest = max(layout.groups)
    end = template.buckets[-1].high
    threshold = layout.long_threshold
    if threshold is not None:
        threshold = min(threshold, min(layout.groups) * instance_tokens - template.reserve_output_tokens + 1)
    threshold = threshold if threshold is not None and threshold < end else None

    def share(low: int, high: int) -> float:
        return sum(1 for length in prompt_lens if low <= length < high) / max(len(prompt_lens), 1)

    if threshold is None:
        dop = largest if layout.long_threshold is None else 1
        buckets = [
            dataclasses.replace(bucket, prefill_dop=dop, max_instances=instances, share=share(bucket.low, bucket.high))
            for bucket in template.buckets
        ]
        return dataclasses.replace(template, buckets=tuple(buckets))
    starts = [sum(layout.groups[:index]) for index in range(len(layout.groups))]
    long_members = tuple(
        instance for start, size in zip(starts, layout.groups) if size == largest for instance in range(start, start + size)
    )
    short_members = tuple(instance for instance in range(instances) if instance not in long_members)
    long_class: tuple[int, ...] | None = long_members
    short_class: tuple[int, ...] | None = short_members
    if not partitioned or not short_class:
        long_class = short_class = None
    short_cap = instances if short_class is None else len(short_class)
    long_cap = largest if long_class is None else len(long_class)
    edges = sorted({bucket.low for bucket in template.buckets if bucket.low < threshold} | {threshold})
    buckets = [
        LengthBucket(
            low, high, share(low, high), 1, template.bucket(low).batch_tokens, short_cap, template.bucket(low).within_slo,
            short_class,
        )
        for low, high in zip(edges, edges[1:])
    ]
    long = template.bucket(threshold)
    within_slo = all(bucket.within_slo for bucket in template.buckets if bucket.high > threshold)
    buckets.append(
        LengthBucket(threshold, end, share(threshold, end), largest, long.batch_tokens, long_cap, within_slo, long_class)
    )
    return dataclasses.replace(template, buckets=tuple(buckets))


def _static_seeds(
    evaluator: Evaluator, milp: list[MilpSolution], verified: list[tuple[float, ElasticPolicy]], seed: int,
    trials: list[Trial], progress: Progress,
) -> list[tuple[float, ElasticPolicy]]:
    """The verified elastic equivalents of the best SEED_LAYOUTS screened best-static groupings
    at a tp the MILP solved (its policy is the template), partitioned and not (which wins
    depends on the workload: a partition keeps long prompts' instances free of short
    requests' KV, sharing lends them while idle), other than the `verified` policies. The
    screen's bisections start from the best verified goodput (the same grid of rates as
    from the workload's own, without the doublings up to it).

    Only the best SEARCH_STARTS policies matter from here (searched, then chosen from): a
    seed that misses the attainment target at the goodput of the last of them is not one
    of them, and that one trial stands for its bisection (its label says so)."""
    known = [policy for _, policy in verified]
    start_rate = max(rate for rate, _ in verified)
    templates = {solution.tp: solution.policy for solution in milp}
    prompt_lens = [request.prompt_len for request in evaluator.workload(requests=evaluator.spec.workload.requests)]
    screened = evaluator.screen(
        "best-static", seed, lambda message: progress("seed", f"best-static: {message}"), start_rate=start_rate
    )
    seeds: list[tuple[float, ElasticPolicy]] = []
    layouts = 0
    for screened_rate, candidate in screened:
        layout = candidate.layout
        if layouts == SEED_LAYOUTS:
            break
        if layout is None or layout.tp not in templates:
            continue
        layouts += 1
        instance_tokens = Deployment.build(evaluator.cost, layout.tp, evaluator.kv_capacity).capacity[0]
        for partitioned in (True, False):
            policy = static_equivalent(layout, templates[layout.tp], prompt_lens, instance_tokens, partitioned)
            if _behaviour(policy) in {_behaviour(other) for other in [*known, *(seeded for _, seeded in seeds)]}:
                continue
            variant = ", partitioned" if policy.instance_classes() else "" if partitioned else ", shared"
            label = f"as static {candidate.label}{variant}"
            progress("seed", f"simulating the elastic equivalent {label}")
            ranked = sorted((rate for rate, _ in [*verified, *seeds]), reverse=True)
            if len(ranked) >= SEARCH_STARTS and ranked[SEARCH_STARTS - 1] > 0:
                bar = ranked[SEARCH_STARTS - 1]
                attainment = evaluator.trial_attainment(evaluator.elastic_candidate(policy), bar, seed)
                if attainment < evaluator.spec.slo.attainment:
                    trials.append(Trial("seed", f"{label} (misses the target at {bar:.4g} req/s: {attainment:.1%})", None))
                    continue
            rate = _goodput(evaluator, policy, seed, start_rate=screened_rate)
            trials.append(Trial("seed", label, rate))
            seeds.append((rate, policy))
    return seeds


def _behaviour(policy: ElasticPolicy) -> ElasticPolicy:
    """`policy` as the scheduler reads it: without the buckets' shares and SLO flags (report-only)."""
    buckets = tuple(dataclasses.replace(bucket, share=0.0, within_slo=True) for bucket in policy.buckets)
    return dataclasses.replace(policy, buckets=buckets)


def goodput_metric(spec: Spec, evaluator: Evaluator) -> str:
    """The spec's `policy.goodput_metric`; "auto" is per-class when some prompt of the
    workload (with its output) needs more KV than one instance of the smallest tp holds —
    the requests elastic SP is for, which P90 goodput would let any strategy drop — and
    P90 otherwise."""
    chosen = spec.policy.goodput_metric
    if chosen != "auto":
        return chosen
    capacity = evaluator.kv_capacity or evaluator.cost.kv_capacity_tokens(spec.cluster.tp or 1)
    needs = max((request.prompt_len + request.output_len for request in evaluator.workload()), default=0)
    return "per-class" if needs > capacity else "p90"


def _goodput(evaluator: Evaluator, policy: ElasticPolicy, seed: int, start_rate: float | None = None) -> float:
    candidate = evaluator.elastic_candidate(policy)
    return evaluator.goodput(candidate, seed, start_rate=start_rate or None).rate


def _neighbours(policy: ElasticPolicy, instances: int) -> Iterator[tuple[str, ElasticPolicy]]:
    """Policies one step from `policy`: the instance classes' (one instance moves, or the
    classes are dropped), then each bucket's, the longest buckets first (they matter most)."""
    yield from _class_moves(policy)
    buckets = list(policy.buckets)
    for index in reversed(range(len(buckets))):
        bucket = buckets[index]
        size = instances if bucket.instances is None else len(bucket.instances)
        for cap in (bucket.max_instances - 1, bucket.max_instances + 1):
            if max(1, bucket.prefill_dop) <= cap <= size:
                changed = buckets.copy()
                changed[index] = dataclasses.replace(bucket, max_instances=cap)
                yield f"bucket {index} ≤ {cap} instances", dataclasses.replace(policy, buckets=tuple(changed))
        for dop in (bucket.prefill_dop - 1, bucket.prefill_dop + 1):
            if 1 <= dop <= bucket.max_instances:
                changed = buckets.copy()
                changed[index] = dataclasses.replace(bucket, prefill_dop=dop)
                yield f"bucket {index} dop ≤ {dop}", dataclasses.replace(policy, buckets=tuple(changed))
    for factor in (0.5, 2.0):
        weight = round(policy.instance_weight * factor, 3) if policy.instance_weight else factor / 2
        yield f"instance weight {weight:g}", dataclasses.replace(policy, instance_weight=weight)


def _class_moves(policy: ElasticPolicy) -> Iterator[tuple[str, ElasticPolicy]]:
    """The policy with one instance moved from one class to another (the giver's instance
    nearest the taker's; caps and DoPs shrink with the giver), and without classes."""
    classes = policy.instance_classes()
    if not classes:
        return
    yield "instances shared", dataclasses.replace(
        policy, buckets=tuple(dataclasses.replace(bucket, instances=None) for bucket in policy.buckets)
    )
    for giver in classes:
        for taker in classes:
            if giver is taker or len(giver) < 2:
                continue
            moved = min(giver, key=lambda i: (min(abs(i - j) for j in taker), i))
            renamed = {giver: tuple(i for i in giver if i != moved), taker: tuple(sorted((*taker, moved)))}

            def moved_bucket(bucket: LengthBucket) -> LengthBucket:
                assert bucket.instances is not None  # a valid policy with classes names them in every bucket
                members = renamed.get(bucket.instances, bucket.instances)
                cap = min(bucket.max_instances, len(members))
                return dataclasses.replace(bucket, instances=members, max_instances=cap, prefill_dop=min(bucket.prefill_dop, cap))

            yield (
                f"instance {moved} from instances {format_instances(giver)} to {format_instances(taker)}",
                dataclasses.replace(policy, buckets=tuple(moved_bucket(bucket) for bucket in policy.buckets)),
            )


def _local_search(
    evaluator: Evaluator,
    best: tuple[float, ElasticPolicy],
    seed: int,
    deadline: float,
    trials: list[Trial],
    progress: Progress,
) -> tuple[float, ElasticPolicy]:
    """First-improvement hill climbing over `_neighbours` until none improves or time is up.

    A neighbour is kept when its goodput clears the bar of the best's × (1 + tolerance),
    which a bisection finds only where the attainment target is met at about the bar: one
    trial at the bar rejects most neighbours, for a fifth to a tenth of a bisection. The
    trials at the bar of the evaluator's `workers` neighbours run at once; the neighbours are
    then taken in order as one at a time would, so the search goes the same way on any
    number of cores (a trial beyond the first improvement is work thrown away)."""
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        instances = len(evaluator.cost.cluster.instances(best[1].tp))
        bar = best[0] * (1 + VERIFY_TOLERANCE)
        neighbours = _neighbours(best[1], instances)
        while not improved and time.perf_counter() < deadline:
            chunk = list(itertools.islice(neighbours, max(evaluator.workers, 1)))
            if not chunk:
                break
            progress("search", f"{'; '.join(label for label, _ in chunk)} (best {best[0]:.4g} req/s)")
            attainments = fork_map(
                lambda neighbour: evaluator.trial_attainment(evaluator.elastic_candidate(neighbour[1]), bar, seed) if bar else 0.0,
                chunk, evaluator.workers,
            )
            for (label, candidate), attainment in zip(chunk, attainments):
                if bar and attainment < evaluator.spec.slo.attainment:
                    trials.append(Trial("search", f"{label} (misses the target at {bar:.4g} req/s: {attainment:.1%})", None))
                    continue
                rate = _goodput(evaluator, candidate, seed, start_rate=best[0])
                trials.append(Trial("search", label, rate))
                if rate > bar:
                    best = (rate, candidate)
                    improved = True
                    break
    return best


def _reason(chosen: StrategyPrediction, predictions: list[StrategyPrediction], requested: str, metric: str) -> str:
    label = GOODPUT_LABELS[metric]
    if requested != "auto":
        return f"the spec asks for {requested}: {chosen.goodput_rps:.4g} req/s {label} in simulation"
    others = sorted((p for p in predictions if p is not chosen), key=lambda p: -p.goodput_rps)
    if not others:
        return f"{chosen.goodput_rps:.4g} req/s {label} in simulation"
    runner_up = others[0]
    ratio = chosen.goodput_rps / runner_up.goodput_rps if runner_up.goodput_rps else float("inf")
    return (
        f"highest simulated {label}: {chosen.goodput_rps:.4g} req/s vs {runner_up.strategy} "
        f"{runner_up.goodput_rps:.4g} req/s ({ratio:.2f}×) on the spec's workload"
    )
