"""Evaluate strategies on a spec's workload: one simulation, or P90 goodput by bisection.

This is what `espc simulate`, `espc compare` and the benchmarks call. A strategy with
several configurations (a disaggregated split, best-static's groupings) is searched:
every configuration is screened with a short run and a coarse bisection, and the best few
are measured again at full length — the configuration with the highest goodput stands for
the strategy.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from espc.frontend.loader import validate_spec
from espc.frontend.spec import GammaArrival, PoissonArrival, Spec
from espc.planner.compile import ilp
from espc.planner.compile.feasibility import Limits
from espc.planner.compile.parallel import fork_map
from espc.planner.compile.policy import ElasticPolicy, SkippedCandidate
from espc.planner.compile.scheduler import ElasticScheduler
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import (
    METRICS,
    Goodput,
    Summary,
    TrialJudge,
    find_goodput,
    isolated_prefill,
    length_classes,
    summarize,
)
from espc.planner.sim.simulator import RunWatch, SimulationResult, simulate
from espc.planner.sim.strategies import Candidate, Deployment, candidates
from espc.planner.sim.workload import Request, generate, mean_rate

# A goodput trial simulates at least this many seconds of arrivals by default: a short
# burst of requests arriving "at once" fits any cluster, so a fixed request count would
# report an unbounded goodput at high rates.
DEFAULT_WINDOW_S = 60.0
# Whatever the window and the cap on a trial's requests, its arrivals span at least this
# many TTFT bounds (of the median prompt): arrivals within one bound are a burst that any
# cluster finishing them within the bound absorbs, however far the rate exceeds what it
# sustains (capped trials reported 8,388,608 req/s on ShareGPT, the bisection's ceiling).
MIN_SPAN_TTFTS = 2.0
# Searching a family: screen every configuration on this many requests at this tolerance,
# then measure the best few in full.
SCREEN_REQUESTS = 200
SCREEN_TOLERANCE = 0.15
SCREEN_WINDOW_S = 20.0
FINALISTS = 3
GOODPUT_TOLERANCE = 0.03  # relative width of the bisection that measures a goodput
# The compiled elastic policy, and its ablation without ESP's choices (ElasticPolicy.rigid).
ELASTIC_STRATEGIES = ("elastic", "elastic-rigid")


@dataclass(frozen=True)
class StrategyRun:
    """One simulation of a strategy at a fixed rate (the best configuration of a family)."""

    strategy: str
    configuration: str
    configurations_searched: int
    result: SimulationResult
    summary: Summary


@dataclass(frozen=True)
class StrategyGoodput:
    strategy: str
    configuration: str
    goodput: Goodput
    configurations_searched: int


def override_workload(spec: Spec, lengths: str | None = None, trace: Path | None = None) -> Spec:
    """The spec with its workload replaced by a length distribution or a trace (replayed
    with its own timestamps), validated like the spec itself: a SpecError names the
    command line as its file."""
    if lengths is None and trace is None:
        return spec
    workload = spec.workload.model_dump(mode="json", exclude={"lengths", "outputs", "trace"}, exclude_none=True)
    if trace is not None:
        workload |= {"trace": str(trace.resolve()), "arrival": "trace"}
    else:
        workload["lengths"] = lengths
    return validate_spec(spec.model_dump(mode="json") | {"workload": workload}, {}, "command line")


class Evaluator:
    """A spec's cost model and workload, with overrides for rate, seed and request count."""

    def __init__(
        self, spec: Spec, base_dir: Path | None = None, requests: int | None = None, cost: CostModel | None = None,
        window_s: float = DEFAULT_WINDOW_S, elastic: ElasticPolicy | None = None, max_trial_requests: int | None = None,
        tolerance: float = GOODPUT_TOLERANCE, kv_capacity: int | None = None, metric: str = "p90",
        limits: Limits | None = None, workers: int = 1,
    ):
        """`limits`: leave out the candidates they rule out (compile; see
        espc.planner.compile.feasibility) and list them in `skipped`; None: every candidate.
        `workers`: processes that simulate independent candidates at once (`goodputs`;
        parallel.fork_map; the results do not depend on it)."""
        if metric not in METRICS:
            raise ValueError(f"unknown goodput metric {metric!r}; metrics: {', '.join(METRICS)}")
        self.spec = spec
        self.metric = metric
        self.kv_capacity = kv_capacity  # tokens per instance; None: what the spec's memory allows
        self.base_dir = base_dir
        self.requests = requests
        self.window_s = window_s
        # A cap on the window's request count keeps trials of very fast clusters bounded.
        self.max_trial_requests = max_trial_requests
        self.cost = cost or CostModel.from_spec(spec)
        self.prefill_s = isolated_prefill(self.cost)
        self.elastic = elastic
        self.tolerance = tolerance
        self._median_ttft_s: float | None = None
        self._classes: tuple[int, ...] | None = None
        # Goodputs found so far, by what was measured (see `goodput`).
        self._goodputs: dict[tuple, Goodput] = {}
        self.limits = limits
        self.skipped: list[SkippedCandidate] = []  # what `limits` left out, in the order met
        self.workers = workers

    def elastic_candidate(self, policy: ElasticPolicy, label: str | None = None, strategy: str = "elastic") -> Candidate:
        deployment = Deployment.build(self.cost, policy.tp, self.kv_capacity)
        return Candidate(
            strategy, label or f"tp={policy.tp}",
            lambda: ElasticScheduler(deployment, policy, self.spec.slo, self.prefill_s, name=f"{strategy}(tp={policy.tp})"),
            key=f"elastic: {policy!r}",  # every field: policies of one tp share a label
        )

    def milp_policies(self) -> list[ilp.MilpSolution]:
        """The MILP's elastic policy for every tp the spec allows (and the evaluator's
        `limits`, which may leave none: then []), highest predicted rate first;
        InfeasibleSLO (from the best-placed tp) when no allowed tp is feasible."""
        sample = self.workload(requests=self.spec.workload.requests)
        tps = [self.spec.cluster.tp] if self.spec.cluster.tp else self.cost.tp_choices()
        if self.limits is not None:
            tps = [tp for tp in tps if not self._left_out("elastic", f"tp={tp}", self.limits.reason("elastic", tp))]
        solutions, errors = [], []
        for tp in tps:
            try:
                solutions.append(ilp.solve(
                    self.cost, tp, sample, self.spec.slo, self.spec.policy, self.prefill_s,
                    prefix_caching=self.spec.runtime.prefix_caching,
                ))
            except ilp.InfeasibleSLO as error:
                errors.append((tp, error))
        if not solutions and errors:
            raise errors[-1][1]
        for tp, infeasible in errors:  # other tps are feasible: these are left out
            self._left_out("elastic", f"tp={tp}", f"the SLOs cannot be met: {infeasible}")
        return sorted(solutions, key=lambda solution: -solution.rate)

    def _left_out(self, strategy: str, configuration: str, reason: str | None) -> bool:
        """Record `reason` (once) when there is one; whether the configuration is left out."""
        if reason is None:
            return False
        skipped = SkippedCandidate(strategy, configuration, reason)
        if skipped not in self.skipped:
            self.skipped.append(skipped)
        return True

    def workload(self, rate: float | None = None, seed: int | None = None, requests: int | None = None) -> list[Request]:
        return generate(
            self.spec.workload, base_dir=self.base_dir, rate=rate, seed=seed,
            requests=requests if requests is not None else self.requests,
        )

    def classes(self) -> tuple[int, ...]:
        """The workload's prompt-length classes (metrics.length_classes of its sample at
        the spec's rate): every trial, at any rate, is split the same way."""
        if self._classes is None:
            self._classes = length_classes([request.prompt_len for request in self.workload()])
        return self._classes

    def median_ttft_s(self) -> float:
        """The TTFT bound of the workload's median prompt."""
        if self._median_ttft_s is None:
            median_prompt = int(statistics.median(request.prompt_len for request in self.workload()))
            self._median_ttft_s = self.spec.slo.ttft.target(self.prefill_s(median_prompt))
        return self._median_ttft_s

    def min_span_s(self) -> float:
        """The shortest span of arrivals a goodput trial may cover (see MIN_SPAN_TTFTS)."""
        return MIN_SPAN_TTFTS * self.median_ttft_s()

    def settle_s(self, tolerance: float) -> float:
        """The span of arrivals past which a longer trial changes no verdict of a bisection
        at `tolerance`: at (1 + tolerance) × the rate a candidate sustains its queue grows
        by tolerance × the time elapsed, so arrivals wait past the (median) TTFT bound after
        bound / tolerance, and more than 1 − attainment of the trial's requests have
        missed once it spans bound / (tolerance × attainment). A window longer than this
        (60 s on a 0.2 s bound: 300 bounds) only simulates more of the same verdict."""
        return self.median_ttft_s() / (tolerance * self.spec.slo.attainment)

    def nominal_rate(self) -> float:
        """The workload's own arrival rate: the spec's, or the trace's mean."""
        arrival = self.spec.workload.arrival
        if isinstance(arrival, (PoissonArrival, GammaArrival)):
            return arrival.rate
        return mean_rate([request.arrival_s for request in self.workload()]) or 1.0

    def candidates(self, strategy: str) -> list[Candidate]:
        """Every configuration of `strategy` on the spec's cluster, less those the
        evaluator's `limits` leave out (listed in `skipped`; a family the cluster cannot
        form at all, such as static-tp at a tp that does not divide the model's heads, is
        left out whole)."""
        if strategy in ELASTIC_STRATEGIES:
            if self.elastic is None:
                policies = self.milp_policies()
                if not policies:  # every tp left out by the limits
                    return []
                self.elastic = policies[0].policy
            policy = self.elastic.rigid() if strategy == "elastic-rigid" else self.elastic
            if self.limits is not None and self._left_out(strategy, f"tp={policy.tp}", self.limits.reason(strategy, policy.tp)):
                return []
            return [self.elastic_candidate(policy, strategy=strategy)]
        prompts = [request.prompt_len for request in self.workload()] if strategy == "best-static" else ()
        if self.limits is None:
            return candidates(strategy, self.spec.policy, self.cost, prompts, self.kv_capacity)
        try:
            family = candidates(strategy, self.spec.policy, self.cost, prompts, self.kv_capacity)
        except ValueError as error:  # the cluster cannot take this strategy's shape
            self._left_out(strategy, "every configuration", str(error))
            return []
        limits = self.limits
        return [
            candidate for candidate in family
            if not self._left_out(strategy, candidate.label, limits.reason(strategy, candidate.make().deployment.tp))
        ]

    def run(
        self, candidate: Candidate, requests: Sequence[Request], *, timeline: bool = False, check: bool = False,
        watch: RunWatch | None = None,
    ) -> tuple[SimulationResult, Summary]:
        result = simulate(
            candidate.make(), requests, record_timeline=timeline, check=check, watch=watch,
            prefix_caching=self.spec.runtime.prefix_caching,
        )
        return result, summarize(result, self.spec.slo, self.prefill_s, self.classes())

    def bracket_start(self, hint: float | None = None) -> float:
        """Where a bisection starts: the workload's rate × 2^k, the k nearest `hint` (a
        rate measured before, which saves trials). Every strategy's search thus brackets
        on the same grid of rates, and none gains from where it happened to start."""
        nominal = self.nominal_rate()
        if not hint or hint <= 0:
            return nominal
        return nominal * 2.0 ** round(math.log2(hint / nominal))

    def goodput(
        self, candidate: Candidate, seed: int | None = None, requests: int | None = None, tolerance: float | None = None,
        start_rate: float | None = None, window_s: float | None = None,
    ) -> Goodput:
        """Goodput by bisection (metrics.find_goodput; P90 or per-class, as the evaluator's
        `metric`) from `bracket_start(start_rate)`. Each trial simulates `requests` or
        `window_s` seconds of arrivals (at most `settle_s(tolerance)`), whichever is more,
        but at most the evaluator's `max_trial_requests`, and always `min_span_s()` of arrivals. Remembered per candidate identity and trial shape:
        static-sp, static-tp and best-static share configurations, and the same search from
        another start rate lands within the tolerance of the first."""
        return self.goodputs([(candidate, start_rate)], seed, requests, tolerance, window_s)[0]

    def goodputs(
        self, starts: Sequence[tuple[Candidate, float | None]], seed: int | None = None, requests: int | None = None,
        tolerance: float | None = None, window_s: float | None = None,
    ) -> list[Goodput]:
        """`goodput` of each (candidate, start rate), those not remembered yet on the
        evaluator's `workers`."""
        base = requests if requests is not None else self.requests or self.spec.workload.requests
        window = self.window_s if window_s is None else window_s
        tolerance = self.tolerance if tolerance is None else tolerance
        keys = [(c.identity(), seed, base, window, self.max_trial_requests, tolerance, self.metric) for c, _ in starts]
        missing: dict[tuple, tuple[Candidate, float | None]] = {}
        for key, start in zip(keys, starts):  # the first start of a candidate met twice, as one at a time would
            if key not in self._goodputs and key not in missing:
                missing[key] = start
        jobs = list(missing.values())
        found = fork_map(lambda job: self._bisect(job[0], seed, base, window, tolerance, job[1]), jobs, self.workers)
        self._goodputs.update(zip(missing, found))
        return [self._goodputs[key] for key in keys]

    def _bisect(
        self, candidate: Candidate, seed: int | None, base: int, window: float, tolerance: float, start_rate: float | None
    ) -> Goodput:
        hopeless: set[float] = set()  # failed rates below which every trial fails alike

        def attainment_at(rate: float) -> float:
            attainment, refusals_decide = self._trial(candidate, rate, seed, base, window, tolerance)
            if refusals_decide:
                hopeless.add(rate)
            return attainment

        return find_goodput(
            attainment_at, self.spec.slo.attainment, self.bracket_start(start_rate), tolerance,
            hopeless_below=hopeless.__contains__,
        )

    def trial_attainment(
        self, candidate: Candidate, rate: float, seed: int | None = None, requests: int | None = None,
        window_s: float | None = None, tolerance: float | None = None,
    ) -> float:
        """The attainment (of the evaluator's `metric`) of one goodput trial at `rate`, of
        the shape `goodput` gives the trials of a bisection at `tolerance`. A trial that cannot reach the spec's target
        stops as soon as that is certain (metrics.TrialJudge): its attainment is then at
        most the full run's, below the target either way."""
        return self._trial(candidate, rate, seed, requests, window_s, tolerance)[0]

    def _trial(
        self, candidate: Candidate, rate: float, seed: int | None, requests: int | None, window_s: float | None,
        tolerance: float | None,
    ) -> tuple[float, bool]:
        """`trial_attainment`, and whether the trial had the fewest requests a trial has (so
        every lower rate simulates the same lengths) and refused enough of them at
        admission, which no rate changes, to miss the target: then every lower rate fails."""
        base = requests if requests is not None else self.requests or self.spec.workload.requests
        window = min(self.window_s if window_s is None else window_s, self.settle_s(tolerance or self.tolerance))
        count = max(base, math.ceil(rate * window))
        if self.max_trial_requests is not None:
            count = min(count, max(base, self.max_trial_requests))
        count = max(count, math.ceil(rate * self.min_span_s()))
        trial = self.workload(rate, seed, count)
        judge = TrialJudge(trial, self.spec.slo, self.prefill_s, self.metric, self.spec.slo.attainment, self.classes())
        attainment = self.run(candidate, trial, watch=judge)[1].attainment_of(self.metric)
        return attainment, count == base and judge.refusals_decide()

    def simulate_strategy(
        self, strategy: str, rate: float | None = None, seed: int | None = None, *, timeline: bool = False,
        configuration: str | None = None, on_progress: Callable[[str], None] | None = None,
    ) -> StrategyRun:
        """Simulate `strategy` at `rate`; a family runs every configuration (or just the one
        labelled `configuration`) and keeps the one with the highest attainment (then the
        lowest P90 TTFT)."""
        requests = self.workload(rate, seed)
        family = self.candidates(strategy)
        searched = len(family)
        if configuration is not None:
            family = [candidate for candidate in family if candidate.label == configuration]
        best: tuple[tuple[float, float], Candidate, SimulationResult, Summary] | None = None
        for candidate in family:
            if on_progress:
                on_progress(f"simulating {candidate.label}")
            result, summary = self.run(candidate, requests, timeline=timeline)
            score = (summary.attainment, -summary.ttft.p90 if summary.completed else float("-inf"))
            if best is None or score > best[0]:
                best = (score, candidate, result, summary)
        assert best is not None
        return StrategyRun(strategy, best[1].label, searched, best[2], best[3])

    def screen(
        self, strategy: str, seed: int | None = None, on_progress: Callable[[str], None] | None = None,
        start_rate: float | None = None,
    ) -> list[tuple[float, Candidate]]:
        """Every configuration of `strategy` with its screened goodput, best first: short
        trials (SCREEN_REQUESTS, at most SCREEN_WINDOW_S of arrivals) and a loose tolerance.
        Every bisection starts from `start_rate`'s bracket, so none gains from the order they
        run in, and they run on the evaluator's `workers` with the same results."""
        family = self.candidates(strategy)
        if on_progress:
            cores = f" on {min(self.workers, len(family))} cores" if self.workers > 1 and len(family) > 1 else ""
            on_progress(f"screening {len(family)} configuration{'s' if len(family) != 1 else ''}{cores}")
        requests = min(SCREEN_REQUESTS, self.requests or SCREEN_REQUESTS)
        found = self.goodputs(
            [(candidate, start_rate) for candidate in family], seed, requests, SCREEN_TOLERANCE,
            window_s=min(self.window_s, SCREEN_WINDOW_S),
        )
        return sorted(((goodput.rate, candidate) for goodput, candidate in zip(found, family)), key=lambda pair: -pair[0])

    def strategy_goodput(
        self, strategy: str, seed: int | None = None, on_progress: Callable[[str], None] | None = None,
        finalists: int = FINALISTS, start_rate: float | None = None,
    ) -> StrategyGoodput:
        """The best configuration of `strategy` and its goodput (see the module docstring);
        the bisections start from `start_rate` (the workload's rate by default)."""
        family = self.candidates(strategy)
        measured_candidates: list[tuple[Candidate, float | None]]
        if len(family) > 1:
            screened = self.screen(strategy, seed, on_progress, start_rate)
            measured_candidates = [(candidate, rate) for rate, candidate in screened[:finalists]]
        else:
            measured_candidates = [(family[0], start_rate)]
        if on_progress:
            on_progress(f"measuring {', '.join(candidate.label for candidate, _ in measured_candidates)}")
        measured = self.goodputs([(candidate, rate or None) for candidate, rate in measured_candidates], seed)
        # The first of the best: the screen's order breaks ties.
        best = max(zip(measured, (candidate for candidate, _ in measured_candidates)), key=lambda pair: pair[0].rate)
        return StrategyGoodput(strategy, best[1].label, best[0], len(family))


@dataclass(frozen=True)
class Comparison:
    """Strategies side by side over seeds: at a fixed rate, or at their goodput.

    `runs[strategy]` holds one simulation per seed — at the given rate, or, with goodput,
    at the strategy's goodput for that seed (so the latency table shows how it serves at
    its limit).
    """

    seeds: tuple[int, ...]
    rate: float | None
    runs: dict[str, list[StrategyRun]]
    goodputs: dict[str, list[StrategyGoodput]] | None
    metric: str = "p90"  # what the goodputs measure (metrics.METRICS)

    def first_runs(self) -> list[StrategyRun]:
        return [runs[0] for runs in self.runs.values()]

    def to_json(self) -> dict:
        def summary(run: StrategyRun) -> dict:
            return {"configuration": run.configuration, "configurations_searched": run.configurations_searched,
                    **dataclasses.asdict(run.summary)}

        data: dict = {"seeds": list(self.seeds), "rate": self.rate, "metric": self.metric, "strategies": {}}
        for strategy, runs in self.runs.items():
            entry: dict = {"runs": [summary(run) for run in runs]}
            if self.goodputs is not None:
                entry["goodput"] = [
                    {"rate": g.goodput.rate, "configuration": g.configuration, "trials": [list(t) for t in g.goodput.trials]}
                    for g in self.goodputs[strategy]
                ]
            data["strategies"][strategy] = entry
        return data


def compare_strategies(
    evaluator: Evaluator,
    strategies: Sequence[str],
    seeds: Sequence[int],
    rate: float | None = None,
    goodput: bool = False,
    *,
    timeline: bool = False,
    on_progress: Callable[[str | None], None] | None = None,
) -> Comparison:
    """Evaluate every strategy on every seed (see Comparison). `on_progress(None)` at the end."""
    runs: dict[str, list[StrategyRun]] = {}
    goodputs: dict[str, list[StrategyGoodput]] | None = {} if goodput else None
    for strategy in strategies:
        for index, seed in enumerate(seeds):
            def progress(message: str) -> None:
                if on_progress:
                    on_progress(f"{strategy}, seed {seed}: {message}")

            record = timeline and index == 0
            if goodputs is None:
                run = evaluator.simulate_strategy(strategy, rate, seed, timeline=record, on_progress=progress)
            else:
                found = evaluator.strategy_goodput(strategy, seed, on_progress=progress)
                goodputs.setdefault(strategy, []).append(found)
                at_rate = found.goodput.rate or min(rate for rate, _ in found.goodput.trials)
                run = evaluator.simulate_strategy(
                    strategy, at_rate, seed, timeline=record, configuration=found.configuration, on_progress=progress
                )
            runs.setdefault(strategy, []).append(run)
    if on_progress:
        on_progress(None)
    return Comparison(tuple(seeds), rate, runs, goodputs, evaluator.metric)
