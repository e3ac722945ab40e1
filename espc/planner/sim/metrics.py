"""Latency statistics, SLO attainment and goodput of simulated (or measured) runs.

A request meets its SLOs when it completed, its TTFT is within `slo.ttft.target(isolated
prefill time)` and its TPOT within `slo.tpot.target()`; rejected and unfinished requests
meet neither. Attainment is the share of *all* requests that meet both, and P90 goodput
(LoongServe's and DistServe's measure) is the highest arrival rate whose attainment is at
least `slo.attainment`, found by bisection over the rate.

The isolated prefill time of a prompt — what a TTFT bound like `max(25x prefill, 15s)`
scales — is the fastest the cluster can prefill that prompt alone: the minimum over every
tp and degree of parallelism it offers. It is the same for every strategy, so all of them
are held to the same bounds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from espc.frontend.spec import SLOSpec
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.simulator import RequestRecord, SimulationResult

# Prompt-length buckets for the per-length table: where long requests starve shows up.
LENGTH_BUCKETS = (0, 1_024, 8_192, 32_768, 131_072, 524_288)


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
    high: int
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
    ttft_met = record.ttft_s <= slo.ttft.target(prefill_s(record.prompt_len))
    tpot_met = record.tpot_s <= slo.tpot.target()
    return ttft_met, tpot_met


def summarize(result: SimulationResult, slo: SLOSpec, prefill_s: Callable[[int], float]) -> Summary:
    records = result.records
    met = [meets_slo(record, slo, prefill_s) for record in records]
    both = [ttft and tpot for ttft, tpot in met]
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
                LatencyStats.of([r.ttft_s for r in done]).p90, LatencyStats.of([r.e2e_s for r in done]).p90,
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
        ttft=LatencyStats.of([r.ttft_s for r in completed]),
        tpot=LatencyStats.of([r.tpot_s for r in completed]),
        e2e=LatencyStats.of([r.e2e_s for r in completed]),
        queueing=LatencyStats.of([r.queueing_s for r in completed]),
        attainment=sum(both) / total,
        ttft_attainment=sum(t for t, _ in met) / total,
        tpot_attainment=sum(t for _, t in met) / total,
        migrated_bytes=result.migrated_bytes,
        preemptions=sum(r.preemptions for r in records),
        mean_utilisation=float(np.mean(result.utilisation)) if result.utilisation else 0.0,
        buckets=tuple(buckets),
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
) -> Goodput:
    """Bisection over the arrival rate, assuming attainment does not grow with the rate.

    Brackets the answer by doubling (or halving) from `start_rate`, then bisects until the
    bracket is narrower than `relative_tolerance`. 0 when even the lowest rate tried fails.
    """
    trials: list[tuple[float, float]] = []

    def meets(rate: float) -> bool:
        attainment = attainment_at(rate)
        trials.append((rate, attainment))
        return attainment >= target

    low = high = start_rate
    if meets(start_rate):
        for _ in range(max_doublings):
            high *= 2
            if not meets(high):
                break
            low = high
        else:
            return Goodput(low, target, tuple(trials))
    else:
        for _ in range(max_doublings):
            low /= 2
            if meets(low):
                break
            high = low
        else:
            return Goodput(0.0, target, tuple(trials))
    while high / low - 1 > relative_tolerance:
        middle = math.sqrt(low * high)
        if meets(middle):
            low = middle
        else:
            high = middle
    return Goodput(low, target, tuple(trials))
