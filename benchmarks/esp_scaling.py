"""Elastic sequence-parallel prefill of one long prompt: scaling and bytes on the wire, with
tensor parallelism inside each instance.

    python benchmarks/esp_scaling.py [--tokens 16384] [--tps 1,2] [--dops 1,2] [--json scaling.json]

Runs the lowered prefill of one prompt on the tiny model with the gloo harness (one process
and one thread per rank, CPU) at each (tp, DoP): a ring of DoP elastic instances, each of tp
ranks (world = tp × DoP processes), retaining the KV evenly over the ring. Time is the
slowest rank's graph wall time (inputs included), best of --repeats runs after a warm-up
iteration that builds the graphs. Speed-up is against tp 1 × DoP 1 and efficiency is
T(1, 1) / (tp · DoP · T(tp, DoP)): one process per rank, so tp · DoP is what the row uses.
On a 2-core machine, tp · DoP above 2 oversubscribes the cores.

Bytes, from the comm counters (`espc.backend.ops.comm_counters`), summed over every rank:

- ring (between instances): the point-to-point channels. Each TP rank moves its own KV
  heads around the ring, to the same TP rank of the next instance, so the minimum is what
  every rank must receive to attend to every other instance's KV block: (DoP − 1) × tokens
  × layers × 2 × head_dim × dtype bytes × (local KV heads × tp). The last factor is
  kv_heads when tp divides them, and tp when kv_heads < tp: a KV head replicated on tp /
  kv_heads ranks is needed on each of them, so each of them receives it.
- all-reduce (inside an instance): the `tp` counter of `espc::tp_all_reduce` adds the bytes
  of each TENSOR it reduces (on every rank: its [local tokens, hidden] partial of o_proj and
  of the MLP), not what gloo puts on the wire. Like is compared with like: the tensor bytes
  the model needs are 2 per layer × tokens × hidden × dtype bytes per rank of the instance
  holding the tokens, × tp ranks (ratio 1.000: no all-reduce beyond the two per layer, none
  of padding). The wire minimum beside it is what a bandwidth-optimal (ring) all-reduce
  sends: 2 · (tp − 1) / tp × the tensor bytes on each rank. gloo's algorithm choice is not
  counted, so that column is analytic only.

Virtual machines do not always run processes on their cores in parallel, so the script also
measures the machine: tp · DoP processes doing the same single-threaded matmuls, against
one. The column ESP/machine divides the row's efficiency by that (1.0: ESP and TP lose
nothing beyond the machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from espc.backend import ops
from espc.backend.harness import Harness, RankResult
from espc.backend.tensor_parallel import tp_shard
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


@functools.cache
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


def ring_minimum(spec: ModelSpec, tokens: int, tp: int, dop: int) -> int:
    """Bytes every TP rank of every instance must receive over the ring, summed (module doc)."""
    local_kv_heads = tp_shard(spec, tp, 0).local_kv_heads  # the same on every TP rank
    return (dop - 1) * tokens * 2 * spec.layers * spec.head_dim * spec.dtype_bytes * local_kv_heads * tp


def all_reduce_tensor_bytes(spec: ModelSpec, tokens: int, tp: int) -> int:
    """Bytes of the tensors the all-reduces of a prefill reduce, summed over ranks: two per
    layer of [tokens, hidden] over the instances, on each of their tp ranks (none at tp 1)."""
    return 0 if tp == 1 else tp * 2 * spec.layers * tokens * spec.hidden * spec.dtype_bytes


def sent(results: list[RankResult], channels) -> int:
    return sum(result.counters[channel]["bytes_sent"] for result in results for channel in channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tps", default="1,2", help="comma-separated tensor-parallel degrees per instance")
    parser.add_argument("--dops", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="time the best of this many runs per (tp, DoP)")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    tps = [int(t) for t in arguments.tps.split(",")]
    dops = [int(d) for d in arguments.dops.split(",")]
    if (tps[0], dops[0]) != (1, 1):
        raise SystemExit(
            f"--tps {arguments.tps} --dops {arguments.dops}: both must start at 1 (the baseline is tp 1 × DoP 1)"
        )
    spec = ModelSpec(preset="tiny", max_context=max(arguments.tokens, 4096))
    prompt = torch.randint(0, spec.vocab, (arguments.tokens,), generator=torch.Generator().manual_seed(0))
    rows = []
    for tp in tps:
        with Harness(spec, tp * max(dops), slots=arguments.tokens + 1024, threads=1, timeout=1800, tp=tp) as harness:
            for dop in dops:
                ring = tuple(range(dop))  # instances; instance i is world ranks [i·tp, (i+1)·tp)
                prefill(harness, ring, prompt[:WARM_UP_TOKENS], 0, 0)
                runs = [prefill(harness, ring, prompt, 2 * (1 + r), 1) for r in range(arguments.repeats)]
                seconds = min(
                    max(result.seconds for result in results if result.rank // tp in ring) for results in runs
                )
                results = runs[-1]
                reduced = all_reduce_tensor_bytes(spec, arguments.tokens, tp)
                rows.append(
                    {
                        "tp": tp,
                        "dop": dop,
                        "processes": tp * dop,
                        "seconds": seconds,
                        "ring_bytes_sent": sent(results, ops.CHANNELS),
                        "ring_bytes_minimum": ring_minimum(spec, arguments.tokens, tp, dop),
                        "all_reduce_tensor_bytes": sent(results, ("tp",)),
                        "all_reduce_tensor_bytes_needed": reduced,
                        "all_reduce_wire_bytes_minimum": round(2 * (tp - 1) / tp * reduced),
                    }
                )
    base = rows[0]["seconds"]
    print(f"prefill of one {arguments.tokens:,}-token prompt, {spec.name} model, gloo, 1 thread per rank (process)")
    print(
        f"{'tp':>2s} {'DoP':>3s} {'time (s)':>9s} {'speed-up':>9s} {'efficiency':>11s} {'machine':>8s} {'ESP/machine':>12s} "
        f"{'ring sent':>12s} {'ring min':>12s} {'ratio':>6s} {'all-reduced':>12s} {'needed':>12s} {'ratio':>6s} "
        f"{'AR wire min':>12s}"
    )
    for row in rows:
        row["speedup"] = base / row["seconds"]
        row["efficiency"] = row["speedup"] / row["processes"]
        row["machine_efficiency"] = machine_efficiency(row["processes"])
        ring_ratio = f"{row['ring_bytes_sent'] / row['ring_bytes_minimum']:.3f}" if row["ring_bytes_minimum"] else "-"
        needed = row["all_reduce_tensor_bytes_needed"]
        reduce = f"{row['all_reduce_tensor_bytes'] / needed:.3f}" if needed else "-"
        print(
            f"{row['tp']:2d} {row['dop']:3d} {row['seconds']:9.2f} {row['speedup']:9.2f} {row['efficiency']:11.1%} "
            f"{row['machine_efficiency']:8.1%} {row['efficiency'] / row['machine_efficiency']:12.2f} "
            f"{row['ring_bytes_sent']:12,d} {row['ring_bytes_minimum']:12,d} {ring_ratio:>6s} "
            f"{row['all_reduce_tensor_bytes']:12,d} {needed:12,d} {reduce:>6s} {row['all_reduce_wire_bytes_minimum']:12,d}"
        )
    print(
        "ring: bytes between instances (every TP rank moves its own KV heads); all-reduced: tensor bytes "
        "espc::tp_all_reduce reduced on every rank, against the two per layer the model needs; "
        "AR wire min: what a ring all-reduce of those tensors sends, 2(tp-1)/tp of them"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
