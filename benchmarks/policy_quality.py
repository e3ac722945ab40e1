"""P90 goodput of the compiled elastic policy against every baseline, per workload.

    python benchmarks/policy_quality.py [--seeds 5] [--requests 300] [--jobs 2] [--search-seconds 20]
        [--workloads "mixed;leval;..."] [--adversarial] [--max-trial-requests N]
        [--reuse benchmarks/results/baselines.json ...] [--report] [--json benchmarks/results/policy_quality.json]

For specs/lwm7b-a800x8.toml (LWM-Text-1M on 8 × A800, LoongServe's SLO), per workload and
seed: `espc compile` with strategy elastic on that workload (tp left to the compiler, as
best-static searches every tp), then the compiled policy's goodput measured exactly as the
baselines' are (benchmarks/baselines.py: same evaluator, trial length and tolerance; the
baselines tuned as their authors ship them, families searched per cell). The table gives
mean ± spread over seeds, elastic's ratio to the best baseline, and the ratios LoongServe
published (3.85× vs chunked on mixed, 5.81× vs disaggregated on leval) beside ours.

A trace replays the same for every seed, so it runs once (benchmarks/baselines.py).
`--reuse` takes the cells earlier runs of either script measured with the same trial
shape from their JSON, so that only the missing ones are measured (`--strategies ""`
measures elastic alone). `--report` measures nothing: it prints the table of the reused
cells, each workload over the seeds its elastic cells measured (runs over different seed
counts per workload merge this way).

`--adversarial` adds a trace of short (2K) and long (200K) prompts strictly alternating,
so that each arrival undoes what the previous one made the scheduler want: elastic's
migrations per 100 iterations at its goodput, and its goodput against best-static's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from baselines import (
    SPEC,
    TRACE_FILES,
    available_workloads,
    cell_key,
    same_shape,
    save,
    seeds_of,
    strategy_spec,
    workload_spec,
    write_azure_csv,
)

from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.evaluation import Evaluator, override_workload
from espc.planner.sim.strategies import BASELINES, candidates

WORKLOADS = ("mixed", "zipf(1.0, 10, 200K)", "zipf(1.2, 10, 200K)", "zipf(1.4, 10, 200K)", "leval", "lveval", "sharegpt")
PUBLISHED = {("mixed", "chunked"): 3.85, ("leval", "disaggregated"): 5.81}  # LoongServe, anchors/README.md
ADVERSARIAL = "adversarial"


def elastic_spec(spec: Spec) -> Spec:
    """The spec with strategy elastic and the tp left to the compiler."""
    data = spec.model_dump(mode="json")
    data["cluster"]["tp"] = None
    data["policy"]["strategy"] = "elastic"
    return validate_spec(data, {}, "benchmark")


def adversarial_trace(directory: Path, requests: int, seed: int) -> Path:
    """Short and long prompts alternating at 1 req/s (Poisson), as an Azure-format CSV."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0, requests))
    prompts = [200_000 if index % 2 else 2_000 for index in range(requests)]
    return write_azure_csv(directory / f"adversarial-{seed}.csv", arrivals, prompts, rng.integers(32, 256, requests))


def _spec_for(workload: str, seed: int, requests: int, scratch: Path) -> Spec:
    if workload == ADVERSARIAL:
        return override_workload(workload_spec("mixed"), trace=adversarial_trace(scratch, requests, seed))
    return workload_spec(workload)


def _cell(workload: str, strategy: str, seed: int, requests: int, search_seconds: float, max_trial: int | None) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        spec = _spec_for(workload, seed, requests, Path(scratch))
        extra: dict = {}
        if strategy == "elastic":
            spec = elastic_spec(spec)
            result = compile_spec(
                spec, spec_hash(spec), SPEC.parent, CompileOptions(search_seconds=search_seconds, trial_requests=requests, seed=seed)
            )
            compiled = result.policy
            extra["compile_trials"] = [[trial.stage, trial.label, trial.goodput_rps] for trial in result.trials]
            extra["elastic_policy"] = str(compiled.elastic)
            evaluator = Evaluator(
                spec, base_dir=SPEC.parent, requests=requests, elastic=compiled.elastic, max_trial_requests=max_trial
            )
            extra["milp_predicted_rps"] = compiled.milp_predicted_rps
            extra["compile_seconds"] = compiled.compile_seconds
            extra["search_seconds"] = search_seconds
        else:
            spec = strategy_spec(spec, strategy)
            extra["tp"] = spec.cluster.tp  # None: every tp searched
            evaluator = Evaluator(spec, base_dir=SPEC.parent, requests=requests, max_trial_requests=max_trial)
        found = evaluator.strategy_goodput(strategy, seed)
        if workload == ADVERSARIAL and strategy == "elastic" and found.goodput.rate:
            run = evaluator.simulate_strategy(strategy, found.goodput.rate, seed)
            migrated = sum(1 for record in run.result.records if record.migrated_tokens)
            extra["migrated_requests_per_100_iterations"] = 100 * migrated / max(run.result.iterations, 1)
            extra["migrated_bytes"] = run.result.migrated_bytes
    return {
        "workload": workload, "strategy": strategy, "seed": seed, "goodput": found.goodput.rate,
        "configuration": found.configuration, "configurations_searched": found.configurations_searched,
        "simulations": len(found.goodput.trials), "seconds": time.perf_counter() - started,
        "requests": requests, "max_trial_requests": max_trial, **extra,
    }


def measured_cells(paths: list[Path], requests: int, max_trial: int | None, search_seconds: float) -> dict[tuple, dict]:
    """The cells these JSON files (of this script or benchmarks/baselines.py) measured with
    the same trial shape (and, for elastic, the same search budget), by (workload, strategy, seed)."""
    cells = {}
    for path in paths:
        for cell in json.loads(path.read_text()):
            # Elastic's trial shape too (its compile searched with it), then its search budget;
            # the baselines' tps searched as well (same_shape).
            if cell["strategy"] == "elastic":
                same = cell.get("search_seconds") == search_seconds and (
                    cell.get("requests"), cell.get("max_trial_requests")) == (requests, max_trial)
            else:
                same = same_shape(cell, requests, max_trial)
            if same:
                cells[cell_key(cell)] = cell
    return cells


def _format(rates: list[float]) -> str:
    if not rates:
        return "-"
    mean = statistics.fmean(rates)
    return f"{mean:.3f} ± {statistics.stdev(rates):.3f}" if len(rates) > 1 else f"{mean:.3f}"


def _mean(results: list[dict], workload: str, strategy: str) -> float | None:
    rates = [c["goodput"] for c in results if c["workload"] == workload and c["strategy"] == strategy]
    return statistics.fmean(rates) if rates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--search-seconds", type=float, default=20.0, help="compile's local-search budget per cell")
    parser.add_argument("--workloads", default=";".join(WORKLOADS + tuple(TRACE_FILES)), help="';'-separated")
    parser.add_argument("--strategies", default=",".join(BASELINES))
    parser.add_argument("--adversarial", action="store_true", help="add the alternating short/long trace")
    parser.add_argument(
        "--max-trial-requests", type=int, default=None,
        help="cap a goodput trial's requests (every strategy alike; default: a full 60 s window of arrivals)",
    )
    parser.add_argument(
        "--reuse", type=Path, nargs="+", default=[],
        help="take the cells these JSON files (of this script or benchmarks/baselines.py) measured with the same trial shape",
    )
    parser.add_argument("--report", action="store_true", help="measure nothing: the table of every --reuse cell")
    parser.add_argument("--json", type=Path, help="also write every cell to this file")
    arguments = parser.parse_args()
    if arguments.report and not arguments.reuse:
        parser.error("--report prints the cells of --reuse files: give at least one")

    workloads = available_workloads(arguments.workloads.split(";"))
    if arguments.adversarial:
        workloads.append(ADVERSARIAL)
    strategies = ["elastic", *filter(None, arguments.strategies.split(","))]
    reused = measured_cells(arguments.reuse, arguments.requests, arguments.max_trial_requests, arguments.search_seconds)
    cells, results = [], []
    if arguments.report:  # each row over the seeds its elastic cells measured, so that a row compares like with like
        elastic_seeds = {(w, seed) for w, s, seed in reused if s == "elastic"}
        results = [
            cell for (w, s, seed), cell in sorted(reused.items()) if w in workloads and s in strategies and (w, seed) in elastic_seeds
        ]
    for w in workloads if not arguments.report else ():
        for s in strategies:
            for seed in seeds_of(w, arguments.seeds):
                if w == ADVERSARIAL and s not in ("elastic", "best-static"):
                    continue
                known = reused.get((w, s, seed))
                if known is not None:
                    results.append(known)
                else:
                    cells.append((w, s, seed, arguments.requests, arguments.search_seconds, arguments.max_trial_requests))
    if arguments.reuse:
        print(f"{len(results)} cells taken from {', '.join(map(str, arguments.reuse))}; {len(cells)} to measure")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        futures = [pool.submit(_cell, *cell) for cell in cells]
        for done, future in enumerate(as_completed(futures), 1):
            cell = future.result()
            results.append(cell)
            save(arguments.json, results)  # after every cell, so that an interrupted run keeps what it measured
            print(
                f"[{done}/{len(cells)} {time.perf_counter() - started:6.0f}s] {cell['workload']:20s} {cell['strategy']:13s} "
                f"seed {cell['seed']}: {cell['goodput']:.3f} req/s ({cell['configuration']}, {cell['seconds']:.0f} s)",
                flush=True,
            )

    save(arguments.json, results)
    print(f"\nP90 goodput (req/s, mean ± stdev over seeds), {SPEC.name} (traces: one replay), "
          f"at least {arguments.requests} requests per trial")
    header = f"{'workload':22s}{'seeds':>6s}" + "".join(f"{s:>16s}" for s in strategies) + f"{'elastic/best':>14s}"
    print(header)
    print("-" * len(header))
    for workload in workloads:
        seeds = len({c["seed"] for c in results if c["workload"] == workload and c["strategy"] == "elastic"})
        row = f"{workload:22s}{seeds:6d}"
        for strategy in strategies:
            row += f"{_format([c['goodput'] for c in results if c['workload'] == workload and c['strategy'] == strategy]):>16s}"
        elastic = _mean(results, workload, "elastic")
        others = [m for s in strategies[1:] if (m := _mean(results, workload, s)) is not None]
        ratio = f"{elastic / max(others):.2f}×" if elastic is not None and others and max(others) > 0 else "-"
        print(row + f"{ratio:>14s}")
    print("\nagainst LoongServe's published ratios:")
    for (workload, baseline), published in PUBLISHED.items():
        elastic, other = _mean(results, workload, "elastic"), _mean(results, workload, baseline)
        ours = f"{elastic / other:.2f}×" if elastic is not None and other else "not measured"
        print(f"  elastic / {baseline} on {workload}: ours {ours}, LoongServe {published:.2f}×")
    for cell in results:
        if "migrated_requests_per_100_iterations" in cell:
            print(
                f"\nadversarial trace, seed {cell['seed']}: {cell['migrated_requests_per_100_iterations']:.2f} migrated "
                f"requests per 100 iterations, {cell['migrated_bytes'] / 1e9:.2f} GB moved at elastic's goodput"
            )
    print("\nhow the baselines are tuned (espc.planner.sim.strategies.candidates):")
    print(textwrap.indent(inspect.getdoc(candidates), "  "))
    print("\ncompiled elastic policies (seed 0):")
    for cell in sorted(results, key=lambda c: c["workload"]):
        if cell["strategy"] == "elastic" and cell["seed"] == 0:
            print(
                f"  {cell['workload']}: {cell['configuration']}, MILP predicted {cell['milp_predicted_rps']:.3f} req/s, "
                f"compiled in {cell['compile_seconds']:.0f} s"
            )


if __name__ == "__main__":
    main()
