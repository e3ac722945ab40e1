"""`espc profile`: measure iterations on the spec's CPU workers and calibrate the cost model.

The workers are the backend's gloo harness (`espc.backend.harness`): one process per
instance, the spec's model (random weights of its shapes: values do not change the time),
the spec's dtype and attention kernel, the runtime's default of one torch thread per worker.
A grid point's time is what a worker reports for one iteration: lowering (cached), its graph
inputs and the graph, the slowest rank of the batch. Every shape runs once untimed first (it
builds the graphs of a new role and warms the allocator), then `repeats` times; the median
counts. Grid, per dop from 1 to the number of instances:

- prefill: single prompts of several lengths and a few batches of equal prompts;
- decode: batch sizes × context lengths, each request's KV retained evenly over the group
  and one master per request, round robin (every request spans the whole group, as the cost
  model assumes); the contexts are prefilled untimed first;
- migration: a request's first tokens moved from instance 0 to 1 (and back, untimed), with
  more repeats than the rest (they are short and cheap);
- the runtime's own time per iteration (`measure_dispatch`), through a real Engine against
  the grid's fit: the fits add it, so the simulator charges what a runtime iteration lasts.

`espc.planner.sim.calibration.fit` fits the cost model on the medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from espc.backend.harness import Harness, RankResult
from espc.frontend.spec import Spec
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    TokenRange,
    even_retention,
)
from espc.planner.sim.calibration import Calibration, Measurement, fit
from espc.planner.sim.costmodel import CostModel

Progress = Callable[[int, int, str], None]
"""on_progress(grid points done, grid points in all, the point being measured)."""

SETUP_PREFILL_TOKENS = 1024
"""Tokens per untimed prefill that fills decode contexts: the torch attention kernel is
dense over a batch, so one big batch would cost (Σ tokens)² instead of Σ tokens²."""
THREADS = 1  # torch threads per worker: the runtime's default (EngineOptions.threads)
MIGRATION_REPEATS = 4  # × repeats: see _Session.time_migrations


@dataclass(frozen=True)
class Grid:
    """The shapes measured at every dop."""

    prefill: tuple[tuple[int, ...], ...]  # batches: the prompt length of each request
    decode: tuple[tuple[int, tuple[int, ...]], ...]  # (context per request, batch sizes)
    migration: tuple[int, ...]  # tokens moved

    @classmethod
    def full(cls, spec: Spec) -> Grid:
        """Lengths up to half the model's context, at most 2048 tokens, so that the grid takes
        under a minute on the tiny spec: a dense prefill of 4096 tokens alone takes seconds."""
        top = min(spec.model.max_context // 2, 2048)
        singles = [n for n in (16, 64, 256, 1024) if n < top] + [top]
        batches = [(top // 8,) * 4, (top // 16,) * 8, (top // 32,) * 4]
        return cls(
            prefill=tuple((n,) for n in singles) + tuple(b for b in batches if b[0] >= 1),
            # Σ context ≤ 4 × top per step: the decode kernel is dense over the batch too.
            decode=tuple((c, tuple(b for b in (1, 4, 16) if b * c <= 4 * top)) for c in (top // 32, top // 4, top) if c >= 1),
            migration=(16, top // 8, top),
        )

    @classmethod
    def quick(cls, spec: Spec) -> Grid:
        """A few seconds of measuring: for tests and CI, not for planning."""
        top = min(spec.model.max_context // 2, 512)
        return cls(
            prefill=((16,), (top // 4,), (top,), (top // 8,) * 4),
            decode=((top // 16, (1, 4)), (top // 2, (1, 4))),
            migration=(16, min(spec.model.max_context // 2, 2048)),  # large enough to see the bandwidth
        )

    def points(self, instances: int) -> int:
        """Grid points measured on `instances` workers (dop 1 to instances)."""
        per_dop = len(self.prefill) + sum(len(batches) for _, batches in self.decode)
        return instances * per_dop + len(self.migrations(instances))

    def migrations(self, instances: int) -> tuple[int, ...]:
        return self.migration if instances > 1 else ()  # a single instance never migrates

    def slots(self, repeats: int) -> int:
        """KV slots one worker needs at most: the phases free their requests before the next."""
        steps = (1 + repeats) * max(len(batches) for _, batches in self.decode)
        decode = max(max(batches) * (context + steps) for context, batches in self.decode)
        return max(max(sum(batch) for batch in self.prefill), decode, max(self.migration))


class ProfileError(ValueError):
    """A spec `espc profile` cannot measure (yet)."""


def profile(spec: Spec, *, grid: Grid | None = None, repeats: int = 3, on_progress: Progress | None = None) -> Calibration:
    """Measure `grid` (default `Grid.full`) on the spec's workers and fit the cost model."""
    cluster = spec.cluster
    if cluster.device_kind != "cpu":
        raise ProfileError(f"espc profile measures CPU workers only for now; the spec's cluster has {cluster.device_kind} devices")
    if cluster.tp not in (None, 1):
        raise ProfileError(f"espc profile measures instances of tp = 1 only for now; the spec sets cluster.tp = {cluster.tp}")
    if len(cluster.nodes) > 1:
        raise ProfileError(
            f"espc profile runs every worker on this machine, so it cannot measure the {len(cluster.nodes)} nodes' network; "
            f"profile a single-node spec"
        )
    if repeats < 1:
        raise ProfileError(f"repeats must be ≥ 1, got {repeats}")
    grid = grid or Grid.full(spec)
    world = len(cluster.instances(1))
    total = grid.points(world)
    measurements: list[Measurement] = []

    def record(phase: str, dop: int, lengths: Sequence[int], samples: Sequence[float]) -> None:
        measurements.append(Measurement(phase, dop, tuple(lengths), tuple(samples)))

    def progress(what: str) -> None:
        if on_progress is not None:
            on_progress(len(measurements), total, what)

    dtype = getattr(torch, spec.model.dtype)  # the spec's dtype names are torch's
    with Harness(
        spec.model, world, slots=grid.slots(repeats), page_size=spec.runtime.kv_block_size, dtype=dtype,
        attention=spec.runtime.attention, threads=THREADS,
    ) as harness:
        session = _Session(harness)
        for dop in range(1, world + 1):
            ring = tuple(range(dop))
            for lengths in grid.prefill:
                progress(f"prefill dop {dop}: {'+'.join(map(str, lengths))} tokens")
                record("prefill", dop, lengths, session.time_prefill(ring, lengths, repeats))
            for context, batches in grid.decode:
                progress(f"decode dop {dop}: context {context}")
                for contexts, samples in session.time_decode(ring, context, batches, repeats):
                    record("decode", dop, contexts, samples)
        if grid.migrations(world):
            progress("migration")
            for tokens, samples in session.time_migrations(grid.migrations(world), repeats):
                record("migration", 2, (tokens,), samples)
    progress("runtime dispatch")
    conditions: dict[str, Any] = {"attention": spec.runtime.attention, "dtype": spec.model.dtype, "threads": THREADS, "world": world}
    workers_only = fit(spec, measurements, conditions)
    conditions["dispatch_s"] = measure_dispatch(spec, workers_only.cost, repeats)
    progress("fitting")
    return fit(spec, measurements, conditions)


DISPATCH_PROMPTS = (16, 64, 256)
DISPATCH_TOKENS = 16


def measure_dispatch(spec: Spec, workers_only: CostModel, repeats: int) -> dict[str, float]:
    """Seconds a runtime iteration lasts beyond what the grid measured on the workers, per
    phase: the driver computing inputs, the command and result queues, its loop taking the
    next step, and whatever else differs between a worker of the engine and of the grid.
    Measured through a real Engine (one instance per request, requests one after another,
    so nothing queues) against `workers_only`, the cost model fitted on the grid alone:
    decode, the median period between a request's successive steps minus the predicted
    step; prefill, the median batch time plus the gap before that instance's next batch
    minus the predicted prefill. The fits add these, so the simulator charges what a
    runtime iteration lasts."""
    from espc.planner.sim.strategies import Deployment, StaticScheduler
    from espc.runtime.engine import Engine
    from espc.runtime.sampling import SamplingParams

    world = len(spec.cluster.instances(1))
    deployment = Deployment.build(CostModel.from_spec(spec), 1, max(DISPATCH_PROMPTS) + DISPATCH_TOKENS + 1)
    with Engine(spec, scheduler=StaticScheduler(deployment, (1,) * world), threads=THREADS) as engine:
        for _ in range(1 + repeats):  # the first round builds the graphs
            for length in DISPATCH_PROMPTS:
                engine.generate([[0] * length], SamplingParams(max_new_tokens=DISPATCH_TOKENS))
        costs = engine.batch_costs()[len(DISPATCH_PROMPTS) * DISPATCH_TOKENS:]
    by_instance: dict[int, list] = {}
    for cost in costs:
        by_instance.setdefault(cost.instances[0], []).append(cost)
    decode_extra, prefill_extra = [], []
    for batches in by_instance.values():
        for before, after in zip(batches, batches[1:]):
            period = after.start_s - before.start_s
            if before.phase == "decode" and after.phase == "decode":
                decode_extra.append(period - workers_only.decode_time(before.lengths, 1, 1))
            elif before.phase == "prefill":
                prefill_extra.append(period - workers_only.prefill_time(before.lengths, 1, 1))
    return {"prefill": max(0.0, statistics.median(prefill_extra)), "decode": max(0.0, statistics.median(decode_extra))}


class _Session:
    """Plans on the harness with fresh request ids; every request is freed before the next shape."""

    def __init__(self, harness: Harness):
        self.harness = harness
        self.iteration = 0
        self.next_request = 0

    def requests(self, count: int) -> list[int]:
        self.next_request += count
        return list(range(self.next_request - count, self.next_request))

    def run(self, batches=(), migrations=(), frees=(), tokens=None) -> list[RankResult]:
        self.iteration += 1
        return self.harness.run(IterationPlan(self.iteration, tuple(batches), tuple(migrations), tuple(frees)), tokens)

    def prefill(self, ring: tuple[int, ...], lengths: dict[int, int]) -> list[RankResult]:
        """One prefill of `lengths` (request → tokens), retained evenly over the ring."""
        items = tuple(PrefillItem(request, 0, n, even_retention(0, n, ring)) for request, n in lengths.items())
        # Token ids do not change the time: zeros.
        return self.run([PrefillBatch(ring, items)], tokens={r: torch.zeros(n, dtype=torch.long) for r, n in lengths.items()})

    def time_prefill(self, ring: tuple[int, ...], lengths: Sequence[int], repeats: int) -> list[float]:
        samples = []
        for attempt in range(1 + repeats):  # the first is the warm-up
            requests = self.requests(len(lengths))
            results = self.prefill(ring, dict(zip(requests, lengths)))
            self.run(frees=requests)
            if attempt:
                samples.append(_slowest(results, ring))
        return samples

    def time_decode(
        self, ring: tuple[int, ...], context: int, batches: Sequence[int], repeats: int
    ) -> list[tuple[list[int], list[float]]]:
        """(contexts of its first timed step, samples) per batch size. The
        batches take the first requests of one set, prefilled once (untimed); every step
        appends a token to each request of the batch."""
        requests = self.requests(max(batches))
        per_prefill = max(1, SETUP_PREFILL_TOKENS // context)
        held: dict[int, dict[int, int]] = {}  # request → instance → tokens
        for start in range(0, len(requests), per_prefill):
            chunk = requests[start:start + per_prefill]
            held |= _held(self.prefill(ring, dict.fromkeys(chunk, context)), chunk, ring)
        lengths = dict.fromkeys(requests, context)
        timed = []
        for batch in batches:
            members = requests[:batch]
            contexts = [lengths[r] for r in members]
            samples = []
            for attempt in range(1 + repeats):
                items = tuple(
                    DecodeItem(r, ring[k % len(ring)], tuple((i, held[r][i]) for i in ring)) for k, r in enumerate(members)
                )
                results = self.run([DecodeBatch(ring, items)], tokens={r: torch.zeros(1, dtype=torch.long) for r in members})
                held |= _held(results, members, ring)
                for r in members:
                    lengths[r] += 1
                if attempt:
                    samples.append(_slowest(results, ring))
            timed.append((contexts, samples))
        self.run(frees=requests)
        return timed

    def time_migrations(self, sizes: Sequence[int], repeats: int) -> list[tuple[int, list[float]]]:
        """(tokens, samples) per size: the first tokens of one request, prefilled on
        instance 0, move to instance 1 (timed) and back (untimed; the warm-up round builds
        both directions' graphs). A migration lasts about a millisecond, close to the noise
        of a shared machine, and costs little: MIGRATION_REPEATS × `repeats` rounds, each
        over every size, so that a slow spell does not fall on one size only."""
        (request,) = self.requests(1)
        self.prefill((0,), {request: max(sizes)})
        samples: dict[int, list[float]] = {tokens: [] for tokens in sizes}
        for attempt in range(1 + MIGRATION_REPEATS * repeats):
            for tokens in sizes:
                results = self.run(migrations=[Migration(request, 0, 1, TokenRange(0, tokens))])
                self.run(migrations=[Migration(request, 1, 0, TokenRange(0, tokens))])
                if attempt:
                    samples[tokens].append(_slowest(results, (0, 1)))
        self.run(frees=[request])
        return list(samples.items())

def _slowest(results: list[RankResult], ranks: Sequence[int]) -> float:
    """An iteration lasts until its slowest rank is done."""
    return max(results[rank].seconds for rank in ranks)


def _held(results: list[RankResult], requests: Sequence[int], ring: tuple[int, ...]) -> dict[int, dict[int, int]]:
    """Tokens each instance of the ring holds of each request after an iteration."""
    return {r: {i: sum(map(len, results[i].held.get(r, ()))) for i in ring} for r in requests}

