"""Bytes the driver sends a worker per decode step, by context length: O(new tokens), not O(context).

    python benchmarks/step_bytes.py [--contexts 4096,131072,524288] [--steps 8] [--json PATH]

The driver keeps a mirror of each worker's block table and sends a step as the plan, the
token ids it feeds and the releases the worker has not seen (`espc.runtime.worker.Step`);
the worker applies it to its own table and computes its graph's inputs there. This
benchmark runs the real `Driver` (scheduler, lowering, mirrors, `_dispatch`) on
specs/tiny-cpu.toml made long-context (static-sp on four instances of one device, each with KV
capacity for the context), with its worker handles replaced by recorders (the `WorkerHandle` protocol) that
pickle each command as the worker queue does and answer each batch with a token, so no
model runs: a 512K-token prefill would take hours on this CPU, and what is measured is what
travels, not what is computed. One request of C prompt tokens: its prefill step (which
carries the C prompt ids once), then `--steps` decode steps.

Columns per context: the median bytes of a decode step now; what the same step carried
when the driver sent the graph inputs computed against its table (positions, slots and
sequence ids of the whole context: `Program.inputs` with `reads=True` on a copy of the
mirror, pickled the same way); and the driver's median seconds to schedule and dispatch a
decode step (not a target here; the machine's load shows in it). Writes
benchmarks/results/step_bytes.json by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from espc import load_spec
from espc.runtime.driver import Admission, Driver, DriverOptions
from espc.runtime.engine import EngineOptions, build_scheduler
from espc.runtime.sampling import SamplingParams
from espc.runtime.worker import Step, StepResult

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"


class Recorder:
    """A `WorkerHandle` that pickles what it is sent (as the worker's queue does) and keeps it."""

    pid = None

    def __init__(self) -> None:
        self.sent: list[tuple[Step, int]] = []

    def send(self, command) -> None:
        self.sent.append((command, len(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))))

    def exitcode(self) -> int | None:
        return None

    def kill(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass


def measure(context: int, steps: int) -> dict:
    spec = load_spec(SPEC)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"max_context": context + steps + 64})})
    options = EngineOptions(strategy="static-sp", configuration="tp=1, groups=1+1+1+1", kv_capacity=context + steps + 64)
    scheduler = build_scheduler(spec, None, SPEC.parent, options)
    driver = Driver(
        spec, scheduler,
        DriverOptions(
            scheduler.deployment.capacity[0], options.max_running, options.threads, options.start_timeout_s,
            options.heartbeat_timeout_s, options.comm_timeout_s, options.stall_timeout_s, "float32",
            Admission(None, None), options.launcher,  # admit whatever the length: bytes are measured, not SLOs
        ),
        SPEC.parent,
    )
    recorders = [Recorder() for _ in range(driver.world)]
    driver._workers = recorders  # no processes: the recorders answer (see the module docstring)
    prompt = list(np.random.default_rng(0).integers(0, spec.model.vocab, context).tolist())
    params = SamplingParams(max_new_tokens=steps + 1, temperature=0.0)
    driver.submit(prompt, params, 0, lambda event: None)
    driver._handle(driver._inbox.get_nowait())
    decode_bytes, input_bytes, dispatch_s, prefill_bytes = [], [], [], 0
    for _ in range(steps + 1):
        tables = copy.deepcopy(driver.tables)  # the mirrors before the step, for the old-design column
        started = time.perf_counter()
        driver._schedule()
        elapsed = time.perf_counter() - started
        (rank,) = [rank for rank, recorder in enumerate(recorders) if recorder.sent]
        step, size = recorders[rank].sent.pop()
        if step.plan.batches[0].phase == "prefill":
            prefill_bytes = size
        else:
            decode_bytes.append(size)
            dispatch_s.append(elapsed)
            ids = {request: torch.from_numpy(chunk) for request, chunk in step.tokens.items()}
            program = driver.lowering.lower(step.plan)
            inputs = program.inputs(rank, tables[rank], ids, None)
            assert inputs is not None
            del inputs["pool"]
            arrays = {name: v.numpy() if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
            input_bytes.append(len(pickle.dumps(arrays, protocol=pickle.HIGHEST_PROTOCOL)))
        (request,) = step.sampling
        driver._answer(rank, step.plan.iteration, StepResult(rank, step.plan.iteration, {request: 7}))
    return {
        "context": context,
        "prefill_step_bytes": prefill_bytes,
        "decode_step_bytes": statistics.median(decode_bytes),
        "decode_step_bytes_all": decode_bytes,
        "graph_input_bytes": statistics.median(input_bytes),
        "dispatch_s": statistics.median(dispatch_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,131072,524288")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "step_bytes.json")
    arguments = parser.parse_args()
    rows = [measure(int(context), arguments.steps) for context in arguments.contexts.split(",")]
    print("bytes the driver sends its worker per decode step (one request, DoP 1, tiny model)")
    print(f"{'context':>9} {'step now':>10} {'graph inputs (before)':>22} {'prefill step':>13} {'dispatch':>10}")
    for row in rows:
        print(
            f"{row['context']:>9,} {row['decode_step_bytes']:>10,} {row['graph_input_bytes']:>22,} "
            f"{row['prefill_step_bytes']:>13,} {row['dispatch_s'] * 1e3:>8.2f}ms"
        )
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps({
        "benchmark": "step_bytes",
        "spec": str(SPEC.relative_to(ROOT)),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
