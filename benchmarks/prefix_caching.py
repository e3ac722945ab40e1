"""Prefix caching against its own ablation, in simulation, on held-out seeds.

    python benchmarks/prefix_caching.py [--seeds 2] [--requests 300] [--search-seconds 5] [--jobs 1]
        [--workloads "mooncake;system-prompt;multi-turn"] [--spec specs/lwm7b-a800x8.toml]
        [--json benchmarks/results/prefix_caching.json] [--txt benchmarks/results/prefix_caching.txt]

Per workload and compile seed s (0 … seeds−1): `espc compile` (strategy elastic at the
spec's tp, `prefix_caching = true`, so the MILP prices the hits the sample promises) tunes
on seed s; then, on the held-out seed HELD_OUT + s, four goodputs under both metrics (P90
over all requests; per-class: attainment in every prompt-length class):

- `elastic+cache`: the compiled policy with the prefix cache (the elastic scheduler reads a
  cached prefix where it lives: `espc.planner.compile.scheduler`, "Prefix caching");
- `elastic`: the same policy with `prefix_caching = false` (the ablation);
- `best-static+cache`: the static family (vLLM replicas) with vLLM's automatic prefix
  caching behind a KV-aware router (`espc.planner.sim.strategies`);
- `best-static`: the same family without it.

best-static is searched at the spec's tp (its SP groupings and two-class splits; the other
benchmarks also search every tp, which costs a 2-core machine several times as long). The
hit rate is the prefix cache's own count (prompt tokens served from it / prompt tokens of
fresh prefills looked up), measured at each `+cache` strategy's P90 goodput; `reusable` is
the most any cache could serve on that trial (`prompt_block_reuse`: blocks an earlier
prompt had, were nothing ever evicted). Ratios are geometric means over seeds of per-seed
pairs.

Workloads:
- `mooncake`: Mooncake's conversation trace (../shared/traces/mooncake_conversation.jsonl,
  or $ESPC_TRACES; skipped with a note when absent): compile seed s replays window 2s of
  `--requests` consecutive requests, held-out seed s window 2s + 1 (timestamps rebased,
  hash_ids kept), rescaled to each trial's rate;
- `system-prompt`: ShareGPT-length messages behind one of 4 shared system prompts of 8K
  tokens (`[workload.prefix] shared_tokens = 8192, groups = 4`);
- `multi-turn`: 4-turn sessions (each turn resends the conversation so far) behind one of 2
  system prompts of 2K tokens, 10 s think time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from baselines import TRACE_FILES, TRACES

from espc import load_spec
from espc.frontend.loader import validate_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.evaluation import Evaluator, override_workload
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.sim.metrics import METRICS
from espc.planner.sim.workload import prompt_block_reuse

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "lwm7b-a800x8.toml"
HELD_OUT = 100  # scored on seed HELD_OUT + s, compiled on seed s
WORKLOADS = ("mooncake", "system-prompt", "multi-turn")
STRATEGIES = ("elastic+cache", "elastic", "best-static+cache", "best-static")
# The synthetic workloads' [workload] tables (prompt lengths are the message after the prefix).
SYNTHETIC = {
    "system-prompt": {"lengths": "sharegpt", "prefix": {"shared_tokens": 8192, "groups": 4}},
    "multi-turn": {"lengths": "sharegpt", "prefix": {"shared_tokens": 2048, "groups": 2, "turns": 4, "think_time": "10s"}},
}


def mooncake_window(directory: Path, index: int, requests: int) -> Path:
    """Requests [index × requests, (index + 1) × requests) of the Mooncake trace as a file of
    their own (the reader rebases timestamps to the window's first)."""
    source = TRACES / TRACE_FILES["mooncake"]
    path = directory / f"mooncake-{index}.jsonl"
    with source.open() as lines:
        window = list(itertools.islice(lines, index * requests, (index + 1) * requests))
    if len(window) < requests:
        raise SystemExit(f"{source} has fewer than {(index + 1) * requests} requests: use fewer --seeds or --requests")
    path.write_text("".join(window))
    return path


def workload_spec(workload: str, seed: int, held_out: bool, requests: int, scratch: Path, base: Path, caching: bool) -> Spec:
    """The benchmark spec with the workload of (seed, held out or not), strategy elastic and
    prefix caching on or off."""
    spec = load_spec(base)
    if workload == "mooncake":
        spec = override_workload(spec, trace=mooncake_window(scratch, 2 * seed + held_out, requests))
    data = spec.model_dump(mode="json")
    if workload in SYNTHETIC:
        data["workload"] = {
            key: value for key, value in data["workload"].items() if key not in ("lengths", "outputs", "trace", "prefix")
        } | SYNTHETIC[workload]
    data["policy"]["strategy"] = "elastic"
    data["runtime"]["prefix_caching"] = caching
    return validate_spec(data, {}, "benchmark")


def _cell(workload: str, seed: int, requests: int, search_seconds: float, base: Path) -> dict:
    started = time.perf_counter()
    held_out = HELD_OUT + seed
    cell: dict = {"workload": workload, "seed": seed, "held_out_seed": held_out, "requests": requests,
                  "search_seconds": search_seconds, "spec": base.name, "goodputs": {}, "hit_rate": {}, "reusable": {},
                  "configurations": {}}
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        spec = workload_spec(workload, seed, False, requests, scratch, base, caching=True)
        try:
            result = compile_spec(
                spec, spec_hash(spec), base.parent, CompileOptions(search_seconds=search_seconds, trial_requests=requests, seed=seed)
            )
        except InfeasibleSLO as error:
            return {**cell, "infeasible": str(error)}
        policy = result.policy.elastic
        assert policy is not None  # strategy elastic compiles an elastic policy
        cell["elastic_policy"] = str(policy)
        cell["compile_seconds"] = time.perf_counter() - started
        scored = {caching: workload_spec(workload, seed, True, requests, scratch, base, caching) for caching in (True, False)}
        for metric in METRICS:
            for strategy in STRATEGIES:
                caching = strategy.endswith("+cache")
                family = strategy.removesuffix("+cache")
                evaluator = Evaluator(scored[caching], base_dir=base.parent, requests=requests, elastic=policy, metric=metric)
                found = evaluator.strategy_goodput(family, held_out)
                cell["goodputs"].setdefault(strategy, {})[metric] = found.goodput.rate
                cell["configurations"][strategy] = found.configuration
                if caching and metric == "p90" and found.goodput.rate:
                    run = evaluator.simulate_strategy(family, found.goodput.rate, held_out, configuration=found.configuration)
                    cell["hit_rate"][strategy] = run.result.prefix_hit_rate
                    cell["reusable"][strategy] = prompt_block_reuse(evaluator.workload(found.goodput.rate, held_out))
    cell["seconds"] = time.perf_counter() - started
    return cell


def geometric_mean_ratio(pairs: list[tuple[float, float]]) -> str:
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    if not logs:
        return "-"
    return f"{math.exp(statistics.fmean(logs)):.2f}×" + (f" ({len(logs)} of {len(pairs)})" if len(logs) < len(pairs) else "")


def render(cells: list[dict]) -> str:
    lines = [f"{c['workload']} seed {c['seed']}: no policy: {c['infeasible']}" for c in cells if "infeasible" in c]
    cells = [c for c in cells if "infeasible" not in c]
    for metric in METRICS:
        lines.append(f"\n{metric} goodput (req/s) on held-out seeds {HELD_OUT}+s, mean over seeds; ratios: geometric mean of per-seed pairs")
        header = f"{'workload':15s}{'seeds':>6s}" + "".join(f"{s:>19s}" for s in STRATEGIES)
        header += f"{'elastic: on/off':>17s}{'static: on/off':>16s}{'e+c / s+c':>11s}"
        lines += [header, "-" * len(header)]
        for workload in dict.fromkeys(c["workload"] for c in cells):
            row_cells = [c for c in cells if c["workload"] == workload]
            row = f"{workload:15s}{len(row_cells):6d}"
            for strategy in STRATEGIES:
                row += f"{statistics.fmean(c['goodputs'][strategy][metric] for c in row_cells):19.3f}"

            def ratio(a: str, b: str) -> str:
                return geometric_mean_ratio([(c["goodputs"][a][metric], c["goodputs"][b][metric]) for c in row_cells])

            lines.append(row + f"{ratio('elastic+cache', 'elastic'):>17s}{ratio('best-static+cache', 'best-static'):>16s}"
                         f"{ratio('elastic+cache', 'best-static+cache'):>11s}")
    lines.append("\nprefix-cache hit rate at each +cache strategy's P90 goodput (reusable: the most any cache could serve)")
    for cell in sorted(cells, key=lambda c: (c["workload"], c["seed"])):
        rates = ", ".join(
            f"{s} {r:.1%} (reusable {cell['reusable'][s]:.1%})" if cell["reusable"].get(s) is not None else f"{s} {r:.1%}"
            for s, r in cell["hit_rate"].items()
        )
        lines.append(f"  {cell['workload']:15s} {cell['seed']} → {cell['held_out_seed']}: {rates}; "
                     f"best-static: {cell['configurations']['best-static+cache']} | {cell['configurations']['best-static']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300, help="requests per trial (at least), and per Mooncake window")
    parser.add_argument("--search-seconds", type=float, default=5.0, help="compile's local-search budget per cell")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--workloads", default=";".join(WORKLOADS), help="';'-separated")
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--json", type=Path, help="write every cell here, after each one")
    parser.add_argument("--txt", type=Path, help="write the table here")
    arguments = parser.parse_args()
    workloads = [w for w in arguments.workloads.split(";") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {', '.join(unknown)}; workloads: {', '.join(WORKLOADS)}")
    if "mooncake" in workloads and not (TRACES / TRACE_FILES["mooncake"]).exists():
        print(f"skipping mooncake: {TRACES / TRACE_FILES['mooncake']} not found (set ESPC_TRACES)")
        workloads.remove("mooncake")
    started = time.perf_counter()
    cells = []
    with ProcessPoolExecutor(max_workers=arguments.jobs) as pool:
        jobs = {
            pool.submit(_cell, w, seed, arguments.requests, arguments.search_seconds, arguments.spec.resolve()): (w, seed)
            for seed in range(arguments.seeds) for w in workloads
        }
        for done, future in enumerate(as_completed(jobs), 1):
            cell = future.result()
            cells.append(cell)
            if arguments.json:
                arguments.json.parent.mkdir(parents=True, exist_ok=True)
                arguments.json.write_text(json.dumps(sorted(cells, key=lambda c: (c["workload"], c["seed"])), indent=2))
            g = cell["goodputs"]
            print(f"[{done}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {cell['workload']:15s} seed {cell['seed']}: "
                  + (", ".join(f"{s} {g[s]['p90']:.3f} | {g[s]['per-class']:.3f}" for s in g) or cell.get("infeasible", "")),
                  flush=True)
    heading = (f"{arguments.spec.name}: compiled (elastic, caching on, {arguments.search_seconds:g} s search) on seeds "
               f"0–{arguments.seeds - 1}, scored on {HELD_OUT}+s; at least {arguments.requests} requests per trial")
    table = heading + "\n" + render(cells)
    print("\n" + table)
    if arguments.txt:
        arguments.txt.parent.mkdir(parents=True, exist_ok=True)
        arguments.txt.write_text(table + "\n")


if __name__ == "__main__":
    main()
