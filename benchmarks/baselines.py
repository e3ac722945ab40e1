"""P90 goodput of every baseline strategy on LoongServe's workloads and the real traces.

    python benchmarks/baselines.py [--seeds 5] [--requests 300] [--jobs 2] [--workloads "sharegpt;leval;..."]
        [--reuse earlier.json ...] [--json benchmarks/results/baselines.json]

For specs/lwm7b-a800x8.toml (LWM-Text-1M on 8 × A800, LoongServe's SLO), each cell is the
goodput (req/s at which ≥ 90% of requests meet both SLOs) of a strategy's best
configuration, as mean ± spread over seeds; the real traces (../shared/traces, or
$ESPC_TRACES) are skipped with a note when absent. A trace is replayed with its own
arrivals, rescaled to each trial's rate, so seeds change nothing: it runs once. Strategies
are tuned as their authors ship them (see espc.planner.sim.strategies.candidates) at the
spec's tp, except best-static, which searches every tp; families are searched per cell.
One worker process (--jobs) evaluates every strategy of a (workload, seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.evaluation import DEFAULT_WINDOW_S, Evaluator, override_workload
from espc.planner.sim.strategies import BASELINES

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


def workload_spec(workload: str, path: Path = SPEC) -> Spec:
    """The benchmark spec (or the one at `path`) with its workload replaced by a length
    distribution or a trace, and the chunked baseline's chunk size as LoongServe ran it on
    that dataset."""
    spec = load_spec(path)
    if workload in CHUNK_TOKENS:
        data = spec.model_dump(mode="json")
        data["policy"]["chunk_tokens"] = CHUNK_TOKENS[workload]
        spec = validate_spec(data, {}, "benchmark")
    if workload in TRACE_FILES:
        return override_workload(spec, trace=TRACES / TRACE_FILES[workload])
    return override_workload(spec, lengths=workload)


def write_azure_csv(path: Path, arrivals: np.ndarray, prompts: Sequence[int], outputs: Sequence[int]) -> Path:
    """Requests as an Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens):
    how the benchmarks hand a workload they construct to the trace reader."""
    start = np.datetime64("2026-01-01T00:00:00")
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for arrival, prompt, output in zip(arrivals, prompts, outputs):
        stamp = str(start + np.timedelta64(int(arrival * 1e7) * 100, "ns")).replace("T", " ")
        stamp = stamp + "0" * (27 - len(stamp)) if "." in stamp else stamp + ".0000000"
        lines.append(f"{stamp[:27]},{int(prompt)},{int(output)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def available_workloads(names: list[str]) -> list[str]:
    """The workloads whose trace files exist (a note for each skipped one)."""
    workloads = []
    for workload in names:
        if workload in TRACE_FILES and not (TRACES / TRACE_FILES[workload]).exists():
            print(f"skipping {workload}: {TRACES / TRACE_FILES[workload]} not found (set ESPC_TRACES)")
            continue
        workloads.append(workload)
    return workloads


def strategy_spec(spec: Spec, strategy: str) -> Spec:
    """best-static searches every tp ("every SP/TP split", as LoongServe's reviewers asked),
    so the spec's tp is lifted for it; the other baselines run at the spec's tp."""
    if strategy != "best-static" or spec.cluster.tp is None:
        return spec
    data = spec.model_dump(mode="json")
    data["cluster"]["tp"] = None
    return validate_spec(data, {}, "benchmark")


def _cell(workload: str, seed: int, strategies: list[str], requests: int) -> list[dict]:
    spec = workload_spec(workload)
    evaluators: dict[int | None, Evaluator] = {}
    cells = []
    for strategy in strategies:
        started = time.perf_counter()
        measured = strategy_spec(spec, strategy)
        if measured.cluster.tp not in evaluators:
            evaluators[measured.cluster.tp] = Evaluator(measured, base_dir=SPEC.parent, requests=requests)
        found = evaluators[measured.cluster.tp].strategy_goodput(strategy, seed)
        cells.append({
            "workload": workload, "strategy": strategy, "seed": seed, "goodput": found.goodput.rate,
            "configuration": found.configuration, "configurations_searched": found.configurations_searched,
            "simulations": len(found.goodput.trials), "seconds": time.perf_counter() - started,
            "requests": requests, "max_trial_requests": None,  # the trial shape (--reuse)
            "tp": measured.cluster.tp,  # None: every tp searched
        })
    return cells


def seeds_of(workload: str, seeds: int) -> range:
    """A trace replay is the same for every seed: one run."""
    return range(1) if workload in TRACE_FILES else range(seeds)


def cell_key(cell: dict) -> tuple:
    return cell["workload"], cell["strategy"], cell["seed"]


def same_shape(cell: dict, requests: int, max_trial: int | None) -> bool:
    """Whether a cell of an earlier run was measured as this run would: the trial shape,
    and the tps searched (best-static's every tp, the others' the spec's)."""
    searched_tp = strategy_spec(load_spec(SPEC), cell["strategy"]).cluster.tp
    return cell.get("requests") == requests and cell.get("max_trial_requests") == max_trial and cell.get("tp") == searched_tp


def save(path: Path | None, results: list[dict]) -> None:
    """Every cell so far, in a stable order (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(results, key=cell_key), indent=2))


def _format(rates: list[float]) -> str:
    mean = statistics.fmean(rates)
    return f"{mean:.3f} ± {statistics.stdev(rates):.3f}" if len(rates) > 1 else f"{mean:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workloads", default=";".join(DATASETS + tuple(TRACE_FILES)), help="';'-separated")
    parser.add_argument("--strategies", default=",".join(BASELINES))
    parser.add_argument(
        "--reuse", type=Path, nargs="+", default=[],
        help="take the cells these JSON files of earlier runs measured the same way (see same_shape)",
    )
    parser.add_argument("--json", type=Path, help="also write every cell to this file")
    arguments = parser.parse_args()

    workloads = available_workloads(arguments.workloads.split(";"))
    strategies = arguments.strategies.split(",")
    reused = {
        cell_key(cell): cell for path in arguments.reuse for cell in json.loads(path.read_text())
        if same_shape(cell, arguments.requests, None)
    }
    # ShareGPT's cells are the longest (its goodput is ~100× the others', so are its trials):
    # submitted first, they do not leave one worker running alone at the end.
    ordered = sorted(workloads, key=lambda workload: workload != "sharegpt")
    results, cells = [], []
    for workload in ordered:
        for seed in seeds_of(workload, arguments.seeds):
            known = [reused.get((workload, strategy, seed)) for strategy in strategies]
            if all(known):
                results += known
            else:
                cells.append((workload, seed, strategies, arguments.requests))
    if arguments.reuse:
        print(f"{len(results)} cells taken from {', '.join(map(str, arguments.reuse))}; {len(cells)} (workload, seed) to measure")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        futures = [pool.submit(_cell, *cell) for cell in cells]
        for done, future in enumerate(as_completed(futures), 1):
            results += future.result()
            save(arguments.json, results)  # after every cell, so that an interrupted run keeps what it measured
            for cell in future.result():
                print(
                    f"[{done}/{len(cells)} {time.perf_counter() - started:6.0f}s] {cell['workload']:10s} "
                    f"{cell['strategy']:13s} seed {cell['seed']}: {cell['goodput']:.3f} req/s "
                    f"({cell['configuration']}, {cell['seconds']:.0f} s)",
                    flush=True,
                )

    save(arguments.json, results)
    print(f"\nP90 goodput (req/s, mean ± stdev over seeds), {SPEC.name}, at least {arguments.requests} "
          f"requests and {DEFAULT_WINDOW_S:g} s of arrivals per trial")
    header = f"{'workload':22s}{'seeds':>6s}" + "".join(f"{s:>18s}" for s in strategies)
    print(header)
    print("-" * len(header))
    for workload in workloads:
        seeds = {c["seed"] for c in results if c["workload"] == workload}
        row = f"{workload:22s}{len(seeds):>6d}"
        for strategy in strategies:
            rates = [c["goodput"] for c in results if c["workload"] == workload and c["strategy"] == strategy]
            row += f"{_format(rates) if rates else '-':>18s}"
        print(row)
    print("\nbest configuration (seed 0):")
    for workload in workloads:
        best = {c["strategy"]: c["configuration"] for c in results if c["workload"] == workload and c["seed"] == 0}
        print(f"  {workload}: " + "; ".join(f"{s}: {best[s]}" for s in strategies if s in best))


if __name__ == "__main__":
    main()
