"""The driver: runs the compiled policy's scheduler against the real clock and the workers.

It owns the global state: the scheduler's `ClusterState` (which requests hold how many
tokens where) and, per worker, a mirror of the worker's `PagedKVTable` (which slot of its
pool holds which token). Its loop, on one thread, does what the simulator does with a
virtual clock:

    arrivals and cancellations -> results of the workers (a batch completes when all its
    ranks answered; a migration when both ends did) -> faults -> schedule (same Scheduler
    object, same ClusterState) -> lower the plan (verified, cached) -> apply its bookkeeping
    to the mirrors (all or nothing) -> send each worker the plan and its new token ids.

The worker applies the same bookkeeping to its own table and computes its graph's inputs
there, so what travels per step is O(new tokens), whatever the context length
(benchmarks/step_bytes.py).

A worker processes its commands in order, so a plan may be sent to a rank that is still
busy with an earlier one (a migration out of an instance running a batch): it runs after,
and every slot the driver frees or reuses on that rank is touched only by later commands.

Faults: a worker that exits, stops sending heartbeats, or reports an error is killed and
its instance retired; every request with KV on it or in flight with it fails with the
reason, the rest go on with the remaining instances (the scheduler only plans idle ones;
a retired instance never is). Peers that then fail to talk to the dead worker report
errors too: those count as answers, not faults. When requests wait, nothing is in flight
and no plan comes for `stall_timeout_s`, they fail: the engine never hangs. A plan fault
touches only the requests it must (`_dispatch`): a batch the backend cannot lower fails its
own requests; a `KVPoolFull` rolls every table back and preempts or refuses the one request
that needed the room (counted in `stats()["kv_full"]`).

Prefix caching (`[runtime] prefix_caching`, espc.planner.sim.prefix_cache): the driver cuts
each request's tokens into blocks of `kv_block_size` and names each by a hash of its token
ids (the state chains them), the prompt's at admission and each block the request generates
as it completes. A finished request stays in the tables as a cache entry (the state's
`prefix.entries`); a plan's hit gives a request read-only views of an entry's slots on every
table (`PagedKVTable.share`) before its inputs are computed; evictions release entries on
every table. `check_kv` holds tables and state to the same owners and views.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from espc.backend.kvpool import KVPoolFull, PagedKVTable
from espc.backend.lower import Lowering, Program
from espc.backend.tensor_parallel import shard_model
from espc.frontend.spec import Spec
from espc.model.llama import build_model
from espc.planner.plan import DecodeBatch, IterationPlan, Migration, PrefillBatch, PrefillItem, RequestId, TokenRange
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.prefix_cache import PrefixCache
from espc.planner.sim.simulator import BatchRecord, SimulationResult, request_record
from espc.planner.sim.strategies import Scheduler
from espc.planner.sim.workload import Request
from espc.runtime.launch import LaunchError, WorkerHandle, instance_workers, spawn_workers, torchrun_workers
from espc.runtime.sampling import SamplingParams, TokenLogprobs
from espc.runtime.worker import BEAT, DTYPES, ERROR, READY, RESULT, Sampling, Step, StepResult, WorkerConfig

# A scheduler may first free KV (preemption) and then plan into the freed space.
_MAX_PLANS_PER_WAKE = 8


class EngineError(RuntimeError):
    """The engine cannot start or went down."""


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int
    index: int  # 0 for the first generated token
    logits: torch.Tensor | None = None
    logprobs: TokenLogprobs | None = None  # with SamplingParams.logprobs


@dataclass(frozen=True)
class FinishEvent:
    request_id: int
    reason: str  # "length", "stop", "cancelled", "rejected" or "error"
    error: str | None = None
    # Why a request was rejected: "queue_full" or "ttft_unreachable" (overload: try again
    # later), "unservable" (no instance group in service can hold its KV), "kv_full" (a KV
    # table could not hold what its plan allocated, and it held no KV to preempt).
    code: str | None = None
    cached_tokens: int = 0  # prompt tokens its (last) prefill read from the prefix cache


Listener = Callable[[TokenEvent | FinishEvent], None]


@dataclass(eq=False)
class _Live:
    """A request the driver serves: its token ids and whom to tell about them."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    listener: Listener
    arrival_s: float
    id: int = -1
    state: RequestState | None = None
    generated: list[int] = field(default_factory=list)

    def sequence(self) -> list[int]:
        return self.prompt + self.generated


@dataclass(eq=False)
class _Task:
    """A batch or a migration in flight: done when every one of its ranks answered."""

    work: PrefillBatch | DecodeBatch | Migration
    ranks: set[int]
    started_s: float
    tokens: dict[RequestId, int] = field(default_factory=dict)
    logits: dict[RequestId, torch.Tensor] = field(default_factory=dict)
    logprobs: dict[RequestId, TokenLogprobs] = field(default_factory=dict)
    worker_s: float = 0.0  # the slowest rank's own time (graph, inputs, sampling)

    @property
    def requests(self) -> tuple[RequestId, ...]:
        if isinstance(self.work, Migration):
            return (self.work.request_id,)
        return tuple(item.request_id for item in self.work.items)


@dataclass(frozen=True, slots=True)
class BatchCost:
    """A finished batch on the driver's clock, and the slowest worker's own time in it: the
    rest is dispatch (inputs, queues, results) — what `espc profile` adds to its fits."""

    phase: str
    instances: tuple[int, ...]
    lengths: tuple[int, ...]  # per request: new tokens (prefill) or context (decode)
    start_s: float
    end_s: float
    worker_s: float


@dataclass(frozen=True)
class Admission:
    """Early rejection at arrival (the spec's `[serving]` section): refuse a request at once,
    with its reason, rather than queue it behind work it can never overtake."""

    max_queued: int | None = None  # requests waiting for their first prefill at once; None: no bound
    ttft_target: Callable[[int], float] | None = None  # prompt length -> TTFT bound (s); None: not checked


@dataclass(frozen=True)
class DriverOptions:
    kv_capacity: int  # tokens per instance the scheduler may plan with
    max_running: int  # requests admitted into the scheduler at once; the rest queue before it
    threads: int  # torch threads per worker
    start_timeout_s: float
    heartbeat_timeout_s: float
    comm_timeout_s: float
    stall_timeout_s: float
    dtype: str
    admission: Admission = Admission()
    launcher: str = "spawn"  # spawn | torchrun (see espc.runtime.launch)
    warm_up: bool = True  # graphs of every batch shape built at start-up (`Lowering.warm_up`)


class Driver:
    """Workers, tables, scheduler and the loop thread; `Engine` is the public face."""

    def __init__(self, spec: Spec, scheduler: Scheduler, options: DriverOptions, base_dir: Path | None = None):
        self.spec = spec
        self.scheduler = scheduler
        self.options = options
        self.base_dir = base_dir
        deployment = scheduler.deployment
        self.world = deployment.num_instances
        page = spec.runtime.kv_block_size
        # Cached prefixes are bounded like running requests: each holds a page table entry.
        cache = PrefixCache(page, options.max_running) if spec.runtime.prefix_caching else None
        self.state = ClusterState(deployment.capacity, prefix=cache)
        residents = options.max_running * (2 if cache else 1)
        # The driver's mirror of each worker's own table: it decides (and rolls back) every
        # plan's bookkeeping here first, the worker repeats it from the plan (`worker._execute`).
        self.tables = [PagedKVTable(capacity, page, residents) for capacity in deployment.capacity]
        self._released: list[list[RequestId]] = [[] for _ in self.tables]  # per table, not yet sent to its worker
        # The driver's world is instances: with tp > 1 each is tp workers (`instance_workers`)
        # that run the same graph on their shards; it lowers TP rank 0's structure to verify.
        self.tp = deployment.tp
        self.lowering = Lowering(
            shard_model(build_model(spec.model, dtype=DTYPES[options.dtype], device="meta"), self.tp, 0),
            attention=spec.runtime.attention, tp=self.tp,
        )
        self._inbox: queue.Queue = queue.Queue()  # ("submit", live) | ("cancel", id) | worker messages
        self._ids = itertools.count()
        self._live: dict[int, _Live] = {}
        self._backlog: deque[_Live] = deque()
        self._tasks: dict[int, list[_Task]] = {}  # iteration -> its batches and migrations in flight
        self._last_beat: dict[int, float] = {}
        self._stalled_since: float | None = None
        self.timeline: list[BatchRecord] = []
        self.batch_costs: list[BatchCost] = []  # what each batch cost the workers vs the driver
        self.busy_s = [0.0] * self.world
        self.migrated_bytes = 0
        self.migrations = 0
        self.rejected: dict[str, int] = {}  # rejection code -> requests
        # Requests a KV table could not hold when a plan allocated for them (see `_kv_full`).
        self.kv_full = {"preempted": 0, "refused": 0}
        self.failures: list[str] = []  # one line per worker taken out of service
        self._workers: list[WorkerHandle] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fatal: str | None = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        from espc.backend.harness import free_port

        torchrun = self.options.launcher == "torchrun"
        device = self.spec.cluster.nodes[0].device.kind
        config = WorkerConfig(
            self.spec.model, self.base_dir, self.world * self.tp, "env://" if torchrun else f"tcp://127.0.0.1:{free_port()}",
            self.spec.runtime.backend, device, self.options.dtype, self.spec.runtime.attention,
            tuple(table.capacity_tokens for table in self.tables), self.tables[0].page_size, self.tables[0].max_requests,
            self.options.threads, self.options.comm_timeout_s, self.tp, self.options.warm_up,
        )
        try:
            if torchrun:
                ranks = torchrun_workers(config, self._inbox, self.options.start_timeout_s)
            else:
                ranks = spawn_workers(config, range(config.world), self._inbox)
            self._workers = instance_workers(ranks, self.tp)
        except LaunchError as error:
            raise EngineError(str(error)) from None
        if self.options.warm_up:  # while the workers start: the graphs it verifies plans with
            self.lowering.warm_up(self.world)
        ready: set[int] = set()
        deadline = time.monotonic() + self.options.start_timeout_s
        while len(ready) < self.world:
            try:
                kind, rank, payload = self._inbox.get(timeout=0.5)
            except queue.Empty:
                exited = {rank: w.exitcode() for rank, w in enumerate(self._workers) if w.exitcode() is not None}
                missing = sorted(set(range(self.world)) - ready)
                if exited or time.monotonic() > deadline:
                    self._kill_all()
                    if exited:
                        raise EngineError(f"workers exited while starting (rank: exit code): {exited}") from None
                    raise EngineError(f"workers {missing} did not start within {self.options.start_timeout_s:g} s") from None
                continue
            if kind == ERROR:
                self._kill_all()
                raise EngineError(f"worker {rank} failed to start:\n{payload[1]}")
            if kind == READY:
                ready.add(rank)
                self._last_beat[rank] = time.monotonic()
        # Start-up state (the policy, the MILP solver's objects, graph caches) lives as long
        # as the engine: frozen out of the collector, a full collection during a scheduling
        # decision walks only what the loop allocated (unfrozen, one took 35 ms on lwm7b).
        gc.collect()
        gc.freeze()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="espc-driver")
        self._thread.start()

    def close(self) -> None:
        """Stop the loop (requests still in flight fail), then the workers."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for rank, worker in enumerate(self._workers):
            if worker.exitcode() is None and rank not in self.state.retired:
                worker.send(None)
        for worker in self._workers:
            worker.join(timeout=10)
            worker.kill()
            worker.join(timeout=10)
        self._workers = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pids(self) -> list[int | None]:
        """Worker process ids (None for a torchrun worker on another process)."""
        return [worker.pid for worker in self._workers]

    # ------------------------------------------------------------------ thread-safe calls

    def submit(
        self, prompt: Sequence[int], params: SamplingParams, seed: int | None, listener: Listener, default_seed: int = 0
    ) -> int:
        """Queue a request; without a seed it samples with one derived from its id, so a
        run's outputs do not depend on which worker samples them."""
        request_id = next(self._ids)
        seed = seed if seed is not None else default_seed * 1_000_003 + request_id
        live = _Live(list(prompt), params, seed, listener, self.now(), request_id)
        self._inbox.put(("submit", 0, live))
        return live.id

    def call(self, function: Callable[[], object], future) -> None:
        """Run `function` on the loop thread between iterations; its result goes to `future`."""
        self._inbox.put(("call", 0, (function, future)))

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", 0, request_id))

    def now(self) -> float:
        return time.monotonic() - self._t0

    # --------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while not (self._stopping.is_set() and not self._tasks):
                timeout = 0.05 if (self._tasks or self._backlog or self.state.waiting) else 0.2
                try:
                    message = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    message = None
                while message is not None:
                    self._handle(message)
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        message = None
                if self._stopping.is_set():
                    self._fail_queued("the engine is shutting down")
                self._check_workers()
                self._schedule()
        except Exception:
            self._fatal = traceback.format_exc()
            for live in list(self._live.values()):
                self._end(live, "error", f"the engine failed: {self._fatal.strip().splitlines()[-1]}")
        finally:
            self._fail_queued("the engine stopped")

    def _handle(self, message) -> None:
        kind, rank, payload = message
        if kind == "submit":
            self._live[payload.id] = payload
            refusal = self._refusal(payload)
            if refusal is None:
                self._backlog.append(payload)
            else:
                self._reject(payload, *refusal)
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "call":
            function, future = payload
            try:
                future.set_result(function())
            except Exception as error:  # the caller's to handle
                future.set_exception(error)
        elif kind == BEAT:
            self._last_beat[rank] = time.monotonic()
        elif kind == RESULT:
            self._last_beat[rank] = time.monotonic()
            self._answer(rank, payload.iteration, payload)
        elif kind == ERROR:
            iteration, text = payload
            if self._collateral(rank, iteration):
                self._answer(rank, iteration, None)
            else:
                self._fault(rank, f"worker {rank} raised during iteration {iteration}: {text.strip().splitlines()[-1]}")

    # ----------------------------------------------------------------------- admission

    def _refusal(self, live: _Live) -> tuple[str, str] | None:
        """(code, reason) when admission control refuses the request on arrival: too many
        requests wait already, or (when enabled) the prefill work queued before it, spread
        evenly over the instances in service, plus its own prefill exceeds its TTFT target —
        an optimistic estimate, so a refused request could not have met its SLO."""
        admission = self.options.admission
        queued = [other for other in self._backlog if other.id in self._live]
        ahead = len(queued) + len(self.state.waiting)
        if admission.max_queued is not None and ahead >= admission.max_queued:
            return "queue_full", f"the server is overloaded: {ahead} requests wait already (max_queued_requests = {admission.max_queued})"
        if admission.ttft_target is None:
            return None
        deployment = self.scheduler.deployment

        def prefill_s(tokens: int) -> float:
            return deployment.cost.prefill_time([tokens], 1, deployment.tp)

        in_service = max(1, self.world - len(self.state.retired))
        work = sum(prefill_s(len(other.prompt)) for other in queued)
        work += sum(prefill_s(state.prefill_target or state.request.prompt_len) for state in self.state.waiting.values())
        estimate = work / in_service + prefill_s(len(live.prompt))
        target = admission.ttft_target(len(live.prompt))
        if estimate > target:
            return "ttft_unreachable", (
                f"its time to first token cannot meet the SLO: {ahead} queued requests and its own prefill take "
                f"at least {estimate:.3g} s on {in_service} instance(s), more than its ttft target of {target:.3g} s"
            )
        return None

    def _reject(self, live: _Live, code: str, reason: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self._end(live, "rejected", reason, code)

    def _admit(self) -> None:
        state = self.state
        while self._backlog and len(state.waiting) + len(state.running) < self.options.max_running:
            live = self._backlog.popleft()
            if live.id not in self._live:
                continue  # cancelled while queued
            output_len = live.params.max_new_tokens
            blocks = self._block_ids(live.prompt, len(live.prompt))
            request = Request(live.id, live.arrival_s, len(live.prompt), output_len, blocks)
            live.state = state.arrive(request)
            reason = self.scheduler.admit(state, live.state)
            if reason is not None:
                state.reject(live.state, reason)
                self._reject(live, "unservable", reason)

    def _block_ids(self, tokens: Sequence[int], end: int, start: int = 0) -> tuple[int, ...]:
        """Names of the full KV blocks of `tokens` between `start` and `end` (block-aligned
        `start`): a hash of each block's ids, which the state chains (equal chains, equal
        prefixes). None without a prefix cache."""
        if self.state.prefix is None:
            return ()
        size = self.spec.runtime.kv_block_size
        return tuple(hash(tuple(tokens[j:j + size])) for j in range(start, end - size + 1, size))

    def _schedule(self) -> None:
        self.state.now = self.now()
        self._admit()
        for _ in range(_MAX_PLANS_PER_WAKE):
            if self._stopping.is_set() or not self.state.idle:
                break
            plan = self.scheduler.schedule(self.state)
            if plan is None:
                break
            self._dispatch(plan)
            if plan.batches or plan.migrations:
                break
        waiting = self.state.waiting and not self._tasks
        if not waiting:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = time.monotonic()
        elif time.monotonic() - self._stalled_since > self.options.stall_timeout_s:
            live_instances = self.world - len(self.state.retired)
            for request_id in list(self.state.waiting):
                self._fail(self._live[request_id], (
                    f"no plan could serve the request for {self.options.stall_timeout_s:g} s with nothing running "
                    f"({live_instances} of {self.world} instances in service)"
                ))
            self._stalled_since = None

    def _dispatch(self, plan: IterationPlan) -> None:
        """Apply the plan to the tables and the state, and send each rank its slice: every
        instance whose table the plan touches gets the plan, the token ids it feeds and the
        releases its table has not seen yet; the worker applies them to its own table in the
        same order (`worker._execute`), so no slot index travels.

        Faults touch only what they must: a batch the backend cannot lower fails its own
        requests and the rest of the plan runs (`_lower`); a table that cannot hold what the
        plan allocates leaves every table as it was, the plan is dropped, and the request
        that needed the room is preempted or refused (`_kv_full`) — the scheduler then plans
        again from the unchanged state."""
        plan = self.state.with_evictions(plan)
        lowered = self._lower(plan)
        if lowered is None:
            return
        plan, program = lowered
        # numpy, not torch: a torch.multiprocessing queue moves every tensor through its own
        # shared-memory segment (~1.4 ms per step for a handful of small tensors).
        tokens: dict[RequestId, np.ndarray] = {}
        for batch in plan.batches:
            for item in batch.items:
                live = self._live[item.request_id]
                if isinstance(batch, PrefillBatch):
                    assert isinstance(item, PrefillItem)  # a prefill batch holds prefill items
                    tokens[item.request_id] = np.array(live.sequence()[item.start:item.end], dtype=np.int64)
                else:
                    tokens[item.request_id] = np.array(live.generated[-1:], dtype=np.int64)
        ids = {request: torch.from_numpy(chunk) for request, chunk in tokens.items()}
        changed = set(plan.frees) | set(plan.evictions) | {hit.source for hit in plan.hits}
        touched = [
            rank for rank, table in enumerate(self.tables)
            if rank not in self.state.retired
            and (rank in program.bindings or any(table.holds(request) for request in changed))
        ]
        rank = 0
        try:
            with ExitStack() as transactions:  # all tables or none: an exception rolls each back
                for table in self.tables:
                    transactions.enter_context(table.transaction())
                    for entry in plan.evictions:
                        table.release(entry)
                    for hit in plan.hits:  # before the inputs, which read the prefix through the views
                        table.share(hit.request_id, hit.source, TokenRange(0, hit.tokens))
                for rank, table in enumerate(self.tables):  # every table: the plan's frees apply to all
                    program.inputs(rank, table, ids, None, reads=False)
        except KVPoolFull as error:  # `rank`: the table that could not hold it
            self._kv_full(plan, rank, error)
            return
        steps = {}
        for rank in touched:
            sampling = {}
            for request_id in program.outputs(rank):
                live = self._live[request_id]
                sampling[request_id] = Sampling(live.params, live.seed, len(live.generated))
            feeds = {
                item.request_id: tokens[item.request_id]
                for batch in plan.batches if rank in batch.instances for item in batch.items
            }
            table = self.tables[rank]
            steps[rank] = Step(plan, feeds, sampling, tuple(self._released[rank]), (table.used_tokens, table.used_pages))
            self._released[rank].clear()
        self.state.start(plan)
        self._release_evicted()
        now = self.now()
        tasks = [_Task(batch, set(batch.instances), now) for batch in plan.batches]
        tasks += [_Task(migration, {migration.src, migration.dst}, now) for migration in plan.migrations]
        for migration in plan.migrations:
            self.migrated_bytes += len(migration.range) * self.spec.model.kv_bytes_per_token
        self.migrations += len(plan.migrations)
        if tasks:
            self._tasks[plan.iteration] = tasks
        for rank, step in steps.items():
            self._workers[rank].send(step)

    def _lower(self, plan: IterationPlan) -> tuple[IterationPlan, Program] | None:
        """The plan and its program, less the batches the backend cannot lower: each batch of
        a plan that raises NotImplementedError is lowered alone, and those that raise it fail
        their own requests with the backend's reason (their migrations leave the plan too);
        the rest of the plan runs. When no batch alone is at fault, every request of the plan
        fails. None: nothing is left to run."""
        try:
            return plan, self.lowering.lower(plan)
        except NotImplementedError as error:  # a plan shape the backend cannot run yet
            whole = error
        failed: set[RequestId] = set()
        for batch in plan.batches:
            try:
                self.lowering.lower(IterationPlan(plan.iteration, (batch,)))
            except NotImplementedError as error:
                for item in batch.items:
                    failed.add(item.request_id)
                    self._fail(self._live[item.request_id], f"cannot execute its batch {batch}: {error}")
        if not failed:
            for batch in plan.batches:
                for item in batch.items:
                    self._fail(self._live[item.request_id], f"cannot execute its plan: {whole}")
            return None
        rest = IterationPlan(
            plan.iteration,
            tuple(batch for batch in plan.batches if not failed.intersection(item.request_id for item in batch.items)),
            tuple(migration for migration in plan.migrations if migration.request_id not in failed),
            plan.frees,
            tuple(hit for hit in plan.hits if hit.request_id not in failed),
            plan.evictions,
        )
        return self._lower(rest)

    def _kv_full(self, plan: IterationPlan, rank: int, error: KVPoolFull) -> None:
        """Instance `rank`'s table could not hold what `plan` allocates for `error.request`
        (every table is as it was before the plan): preempt that request when it holds KV —
        its pages free, it recomputes later (vLLM's recompute preemption) — or refuse it.
        Only the planner's and the tables' accounting disagreeing gets here (a table holds
        every token the planner's capacity admits: `espc.backend.kvpool`). Before either, the
        least recently used cached prefix on that table that the plan does not read is
        evicted and the plan dispatched again."""
        if self._evict_cached(plan, rank):  # cached prefixes give way first; then plan again
            self._dispatch(dataclasses.replace(plan, evictions=()))
            return
        live = self._live[error.request]
        assert live.state is not None  # admitted: it is in the plan
        if live.state.kv_len and not live.state.busy:
            self.kv_full["preempted"] += 1
            self._dispatch(IterationPlan(plan.iteration, (), frees=(error.request,)))
            return
        self.kv_full["refused"] += 1
        self.rejected["kv_full"] = self.rejected.get("kv_full", 0) + 1
        self._fail(live, f"instance {rank} cannot hold its KV: {error}", "rejected", "kv_full")

    def _evict_cached(self, plan: IterationPlan, rank: int) -> bool:
        """Evict the least recently used cached prefix holding KV on `rank` that no running
        request and none of the plan's hits reads; False when there is none."""
        cache = self.state.prefix
        if cache is None:
            return False
        read = {entry.id for hit in plan.hits for entry in cache.lineage(hit.source)}
        for entry in cache.lru_unpinned():
            if self.state.requests[entry].tokens_on(rank) and not read.intersection(cache.subtree(entry)):
                self.state.evict(entry)
                self._release_evicted()
                return True
        return False

    # --------------------------------------------------------------------- completions

    def _answer(self, rank: int, iteration: int, result: StepResult | None) -> None:
        tasks = self._tasks.get(iteration, [])
        for task in tasks:
            if rank not in task.ranks:
                continue
            task.ranks.discard(rank)
            if result is not None:
                task.worker_s = max(task.worker_s, result.seconds)
                for request_id, token in result.tokens.items():
                    if request_id in task.requests:
                        task.tokens[request_id] = token
                        if request_id in result.logits:
                            task.logits[request_id] = torch.from_numpy(result.logits[request_id])
                        if request_id in result.logprobs:
                            task.logprobs[request_id] = result.logprobs[request_id]
            if not task.ranks:
                self._complete(task)
        remaining = [task for task in tasks if task.ranks]
        if remaining:
            self._tasks[iteration] = remaining
        else:
            self._tasks.pop(iteration, None)

    def _complete(self, task: _Task) -> None:
        self.state.now = self.now()
        if isinstance(task.work, Migration):
            self.state.complete_migration(task.work)
            return
        batch = task.work
        self.timeline.append(BatchRecord(
            task.started_s, self.state.now, batch.phase, batch.instances,
            tuple(item.request_id for item in batch.items), batch.num_tokens,
        ))
        for instance in batch.instances:
            self.busy_s[instance] += self.state.now - task.started_s
        self.batch_costs.append(BatchCost(batch.phase, batch.instances, _lengths(batch), task.started_s, self.state.now, task.worker_s))
        produced = {item.request_id for item in batch.items if self._produces_token(batch, item)}
        self.state.complete(batch)
        self._release_evicted()
        for request_id in task.requests:
            live = self._live.get(request_id)
            if live is None:
                continue  # failed or cancelled while the batch ran
            assert live.state is not None  # admitted: it was scheduled into this batch
            if live.state.rejected is not None:
                continue  # failed or cancelled while the batch ran
            if request_id in produced:
                token = task.tokens.get(request_id)
                if token is None:
                    self._fail(live, "no worker returned its token")
                    continue
                self._emit_token(live, token, task.logits.get(request_id), task.logprobs.get(request_id))
            if live.state.done:  # reached max_new_tokens
                self._end(live, "length")

    def _produces_token(self, batch: PrefillBatch | DecodeBatch, item) -> bool:
        """Every decode step does; a prefill only when it reaches the request's target
        (not a chunk of a longer prefill)."""
        if isinstance(batch, DecodeBatch):
            return True
        target = self.state.requests[item.request_id].prefill_target
        return target is None or item.end >= target

    def _emit_token(
        self, live: _Live, token: int, logits: torch.Tensor | None, logprobs: TokenLogprobs | None = None,
    ) -> None:
        """Stream the token, or end the request on a stop token (which is not streamed)."""
        assert live.state is not None  # admitted: only a scheduled batch produces tokens
        if token in live.params.stop_token_ids:
            if not live.state.done:
                self.state.finish(live.state)
            self._end(live, "stop")
            return
        live.generated.append(token)
        size = self.spec.runtime.kv_block_size
        length = len(live.prompt) + len(live.generated)
        if self.state.prefix is not None and length % size == 0:  # a block of its sequence is complete
            (block,) = self._block_ids(live.sequence(), length, length - size)
            self.state.add_block(live.state, block)
        self._tell(live, TokenEvent(live.id, token, len(live.generated) - 1, logits, logprobs))

    def _tell(self, live: _Live, event: TokenEvent | FinishEvent) -> None:
        """A listener that raises (its consumer went away) loses its request, not the engine."""
        try:
            live.listener(event)
        except Exception as error:
            if isinstance(event, TokenEvent):
                self._fail(live, f"its listener raised {type(error).__name__}: {error}", "cancelled")

    # ---------------------------------------------------------------------- ends, faults

    def _release(self, request_id: int) -> None:
        """Release the request on every table that holds it; each worker hears of it with
        its next step (before that step's own bookkeeping, as here)."""
        for rank, table in enumerate(self.tables):
            if table.holds(request_id):
                table.release(request_id)
                self._released[rank].append(request_id)

    def _release_evicted(self) -> None:
        """Release in every table the cached requests the state evicted."""
        for entry in self.state.take_evictions():
            self._release(entry)

    def _end(self, live: _Live, reason: str, error: str | None = None, code: str | None = None) -> None:
        """Free the request's slots in every table (the state freed its KV already, or kept
        it as a cached prefix: then the slots stay) and tell the listener."""
        if self._live.pop(live.id, None) is None:
            return
        if self.state.prefix is None or live.id not in self.state.prefix.entries:
            self._release(live.id)
        cached = live.state.cached_tokens if live.state is not None else 0
        self._tell(live, FinishEvent(live.id, reason, error, code, cached))

    def _fail(self, live: _Live, reason: str, kind: str = "error", code: str | None = None) -> None:
        if live.state is not None:
            self.state.now = self.now()
            self.state.fail(live.state, reason)
        self._end(live, kind, reason, code)

    def _cancel(self, request_id: int) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._fail(live, "cancelled", "cancelled")

    def _fail_queued(self, reason: str) -> None:
        for live in list(self._live.values()):
            if live.state is None or not live.state.busy:
                self._fail(live, reason)

    def _collateral(self, rank: int, iteration: int | None) -> bool:
        """An error of a rank whose batch or migration includes a retired instance."""
        if iteration is None:  # an error outside any iteration (a worker's start-up): no tasks
            return False
        return any(
            rank in task.ranks and set(_members(task.work)) & self.state.retired
            for task in self._tasks.get(iteration, [])
        )

    def _check_workers(self) -> None:
        now = time.monotonic()
        for rank, worker in enumerate(self._workers):
            if rank in self.state.retired:
                continue
            if worker.exitcode() is not None:
                self._fault(rank, f"worker {rank} (pid {worker.pid}) exited with code {worker.exitcode()}")
            elif now - self._last_beat.get(rank, now) > self.options.heartbeat_timeout_s:
                self._fault(rank, f"worker {rank} (pid {worker.pid}) sent no heartbeat for {self.options.heartbeat_timeout_s:g} s")

    def _fault(self, rank: int, why: str) -> None:
        """Take `rank` out of service; fail what depends on it."""
        if rank in self.state.retired:
            return
        self._workers[rank].kill()
        self.failures.append(why)
        reason = f"instance {rank} failed: {why}"
        affected = {request_id for request_id, state in self.state.running.items() if state.tokens_on(rank)}
        affected.update(state.id for state in self.state.cache_readers(rank))
        for flight in self._tasks.values():
            for task in flight:
                if rank in _members(task.work):
                    affected.update(task.requests)
        for request_id in sorted(affected):
            if request_id in self._live:
                self._fail(self._live[request_id], reason)
        self.state.retire(rank)
        self._release_evicted()
        for iteration in list(self._tasks):
            self._answer(rank, iteration, None)
        if len(self.state.retired) == self.world:
            self._stopping.set()

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        for worker in self._workers:
            worker.join(timeout=10)

    # -------------------------------------------------------------------------- reports

    def stats(self) -> dict:
        state = self.state
        dop = [0] * self.world  # per instance: the DoP of the batch it runs, 0 when idle
        for flight in self._tasks.values():
            for task in flight:
                if not isinstance(task.work, Migration):
                    for instance in task.work.instances:
                        dop[instance] = len(task.work.instances)
        return {
            "instances": self.world,
            "in_service": self.world - len(state.retired),
            "queued": len(self._backlog),
            "waiting": len(state.waiting),
            "running": len(state.running),
            "iterations": state.iteration,
            "kv_used_tokens": [table.used_tokens for table in self.tables],
            # Of those, held by cached prefixes no running request reads (evicted when needed).
            "kv_cached_tokens": list(state.cached),
            "kv_capacity_tokens": list(state.capacity),
            "migrated_tokens": state.migrated_tokens,
            "migrated_bytes": self.migrated_bytes,
            "migrations": self.migrations,
            "dop": dop,
            "rejected": dict(self.rejected),
            "kv_full": dict(self.kv_full),
            "graph_cache": str(self.lowering.cache),
            "prefix_cache": self._prefix_stats(),
            "failures": list(self.failures),
        }

    def _prefix_stats(self) -> dict:
        cache = self.state.prefix
        if cache is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "queried_tokens": cache.queried_tokens,
            "hit_tokens": cache.hit_tokens,
            "cached_tokens": sum(self.state.cached),
            "cached_blocks": sum(len(e.keys) - e.start // cache.block_tokens for e in cache.entries.values()),
            "evicted_blocks": cache.evicted_blocks,
            "entries": len(cache.entries),
        }

    def check_kv(self) -> None:
        """Invariant between iterations: tables hold exactly what the state says — the owned
        tokens and the views of every running request and cached prefix; when nothing is
        live, nothing but cached prefixes."""
        for rank, table in enumerate(self.tables):
            mismatch = table_mismatch(self.state, rank, table)
            if mismatch is not None:
                raise AssertionError(mismatch)
        cached = sum(self.state.cached)  # with nothing live, no cached prefix is read: all of them
        if not self._live and sum(table.used_tokens for table in self.tables) != cached:
            raise AssertionError(f"no request is live but KV is held: {[t.used_tokens for t in self.tables]}, cached {cached}")

    def result(self) -> SimulationResult:
        """Everything served so far in the simulator's terms (the same metrics apply)."""
        records = sorted((request_record(state) for state in self.state.requests.values()), key=lambda r: r.id)
        finished = [r.finish_s for r in records if r.finish_s is not None]
        duration = (max(finished) - min(r.arrival_s for r in records)) if finished else 0.0
        kv_token = self.spec.model.kv_bytes_per_token
        return SimulationResult(
            f"{self.scheduler.name} (runtime)", records, duration, self.state.iteration, list(self.busy_s),
            self.migrated_bytes // kv_token if kv_token else 0, self.migrated_bytes, list(self.timeline),
        )


def _lengths(batch: PrefillBatch | DecodeBatch) -> tuple[int, ...]:
    if isinstance(batch, PrefillBatch):
        return tuple(item.end - item.start for item in batch.items)
    return tuple(item.context_len for item in batch.items)


def _members(work: PrefillBatch | DecodeBatch | Migration) -> tuple[int, ...]:
    return (work.src, work.dst) if isinstance(work, Migration) else work.instances


def table_mismatch(state: ClusterState, rank: int, table: PagedKVTable) -> str | None:
    """How instance `rank`'s page table differs from the scheduler's state — the tokens each
    running request and cached prefix owns there, and the views each reads — or None; the
    table's own invariants first (`verify` raises)."""
    table.verify()
    holders = list(state.running.values())
    if state.prefix is not None:
        holders += [state.requests[entry] for entry in state.prefix.entries]
    owned, viewed = {}, {}
    for holder in holders:
        views = _merged(holder.borrowed.get(rank, ()))
        if views:
            viewed[holder.id] = views
        own = _subtract(_merged(holder.kv.get(rank, ())), views)
        if own:
            owned[holder.id] = own
    actual = {request_id: _merged((r.start, r.end) for r in ranges) for request_id, ranges in table.held().items()}
    if actual != owned:
        return f"instance {rank}: its table holds {actual}, the scheduler's state {owned}"
    shared = {request_id: _merged((r.start, r.end) for r in ranges) for request_id, ranges in table.shared().items()}
    if shared != viewed:
        return f"instance {rank}: its table's views are {shared}, the scheduler's state's {viewed}"
    return None


def _subtract(ranges: tuple[tuple[int, int], ...], cut: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Sorted disjoint `ranges` less sorted disjoint `cut`."""
    kept = []
    for start, end in ranges:
        for low, high in cut:
            if high <= start or end <= low:
                continue
            if low > start:
                kept.append((start, low))
            start = max(start, high)
            if start >= end:
                break
        if start < end:
            kept.append((start, end))
    return tuple(kept)


def _merged(ranges) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return tuple((start, end) for start, end in merged)
