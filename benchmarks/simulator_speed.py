"""Simulator throughput: 10,000 ShareGPT requests on 64 instances (8 nodes × 8 H100, tp 1).

    python benchmarks/simulator_speed.py [--requests 10000] [--json speed.json]

The target is under 30 s per run on a 2-core machine. Prints, per baseline, the wall time,
simulated iterations and iterations per second.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from espc import parse_spec
from espc.planner.compile.evaluation import Evaluator

SPEC = """
[model]
preset = "llama3-8b"

[cluster]
tp = 1
inter_node_bandwidth = "400GB/s"
{nodes}

[slo]
ttft = "max(25x prefill, 5s) at p90"
tpot = "50ms at p90"

[workload]
lengths = "sharegpt"
arrival = "poisson(100)"
requests = {requests}
"""
NODE = '\n[[cluster.nodes]]\ndevice = "H100"\ndevices = 8\n'
# One configuration per baseline: vLLM-style replicas, chunked prefill, a 32P+32D split.
CASES = (("static-sp", "tp=1, groups=" + "+".join(["1"] * 64)), ("chunked", None), ("disaggregated", "tp=1, 32P+32D"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    spec = parse_spec(SPEC.format(nodes=NODE * 8, requests=arguments.requests), "speed.toml")
    evaluator = Evaluator(spec)
    requests = evaluator.workload()
    rows = []
    print(f"{'strategy':15s} {'configuration':22s} {'wall (s)':>9s} {'iterations':>11s} {'iter/s':>9s} {'attainment':>11s}")
    for strategy, label in CASES:
        candidate = next(c for c in evaluator.candidates(strategy) if label is None or c.label == label)
        started = time.perf_counter()
        result, summary = evaluator.run(candidate, requests)
        wall = time.perf_counter() - started
        rows.append({"strategy": strategy, "configuration": candidate.label, "wall_s": wall,
                     "iterations": result.iterations, "attainment": summary.attainment})
        print(f"{strategy:15s} {candidate.label[:22]:22s} {wall:9.1f} {result.iterations:11,d} "
              f"{result.iterations / wall:9,.0f} {summary.attainment:11.1%}")
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
