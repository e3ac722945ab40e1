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
    world: int
    init_method: str  # e.g. tcp://127.0.0.1:PORT (mp spawn) or env:// (torchrun)
    backend: str  # gloo | nccl
    device: str  # cpu | cuda
    dtype: str
    attention: str  # torch | triton
    pool_slots: int
    threads: int
    comm_timeout_s: float


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
    from espc.runtime.sampling import sample
    from espc.runtime.weights import load_model

    torch.set_num_threads(config.threads)
    stop = threading.Event()
    try:
        device = torch.device("cuda", rank % torch.cuda.device_count()) if config.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            config.backend, init_method=config.init_method, rank=rank, world_size=config.world,
            timeout=timedelta(seconds=config.comm_timeout_s),
        )
        # NCCL creates its communicator on the first operation, which must involve every
        # rank: a barrier now, not the first batch_isend_irecv of one pair of ranks.
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        dtype = DTYPES[config.dtype]
        model = load_model(config.model, dtype=dtype, device=device, base_dir=config.base_dir)
        lowering = Lowering(model, attention=config.attention)
        pool = pool_tensor(config.model, config.pool_slots, dtype, device)
        threading.Thread(target=_heartbeat, args=(rank, results, stop), daemon=True).start()
        results.put((READY, rank, os.getpid()))
    except Exception:
        results.put((ERROR, rank, (None, traceback.format_exc())))
        return
    try:
        while (command := commands.get()) is not None:
            try:
                results.put((RESULT, rank, _execute(rank, lowering, pool, command, sample)))
            except Exception:
                results.put((ERROR, rank, (command.plan.iteration, traceback.format_exc())))
    finally:
        stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()
        # Skip the interpreter's slow teardown (seconds with torch loaded) once the answers
        # are flushed to the driver.
        results.close()
        results.join_thread()
        os._exit(0)


def _execute(rank: int, lowering, pool: torch.Tensor, command: Step, sample) -> StepResult:
    started = time.perf_counter()
    program = lowering.lower(command.plan, ranks=(rank,), verify=False)
    tokens: dict[RequestId, int] = {}
    logits: dict[RequestId, np.ndarray] = {}
    with torch.inference_mode():
        inputs = {name: _to(value, pool.device) for name, value in command.inputs.items()}
        outputs = program.graph(rank)(pool=pool, **inputs)
        if outputs:
            for request, row in zip(program.outputs(rank), outputs[0].unbind(0)):
                how = command.sampling[request]
                tokens[request] = sample(row, how.params, how.seed, how.step)
                if how.params.return_logits:
                    logits[request] = row.float().cpu().numpy()
    return StepResult(rank, command.plan.iteration, tokens, logits, time.perf_counter() - started)


def _to(value: Any, device: torch.device) -> Any:
    """Graph inputs travel as numpy arrays (see Driver._dispatch)."""
    return torch.from_numpy(value).to(device) if isinstance(value, np.ndarray) else value
