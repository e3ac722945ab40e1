"""`espc profile`: measure iterations on the spec's CPU workers and calibrate the cost model.

The workers are the backend's gloo harness (`espc.backend.harness`): one process per
instance, the spec's model (random weights of its shapes: values do not change the time),
the spec's dtype and attention kernel, the runtime's default of one torch thread per worker.
A grid point's time is what a worker reports for one iteration: lowering (cached), its graph
inputs and the graph, the slowest rank of the batch. Every shape runs once untimed first (it
builds the graphs of a new role and warms the allocator), then `repeats` times; the median
counts. Grid, per dop from 1 to the number of instances:

- prefill: single prompts of several lengths and a few batches of equal prompts; prompts
  (and decode contexts) longer than the rest at the dops whose KV holds them (`Grid.long`);
- decode: batch sizes × context lengths, each request's KV retained evenly over the group
  and one master per request, round robin (every request spans the whole group, as the cost
  model assumes); the contexts are prefilled untimed first;
- migration: a request's first tokens moved from instance 0 to 1 (and back, untimed), with
  more repeats than the rest (they are short and cheap);
- through a real Engine at every dop (`measure_runtime`): the runtime's own time per
  iteration against the grid's fit (the fits add it, so the simulator charges what a
  runtime iteration lasts), and its contention: how much longer its iterations last while
  0, 1, … other instances decode requests of their own. Where the workers share fewer
  cores than there are of them, a batch runs slower while other instances run, a group
  whose ranks wait on each other slower still, and the one driver that feeds them all
  takes longer to come back to each.

`espc.planner.sim.calibration.fit` fits the cost model on the medians.
"""

from __future__ import annotations

import os
import statistics
import threading
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
LONG_DECODE_ROOM = 64  # KV slots a long context keeps free to decode into (Grid.long_at)


@dataclass(frozen=True)
class Grid:
    """The shapes measured at every dop."""

    prefill: tuple[tuple[int, ...], ...]  # batches: the prompt length of each request
    decode: tuple[tuple[int, tuple[int, ...]], ...]  # (context per request, batch sizes)
    migration: tuple[int, ...]  # tokens moved
    long: tuple[int, ...] = ()  # single prompts, and decode contexts of one request, at the dops that hold them

    @classmethod
    def full(cls, spec: Spec) -> Grid:
        """Lengths up to half the model's context, at most 2048 tokens, at every dop; longer
        prompts and contexts (up to the model's context) at the dops whose KV holds them,
        where long prompts run: a policy spreads a prompt that one instance cannot hold, and
        its time is not extrapolated from short ones. About a minute on the tiny spec."""
        top = min(spec.model.max_context // 2, 2048)
        singles = [n for n in (16, 64, 256, 1024) if n < top] + [top]
        batches = [(top // 8,) * 4, (top // 16,) * 8, (top // 32,) * 4]
        return cls(
            prefill=tuple((n,) for n in singles) + tuple(b for b in batches if b[0] >= 1),
            # Σ context ≤ 4 × top per step: the decode kernel is dense over the batch too.
            decode=tuple((c, tuple(b for b in (1, 4, 16) if b * c <= 4 * top)) for c in (top // 32, top // 4, top) if c >= 1),
            migration=(16, top // 8, top),
            long=tuple(n for n in (2 * top, 3 * top, 4 * top) if n <= spec.model.max_context),
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

    def points(self, instances: int, capacity: int) -> int:
        """Grid points measured on `instances` workers (dop 1 to instances) of `capacity` KV slots."""
        per_dop = len(self.prefill) + sum(len(batches) for _, batches in self.decode)
        long = sum(2 * len(self.long_at(dop, capacity)) for dop in range(1, instances + 1))
        return instances * per_dop + long + len(self.migrations(instances))

    def long_at(self, dop: int, capacity: int) -> tuple[int, ...]:
        """The long lengths `dop` instances of `capacity` KV slots hold (with room to decode)."""
        return tuple(n for n in self.long if n + LONG_DECODE_ROOM <= dop * capacity)

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
    capacity = CostModel.from_spec(spec).kv_capacity_tokens(1)  # each worker's KV slots in the runtime
    total = grid.points(world, capacity)
    measurements: list[Measurement] = []

    def record(phase: str, dop: int, lengths: Sequence[int], samples: Sequence[float]) -> None:
        measurements.append(Measurement(phase, dop, tuple(lengths), tuple(samples)))

    def progress(what: str) -> None:
        if on_progress is not None:
            on_progress(len(measurements), total, what)

    dtype = getattr(torch, spec.model.dtype)  # the spec's dtype names are torch's
    with Harness(
        spec.model, world, slots=max(grid.slots(repeats), capacity if grid.long else 0), page_size=spec.runtime.kv_block_size, dtype=dtype,
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
            for length in grid.long_at(dop, capacity):
                progress(f"prefill and decode dop {dop}: {length} tokens")
                record("prefill", dop, (length,), session.time_prefill(ring, (length,), repeats))
                for contexts, samples in session.time_decode(ring, length, (1,), repeats):
                    record("decode", dop, contexts, samples)
        if grid.migrations(world):
            progress("migration")
            for tokens, samples in session.time_migrations(grid.migrations(world), repeats):
                record("migration", 2, (tokens,), samples)
    progress("runtime dispatch and contention")
    conditions: dict[str, Any] = {
        "attention": spec.runtime.attention, "dtype": spec.model.dtype, "threads": THREADS, "world": world,
        "cores": len(os.sched_getaffinity(0)),
    }
    workers_only = fit(spec, measurements, conditions)
    conditions["dispatch_s"], conditions["contention"], conditions["admission_s"] = measure_runtime(
        spec, workers_only.cost, repeats
    )
    progress("fitting")
    return fit(spec, measurements, conditions)


DISPATCH_PROMPTS = (16, 64, 256)
DISPATCH_TOKENS = 16
BACKGROUND_PROMPT = 4  # tokens: under DISPATCH_PROMPTS, so a static scheduler routes it apart
BACKGROUND_TOKENS = 1024


def measure_runtime(
    spec: Spec, workers_only: CostModel, repeats: int
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, list[float]]], float]:
    """(dispatch, contention, admission): the first two per phase and dop, measured through a real Engine per dop: a
    static group of dop instances takes the timed requests, one after another, while 0, 1,
    …, world − dop of the other instances each decode a request of their own (`_Background`).

    The time of a timed iteration: decode, the period between a request's successive
    steps; prefill, the batch plus the gap before that group's next batch. Both include what
    the grid did not measure on the workers: the driver computing inputs and sending each of
    the group's ranks its step, the command and result queues, its loop taking the next step
    (a group waits for the last of its ranks to hear and to answer, so it grows with the
    dop), and, with other instances busy, the cores and the driver they share.

    dispatch: the median time with nothing else busy minus `workers_only`'s prediction (the
    cost model fitted on the grid alone); negative where the engine is the faster. contention: the median time with 0, 1, … other
    instances busy over the median with none (1, then never below the factor of fewer: what
    is below is noise). admission: the median time from a timed request's arrival to the
    start of its first batch with nothing else busy (the driver taking it in, planning,
    lowering, computing inputs), which no iteration's time holds."""
    from espc.planner.sim.strategies import Deployment, StaticScheduler
    from espc.runtime.engine import Engine
    from espc.runtime.sampling import SamplingParams

    world = len(spec.cluster.instances(1))
    # Room for a timed and a background request on one instance.
    capacity = max(DISPATCH_PROMPTS) + DISPATCH_TOKENS + BACKGROUND_PROMPT + BACKGROUND_TOKENS + 2
    deployment = Deployment.build(CostModel.from_spec(spec), 1, capacity)
    dispatch: dict[str, dict[int, float]] = {"prefill": {}, "decode": {}}
    contention: dict[str, dict[int, list[float]]] = {"prefill": {}, "decode": {}}
    admission: list[float] = []
    for dop in range(1, world + 1):
        # Timed prompts are "long": they go to the largest group, the dop one; background
        # prompts are short: each to the least loaded single instance.
        scheduler = StaticScheduler(deployment, (dop,) + (1,) * (world - dop), long_prompt_threshold=min(DISPATCH_PROMPTS))
        # Without the start-up warm-up: each block's first round builds what it needs, untimed.
        with Engine(spec, scheduler=scheduler, threads=THREADS, warm_up=False) as engine:
            by_busy = []  # other instances busy -> phase -> [(seconds, lengths)]
            for busy in range(world - dop + 1):
                with _Background(engine, busy):
                    start = len(engine.batch_costs())
                    timed = set()
                    for round_ in range(1 + repeats):  # the first round is not timed: it builds the graphs
                        for length in DISPATCH_PROMPTS:
                            (done,) = engine.generate([[0] * length], SamplingParams(max_new_tokens=DISPATCH_TOKENS))
                            if round_:
                                timed.add(done.request_id)
                    served = engine.result()
                    batches = list(zip(served.timeline[start:], engine.batch_costs()[start:]))
                if busy == 0:
                    arrivals = {record.id: record.arrival_s for record in served.records if record.id in timed}
                    firsts: dict[int, float] = {}
                    for batch, _ in batches:
                        for request in batch.request_ids:
                            firsts.setdefault(request, batch.start_s)
                    admission += [firsts[request] - arrival for request, arrival in arrivals.items() if request in firsts]
                by_busy.append(_iteration_times([cost for batch, cost in batches if timed.issuperset(batch.request_ids)]))
            for phase, predict in (("prefill", workers_only.prefill_time), ("decode", workers_only.decode_time)):
                alone = by_busy[0][phase]
                # Signed: the engine may run an iteration faster than the grid's harness timed
                # it (a DoP-2 decode on 2 CPU cores: 3.6 ms against 5.3 ms), and clipping that
                # at 0 left the simulator 1.7× pessimistic on every multi-instance decode.
                dispatch[phase][dop] = statistics.median(s - predict(lengths, dop, 1) for s, lengths in alone)
                factors = [1.0]
                for times in by_busy[1:]:
                    slowdown = statistics.median(s for s, _ in times[phase]) / statistics.median(s for s, _ in alone)
                    factors.append(max(factors[-1], slowdown))
                contention[phase][dop] = factors
    return dispatch, contention, max(0.0, statistics.median(admission))


def _iteration_times(costs) -> dict[str, list[tuple[float, tuple[int, ...]]]]:
    """(seconds, lengths) of each iteration of `costs` (an engine's finished batches of
    requests served one after another) as the runtime paces them: a decode step until the
    group's next step, a prefill until its next batch (the batch plus the gap)."""
    times: dict[str, list[tuple[float, tuple[int, ...]]]] = {"prefill": [], "decode": []}
    by_group: dict[tuple[int, ...], list] = {}
    for cost in costs:
        by_group.setdefault(cost.instances, []).append(cost)
    for batches in by_group.values():
        for before, after in zip(batches, batches[1:]):
            if before.phase == "prefill" or after.phase == "decode":  # not a last step to the next prompt
                times[before.phase].append((after.start_s - before.start_s, before.lengths))
    return times


class _Background:
    """While the block runs, `count` requests decode on instances of their own (a static
    scheduler sends each short prompt to the least loaded single instance), each replaced
    when it ends; cancelled, and waited for, on exit."""

    def __init__(self, engine, count: int):
        from espc.runtime.sampling import SamplingParams

        self.engine = engine
        self.count = count
        self.params = SamplingParams(max_new_tokens=BACKGROUND_TOKENS)
        self.handles: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._keep, name="espc-profile-background", daemon=True)

    def __enter__(self) -> _Background:
        self.handles = [self.engine.submit([0] * BACKGROUND_PROMPT, self.params) for _ in range(self.count)]
        self.thread.start()
        return self

    def _keep(self) -> None:
        while not self.stop.wait(0.005):
            for index, handle in enumerate(self.handles):
                if handle.done():
                    self.handles[index] = self.engine.submit([0] * BACKGROUND_PROMPT, self.params)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for handle in self.handles:
            handle.cancel()
        for handle in self.handles:
            handle.result(timeout=60)


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

