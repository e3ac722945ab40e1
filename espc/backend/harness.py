"""Run lowered plans in N processes, without the runtime: gloo on the CPU, or NCCL with rank r
on cuda:r.

`Harness(spec, world)` spawns one process per rank (torch.multiprocessing, spawn), each with
the random-weight model of the spec on its device, a KV pool (`espc.backend.kvpool`: the tensor and its
paged table, as the runtime's) and a `Lowering`. `run(plan, tokens)` lowers and verifies the
plan in the parent (so a bad plan fails before any rank waits on a message), sends it to
every rank, and each rank lowers its own graph (cached), applies the plan to its table and
executes (`Program.run`: frees, inputs, migrated-away slots, in the driver's order), and
checks its comm counters against `expected_traffic` before answering. Any rank's error, or
no answer within the timeout, tears the group down and raises: a test can never hang.

The runtime is built from the same pieces, split across processes: the driver applies each
plan to its tables (`Program.inputs`), a worker lowers its own rank with
`Lowering.lower(plan, ranks=(rank,), verify=False)` and runs the graph on its pool.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from espc.backend import ops
from espc.backend.kvpool import PagedKVTable, pool_tensor
from espc.backend.lower import Lowering
from espc.backend.tensor_parallel import init_tp_group, shard_model, tp_shard
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.planner.plan import DecodeBatch, IterationPlan, PrefillBatch, RequestId, TokenRange


def expected_traffic(plan: IterationPlan, spec: ModelSpec, dtype: torch.dtype, tp: int = 1) -> dict[int, dict[str, int]]:
    """Bytes each instance sends per channel, from the plan alone (an independent account of
    what the lowering must move), per TP rank of the instance (each moves its own heads): the
    prefill ring passes each rank's KV block d - 1 hops per
    layer, and each query of a continued request (start > 0) goes to the d - 1 other ring
    members, which answer with (o, lse) over the prefix they hold; decode sends each query
    to the instances holding a non-empty shard and gets one (o, lse) answer back; a
    migration moves its tokens' KV of every layer once."""
    size = torch.empty((), dtype=dtype).element_size()
    shard = tp_shard(spec, tp, 0)  # every TP rank holds as many heads
    heads, kv_heads = shard.local_heads, shard.local_kv_heads
    kv_token = 2 * kv_heads * spec.head_dim * size
    query = spec.layers * heads * spec.head_dim * size
    answer = spec.layers * heads * (spec.head_dim + 1) * 4  # fp32 o and lse
    traffic: dict[int, dict[str, int]] = {}

    def add(rank: int, channel: str, amount: int) -> None:
        traffic.setdefault(rank, dict.fromkeys(ops.CHANNELS, 0))[channel] += amount

    for batch in plan.batches:
        d = len(batch.instances)
        for p, rank in enumerate(batch.instances):
            add(rank, "ring", 0)
            if isinstance(batch, PrefillBatch):
                for s in range(d - 1):
                    origin = (p - s) % d
                    tokens = sum(len(range(item.start + (origin - item.start) % d, item.end, d)) for item in batch.items)
                    add(rank, "ring", spec.layers * tokens * kv_token)
                continued = sum(len(range(item.start + (p - item.start) % d, item.end, d)) for item in batch.items if item.start)
                if continued and d > 1:
                    add(rank, "query", (d - 1) * continued * query)
                    for other in batch.instances:
                        if other != rank:
                            add(other, "partial", continued * answer)
        if isinstance(batch, DecodeBatch):
            for item in batch.items:
                for holder, tokens in item.shards:
                    if holder != item.master and tokens:
                        add(item.master, "query", query)
                        add(holder, "partial", answer)
    for migration in plan.migrations:
        add(migration.src, "migration", spec.layers * len(migration.range) * kv_token)
        add(migration.dst, "migration", 0)
    return traffic


@dataclass(frozen=True)
class RankResult:
    rank: int
    logits: dict[RequestId, torch.Tensor]
    counters: dict[str, dict[str, int]]
    held: dict[RequestId, tuple[TokenRange, ...]]
    seconds: float  # wall time of the graph, inputs included


class HarnessError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, spec: ModelSpec, options: dict, commands, results) -> None:
    torch.set_num_threads(options["threads"])
    try:
        device = torch.device("cuda", rank) if options["device"] == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            options["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=options["timeout"]),
        )
        # NCCL creates its communicator on the first operation, which must involve every
        # rank: a barrier now, not the first batch_isend_irecv of one pair of ranks.
        dist.barrier(device_ids=[rank] if device.type == "cuda" else None)
        tp = options["tp"]
        init_tp_group(world, tp, rank)
        model = shard_model(build_model(spec, dtype=options["dtype"], device=device), tp, rank % tp)
        lowering = Lowering(model, attention=options["attention"], tp=tp)
        table = PagedKVTable(options["slots"], options["page_size"], options["max_requests"])
        kv_heads = tp_shard(spec, tp, rank % tp).local_kv_heads
        pool = pool_tensor(spec, table.num_slots, options["dtype"], device, kv_heads=kv_heads)
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, None, traceback.format_exc()))
        return
    try:
        while (command := commands.get()) is not None:
            plan, tokens = command
            try:
                results.put((rank, _step(rank, spec, options, lowering, pool, table, plan, tokens), None))
            except Exception:
                results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
        # Skip the interpreter's slow teardown (seconds with torch loaded) once the answers
        # are flushed to the parent.
        results.close()
        results.join_thread()
        os._exit(0)


def _step(rank, spec, options, lowering, pool, table, plan, tokens) -> RankResult:
    ops.reset_comm_counters()
    tp = options["tp"]
    instance, tp_rank = divmod(rank, tp)
    started = time.perf_counter()
    program = lowering.lower(plan, ranks=(instance,), verify=False)
    with torch.inference_mode():
        logits = program.run(instance, pool, table, tokens, tp_rank)
    seconds = time.perf_counter() - started
    counters = ops.comm_counters()
    expected = expected_traffic(plan, spec, options["dtype"], tp).get(instance, dict.fromkeys(ops.CHANNELS, 0))
    sent = {channel: counters[channel]["bytes_sent"] for channel in ops.CHANNELS}
    assert sent == expected, f"rank {rank}: sent {sent} bytes per channel, the plan needs exactly {expected}"
    # Two all-reduces per layer (o_proj, MLP) in a batch's graph; none at tp = 1 or when idle.
    computes = tp > 1 and instance in program.bindings and program.bindings[instance].batch is not None
    reduces = 2 * spec.layers if computes else 0
    assert counters["tp"]["calls"] == reduces, f"rank {rank}: {counters['tp']['calls']} TP all-reduces, the plan needs {reduces}"
    for request, row in logits.items():
        assert torch.isfinite(row).all(), f"rank {rank}: request {request} has non-finite logits"
    # Answers cross the process boundary on the host (never as CUDA IPC handles).
    logits = {request: row.cpu() for request, row in logits.items()}
    return RankResult(rank, logits, counters, table.held(), seconds)


class Harness:
    """N ranks executing lowered plans; use as a context manager. `device="cpu"` (gloo) or
    `"cuda"` (rank r on cuda:r, its model and pool there; `backend="nccl"`). Each rank's
    table holds up to `slots` tokens of up to `max_requests` requests in pages of
    `page_size` (`PagedKVTable`). With `tp` > 1 the N ranks are N / tp elastic instances of
    tp ranks each (world rank = instance · tp + TP rank); plans name instances, and every
    TP rank of an instance answers with the instance's logits."""

    def __init__(
        self, spec: ModelSpec, world: int, *, slots: int = 16384, page_size: int = 16, max_requests: int = 64,
        dtype: torch.dtype = torch.float32, attention: str = "torch", threads: int = 1, timeout: float = 120.0,
        tp: int = 1, device: str = "cpu", backend: str = "gloo",
    ):
        if world % tp:
            raise ValueError(f"tp({tp}) does not divide the world of {world} ranks")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: expected cpu or cuda")
        if device == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"{world} ranks need one CUDA device each; this machine has {torch.cuda.device_count()}")
        self.spec, self.world, self.timeout, self.tp = spec, world, timeout, tp
        meta = shard_model(build_model(spec, dtype=dtype, device="meta"), tp, 0)
        self.lowering = Lowering(meta, attention=attention, tp=tp)
        options = {
            "slots": slots, "page_size": page_size, "max_requests": max_requests, "dtype": dtype,
            "attention": attention, "threads": threads, "timeout": timeout, "tp": tp, "device": device,
            "backend": backend,
        }
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._commands = [context.Queue() for _ in range(world)]
        port = free_port()
        self._processes = [
            context.Process(
                target=_worker, args=(rank, world, port, spec, options, self._commands[rank], self._results), daemon=True
            )
            for rank in range(world)
        ]
        for process in self._processes:
            process.start()
        self._collect("start-up")

    def run(self, plan: IterationPlan, tokens: Mapping[RequestId, torch.Tensor] | None = None) -> list[RankResult]:
        """Execute one plan on every rank; results indexed by rank."""
        if not self._processes:
            raise HarnessError("the harness is closed (a previous run failed or close() was called)")
        self.lowering.lower(plan)  # verify in the parent: a plan that would deadlock fails here
        for command in self._commands:
            command.put((plan, dict(tokens or {})))
        return self._collect(f"iteration {plan.iteration}")

    def _collect(self, what: str) -> list:
        answers: dict[int, object] = {}
        failed: dict[int, str] = {}
        errors: list[str] = []
        started = time.monotonic()
        deadline = started + self.timeout
        while len(answers) + len(failed) < self.world:
            try:
                rank, result, error = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(self.world)) - answers.keys() - failed.keys())
                errors.append(f"{what}: ranks {missing} did not answer within {time.monotonic() - started:.0f} s")
                break
            if error is not None:
                failed[rank] = error
                errors.append(f"rank {rank}, {what}:\n{error}")
                # Peers of a failed rank may wait forever for its messages: give the others a
                # moment to report their own errors, then tear the group down.
                deadline = min(deadline, time.monotonic() + 3)
            else:
                answers[rank] = result
        if errors:
            self.close()
            raise HarnessError("\n".join(errors))
        return [answers[rank] for rank in range(self.world)]

    def close(self) -> None:
        for command, process in zip(self._commands, self._processes):
            if process.is_alive():
                command.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = []
        self._commands = []

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
