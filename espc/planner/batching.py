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

The DP is exact over that space: dp[i][j] is the best cost of batching the i shortest
prompts on at most j instances, and every (last batch start, dop) pair is considered — no
pruning (the released LoongServe DP prunes and collapses every plan to one batch on all
instances; see anchors/README.md). Batch times come from one vectorised prefix-sum pass
per dop (`CostModel.prefill_segment_times`), so a decision over 256 prompts × 8 instances
takes a few milliseconds. `brute_force_batches` enumerates the same space exhaustively and
is what the tests check the DP against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PrefillCost = Callable[[Sequence[int], int], float]
"""prefill seconds of a batch of prompt lengths at a dop."""
SegmentCosts = Callable[[Sequence[int], int], np.ndarray]
"""[k, i] = prefill seconds of lengths[k:i] at a dop (see CostModel.prefill_segment_times)."""


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
    lengths = np.asarray(problem.lengths, dtype=float)
    prefix = np.concatenate(([0.0], np.cumsum(lengths)))
    top_dop = min(m, max(problem.max_dop))
    # cost[d - 1, k, i]: objective of the batch lengths[k:i] at dop d (inf when not allowed).
    cost = np.full((top_dop, n + 1, n + 1), np.inf)
    ends = np.arange(n + 1)
    size = ends[None, :] - ends[:, None]
    tokens = prefix[None, :] - prefix[:, None]
    budget = np.concatenate(([0], problem.token_budget))[None, :]
    allowed = (size == 1) | ((size > 1) & (tokens <= budget))
    caps = np.concatenate(([0], problem.max_dop))[None, :]
    for dop in range(1, top_dop + 1):
        seconds = segment_costs(problem.lengths, dop)
        usable = allowed & (caps >= dop)
        if problem.ring_slots is not None:
            usable &= tokens <= problem.ring_slots[dop - 1]
        cost[dop - 1] = np.where(usable, seconds * (size + problem.instance_weight * dop), np.inf)

    # best[i, j]: optimum for the i shortest prompts on at most j instances. shifted[j, k, d - 1]
    # holds best[k, j - d] so that each step is one array operation over (j, k, d).
    best = np.full((n + 1, m + 1), np.inf)
    best[0, :] = 0.0
    shifted = np.full((m + 1, n + 1, top_dop), np.inf)
    choice = np.zeros((n + 1, m + 1, 2), dtype=np.int64)  # (k, d) of the last batch
    dops = np.arange(1, top_dop + 1)
    js = np.arange(m + 1)
    source = js[:, None] - dops[None, :]  # (j, d): the instances left before the batch
    reachable = source >= 0
    source = np.clip(source, 0, m)
    by_end = np.ascontiguousarray(cost.transpose(2, 1, 0))  # [i, k, d - 1]

    def fill_shifted(k: int) -> None:
        shifted[:, k, :] = np.where(reachable, best[k][source], np.inf)

    fill_shifted(0)
    # Only starts whose batch fits the budget can be finite; a binary search bounds them.
    firsts = np.searchsorted(prefix, prefix[1:] - np.asarray(problem.token_budget, dtype=float), side="left")
    for i in range(1, n + 1):
        first = min(int(firsts[i - 1]), i - 1)
        flat = (shifted[:, first:i, :] + by_end[i, first:i][None, :, :]).reshape(m + 1, -1)  # (j, k·d)
        position = np.argmin(flat, axis=1)
        best[i] = flat[js, position]
        choice[i, :, 0] = first + position // top_dop
        choice[i, :, 1] = position % top_dop + 1
        fill_shifted(i)

    j = int(np.argmin(best[n]))
    if not math.isfinite(best[n, j]):
        return None
    total = float(best[n, j])
    batches = []
    i = n
    while i > 0:
        k, dop = (int(x) for x in choice[i, j])
        batches.append((k, i, dop))
        i, j = k, j - dop
    return Batching(tuple(reversed(batches)), total)


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
