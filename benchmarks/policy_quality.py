"""The compiled elastic policy against its own ablation and every baseline, on held-out seeds.

    python benchmarks/policy_quality.py [--seeds 5] [--requests 200] [--jobs 1] [--search-seconds 10]
        [--workloads "mixed;lveval;zipf(1.0, 10, 200K);lveval-heavy;adversarial"]
        [--baselines best-static,static-tp,static-sp,chunked,disaggregated] [--tp 2]
        [--ttft "max(5x prefill, 5s) at p90"] [--tpot "30ms at p90"] [--spec specs/lwm7b-a800x8.toml] [--link-scale 0.5]
        [--goodput-metric p90]
        [--reuse benchmarks/results/policy_quality.json] [--report] [--json benchmarks/results/policy_quality.json]

For specs/lwm7b-a800x8.toml (LWM-Text-1M on 8 × A800, LoongServe's SLO), per workload and
compile seed s (0 … seeds−1): `espc compile` (strategy elastic, tp left to the compiler
unless `--tp`) tunes on seed s; then everything is scored on the held-out seed HELD_OUT + s:
the compiled policy (`elastic`), the same policy with ESP's choices removed
(`elastic-rigid`: ElasticPolicy.rigid — every prompt on the fewest instances its KV needs,
no decode scale-up, no migration; same buckets, caps, instance classes, admission), and
every baseline family of `--baselines`, tuned as its authors ship it and searched per cell
(espc.planner.sim.strategies.candidates; best-static searches every tp). Each is measured
under both metrics: P90 goodput (attainment over all requests) and per-class goodput
(attainment in every prompt-length class, so the long requests ESP is for cannot be
dropped). Ratios are paired per seed (elastic / elastic-rigid: what ESP itself earns;
elastic / the best baseline of that seed); the table shows their geometric mean with a 95%
t-interval over seeds, and LoongServe's published ratios beside ours where measured. A seed
where a side serves nothing has no ratio and is counted apart: "x/0" (only the first side
meets the target), "0/x" (only the second) or "0/0".

`--ttft` / `--tpot` replace the spec's SLO bounds: where ESP pays depends on how much slack
they leave a prompt prefilled on one instance and a context decoded by one instance
(benchmarks/esp_physics.py prints both). `--spec` measures another spec (e.g. the PCIe
one) and `--link-scale` multiplies every device's link bandwidth: where ring and migration
costs make ESP lose, compile should choose rigid by itself.

Workloads: the dataset length distributions, zipf and traces of benchmarks/baselines.py,
and two traces written per seed (so seeds differ): `lveval-heavy`, ShareGPT and LV-Eval
prompts half and half (≥ 20% of prompts above 150K tokens), and `adversarial`, 2K and 200K
prompts strictly alternating, so that each arrival undoes what the previous one made the
scheduler want — there migrations per 100 iterations at elastic's P90 goodput are
reported. Compile chooses rigid by itself where rigid measures higher on its seed (its
`ablate` stage): then both rows are the same policy and the ratio is 1.

`--goodput-metric` chooses the goodput elastic is compiled for (the spec's `auto` by
default). `--reuse` takes the cells of earlier runs measured with the same settings (trial
requests, search budget, tp, SLO and that metric — elastic's compile depends on all of them;
a baseline's goodputs are taken from a cell compiled for another metric too) and measures
only what they lack: a reused cell without some `--baselines` gets just those. The `--json` file
keeps every reused cell too, the ones this run did not select (other seeds, workloads or
settings) included, so `--json X --reuse X` only ever adds. `--report` measures nothing
and prints the table of the reused cells.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from baselines import SPEC, available_workloads, strategy_spec, workload_spec, write_azure_csv

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.evaluation import Evaluator, override_workload
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.sim.metrics import METRICS
from espc.planner.sim.strategies import BASELINES, candidates
from espc.planner.sim.workload import sample_dataset

HELD_OUT = 100  # scored on seed HELD_OUT + s, compiled on seed s
WORKLOADS = ("mixed", "lveval", "zipf(1.0, 10, 200K)", "lveval-heavy", "adversarial")
TRACE_WORKLOADS = ("lveval-heavy", "adversarial")
ELASTIC = ("elastic", "elastic-rigid")
PINNED_MAX_CONTEXT = 524_288
PUBLISHED = {("mixed", "chunked"): 3.85, ("leval", "disaggregated"): 5.81}  # LoongServe, anchors/README.md
# Two-sided 95% Student t quantiles by degrees of freedom (a paired ratio over few seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def trace_for(workload: str, directory: Path, requests: int, seed: int) -> Path:
    """The workload's requests at Poisson arrivals of 1 req/s, as an Azure-format CSV (the
    goodput search rescales the trace's rate)."""
    rng = np.random.default_rng(seed)
    if workload == "adversarial":  # 2K and 200K strictly alternating
        prompts = np.array([200_000 if index % 2 else 2_000 for index in range(requests)])
        outputs = rng.integers(32, 256, requests)
    else:  # lveval-heavy: ShareGPT and LV-Eval half and half, shuffled
        short, short_out = sample_dataset("sharegpt", requests - requests // 2, rng)
        long, long_out = sample_dataset("lveval", requests // 2, rng)
        order = rng.permutation(requests)
        prompts, outputs = np.concatenate([short, long])[order], np.concatenate([short_out, long_out])[order]
    arrivals = np.cumsum(rng.exponential(1.0, requests))
    return write_azure_csv(directory / f"{workload}-{seed}.csv", arrivals, prompts, outputs)


def with_slo(spec: Spec, slo: dict[str, str]) -> Spec:
    """The spec with some SLO bounds replaced (the spec's own shorthand, e.g. "30ms at p90")."""
    if not slo:
        return spec
    data = spec.model_dump(mode="json")
    data["slo"].update(slo)
    return validate_spec(data, {}, "benchmark")


def pinned(spec: Spec, tp: int | None) -> Spec:
    """The spec at `tp` (None: the spec's own). Pinned below the spec's, every device holds
    more of the weights: the longest context allowed is then the longest the workloads have
    (LV-Eval's 497.3K) rather than the model's 1M."""
    if tp is None:
        return spec
    data = spec.model_dump(mode="json")
    data["cluster"]["tp"] = tp
    data["model"]["max_context"] = PINNED_MAX_CONTEXT
    return validate_spec(data, {}, "benchmark")


def elastic_spec(spec: Spec, tp: int | None, goodput_metric: str = "auto") -> Spec:
    """The spec with strategy elastic, its tp pinned or (None) left to the compiler, as
    best-static searches every tp, and the goodput compile maximises."""
    data = pinned(spec, tp).model_dump(mode="json")
    data["cluster"]["tp"] = tp
    data["policy"]["strategy"] = "elastic"
    data["policy"]["goodput_metric"] = goodput_metric
    return validate_spec(data, {}, "benchmark")


def with_links(spec: Spec, scale: float) -> Spec:
    """The spec with every device's link bandwidth (NVLink or PCIe) multiplied by `scale`."""
    if scale == 1.0:
        return spec
    data = spec.model_dump(mode="json")
    for node, spec_node in zip(data["cluster"]["nodes"], spec.cluster.nodes):
        node["device"]["link_bandwidth"] = spec_node.device.link_bandwidth * scale  # B/s
    return validate_spec(data, {}, "benchmark")


def _spec_for(workload: str, seed: int, requests: int, scratch: Path, variant: dict) -> Spec:
    """The variant's spec (`spec`, `slo` bounds replaced, `link_scale`) with the workload's
    requests of `seed`."""
    path = SPEC.parent / variant["spec"]
    if workload in TRACE_WORKLOADS:
        spec = override_workload(load_spec(path), trace=trace_for(workload, scratch, requests, seed))
    else:
        spec = workload_spec(workload, path)
    return with_links(with_slo(spec, variant["slo"]), variant["link_scale"])


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


def _elastic_cell(workload: str, seed: int, requests: int, search_seconds: float, tp: int | None, variant: dict) -> dict:
    """Compile on `seed`, then measure elastic and elastic-rigid under every metric on
    seed HELD_OUT + seed."""
    started = time.perf_counter()
    held_out = HELD_OUT + seed
    cell = {"workload": workload, "seed": seed, "held_out_seed": held_out, "requests": requests,
            "search_seconds": search_seconds, "tp": tp, **variant, "goodputs": {}, "configurations": {}}
    with tempfile.TemporaryDirectory() as scratch:
        spec = elastic_spec(_spec_for(workload, seed, requests, Path(scratch), variant), tp, variant["goodput_metric"])
        try:
            result = compile_spec(
                spec, spec_hash(spec), SPEC.parent,
                CompileOptions(search_seconds=search_seconds, trial_requests=requests, seed=seed),
            )
        except InfeasibleSLO as error:  # a finding of its own (e.g. TPOT at a pinned tp): reported
            return {**cell, "infeasible": str(error)}
        policy = result.policy
        assert policy.elastic is not None  # strategy elastic compiles an elastic policy
        # A trace workload's held-out seed is another trace; a distribution's is another sample.
        scored = elastic_spec(_spec_for(workload, held_out, requests, Path(scratch), variant), tp, variant["goodput_metric"])
        migrations = use = None
        for metric in METRICS:
            evaluator = Evaluator(scored, base_dir=SPEC.parent, requests=requests, elastic=policy.elastic, metric=metric)
            for strategy in ELASTIC:
                found = evaluator.strategy_goodput(strategy, held_out)
                cell["goodputs"].setdefault(strategy, {})[metric] = found.goodput.rate
                cell["configurations"][strategy] = found.configuration
            rate = cell["goodputs"]["elastic"][metric]
            if metric == "p90" and rate:  # at elastic's P90 goodput
                use = {strategy: esp_use(evaluator, strategy, rate, held_out) for strategy in ELASTIC}
                if workload == "adversarial":
                    run = evaluator.simulate_strategy("elastic", rate, held_out)
                    migrated = sum(1 for record in run.result.records if record.migrated_tokens)
                    migrations = {"per_100_iterations": 100 * migrated / max(run.result.iterations, 1),
                                  "bytes": run.result.migrated_bytes}
    return {
        **cell, "compile_metric": policy.goodput_metric, "compiled_rigid": policy.elastic.is_rigid(),
        "elastic_policy": str(policy.elastic), "compile_trials": [[t.stage, t.label, t.goodput_rps] for t in result.trials],
        "migrations": migrations, "esp_use": use, "seconds": time.perf_counter() - started,
    }


def _baseline_cell(workload: str, seed: int, requests: int, tp: int | None, variant: dict, baselines: list[str]) -> dict:
    """The baseline families' goodputs under every metric on seed HELD_OUT + seed, at the
    spec's tp (LoongServe's TP2 layout) unless `tp` pins another; best-static searches every tp."""
    started = time.perf_counter()
    held_out = HELD_OUT + seed
    goodputs: dict[str, dict[str, float]] = {}
    configurations: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scored = pinned(_spec_for(workload, held_out, requests, Path(scratch), variant), tp)
        for strategy in baselines:
            for metric in METRICS:
                evaluator = Evaluator(strategy_spec(scored, strategy), base_dir=SPEC.parent, requests=requests, metric=metric)
                found = evaluator.strategy_goodput(strategy, held_out)
                goodputs.setdefault(strategy, {})[metric] = found.goodput.rate
                configurations[strategy] = found.configuration
    return {"workload": workload, "seed": seed, "goodputs": goodputs, "configurations": configurations,
            "baseline_seconds": time.perf_counter() - started}


def paired_ratio(pairs: list[tuple[float, float]]) -> str:
    """Geometric mean of a/b over seeds with a 95% t-interval; pairs with a zero are listed
    apart: "x/0" where only a is served, "0/x" where only b is, "0/0" where neither is."""
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    apart = Counter("x/0" if a > 0 else "0/x" if b > 0 else "0/0" for a, b in pairs if not (a > 0 and b > 0))
    listed = ", ".join(f"{apart[kind]} × {kind}" for kind in ("x/0", "0/x", "0/0") if apart[kind])
    if not logs:
        return f"({listed})" if listed else "-"
    mean = statistics.fmean(logs)
    text = f"{math.exp(mean):.2f}×"
    if len(logs) > 1:
        half = T95.get(len(logs) - 1, 1.96) * statistics.stdev(logs) / math.sqrt(len(logs))
        text += f" [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}]"
    return text + (f" (+{listed})" if listed else "")


def render(results: list[dict]) -> str:
    lines = [f"{c['workload']} seed {c['seed']}: no policy: {c['infeasible']}" for c in results if "infeasible" in c]
    results = [c for c in results if "infeasible" not in c]
    strategies = sorted({s for cell in results for s in cell["goodputs"]}, key=lambda s: (s not in ELASTIC, ELASTIC.index(s) if s in ELASTIC else 0, s))
    baselines = [s for s in strategies if s not in ELASTIC]
    for metric in METRICS:
        lines.append(f"\n{metric} goodput (req/s) on held-out seeds {HELD_OUT}+s, mean over seeds; "
                     "ratios: geometric mean [95% interval] of per-seed pairs")
        header = f"{'workload':22s}{'seeds':>6s}" + "".join(f"{s:>15s}" for s in strategies)
        header += f"{'elastic/rigid':>32s}{'elastic/best base':>32s}"
        lines += [header, "-" * len(header)]
        for workload in dict.fromkeys(cell["workload"] for cell in results):
            cells = sorted((c for c in results if c["workload"] == workload), key=lambda c: c["seed"])
            row = f"{workload:22s}{len(cells):6d}"
            for strategy in strategies:
                rates = [c["goodputs"][strategy][metric] for c in cells if strategy in c["goodputs"]]
                # A strategy measured on fewer seeds than the row says how many (its ratio pairs only those).
                mean = f"{statistics.fmean(rates):.3f}" + (f" ({len(rates)})" if len(rates) < len(cells) else "") if rates else "-"
                row += f"{mean:>15s}"
            rigid = [(c["goodputs"]["elastic"][metric], c["goodputs"]["elastic-rigid"][metric]) for c in cells]
            best = [
                (c["goodputs"]["elastic"][metric], max(c["goodputs"][s][metric] for s in baselines))
                for c in cells if baselines and all(s in c["goodputs"] for s in baselines)
            ]
            lines.append(row + f"{paired_ratio(rigid):>32s}{paired_ratio(best) if best else '-':>32s}")
    published = []
    for (workload, baseline), ratio in PUBLISHED.items():
        cells = [c for c in results if c["workload"] == workload and baseline in c["goodputs"]]
        if cells:
            ours = paired_ratio([(c["goodputs"]["elastic"]["p90"], c["goodputs"][baseline]["p90"]) for c in cells])
            published.append(f"  elastic / {baseline} on {workload}, P90: ours {ours}, LoongServe {ratio:.2f}×")
    if published:
        lines += ["\nagainst LoongServe's published ratios:", *published]
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
    if baselines:
        lines.append("\nhow the baselines are tuned (espc.planner.sim.strategies.candidates):")
        lines.append(textwrap.indent(inspect.getdoc(candidates) or "", "  "))
    return "\n".join(lines)


def _variant(cell: dict) -> dict:
    """What a cell measured beside the trial shape (cells of earlier runs lack the defaults)."""
    return {"spec": cell.get("spec", SPEC.name), "slo": cell.get("slo", {}), "link_scale": cell.get("link_scale", 1.0),
            "goodput_metric": cell.get("goodput_metric", "auto")}


def _baseline_settings(requests: int, tp: int | None, variant: dict) -> tuple:
    """What a baseline cell's goodputs depend on: not what elastic compiled for."""
    return requests, tp, {name: value for name, value in variant.items() if name != "goodput_metric"}


def _save(path: Path | None, results: dict[tuple[str, int], dict], kept: list[dict]) -> None:
    """Write this run's cells and `kept`: the reused cells it did not select, so that
    `--json X --reuse X` with fewer seeds, workloads or other settings loses nothing."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kept + [results[key] for key in sorted(results)], indent=2))


def _merge_baselines(cell: dict, baselines: dict | None) -> None:
    """Add a baseline cell's goodputs and configurations to `cell` (not to an infeasible one)."""
    if baselines is not None and "infeasible" not in cell:
        cell["goodputs"].update(baselines["goodputs"])
        cell["configurations"].update(baselines["configurations"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per simulation (at least)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--search-seconds", type=float, default=10.0, help="compile's local-search budget per cell")
    parser.add_argument("--workloads", default=";".join(WORKLOADS), help="';'-separated")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated baseline families ('' for none)")
    parser.add_argument("--tp", type=int, help="pin every instance's tp (default: the compiler chooses)")
    parser.add_argument("--ttft", help="replace the spec's TTFT bound, e.g. \"max(5x prefill, 5s) at p90\"")
    parser.add_argument("--tpot", help="replace the spec's TPOT bound, e.g. \"30ms at p90\"")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the spec measured (in specs/)")
    parser.add_argument("--link-scale", type=float, default=1.0, help="multiply every device's link bandwidth")
    parser.add_argument("--goodput-metric", choices=("auto", "p90", "per-class"), default="auto",
                        help="the goodput elastic is compiled for (baselines measured for another are reused)")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[], help="take cells of earlier runs with the same settings")
    parser.add_argument("--report", action="store_true", help="measure nothing: the table of the --reuse cells")
    parser.add_argument("--json", type=Path, help="write every cell here, after each one")
    arguments = parser.parse_args()

    baselines = [name for name in arguments.baselines.split(",") if name]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        parser.error(f"unknown baselines {', '.join(unknown)}; baselines: {', '.join(BASELINES)}")
    slo = {name: bound for name, bound in (("ttft", arguments.ttft), ("tpot", arguments.tpot)) if bound}
    variant = {"spec": arguments.spec.name, "slo": slo, "link_scale": arguments.link_scale,
               "goodput_metric": arguments.goodput_metric}
    settings = (arguments.requests, arguments.search_seconds, arguments.tp, variant)
    workloads = available_workloads(arguments.workloads.split(";"))
    results: dict[tuple[str, int], dict] = {}
    kept: list[dict] = []
    # Baseline goodputs of cells whose elastic was compiled for another goodput metric.
    measured_baselines: dict[tuple[str, int], dict] = {}
    for cell in (cell for path in arguments.reuse for cell in json.loads(path.read_text())):
        selected = ((cell["requests"], cell["search_seconds"], cell.get("tp"), _variant(cell)) == settings
                    and cell["workload"] in workloads and (arguments.report or cell["seed"] < arguments.seeds))
        if selected:
            results[(cell["workload"], cell["seed"])] = cell
        else:
            kept.append(cell)
            if _baseline_settings(cell["requests"], cell.get("tp"), _variant(cell)) == _baseline_settings(
                arguments.requests, arguments.tp, variant
            ):
                measured_baselines.setdefault((cell["workload"], cell["seed"]), {"goodputs": {}, "configurations": {}})
                for strategy in set(cell["goodputs"]) - set(ELASTIC):
                    measured_baselines[(cell["workload"], cell["seed"])]["goodputs"][strategy] = cell["goodputs"][strategy]
                    measured_baselines[(cell["workload"], cell["seed"])]["configurations"][strategy] = cell["configurations"][strategy]
    # Seed-major: an interrupted run still has every workload's first seeds.
    keys = [] if arguments.report else [(w, seed) for seed in range(arguments.seeds) for w in workloads]
    elastic_todo = [key for key in keys if key not in results]
    for key, cell in results.items():
        _merge_baselines(cell, measured_baselines.get(key))
    baseline_todo = [
        (key, missing) for key in keys
        if (missing := [b for b in baselines if (key not in results or b not in results[key]["goodputs"])
                        and b not in measured_baselines.get(key, {}).get("goodputs", {})])
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        # Elastic first (a baseline cell merges into its elastic cell), then the baselines.
        for stage, jobs in (
            ("elastic", {pool.submit(_elastic_cell, w, s, arguments.requests, arguments.search_seconds, arguments.tp, variant): (w, s)
                         for w, s in elastic_todo}),
            ("baselines", {pool.submit(_baseline_cell, w, s, arguments.requests, arguments.tp, variant, missing): (w, s)
                           for (w, s), missing in baseline_todo}),
        ):
            for done, future in enumerate(as_completed(jobs), 1):
                measured = future.result()
                key = jobs[future]
                if stage == "elastic":
                    results[key] = measured
                    _merge_baselines(measured, measured_baselines.get(key))
                else:
                    _merge_baselines(results[key], measured)
                _save(arguments.json, results, kept)
                g = measured["goodputs"]
                print(f"[{stage} {done}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {key[0]:20s} seed {key[1]}: "
                      + (", ".join(f"{s} {g[s]['p90']:.3f} | {g[s]['per-class']:.3f}" for s in g) or measured.get("infeasible", "")),
                      flush=True)
    bounds = ", ".join(f"{name} {bound}" for name, bound in slo.items()) or "the spec's"
    links = f", link bandwidth × {arguments.link_scale:g}" if arguments.link_scale != 1.0 else ""
    seeds = sorted({seed for _, seed in results})
    print(f"\n{arguments.spec.name}{links}, SLO {bounds}, tp {arguments.tp or 'chosen by compile'}: compiled on seeds "
          f"{', '.join(map(str, seeds))} ({arguments.search_seconds:g} s search), at least {arguments.requests} requests per trial")
    print(render(list(results.values())))


if __name__ == "__main__":
    main()
