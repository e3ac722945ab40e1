"""`espc compile` wall time for 8, 64 and 256 elastic instances.

    python benchmarks/compile_time.py [--instances 8,64,256] [--strategies elastic,auto]
        [--search-seconds 0] [--requests 300] [--json benchmarks/results/compile_time.json]

specs/lwm7b-a800x8.toml (tp 2) with its node of 8 A800 repeated, so the cluster has
exactly N elastic instances (2N devices). Each compile runs the whole pipeline of
`espc.planner.compile.compiler` — workload sample, MILP, simulation of the MILP policy, local
search (`--search-seconds`), and with strategy auto every baseline family — and the table
shows the seconds per stage. Targets (planner issue): ≤ 10 s for 8 instances, ≤ 60 s for 64.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from espc.frontend.loader import load_spec, validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "lwm7b-a800x8.toml"
TARGETS_S = {8: 10.0, 64: 60.0}
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
    spec = cluster_spec(instances, strategy)
    stages: dict[str, float] = {}
    last = [time.perf_counter(), None]

    def on_progress(stage: str, message: str) -> None:
        now = time.perf_counter()
        if last[1] is not None:
            stages[last[1]] = stages.get(last[1], 0.0) + now - last[0]
        last[0], last[1] = now, stage

    started = time.perf_counter()
    result = compile_spec(spec, spec_hash(spec), SPEC.parent, options, on_progress=on_progress)
    total = time.perf_counter() - started
    if last[1] is not None:
        stages[last[1]] = stages.get(last[1], 0.0) + time.perf_counter() - last[0]
    return {
        "instances": instances, "strategy": strategy, "seconds": total, "stages": stages,
        "chosen": f"{result.policy.strategy} ({result.policy.configuration})",
        "milp_seconds": sum(solution.solver.seconds for solution in result.milp),
        "simulations": len(result.trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="8,64,256")
    parser.add_argument("--strategies", default="elastic,auto")
    parser.add_argument("--search-seconds", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulated trial")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    options = CompileOptions(search_seconds=arguments.search_seconds, trial_requests=arguments.requests)

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
