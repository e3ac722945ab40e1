"""`espc compile` wall time for 8, 64 and 256 elastic instances, and for the tiny CPU default.

    python benchmarks/compile_time.py [--instances 8,64,256] [--strategies elastic,auto]
        [--search-seconds 0] [--requests 300] [--json benchmarks/results/compile_time.json]
    python benchmarks/compile_time.py --tiny [--workers 1,2] [--json benchmarks/results/compile_time_tiny.json]

specs/lwm7b-a800x8.toml (tp 2) with its node of 8 A800 repeated, so the cluster has
exactly N elastic instances (2N devices). Each compile runs the whole pipeline of
`espc.planner.compile.compiler` — workload sample, MILP, simulation of the MILP policy, local
search (`--search-seconds`), and with strategy auto every baseline family — and the table
shows the seconds per stage. Targets (planner issue): ≤ 10 s for 8 instances, ≤ 60 s for 64.

`--tiny` compiles specs/tiny-cpu.toml as `espc compile` does by default (strategy auto,
every option at its default: 20 s search budget, 300-request trials) — `make run`'s compile
— with the machine's load average and the compile's CPU seconds beside it (the target,
≤ 10 s on 2 cores, is for a machine the compile has to itself; on a loaded one the CPU
seconds are the better measure), and the decisions: the chosen strategy, every
strategy's predicted goodput and the elastic policy's DoP caps. `--workers 1,2` compiles
once per worker count back to back (the CPU seconds of the forked workers are shown apart)
and says whether the decisions are the same, as they must be.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from espc.frontend.loader import load_spec, validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, CompileResult, compile_spec
from espc.planner.compile.parallel import available_workers

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "lwm7b-a800x8.toml"
TINY_SPEC = ROOT / "specs" / "tiny-cpu.toml"
TARGETS_S = {8: 10.0, 64: 60.0}
TINY_TARGET_S = 10.0
INTER_NODE_BANDWIDTH = "100GB/s"  # a typical node: 4 × 200Gb/s InfiniBand


def cluster_spec(instances: int, strategy: str) -> Spec:
    """The spec's node repeated until the cluster has `instances` instances of the spec's tp
    (tp 2: at tp 1 one device cannot hold the weights beside a 1M-token context's share)."""
    data = load_spec(SPEC).model_dump(mode="json")
    node = data["cluster"]["nodes"][0]
    per_node = node["devices"] // data["cluster"]["tp"]
    if instances % per_node:
        raise SystemExit(f"{instances} instances is not a whole number of nodes of {per_node} instances")
    data["cluster"]["nodes"] = [{**node, "name": f"node{index}"} for index in range(instances // per_node)]
    if len(data["cluster"]["nodes"]) > 1:
        data["cluster"]["inter_node_bandwidth"] = INTER_NODE_BANDWIDTH
    data["policy"]["strategy"] = strategy
    return validate_spec(data, {}, f"{instances} instances")


def measure(instances: int, strategy: str, options: CompileOptions) -> dict:
    row, _ = timed_compile(cluster_spec(instances, strategy), SPEC.parent, options)
    return {"instances": instances, "strategy": strategy, **row}


def timed_compile(spec: Spec, base_dir: Path, options: CompileOptions) -> tuple[dict, CompileResult]:
    """Compile `spec`: total and per-stage seconds, the process's CPU seconds (what other
    processes on a loaded machine inflate far less than wall time), what was chosen, MILP
    seconds, trials."""
    stages: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    clocks = (time.perf_counter, time.process_time)
    last: list = [[clock() for clock in clocks], None]  # (wall, CPU) when the current stage began; the stage

    def close_stage() -> None:
        if last[1] is not None:
            wall, cpu = (clock() - began for clock, began in zip(clocks, last[0]))
            stages[last[1]] = stages.get(last[1], 0.0) + wall
            stage_cpu[last[1]] = stage_cpu.get(last[1], 0.0) + cpu

    def on_progress(stage: str, message: str) -> None:
        close_stage()
        last[0], last[1] = [clock() for clock in clocks], stage

    def children_cpu() -> float:
        times = os.times()
        return times.children_user + times.children_system

    started, cpu_started, children_started = time.perf_counter(), time.process_time(), children_cpu()
    result = compile_spec(spec, spec_hash(spec), base_dir, options, on_progress=on_progress)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    close_stage()
    return {
        "seconds": total, "cpu_seconds": cpu, "workers_cpu_seconds": children_cpu() - children_started,
        "stages": stages, "stage_cpu_seconds": stage_cpu,
        "chosen": f"{result.policy.strategy} ({result.policy.configuration})",
        "milp_seconds": sum(solution.solver.seconds for solution in result.milp),
        "simulations": len(result.trials),
    }, result


def tiny(json_path: Path | None, worker_counts: list[int]) -> None:
    """`--tiny`: see the module docstring; once per worker count, back to back."""
    rows = []
    for workers in worker_counts:
        load_before = os.getloadavg()
        row, result = timed_compile(load_spec(TINY_SPEC), TINY_SPEC.parent, CompileOptions(workers=workers))
        policy = result.policy
        row |= {
            "spec": str(TINY_SPEC.relative_to(ROOT)), "options": f"espc compile defaults, --workers {workers}",
            "workers": workers, "target_s": TINY_TARGET_S,
            "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "predictions": {p.strategy: [p.configuration, p.goodput_rps] for p in policy.predictions},
            "reason": policy.reason,
            "prefill_dop_caps": [bucket.prefill_dop for bucket in policy.elastic.buckets] if policy.elastic else None,
        }
        rows.append(row)
        stages = ", ".join(
            f"{stage} {seconds:.1f} ({row['stage_cpu_seconds'][stage]:.1f} CPU)" for stage, seconds in row["stages"].items()
        )
        print(f"espc compile {row['spec']} (defaults, {workers} worker{'s' if workers > 1 else ''}): {row['seconds']:.1f} s "
              f"(target ≤ {TINY_TARGET_S:g} s on 2 cores), {row['cpu_seconds']:.1f} s of CPU here and "
              f"{row['workers_cpu_seconds']:.1f} s in forked workers, load average {load_before[0]:.1f} before on {row['cpus']} CPUs")
        print(f"  stages (s): {stages}; {row['simulations']} candidates simulated")
        print(f"  chosen: {row['chosen']}: {policy.reason}")
        print(f"  elastic prefill DoP caps per bucket: {row['prefill_dop_caps']}", flush=True)
    decisions = {json.dumps([row["predictions"], row["prefill_dop_caps"]]) for row in rows}
    print(f"same decisions on {', '.join(map(str, worker_counts))} workers: {'yes' if len(decisions) == 1 else 'NO'}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="8,64,256")
    parser.add_argument("--strategies", default="elastic,auto")
    parser.add_argument("--search-seconds", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulated trial")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="compile specs/tiny-cpu.toml with the defaults instead")
    parser.add_argument("--workers", help="comma-separated worker counts, each measured (default: the compile's default)")
    arguments = parser.parse_args()
    worker_counts = [int(w) for w in arguments.workers.split(",")] if arguments.workers else [available_workers()]
    if arguments.tiny:
        tiny(arguments.json, worker_counts)
        return
    options = CompileOptions(
        search_seconds=arguments.search_seconds, trial_requests=arguments.requests, workers=worker_counts[0]
    )

    rows = []
    for instances in map(int, arguments.instances.split(",")):
        for strategy in arguments.strategies.split(","):
            row = measure(instances, strategy, options)
            rows.append(row)
            print(f"{instances:4d} instances, {strategy:8s}: {row['seconds']:7.1f} s  ({row['chosen']})", flush=True)

    print(f"\nespc compile wall time, {SPEC.name} scaled (tp=2), search {arguments.search_seconds:g} s")
    header = f"{'instances':>9s} {'strategy':>9s} {'total s':>9s} {'MILP s':>8s} {'target':>8s}  stages (s)"
    print(header)
    print("-" * len(header))
    for row in rows:
        target = TARGETS_S.get(row["instances"])
        stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in row["stages"].items())
        print(
            f"{row['instances']:>9d} {row['strategy']:>9s} {row['seconds']:>9.1f} {row['milp_seconds']:>8.2f} "
            f"{(f'≤ {target:g}' if target else '-'):>8s}  {stages}"
        )
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
