"""One worker process per device: it holds the model's weights and the KV pool tensor and
executes its slice of every iteration.

The driver (`espc.runtime.driver`) sends each worker, in order, `Step` commands: the plan
(from which the worker lowers its own graph through its graph cache: same code, same graphs
as the driver's verified lowering), the graph inputs the driver computed against its global
KV table (slots, positions, token ids), and how to sample the requests whose logits this
rank produces. The worker runs the graph, samples (so only token ids travel back, plus the
logits rows when a request asked for them) and answers with a `StepResult`. Its pool holds
no bookkeeping: which slot holds what is the driver's table alone.

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
from espc.planner.plan import IterationPlan, RequestId

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
    pool_slots: int
    threads: int
    comm_timeout_s: float
    tp: int = 1  # ranks per elastic instance


@dataclass(frozen=True)
class Sampling:
    """How to turn one request's logits row into a token on this step."""

    params: Any  # espc.runtime.sampling.SamplingParams
    seed: int
    step: int  # index of the token being generated


@dataclass(frozen=True)
class Step:
    plan: IterationPlan
    inputs: dict[str, Any]  # the graph inputs of this rank (numpy arrays and ints), without the pool
    sampling: dict[RequestId, Sampling]


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
    from espc.backend.kvpool import pool_tensor
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
        pool = pool_tensor(config.model, config.pool_slots, dtype, device, kv_heads=kv_heads)
        # The first call of a torch.library custom op in a process sets up torch's machinery
        # for them (about a second on a CPU, whatever the op and its size), which the first
        # request to reach this worker would pay in its TTFT: pay it now, on an empty read.
        torch.ops.espc.kv_gather(pool, 0, torch.empty(0, dtype=torch.int64, device=device))
        threading.Thread(target=_heartbeat, args=(instance, results, stop), daemon=True).start()
        results.put((READY, instance, os.getpid()))
    except Exception:
        results.put((ERROR, instance, (None, traceback.format_exc())))
        return
    try:
        while (command := commands.get()) is not None:
            try:
                result = _execute(instance, tp_rank, lowering, pool, command, sample, token_logprobs)
                if tp_rank == 0:  # the instance's answer; its other ranks computed the same logits
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


def _execute(rank: int, tp_rank: int, lowering, pool: torch.Tensor, command: Step, sample, token_logprobs) -> StepResult:
    """Run instance `rank`'s graph as its TP rank `tp_rank`; TP rank 0 samples."""
    started = time.perf_counter()
    program = lowering.lower(command.plan, ranks=(rank,), verify=False)
    tokens: dict[RequestId, int] = {}
    logits: dict[RequestId, np.ndarray] = {}
    logprobs: dict[RequestId, Any] = {}
    with torch.inference_mode():
        inputs = {name: _to(value, pool.device) for name, value in command.inputs.items()}
        inputs.update(program.peer_ranks(rank, tp_rank))  # the driver's inputs name TP rank 0's peers
        outputs = program.graph(rank)(pool=pool, **inputs)
        if outputs and tp_rank == 0:
            for request, row in zip(program.outputs(rank), outputs[0].unbind(0)):
                how = command.sampling[request]
                tokens[request] = sample(row, how.params, how.seed, how.step)
                if how.params.return_logits:
                    logits[request] = row.float().cpu().numpy()
                if how.params.logprobs is not None:  # from the same row: no extra pass
                    logprobs[request] = token_logprobs(row, tokens[request], how.params.logprobs)
    return StepResult(rank, command.plan.iteration, tokens, logits, logprobs, time.perf_counter() - started)


def _to(value: Any, device: torch.device) -> Any:
    """Graph inputs travel as numpy arrays (see Driver._dispatch)."""
    return torch.from_numpy(value).to(device) if isinstance(value, np.ndarray) else value
