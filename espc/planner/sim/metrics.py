"""Latency statistics, SLO attainment and goodput of simulated (or measured) runs.

A request meets its SLOs when it completed, its TTFT is within `slo.ttft.target(isolated
prefill time)` and its TPOT within `slo.tpot.target()`; rejected and unfinished requests
meet neither. Attainment is the share of *all* requests that meet both, and P90 goodput
(LoongServe's and DistServe's measure) is the highest arrival rate whose attainment is at
least `slo.attainment`, found by bisection over the rate. P90 goodput lets a strategy drop
the longest tenth of the requests for free; *per-class goodput* asks the same attainment
of every prompt-length class (`length_classes`), so it cannot hide the long requests.

The isolated prefill time of a prompt — what a TTFT bound like `max(25x prefill, 15s)`
scales — is the fastest the cluster can prefill that prompt alone: the minimum over every
tp and degree of parallelism it offers. It is the same for every strategy, so all of them
are held to the same bounds.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from espc.frontend.spec import SLOSpec
from espc.planner.sim.cluster_state import RequestState
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.simulator import RequestRecord, SimulationResult, request_record
from espc.planner.sim.workload import Request

# Prompt-length buckets for the per-length table: where long requests starve shows up.
LENGTH_BUCKETS = (0, 1_024, 8_192, 32_768, 131_072, 524_288)
# The prompt-length classes of the per-class goodput (< 8K, 8–64K, 64–256K, ≥ 256K tokens);
# a class with fewer than MIN_CLASS_SHARE of a workload's requests joins its neighbour.
CLASS_EDGES = (8_192, 65_536, 262_144)
MIN_CLASS_SHARE = 0.05
METRICS = ("p90", "per-class")
GOODPUT_LABELS = {"p90": "P90 goodput", "per-class": "per-class goodput"}
# A goodput is reported only where attainment also holds at this fraction of it.
CONFIRM_FRACTION = 0.9


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        array = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(array, [50, 90, 99])
        return cls(len(array), float(array.mean()), float(p50), float(p90), float(p99), float(array.max()))


@dataclass(frozen=True)
class BucketStats:
    """Requests whose prompt length lies in [low, high)."""

    low: int
    high: float  # math.inf for the last bucket
    count: int
    attainment: float
    ttft_p90_s: float
    e2e_p90_s: float


@dataclass(frozen=True)
class Summary:
    strategy: str
    requests: int
    completed: int
    rejected: int
    duration_s: float
    throughput_rps: float
    output_tokens_per_s: float
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    queueing: LatencyStats
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    migrated_bytes: int
    preemptions: int
    mean_utilisation: float
    buckets: tuple[BucketStats, ...]
    # (class low, attainment) per prompt-length class of `length_classes` that had requests.
    class_attainment: tuple[tuple[int, float], ...] = ()

    @property
    def worst_class_attainment(self) -> float:
        """The per-class goodput's measure: the attainment of the worst-served class."""
        return min((attainment for _, attainment in self.class_attainment), default=self.attainment)

    def attainment_of(self, metric: str) -> float:
        """`attainment` for P90 goodput, `worst_class_attainment` for per-class goodput."""
        if metric not in METRICS:
            raise ValueError(f"unknown goodput metric {metric!r}; metrics: {', '.join(METRICS)}")
        return self.attainment if metric == "p90" else self.worst_class_attainment


def length_classes(prompt_lens: Sequence[int], edges: Sequence[int] = CLASS_EDGES, min_share: float = MIN_CLASS_SHARE) -> tuple[int, ...]:
    """The lower bounds of a workload's prompt-length classes: `edges` split the lengths;
    empty classes go, and while some class holds fewer than `min_share` of the prompts the
    smallest joins its shorter neighbour (the shortest class its longer one). A few very
    long prompts thus count with the next shorter class instead of deciding a goodput alone,
    and a workload of short prompts has one class, whose per-class goodput is its P90 goodput."""
    lows = [0, *edges]
    counts = [sum(1 for n in prompt_lens if low <= n < high) for low, high in zip(lows, [*edges, math.inf])]
    classes = [[low, count] for low, count in zip(lows, counts) if count]
    total = max(len(prompt_lens), 1)
    while len(classes) > 1:
        smallest = min(range(len(classes)), key=lambda index: classes[index][1])
        if classes[smallest][1] / total >= min_share:
            break
        into = smallest - 1 if smallest > 0 else 1
        classes[into][1] += classes[smallest][1]
        classes[into][0] = min(classes[into][0], classes[smallest][0])
        del classes[smallest]
    if not classes:
        return (0,)
    classes[0][0] = 0
    return tuple(low for low, _ in classes)


def isolated_prefill(cost: CostModel) -> Callable[[int], float]:
    """Seconds to prefill a prompt alone at the cluster's fastest tp and parallelism: the
    minimum over every (dop, tp), each tp's dops in one vectorised pass (a 256-instance
    cluster has 500 configurations, and a workload as many prompt lengths as requests)."""
    tps = cost.tp_choices()
    fitted = [(dop, tp) for dop, tp in cost.prefill_fits if tp in tps and dop <= len(cost.cluster.instances(tp))]

    @functools.lru_cache(maxsize=65_536)
    def seconds(prompt_len: int) -> float:
        analytical = []
        for tp in tps:
            times = cost.alone_prefill_times(prompt_len, tp)
            for dop, fit_tp in fitted:
                if fit_tp == tp:
                    times[dop - 1] = np.inf  # the fit below stands for it
            analytical.append(float(times.min()))
        return min(analytical + [cost.prefill_time([prompt_len], dop, tp) for dop, tp in fitted])

    return seconds


def meets_slo(record: RequestRecord, slo: SLOSpec, prefill_s: Callable[[int], float]) -> tuple[bool, bool]:
    """(TTFT met, TPOT met) for one request."""
    if not record.completed:
        return False, False
    ttft_s, tpot_s = record.ttft_s, record.tpot_s
    assert ttft_s is not None and tpot_s is not None  # a completed request had its first token
    ttft_met = ttft_s <= slo.ttft.target(prefill_s(record.prompt_len))
    tpot_met = tpot_s <= slo.tpot.target()
    return ttft_met, tpot_met


class TrialJudge:
    """A simulator.RunWatch that stops a goodput trial once it cannot reach `target`: when
    the requests known to miss their SLOs leave some class (all requests for P90 goodput,
    each of `classes` for per-class) below the target even if every other request meets
    them. A request is known to miss when it is refused, when it is still without its
    first token past its TTFT bound, or when it completes late (`meets_slo`). The trial's
    outcome against the target is the full run's (the requests left end unfinished and
    count as misses, so its attainment is at most the full run's), for a fraction of the
    simulation: past its limit a queue, and the scheduler's work per event, only grow."""

    def __init__(
        self, requests: Sequence[Request], slo: SLOSpec, prefill_s: Callable[[int], float], metric: str,
        target: float, classes: Sequence[int] = (0,),
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown goodput metric {metric!r}; metrics: {', '.join(METRICS)}")
        self.slo, self.prefill_s, self.target = slo, prefill_s, target
        self.classes = tuple(classes) if metric == "per-class" else (0,)
        self.sizes = [0] * len(self.classes)
        for request in requests:
            self.sizes[self._class(request.prompt_len)] += 1
        self.misses = [0] * len(self.classes)
        self.refused = [0] * len(self.classes)  # refused at admission: at any rate, for these lengths
        self.missed: set[int] = set()
        self.ttft_s: dict[int, float] = {}  # request id -> its TTFT bound
        self.deadlines: list[tuple[float, int, RequestState]] = []  # (TTFT deadline, id, request), a heap

    def _class(self, prompt_len: int) -> int:
        return bisect.bisect_right(self.classes, prompt_len) - 1

    def _miss(self, request: RequestState) -> None:
        if request.id not in self.missed:
            self.missed.add(request.id)
            self.misses[self._class(request.request.prompt_len)] += 1

    def arrived(self, request: RequestState) -> None:
        bound = self.slo.ttft.target(self.prefill_s(request.request.prompt_len))
        heapq.heappush(self.deadlines, (request.request.arrival_s + bound, request.id, request))
        self.ttft_s[request.id] = bound

    def ended(self, request: RequestState) -> None:
        if request.rejected is not None and request.first_scheduled_s is None:
            self.refused[self._class(request.request.prompt_len)] += 1
        if not all(meets_slo(request_record(request), self.slo, self.prefill_s)):
            self._miss(request)

    def refusals_decide(self) -> bool:
        """Whether the requests refused at admission (for their lengths, whatever the rate)
        alone leave some class below the target."""
        return any(refused and (size - refused) / size < self.target for size, refused in zip(self.sizes, self.refused))

    def stop(self, now: float) -> str | None:
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] < now:
            _, request_id, request = deadlines[0]
            if request.first_token_s is None and not now - request.request.arrival_s > self.ttft_s[request_id]:
                break  # past the deadline by rounding only: not yet known to miss
            heapq.heappop(deadlines)
            if request.first_token_s is None:
                self._miss(request)  # its first token comes after its TTFT bound
        for size, misses in zip(self.sizes, self.misses):
            if misses and (size - misses) / size < self.target:
                return f"the trial stopped: {misses} of {size} requests already missed their SLOs, short of the {self.target:.0%} target"
        return None


def _completed_stats(values: list[float | None]) -> LatencyStats:
    """LatencyStats of one latency of completed requests, which every one of them has: it
    was scheduled, produced its first token (`meets_slo` compares both) and finished."""
    return LatencyStats.of(cast("list[float]", values))


def summarize(
    result: SimulationResult, slo: SLOSpec, prefill_s: Callable[[int], float], classes: Sequence[int] = (0,)
) -> Summary:
    """The run's statistics; `classes` are the lower bounds of its prompt-length classes
    (`length_classes` of the workload) for the per-class attainment."""
    records = result.records
    met = [meets_slo(record, slo, prefill_s) for record in records]
    both = [ttft and tpot for ttft, tpot in met]
    class_met: dict[int, list[bool]] = {}
    for record, ok in zip(records, both):
        class_met.setdefault(classes[bisect.bisect_right(classes, record.prompt_len) - 1], []).append(ok)
    class_attainment = tuple((low, sum(class_met[low]) / len(class_met[low])) for low in classes if low in class_met)
    completed = [r for r in records if r.completed]
    total = max(len(records), 1)
    buckets = []
    for low, high in zip(LENGTH_BUCKETS, LENGTH_BUCKETS[1:] + (math.inf,)):
        inside = [i for i, r in enumerate(records) if low <= r.prompt_len < high]
        if not inside:
            continue
        done = [records[i] for i in inside if records[i].completed]
        buckets.append(
            BucketStats(
                low, high, len(inside), sum(both[i] for i in inside) / len(inside),
                _completed_stats([r.ttft_s for r in done]).p90, _completed_stats([r.e2e_s for r in done]).p90,
            )
        )
    duration = result.duration_s
    return Summary(
        strategy=result.strategy,
        requests=len(records),
        completed=len(completed),
        rejected=sum(1 for r in records if r.rejected is not None),
        duration_s=duration,
        throughput_rps=len(completed) / duration if duration else 0.0,
        output_tokens_per_s=sum(r.output_len for r in completed) / duration if duration else 0.0,
        ttft=_completed_stats([r.ttft_s for r in completed]),
        tpot=_completed_stats([r.tpot_s for r in completed]),
        e2e=_completed_stats([r.e2e_s for r in completed]),
        queueing=_completed_stats([r.queueing_s for r in completed]),
        attainment=sum(both) / total,
        ttft_attainment=sum(t for t, _ in met) / total,
        tpot_attainment=sum(t for _, t in met) / total,
        migrated_bytes=result.migrated_bytes,
        preemptions=sum(r.preemptions for r in records),
        mean_utilisation=float(np.mean(result.utilisation)) if result.utilisation else 0.0,
        buckets=tuple(buckets),
        class_attainment=class_attainment,
    )


@dataclass(frozen=True)
class Goodput:
    """The highest rate meeting the attainment target, and every rate tried on the way."""

    rate: float
    target: float
    trials: tuple[tuple[float, float], ...]  # (rate, attainment)


def find_goodput(
    attainment_at: Callable[[float], float],
    target: float,
    start_rate: float,
    relative_tolerance: float = 0.03,
    max_doublings: int = 24,
    confirm: float = CONFIRM_FRACTION,
    hopeless_below: Callable[[float], bool] | None = None,
) -> Goodput:
    """Bisection over the arrival rate for the highest rate meeting `target`.

    Brackets the answer by doubling (or halving) from `start_rate`, then bisects until the
    bracket is narrower than `relative_tolerance`. Attainment is not monotone in the rate
    (a trial's requests change with it), so a rate is reported only when `confirm` × it
    meets the target too: a lucky rate above a failing one is no goodput, and the search
    goes on below the failure. 0 when even the lowest rate tried fails, or at once when
    `hopeless_below(rate)` says after a failure at `rate` that no lower rate can meet it.
    """
    trials: list[tuple[float, float]] = []
    measured: dict[float, bool] = {}

    def meets(rate: float) -> bool:
        if rate not in measured:
            attainment = attainment_at(rate)
            trials.append((rate, attainment))
            measured[rate] = attainment >= target
        return measured[rate]

    low = high = start_rate
    if meets(start_rate):
        for _ in range(max_doublings):
            high *= 2
            if not meets(high):
                break
            low = high
        else:
            return Goodput(low, target, tuple(trials))
    while True:
        if not meets(low):  # find a rate that meets the target below the failing `high`
            for _ in range(max_doublings):
                if hopeless_below is not None and hopeless_below(low):
                    return Goodput(0.0, target, tuple(trials))
                high = low
                low /= 2
                if meets(low):
                    break
            else:
                return Goodput(0.0, target, tuple(trials))
        while high / low - 1 > relative_tolerance:
            middle = math.sqrt(low * high)
            if meets(middle):
                low = middle
            else:
                high = middle
        if meets(low * confirm):
            return Goodput(low, target, tuple(trials))
        high = low * confirm
        low = high
