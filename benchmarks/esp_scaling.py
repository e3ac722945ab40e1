"""Elastic sequence-parallel prefill of one long prompt: scaling and bytes on the wire.

    python benchmarks/esp_scaling.py [--tokens 16384] [--dops 1,2] [--json scaling.json]

Runs the lowered prefill of one prompt on the tiny model with the gloo harness (one process
and one thread per rank, CPU) at each DoP, retaining the KV evenly over the ring. Time is the
slowest rank's graph wall time (inputs included), best of --repeats runs after a warm-up
iteration that builds the graphs. Scaling efficiency at DoP d is T(1) / (d * T(d)). Bytes are what the comm counters
saw; the analytic minimum is what each rank must receive to attend to every other rank's KV
block: (d - 1) * tokens * KV bytes per token (every layer). On a 2-core machine, DoP above 2
oversubscribes the cores.

Virtual machines do not always run processes on their cores in parallel, so the script also
measures the machine: d processes doing the same single-threaded matmuls, against one. The
last column divides ESP's efficiency by that (1.0: ESP loses nothing beyond the machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from espc.backend.harness import Harness
from espc.frontend.spec import ModelSpec
from espc.planner.plan import IterationPlan, PrefillBatch, PrefillItem, even_retention

WARM_UP_TOKENS = 257


def prefill(harness: Harness, ring: tuple[int, ...], tokens: torch.Tensor, iteration: int, request: int):
    n = len(tokens)
    plan = IterationPlan(iteration, (PrefillBatch(ring, (PrefillItem(request, 0, n, even_retention(0, n, ring)),)),))
    results = harness.run(plan, {request: tokens})
    harness.run(IterationPlan(iteration + 1, (), frees=(request,)))
    return results


def _matmuls(_: int) -> float:
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for _ in range(40):
        a @ a
    return time.perf_counter() - started


def machine_efficiency(processes: int, repeats: int = 3) -> float:
    """Throughput of `processes` concurrent single-threaded workers over one, per worker
    (best of `repeats`: the machine may be shared)."""
    if processes == 1:
        return 1.0
    context = mp.get_context("spawn")
    with context.Pool(processes) as pool:
        alone = min(pool.map(_matmuls, [0])[0] for _ in range(repeats))
        together = min(max(pool.map(_matmuls, range(processes))) for _ in range(repeats))
    return alone / together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dops", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="time the best of this many runs per DoP")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    dops = [int(d) for d in arguments.dops.split(",")]
    spec = ModelSpec(preset="tiny", max_context=max(arguments.tokens, 4096))
    prompt = torch.randint(0, spec.vocab, (arguments.tokens,), generator=torch.Generator().manual_seed(0))
    rows = []
    with Harness(spec, max(dops), slots=arguments.tokens + 1024, threads=1, timeout=1800) as harness:
        for dop in dops:
            ring = tuple(range(dop))
            prefill(harness, ring, prompt[:WARM_UP_TOKENS], 0, 0)
            runs = [prefill(harness, ring, prompt, 2 * (1 + r), 1) for r in range(arguments.repeats)]
            seconds = min(max(result.seconds for result in results if result.rank in ring) for results in runs)
            results = runs[-1]
            sent = sum(sum(c["bytes_sent"] for c in result.counters.values()) for result in results)
            minimum = (dop - 1) * arguments.tokens * spec.kv_bytes_per_token
            rows.append({"dop": dop, "seconds": seconds, "bytes_sent": sent, "bytes_minimum": minimum})
    base = rows[0]["seconds"] * rows[0]["dop"]
    print(f"prefill of one {arguments.tokens:,}-token prompt, {spec.name} model, gloo, 1 thread per rank")
    print(
        f"{'DoP':>3s} {'time (s)':>9s} {'speed-up':>9s} {'efficiency':>11s} {'machine':>8s} {'ESP/machine':>12s} "
        f"{'bytes sent':>14s} {'analytic min':>14s} {'ratio':>6s}"
    )
    for row in rows:
        row["speedup"] = base / row["seconds"]
        row["efficiency"] = row["speedup"] / row["dop"]
        row["machine_efficiency"] = machine_efficiency(row["dop"])
        ratio = f"{row['bytes_sent'] / row['bytes_minimum']:.3f}" if row["bytes_minimum"] else "-"
        print(
            f"{row['dop']:3d} {row['seconds']:9.2f} {row['speedup']:9.2f} {row['efficiency']:11.1%} "
            f"{row['machine_efficiency']:8.1%} {row['efficiency'] / row['machine_efficiency']:12.2f} "
            f"{row['bytes_sent']:14,d} {row['bytes_minimum']:14,d} {ratio:>6s}"
        )
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
