"""What elastic SP earns: the compiled elastic policy against its own ablation, on held-out seeds.

    python benchmarks/esp_ablation.py [--seeds 5] [--requests 300] [--jobs 1] [--search-seconds 30]
        [--workloads "mixed;lveval;zipf(1.0, 10, 200K);lveval-heavy;adversarial"] [--baselines best-static]
        [--spec specs/lwm7b-a800x8.toml] [--reuse earlier.json] [--json benchmarks/results/esp_ablation.json]

Per workload and compile seed s (0 … seeds−1): `espc compile` (strategy elastic, tp left
to the compiler) tunes on seed s; then, on the held-out seed HELD_OUT + s, the compiled
policy (`elastic`) and the same policy with ESP's choices removed (`elastic-rigid`:
ElasticPolicy.rigid — every prompt on the fewest instances its KV needs, no decode
scale-up, no migration; same buckets, caps, instance classes, admission) are measured
under both metrics: P90 goodput (attainment over all requests) and per-class goodput
(attainment in every prompt-length class, so the long requests ESP is for cannot be
dropped). The ratio elastic / elastic-rigid is paired per seed; the table shows its
geometric mean with a 95% t-interval over seeds. `--baselines` measures baseline families
on the same held-out seeds and metrics (best-static searches every tp).

Workloads: the dataset length distributions and zipf of specs (see baselines.py); two
traces this script writes per seed (so seeds differ): `lveval-heavy`, ShareGPT and LV-Eval
prompts half and half (≥ 20% of prompts above 150K tokens), and `adversarial`, 2K and 200K
prompts strictly alternating — there migrations per 100 iterations at elastic's goodput
are reported. Compile chooses rigid by itself where rigid measures higher on its seed
(its `ablate` stage): then both rows are the same policy and the ratio is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from baselines import SPEC, strategy_spec, workload_spec, write_azure_csv
from policy_quality import elastic_spec

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.evaluation import Evaluator, override_workload
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.sim.metrics import METRICS
from espc.planner.sim.workload import sample_dataset

HELD_OUT = 100  # scored on seed HELD_OUT + s, compiled on seed s
WORKLOADS = ("mixed", "lveval", "zipf(1.0, 10, 200K)", "lveval-heavy", "adversarial")
TRACE_WORKLOADS = ("lveval-heavy", "adversarial")
PINNED_MAX_CONTEXT = 524_288
# Two-sided 95% Student t quantiles by degrees of freedom (a paired ratio over few seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def trace_for(workload: str, directory: Path, requests: int, seed: int) -> Path:
    """The workload's requests at Poisson arrivals of 1 req/s, as an Azure-format CSV (the
    goodput search rescales the trace's rate)."""
    rng = np.random.default_rng(seed)
    if workload == "adversarial":  # policy_quality's, 2K and 200K strictly alternating
        prompts = np.array([200_000 if index % 2 else 2_000 for index in range(requests)])
        outputs = rng.integers(32, 256, requests)
    else:  # lveval-heavy: ShareGPT and LV-Eval half and half, shuffled
        short, short_out = sample_dataset("sharegpt", requests - requests // 2, rng)
        long, long_out = sample_dataset("lveval", requests // 2, rng)
        order = rng.permutation(requests)
        prompts, outputs = np.concatenate([short, long])[order], np.concatenate([short_out, long_out])[order]
    arrivals = np.cumsum(rng.exponential(1.0, requests))
    return write_azure_csv(directory / f"{workload}-{seed}.csv", arrivals, prompts, outputs)


def _spec_for(workload: str, seed: int, requests: int, scratch: Path) -> Spec:
    if workload in TRACE_WORKLOADS:
        return override_workload(load_spec(SPEC), trace=trace_for(workload, scratch, requests, seed))
    return workload_spec(workload)


def pinned(spec: Spec, tp: int | None) -> Spec:
    """The elastic spec, its tp left to the compiler (None) or pinned. Pinned below the
    spec's, every device holds more of the weights: the longest context allowed is then
    the longest the workloads have (LV-Eval's 497.3K) rather than the model's 1M."""
    spec = elastic_spec(spec)
    if tp is None:
        return spec
    data = spec.model_dump(mode="json")
    data["cluster"]["tp"] = tp
    data["model"]["max_context"] = PINNED_MAX_CONTEXT
    return validate_spec(data, {}, "benchmark")


def esp_use(evaluator: Evaluator, strategy: str, rate: float, seed: int) -> dict[str, float]:
    """How much of ESP a strategy uses at `rate`: the share of prefill batches on several
    instances, of decode steps on several instances, and the KV bytes migrated."""
    batches = evaluator.simulate_strategy(strategy, rate, seed, timeline=True).result
    prefills = [b for b in batches.timeline if b.phase == "prefill"]
    decodes = [b for b in batches.timeline if b.phase == "decode"]
    return {
        "multi_instance_prefills": sum(len(b.instances) > 1 for b in prefills) / max(len(prefills), 1),
        "multi_instance_decodes": sum(len(b.instances) > 1 for b in decodes) / max(len(decodes), 1),
        "migrated_bytes": batches.migrated_bytes,
    }


def _cell(workload: str, seed: int, requests: int, search_seconds: float, baselines: list[str], tp: int | None) -> dict:
    """Compile on `seed`, then measure elastic, elastic-rigid and `baselines` under every
    metric on seed HELD_OUT + seed."""
    started = time.perf_counter()
    held_out = HELD_OUT + seed
    with tempfile.TemporaryDirectory() as scratch:
        spec = pinned(_spec_for(workload, seed, requests, Path(scratch)), tp)
        try:
            result = compile_spec(
                spec, spec_hash(spec), SPEC.parent,
                CompileOptions(search_seconds=search_seconds, trial_requests=requests, seed=seed),
            )
        except InfeasibleSLO as error:  # a finding of its own (e.g. TPOT at a pinned tp): reported
            return {"workload": workload, "seed": seed, "held_out_seed": held_out, "requests": requests,
                    "search_seconds": search_seconds, "tp": tp, "infeasible": str(error), "goodputs": {}}
        policy = result.policy
        # A trace workload's held-out seed is another trace; a distribution's is another sample.
        scored = pinned(_spec_for(workload, held_out, requests, Path(scratch)), tp)
        goodputs: dict[str, dict[str, float]] = {}
        configurations: dict[str, str] = {}
        migrations = use = None
        for metric in METRICS:
            evaluator = Evaluator(scored, base_dir=SPEC.parent, requests=requests, elastic=policy.elastic, metric=metric)
            for strategy in ("elastic", "elastic-rigid", *baselines):
                measuring = evaluator
                if strategy not in ("elastic", "elastic-rigid"):
                    measuring = Evaluator(
                        strategy_spec(scored, strategy), base_dir=SPEC.parent, requests=requests, metric=metric
                    )
                found = measuring.strategy_goodput(strategy, held_out)
                goodputs.setdefault(strategy, {})[metric] = found.goodput.rate
                configurations[strategy] = found.configuration
                if workload == "adversarial" and strategy == "elastic" and metric == "p90" and found.goodput.rate:
                    run = evaluator.simulate_strategy(strategy, found.goodput.rate, held_out)
                    migrated = sum(1 for record in run.result.records if record.migrated_tokens)
                    migrations = {
                        "per_100_iterations": 100 * migrated / max(run.result.iterations, 1),
                        "bytes": run.result.migrated_bytes,
                    }
            if metric == "p90" and goodputs["elastic"]["p90"]:  # both at elastic's P90 goodput
                rate = goodputs["elastic"]["p90"]
                use = {strategy: esp_use(evaluator, strategy, rate, held_out) for strategy in ("elastic", "elastic-rigid")}
    return {
        "workload": workload, "seed": seed, "held_out_seed": held_out, "requests": requests,
        "search_seconds": search_seconds, "compile_metric": policy.goodput_metric,
        "compiled_rigid": policy.elastic.is_rigid() if policy.elastic else None,
        "elastic_policy": str(policy.elastic), "compile_trials": [[t.stage, t.label, t.goodput_rps] for t in result.trials],
        "goodputs": goodputs, "configurations": configurations, "migrations": migrations, "esp_use": use, "tp": tp,
        "seconds": time.perf_counter() - started,
    }


def paired_ratio(pairs: list[tuple[float, float]]) -> str:
    """Geometric mean of a/b over seeds with a 95% t-interval ("a/0" pairs are listed apart)."""
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    undefined = sum(1 for a, b in pairs if not (a > 0 and b > 0))
    if not logs:
        return "-" if not undefined else f"({undefined} × x/0)"
    mean = statistics.fmean(logs)
    text = f"{math.exp(mean):.2f}×"
    if len(logs) > 1:
        half = T95.get(len(logs) - 1, 1.96) * statistics.stdev(logs) / math.sqrt(len(logs))
        text += f" [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}]"
    return text + (f" (+{undefined} × x/0)" if undefined else "")


def render(results: list[dict]) -> str:
    lines = [f"{c['workload']} seed {c['seed']}: no policy: {c['infeasible']}" for c in results if "infeasible" in c]
    results = [c for c in results if "infeasible" not in c]
    strategies = sorted({s for cell in results for s in cell["goodputs"]}, key=lambda s: (s != "elastic", s != "elastic-rigid", s))
    for metric in METRICS:
        lines.append(f"\n{metric} goodput (req/s) on held-out seeds {HELD_OUT}+s, mean over seeds; "
                     "ratios: geometric mean [95% interval] of per-seed pairs")
        header = f"{'workload':22s}{'seeds':>6s}" + "".join(f"{s:>15s}" for s in strategies)
        header += f"{'elastic/rigid':>36s}{'elastic/best base':>28s}"
        lines += [header, "-" * len(header)]
        for workload in dict.fromkeys(cell["workload"] for cell in results):
            cells = sorted((c for c in results if c["workload"] == workload), key=lambda c: c["seed"])
            row = f"{workload:22s}{len(cells):6d}"
            for strategy in strategies:
                rates = [c["goodputs"][strategy][metric] for c in cells if strategy in c["goodputs"]]
                row += f"{statistics.fmean(rates):15.3f}" if rates else f"{'-':>15s}"
            rigid = [(c["goodputs"]["elastic"][metric], c["goodputs"]["elastic-rigid"][metric]) for c in cells]
            baselines = [s for s in strategies if s not in ("elastic", "elastic-rigid")]
            best = [
                (c["goodputs"]["elastic"][metric], max(c["goodputs"][s][metric] for s in baselines))
                for c in cells if baselines and all(s in c["goodputs"] for s in baselines)
            ]
            lines.append(row + f"{paired_ratio(rigid):>36s}{paired_ratio(best) if best else '-':>28s}")
    lines.append("\nper seed (compile seed → held-out seed): elastic / elastic-rigid, p90 | per-class; compiled rigid?")
    for cell in sorted(results, key=lambda c: (c["workload"], c["seed"])):
        g = cell["goodputs"]
        pair = " | ".join(f"{g['elastic'][m]:.3f} / {g['elastic-rigid'][m]:.3f}" for m in METRICS)
        migrated = cell.get("migrations")
        extra = f"; {migrated['per_100_iterations']:.2f} migrations / 100 iterations" if migrated else ""
        if cell.get("esp_use"):
            extra += "; multi-instance prefills / decodes at elastic's p90 goodput: " + ", ".join(
                f"{name} {u['multi_instance_prefills']:.0%} / {u['multi_instance_decodes']:.0%}"
                for name, u in cell["esp_use"].items()
            )
        lines.append(f"  {cell['workload']:20s} {cell['seed']} → {cell['held_out_seed']}: {pair}; "
                     f"{'rigid' if cell['compiled_rigid'] else 'elastic'} (compiled for {cell['compile_metric']}){extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per simulation (at least)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--search-seconds", type=float, default=30.0, help="compile's local-search budget per cell")
    parser.add_argument("--workloads", default=";".join(WORKLOADS), help="';'-separated")
    parser.add_argument("--baselines", default="", help="comma-separated baseline families, e.g. best-static")
    parser.add_argument("--tp", type=int, help="pin every instance's tp (default: the compiler chooses)")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[], help="take cells of earlier runs with the same settings")
    parser.add_argument("--report", action="store_true", help="measure nothing: the table of the --reuse cells")
    parser.add_argument("--json", type=Path, help="write every cell here, after each one")
    arguments = parser.parse_args()

    baselines = [name for name in arguments.baselines.split(",") if name]
    settings = (arguments.requests, arguments.search_seconds, arguments.tp)
    reused = {
        (cell["workload"], cell["seed"]): cell for path in arguments.reuse for cell in json.loads(path.read_text())
        if (cell["requests"], cell["search_seconds"], cell.get("tp")) == settings and all(b in cell["goodputs"] for b in baselines)
    }
    workloads = arguments.workloads.split(";")
    results = [cell for key, cell in reused.items() if key[0] in workloads]
    # Seed-major: an interrupted run still has every workload's first seeds.
    todo = [] if arguments.report else [
        (w, seed) for seed in range(arguments.seeds) for w in workloads if (w, seed) not in reused
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        futures = [
            pool.submit(_cell, w, seed, arguments.requests, arguments.search_seconds, baselines, arguments.tp) for w, seed in todo
        ]
        for done, future in enumerate(as_completed(futures), 1):
            cell = future.result()
            results.append(cell)
            if arguments.json:
                arguments.json.parent.mkdir(parents=True, exist_ok=True)
                arguments.json.write_text(json.dumps(sorted(results, key=lambda c: (c["workload"], c["seed"])), indent=2))
            g = cell["goodputs"]
            print(f"[{done}/{len(todo)} {time.perf_counter() - started:6.0f}s] {cell['workload']:20s} seed {cell['seed']}: "
                  + (", ".join(f"{s} {g[s]['p90']:.3f} | {g[s]['per-class']:.3f}" for s in g) or cell.get("infeasible", ""))
                  + f" ({cell.get('seconds', 0):.0f} s)", flush=True)
    print(f"\n{SPEC.name}, tp {arguments.tp or 'chosen by compile'}: compiled on seeds 0..{arguments.seeds - 1} "
          f"({arguments.search_seconds:g} s search), "
          f"at least {arguments.requests} requests per trial")
    print(render(results))


if __name__ == "__main__":
    main()
