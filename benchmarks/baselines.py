"""P90 goodput of every baseline strategy on LoongServe's workloads and the real traces.

    python benchmarks/baselines.py [--seeds 5] [--requests 300] [--jobs 2] [--json baselines.json]

For specs/lwm7b-a800x8.toml (LWM-Text-1M on 8 × A800, LoongServe's SLO), each cell is the
goodput (req/s at which ≥ 90% of requests meet both SLOs) of a strategy's best
configuration, as mean ± spread over seeds; the real traces (../shared/traces, or
$ESPC_TRACES) are skipped with a note when absent. Strategies are tuned as their authors
ship them (see espc.planner.strategies.candidates); families are searched per cell.
Cells run in parallel worker processes (--jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.evaluation import Evaluator, override_workload
from espc.planner.strategies import BASELINES

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "lwm7b-a800x8.toml"
TRACES = Path(os.environ.get("ESPC_TRACES", ROOT.parent / "shared" / "traces"))
DATASETS = ("sharegpt", "leval", "lveval", "mixed")
TRACE_FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "mooncake": "mooncake_conversation.jsonl",
}


# The chunk sizes LoongServe ran its chunked baseline with, per dataset (anchors/README.md);
# other workloads keep the spec's.
CHUNK_TOKENS = {"sharegpt": 256, "leval": 2048, "lveval": 16384, "mixed": 2048}


def workload_spec(workload: str) -> Spec:
    """The benchmark spec with its workload replaced by a length distribution or a trace,
    and the chunked baseline's chunk size as LoongServe ran it on that dataset."""
    spec = load_spec(SPEC)
    if workload in CHUNK_TOKENS:
        data = spec.model_dump(mode="json")
        data["policy"]["chunk_tokens"] = CHUNK_TOKENS[workload]
        spec = validate_spec(data, {}, "benchmark")
    if workload in TRACE_FILES:
        return override_workload(spec, trace=TRACES / TRACE_FILES[workload])
    return override_workload(spec, lengths=workload)


def available_workloads(names: list[str]) -> list[str]:
    """The workloads whose trace files exist (a note for each skipped one)."""
    workloads = []
    for workload in names:
        if workload in TRACE_FILES and not (TRACES / TRACE_FILES[workload]).exists():
            print(f"skipping {workload}: {TRACES / TRACE_FILES[workload]} not found (set ESPC_TRACES)")
            continue
        workloads.append(workload)
    return workloads


def _cell(workload: str, strategy: str, seed: int, requests: int) -> dict:
    spec = workload_spec(workload)
    started = time.perf_counter()
    found = Evaluator(spec, base_dir=SPEC.parent, requests=requests).strategy_goodput(strategy, seed)
    return {
        "workload": workload, "strategy": strategy, "seed": seed, "goodput": found.goodput.rate,
        "configuration": found.configuration, "configurations_searched": found.configurations_searched,
        "simulations": len(found.goodput.trials), "seconds": time.perf_counter() - started,
    }


def _format(rates: list[float]) -> str:
    mean = statistics.fmean(rates)
    return f"{mean:.3f} ± {statistics.stdev(rates):.3f}" if len(rates) > 1 else f"{mean:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workloads", default=",".join(DATASETS + tuple(TRACE_FILES)))
    parser.add_argument("--strategies", default=",".join(BASELINES))
    parser.add_argument("--json", type=Path, help="also write every cell to this file")
    arguments = parser.parse_args()

    workloads = available_workloads(arguments.workloads.split(","))
    strategies = arguments.strategies.split(",")
    cells = [(w, s, seed, arguments.requests) for w in workloads for s in strategies for seed in range(arguments.seeds)]
    results = []
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        futures = [pool.submit(_cell, *cell) for cell in cells]
        for done, future in enumerate(as_completed(futures), 1):
            cell = future.result()
            results.append(cell)
            print(
                f"[{done}/{len(cells)} {time.perf_counter() - started:6.0f}s] {cell['workload']:10s} {cell['strategy']:13s} "
                f"seed {cell['seed']}: {cell['goodput']:.3f} req/s ({cell['configuration']})",
                flush=True,
            )

    print(f"\nP90 goodput (req/s), {SPEC.name}, {arguments.seeds} seeds × {arguments.requests} requests")
    header = f"{'workload':12s}" + "".join(f"{s:>18s}" for s in strategies)
    print(header)
    print("-" * len(header))
    for workload in workloads:
        row = f"{workload:12s}"
        for strategy in strategies:
            rates = [c["goodput"] for c in results if c["workload"] == workload and c["strategy"] == strategy]
            row += f"{_format(rates):>18s}"
        print(row)
    print("\nbest configuration (seed 0):")
    for workload in workloads:
        best = {c["strategy"]: c["configuration"] for c in results if c["workload"] == workload and c["seed"] == 0}
        print(f"  {workload}: " + "; ".join(f"{s}: {best[s]}" for s in strategies if s in best))
    if arguments.json:
        arguments.json.write_text(json.dumps(sorted(results, key=lambda c: (c["workload"], c["strategy"], c["seed"])), indent=2))


if __name__ == "__main__":
    main()
