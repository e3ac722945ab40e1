"""One worker process per device: it holds the model's weights and the KV pool tensor and
executes its slice of every iteration.

The driver (`espc.runtime.driver`) sends each worker, in order, `Step` commands: the plan
(from which the worker lowers its own graph through its graph cache: same code, same graphs
as the driver's verified lowering), the token ids it feeds (a prefill chunk, one token per
decode step), the requests the driver released from this worker's table since the last
step, and how to sample the requests whose logits this rank produces. The worker keeps its
own block table (`PagedKVTable`, same size as the driver's mirror of it) and applies each
step to it exactly as the driver applied it to the mirror (releases, the plan's evictions
and prefix hits, then `Program.inputs`), so both name the same slots without the driver
sending any: a step costs O(new tokens) to send whatever the context length. It runs the
graph, samples (so only token ids travel back, plus the logits rows when a request asked
for them) and answers with a `StepResult` when it ran a graph (a step that only touches
its table gets no answer).

A heartbeat thread reports every `HEARTBEAT_S` so the driver can tell a hung worker (no
beats: stopped, or stuck outside Python) from one that waits on a peer.

Tensor parallelism (`tp` > 1): world rank r is TP rank r % tp of elastic instance r // tp
(`espc.backend.tensor_parallel`). Every rank creates all instances' TP groups at start-up,
in the same order, holds its shard of the weights and a pool of its KV heads, receives the
instance's commands and runs the instance's graph, talking to the same TP rank of its peer
instances. Every rank of an instance computes the same logits; TP rank 0 alone samples and
answers. Messages to the driver name the instance (the driver knows instances only), so
any rank's error or exit takes its whole instance out of service.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from espc.frontend.spec import ModelSpec
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    PrefillBatch,
    PrefillItem,
    RequestId,
    TokenRange,
    even_retention,
)

HEARTBEAT_S = 0.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to start (pickled to the spawned processes)."""

    model: ModelSpec
    base_dir: Path | None  # where a relative checkpoint path is resolved
    world: int  # worker processes: instances × tp
    init_method: str  # e.g. tcp://127.0.0.1:PORT (mp spawn) or env:// (torchrun)
    backend: str  # gloo | nccl
    device: str  # cpu | cuda
    dtype: str
    attention: str  # torch | triton
    kv_capacity: tuple[int, ...]  # per instance: tokens its table (and pool) holds
    kv_page_size: int
    kv_max_requests: int
    threads: int
    comm_timeout_s: float
    tp: int = 1  # ranks per elastic instance
    warm_up: bool = True  # build every batch shape's graphs before answering READY


@dataclass(frozen=True)
class Sampling:
    """How to turn one request's logits row into a token on this step."""

    params: Any  # espc.runtime.sampling.SamplingParams
    seed: int
    step: int  # index of the token being generated


@dataclass(frozen=True)
class Step:
    """One plan for one instance: what its table and graph need beyond the plan itself."""

    plan: IterationPlan
    tokens: dict[RequestId, np.ndarray]  # int64 ids: a prefill item's [start, end), a decode item's new token
    sampling: dict[RequestId, Sampling]
    releases: tuple[RequestId, ...] = ()  # released from this table since its last step, in that order
    table: tuple[int, int] = (0, 0)  # (tokens, pages) the driver's mirror holds after the step


@dataclass(frozen=True)
class StepResult:
    rank: int
    iteration: int
    tokens: dict[RequestId, int]
    logits: dict[RequestId, np.ndarray] = field(default_factory=dict)  # fp32 rows, only when asked for
    logprobs: dict[RequestId, Any] = field(default_factory=dict)  # sampling.TokenLogprobs, only when asked for
    seconds: float = 0.0  # graph + sampling wall time


# Messages on the results queue: (kind, rank, payload), kind one of these.
READY, RESULT, ERROR, BEAT = "ready", "result", "error", "beat"


def _heartbeat(rank: int, results, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        results.put((BEAT, rank, time.monotonic()))


def worker_main(rank: int, config: WorkerConfig, commands, results) -> None:
    """The process body: start up, answer READY (or ERROR), then execute commands until None."""
    # Imported here: the spawned interpreter pays for them once, the driver never needs them.
    from espc.backend.kvpool import PagedKVTable, pool_tensor
    from espc.backend.lower import Lowering
    from espc.backend.tensor_parallel import init_tp_group, tp_shard
    from espc.runtime.sampling import sample, token_logprobs
    from espc.runtime.weights import load_model

    torch.set_num_threads(config.threads)
    stop = threading.Event()
    instance, tp_rank = divmod(rank, config.tp)  # what the driver calls this worker: its instance
    try:
        # One GPU per worker, by its rank on this node: torchrun's LOCAL_RANK (ranks of other
        # nodes count from 0 there), else the global rank (spawn puts every rank on one node).
        local = int(os.environ.get("LOCAL_RANK", rank)) if config.init_method == "env://" else rank
        device = torch.device("cuda", local % torch.cuda.device_count()) if config.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            config.backend, init_method=config.init_method, rank=rank, world_size=config.world,
            timeout=timedelta(seconds=config.comm_timeout_s),
        )
        # NCCL creates its communicator on the first operation, which must involve every
        # rank: a barrier now, not the first batch_isend_irecv of one pair of ranks.
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        init_tp_group(config.world, config.tp, rank)
        dtype = DTYPES[config.dtype]
        model = load_model(
            config.model, dtype=dtype, device=device, base_dir=config.base_dir, tp=config.tp, tp_rank=tp_rank
        )
        lowering = Lowering(model, attention=config.attention, tp=config.tp)
        kv_heads = tp_shard(config.model, config.tp, tp_rank).local_kv_heads
        table = PagedKVTable(config.kv_capacity[instance], config.kv_page_size, config.kv_max_requests)
        pool = pool_tensor(config.model, table.num_slots, dtype, device, kv_heads=kv_heads)
        if config.warm_up:
            _warm_up(lowering, pool, config, rank, tp_rank, device)
        threading.Thread(target=_heartbeat, args=(instance, results, stop), daemon=True).start()
        results.put((READY, instance, os.getpid()))
    except Exception:
        results.put((ERROR, instance, (None, traceback.format_exc())))
        return
    try:
        while (command := commands.get()) is not None:
            try:
                result = _execute(instance, tp_rank, lowering, pool, table, command, sample, token_logprobs)
                if result is not None and tp_rank == 0:  # its other ranks computed the same logits
                    results.put((RESULT, instance, result))
            except Exception:
                results.put((ERROR, instance, (command.plan.iteration, traceback.format_exc())))
    finally:
        stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()
        # Skip the interpreter's slow teardown (seconds with torch loaded) once the answers
        # are flushed to the driver.
        results.close()
        results.join_thread()
        os._exit(0)


def _warm_up(lowering, pool: torch.Tensor, config: WorkerConfig, rank: int, tp_rank: int, device: torch.device) -> None:
    """Pay at start-up what the first request of each batch shape would pay in its latency:
    building the graphs of every shape without migrations (`Lowering.warm_up`; a
    migration's are built when one first happens); the first call of each op — torch's
    custom-op machinery costs about a second on its first call in a process, an attention
    kernel milliseconds (a Triton one its compilation) — by running the DoP-1 prefill,
    continued prefill and decode graphs once on a scratch table over the pool's first
    pages (a slot is read only after its request wrote it, so what they leave there is
    never read); and the first message between two ranks (connection set-up; NCCL creates
    point-to-point communicators lazily), by one small exchange with every other rank."""
    from espc.backend.kvpool import PagedKVTable

    lowering.warm_up(config.world // config.tp)
    page = config.kv_page_size
    scratch = PagedKVTable(2 * page, page, 1)
    ring, ids = (0,), torch.arange(2 * page)  # token ids stay on the host, as the driver's do
    fresh = PrefillItem(0, 0, page, even_retention(0, page, ring))
    continued = PrefillItem(0, page, page + 1, even_retention(page, page + 1, ring))
    plans: list[tuple[PrefillBatch | DecodeBatch, torch.Tensor]] = [
        (PrefillBatch(ring, (fresh,)), ids[:page]),
        (PrefillBatch(ring, (continued,)), ids[page:page + 1]),
        (DecodeBatch(ring, (DecodeItem(0, 0, ((0, page + 1),)),)), ids[:1]),
    ]
    with torch.inference_mode():
        for batch, tokens in plans:
            lowering.lower(IterationPlan(0, (batch,)), ranks=(0,), verify=False).run(0, pool, scratch, {0: tokens}, tp_rank)
    if config.world > 1:
        peers = [peer for peer in range(config.world) if peer != rank]
        message = torch.zeros(1, device=device)
        exchange = [dist.P2POp(dist.isend, message, peer) for peer in peers]
        exchange += [dist.P2POp(dist.irecv, torch.empty(1, device=device), peer) for peer in peers]
        for work in dist.batch_isend_irecv(exchange):
            work.wait()


def _execute(
    rank: int, tp_rank: int, lowering, pool: torch.Tensor, table, command: Step, sample, token_logprobs
) -> StepResult | None:
    """Apply the step to instance `rank`'s table in the driver's order and run its graph as
    TP rank `tp_rank`; TP rank 0 samples. None: the instance runs no graph in this plan."""
    started = time.perf_counter()
    plan = command.plan
    program = lowering.lower(plan, ranks=(rank,), verify=False)
    tokens: dict[RequestId, int] = {}
    logits: dict[RequestId, np.ndarray] = {}
    logprobs: dict[RequestId, Any] = {}
    with torch.inference_mode():
        inputs = apply_step(rank, table, program, command, pool, tp_rank)
        if inputs is None:
            return None
        # Index tensors are built on the CPU (the table is there); the graph runs on the pool's device.
        inputs = {name: _to(value, pool.device) for name, value in inputs.items()}
        outputs = program.graph(rank)(**inputs)
        if outputs and tp_rank == 0:
            for request, row in zip(program.outputs(rank), outputs[0].unbind(0)):
                how = command.sampling[request]
                tokens[request] = sample(row, how.params, how.seed, how.step)
                if how.params.return_logits:
                    logits[request] = row.float().cpu().numpy()
                if how.params.logprobs is not None:  # from the same row: no extra pass
                    logprobs[request] = token_logprobs(row, tokens[request], how.params.logprobs)
    return StepResult(rank, plan.iteration, tokens, logits, logprobs, time.perf_counter() - started)


def apply_step(
    rank: int, table, program, command: Step, pool: torch.Tensor | None, tp_rank: int = 0
) -> dict[str, Any] | None:
    """Apply `command` to instance `rank`'s own table in the driver's order — the releases
    it has not seen, the plan's evictions and prefix hits, then `Program.inputs` — and
    return its graph's inputs (None: it runs no graph in this plan). Raises when the table
    then differs from the driver's mirror, which would make the two name different slots."""
    plan = command.plan
    for request in command.releases:
        table.release(request)
    for entry in plan.evictions:
        table.release(entry)
    for hit in plan.hits:
        table.share(hit.request_id, hit.source, TokenRange(0, hit.tokens))
    ids = {request: torch.from_numpy(chunk) for request, chunk in command.tokens.items()}
    inputs = program.inputs(rank, table, ids, pool, tp_rank)
    if (table.used_tokens, table.used_pages) != command.table:
        raise RuntimeError(
            f"iteration {plan.iteration}: instance {rank}'s table holds {table.used_tokens} tokens in "
            f"{table.used_pages} pages after the step, the driver's mirror {command.table[0]} in "
            f"{command.table[1]}: they no longer name the same slots"
        )
    return inputs


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
