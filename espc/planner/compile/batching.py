"""The elastic scheduler's batching step: an exact dynamic program over requests × instances.

Given the prompts chosen for this iteration's prefill and `instances` free instances,
split the prompts into batches and give each batch a degree of parallelism (its number of
instances), minimising

    Σ_batches  T(batch, dop) · (requests in the batch + instance_weight · dop)

T is the cost model's prefill time. The first term is the requests' summed time to first
token contributed by this iteration; the second charges the instances a batch holds, at
`instance_weight` requests' worth of waiting each, so that short prompts do not grab every
free instance for a few percent of speed-up while other work could use them (the policy
compiler sets the weight from the expected load; 0 means pure latency).

Search space, as in LoongServe: a batch is a run of consecutive prompts in length order
(mixing a short prompt into a long prompt's batch makes it wait for the long one), its dop
is at most the cap of its longest prompt's length bucket, its prompt tokens fit the
token budget of that bucket (a batch of one prompt always fits) and the KV slots of its
instances. The batches together use at most `instances` instances.

The DP is exact over that space: dp[j][i] is the best cost of batching the i shortest
prompts on at most j instances, and every (last batch start, dop) pair is considered — no
pruning (the released LoongServe DP prunes and collapses every plan to one batch on all
instances; see anchors/README.md). Batch times come from one vectorised prefix-sum pass
per dop over the batches within budget (`CostModel.prefill_segment_times`), and each row
dp[j] is an array step per dop over all of them, so a decision over 256 prompts × 8
instances takes about 2 ms. `brute_force_batches` enumerates the same space exhaustively
and is what the tests check the DP against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PrefillCost = Callable[[Sequence[int], int], float]
"""prefill seconds of a batch of prompt lengths at a dop."""
SegmentCosts = Callable[[Sequence[int], int, np.ndarray, np.ndarray], np.ndarray]
"""(lengths, dop, starts, ends) → [p] = prefill seconds of lengths[starts[p]:ends[p]] at the
dop (see CostModel.prefill_segment_times)."""


@dataclass(frozen=True)
class BatchingProblem:
    """Prompt lengths in ascending order, with each prompt's dop cap and token budget
    (those of its length bucket; monotone caps are not required)."""

    lengths: tuple[int, ...]
    max_dop: tuple[int, ...]
    token_budget: tuple[int, ...]
    instances: int
    instance_weight: float = 0.0
    # ring_slots[d - 1]: the most KV slots d instances can give a batch's prompts (the
    # d roomiest instances' free slots; None: unlimited).
    ring_slots: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.lengths)
        if len(self.max_dop) != n or len(self.token_budget) != n:
            raise ValueError(f"lengths, max_dop and token_budget differ in size: {n}, {len(self.max_dop)}, {len(self.token_budget)}")
        if any(a > b for a, b in itertools.pairwise(self.lengths)):
            raise ValueError("lengths must be in ascending order")
        if self.instances < 0 or self.instance_weight < 0:
            raise ValueError(f"instances({self.instances}) and instance_weight({self.instance_weight}) must be ≥ 0")
        if any(cap < 1 for cap in self.max_dop):
            raise ValueError("every max_dop must be ≥ 1")
        if self.ring_slots is not None and len(self.ring_slots) < min(self.instances, max(self.max_dop, default=0)):
            raise ValueError(f"ring_slots has {len(self.ring_slots)} entries for up to {self.instances} instances")

    def fits(self, first: int, end: int) -> bool:
        """Whether prompts [first, end) may form one batch (the token budget)."""
        return end - first == 1 or sum(self.lengths[first:end]) <= self.token_budget[end - 1]

    def holds(self, first: int, end: int, dop: int) -> bool:
        """Whether `dop` instances have the KV slots for prompts [first, end)."""
        return self.ring_slots is None or sum(self.lengths[first:end]) <= self.ring_slots[dop - 1]


@dataclass(frozen=True)
class Batching:
    """Batches as (first, end, dop) over the problem's prompt indices, and the objective."""

    batches: tuple[tuple[int, int, int], ...]
    cost: float

    @property
    def instances_used(self) -> int:
        return sum(dop for _, _, dop in self.batches)


def optimal_batches(problem: BatchingProblem, segment_costs: SegmentCosts) -> Batching | None:
    """The DP of the module docstring; None when no batching fits the instances."""
    n, m = len(problem.lengths), problem.instances
    if n == 0:
        return Batching((), 0.0)
    if m == 0:
        return None
    if n == 1:
        return _one_batch(problem, segment_costs)
    starts, ends, offsets = _candidate_batches(problem)
    top_dop = min(m, max(problem.max_dop))
    lengths = np.asarray(problem.lengths, dtype=float)
    prefix = np.concatenate(([0.0], np.cumsum(lengths)))
    tokens = prefix[ends] - prefix[starts]
    sizes = (ends - starts).astype(float)
    caps = np.asarray(problem.max_dop)[ends - 1]
    # batch_cost[d - 1, p]: objective of candidate batch p at dop d (inf when not allowed).
    batch_cost = np.empty((top_dop, len(starts)))
    for dop in range(1, top_dop + 1):
        usable = caps >= dop
        if problem.ring_slots is not None:
            usable &= tokens <= problem.ring_slots[dop - 1]
        batch_cost[dop - 1] = segment_costs(problem.lengths, dop, starts, ends) * (sizes + problem.instance_weight * dop)
        batch_cost[dop - 1, ~usable] = np.inf

    # best[j, i]: optimum for the i shortest prompts on at most j instances. A row is an
    # array step per dop over every candidate batch: best[j - d, start] + its cost.
    best = np.full((m + 1, n + 1), np.inf)
    best[:, 0] = 0.0
    for j in range(1, m + 1):
        totals = best[j - 1][starts] + batch_cost[0]  # (row, then 1-d gather: 3× faster than [j - 1, starts])
        for dop in range(2, min(j, top_dop) + 1):
            np.minimum(totals, best[j - dop][starts] + batch_cost[dop - 1], out=totals)
        best[j, 1:] = np.minimum(best[j - 1, 1:], np.minimum.reduceat(totals, offsets[:-1]))

    j = int(np.argmin(best[:, n]))  # the fewest instances that reach the optimum
    if not math.isfinite(best[j, n]):
        return None
    total = float(best[j, n])
    batches = []
    i = n
    while i > 0:
        # The last batch: a (start, dop) whose total is best[j, i] (smallest start, then dop);
        # none when fewer instances reach the same optimum.
        group = slice(offsets[i - 1], offsets[i])
        dops = min(j, top_dop)
        before = best[j - dops : j][::-1]
        totals = before[:, starts[group]] + batch_cost[:dops, group]  # [d - 1, p]
        hits = np.argwhere(totals.T == best[j, i])
        if len(hits) == 0:
            j -= 1
            continue
        position, dop = int(hits[0, 0]), int(hits[0, 1]) + 1
        start = int(starts[group][position])
        batches.append((start, i, dop))
        i, j = start, j - dop
    return Batching(tuple(reversed(batches)), total)


def _one_batch(problem: BatchingProblem, segment_costs: SegmentCosts) -> Batching | None:
    """The DP's answer for one prompt, without its tables (nine decisions in ten batch one
    prompt): the dop of the lowest cost, the fewest instances among equal costs — the same
    products of the same segment times, so the same floats and the same tie-break."""
    (length,) = problem.lengths
    starts, ends = np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)
    best: Batching | None = None
    for dop in range(1, min(problem.instances, problem.max_dop[0]) + 1):
        if problem.ring_slots is not None and length > problem.ring_slots[dop - 1]:
            continue
        cost = float(segment_costs(problem.lengths, dop, starts, ends)[0] * (1.0 + problem.instance_weight * dop))
        if best is None or cost < best.cost:
            best = Batching(((0, 1, dop),), cost)
    return best if best is not None and math.isfinite(best.cost) else None


def _candidate_batches(problem: BatchingProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every batch within its token budget as (starts, ends) over prompt indices, grouped by
    end (1..n) with starts ascending: end i's batches are [offsets[i - 1], offsets[i]).
    Lengths ascend, so a binary search over the prefix sums bounds each end's starts."""
    n = len(problem.lengths)
    prefix = np.concatenate(([0], np.cumsum(problem.lengths, dtype=np.int64)))
    ends = np.arange(1, n + 1)
    firsts = np.searchsorted(prefix, prefix[1:] - np.asarray(problem.token_budget, dtype=np.int64), side="left")
    firsts = np.minimum(firsts, ends - 1)  # a batch of one prompt always fits
    counts = ends - firsts
    offsets = np.concatenate(([0], np.cumsum(counts)))
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
    return np.repeat(firsts, counts) + within, np.repeat(ends, counts), offsets


def brute_force_batches(problem: BatchingProblem, prefill_cost: PrefillCost) -> Batching | None:
    """Every split of the length-sorted prompts into runs × every dop per run: the reference
    the DP is tested against (exponential; small problems only)."""
    n = len(problem.lengths)
    if n == 0:
        return Batching((), 0.0)
    best: Batching | None = None
    for cut_mask in range(1 << (n - 1)):
        cuts = [0] + [b + 1 for b in range(n - 1) if cut_mask >> b & 1] + [n]
        runs = list(itertools.pairwise(cuts))
        if not all(problem.fits(first, end) for first, end in runs):
            continue
        ranges = [range(1, min(problem.max_dop[end - 1], problem.instances) + 1) for _, end in runs]
        for dops in itertools.product(*ranges):
            if sum(dops) > problem.instances:
                continue
            if not all(problem.holds(first, end, dop) for (first, end), dop in zip(runs, dops)):
                continue
            total = sum(
                prefill_cost(problem.lengths[first:end], dop) * (end - first + problem.instance_weight * dop)
                for (first, end), dop in zip(runs, dops)
            )
            if best is None or total < best.cost:
                best = Batching(tuple((first, end, dop) for (first, end), dop in zip(runs, dops)), total)
    return best
