"""Lowering + comm verification time per plan, cold and cached, and the graph cache's hit rate
over 1,000 iterations of simulated serving.

    python benchmarks/lowering.py [--json lowering.json]

Cold: a fresh Lowering builds, passes and verifies every rank's graph. Cached: the same plan
again (graphs and the comm proof come from the cache; the plan is still checked and bound).
The simulated run lowers, in order, the plans the planner's schedulers emit for the tiny CPU
spec (static SP with groups 2+2 and 4, then 2P+2D disaggregation with KV migrations) through
one Lowering, as a driver would. Target: cached <= 1 ms per plan.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from espc.backend.dump import representative_plan
from espc.backend.lower import Lowering
from espc.frontend.loader import load_spec
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.planner.compile.evaluation import Evaluator
from espc.planner.plan import IterationPlan, Migration, TokenRange
from espc.planner.sim.simulator import simulate

ROOT = Path(__file__).resolve().parent.parent
SEGMENTS = (("static-sp", "tp=1, groups=2+2", 400), ("static-sp", "tp=1, groups=4", 300), ("disaggregated", "tp=1, 2P+2D", 300))


def _with_migrations(plan: IterationPlan) -> IterationPlan:
    """The decode plan plus two migrations to and from an idle instance."""
    dop = len(plan.batches[0].instances)
    moves = (Migration(7, dop, 0, TokenRange(0, 64)), Migration(8, 1 % dop, dop, TokenRange(0, 32)))
    return IterationPlan(plan.iteration, plan.batches, moves)


def time_plans(model_spec: ModelSpec, repeats: int) -> list[dict]:
    model = build_model(model_spec, device="meta")
    rows = []
    cases = [(phase, dop, False) for phase in ("prefill", "decode") for dop in (1, 2, 4, 8)] + [("decode", 4, True)]
    for phase, dop, migrations in cases:
        plan = representative_plan(phase, dop)
        if migrations:
            plan = _with_migrations(plan)
        started = time.perf_counter()
        lowering = Lowering(model)
        program = lowering.lower(plan)
        cold = time.perf_counter() - started
        cached = []
        for _ in range(repeats):
            started = time.perf_counter()
            lowering.lower(plan)
            cached.append(time.perf_counter() - started)
        nodes = sum(len(program.graph(rank).graph.nodes) for rank in program.ranks)
        rows.append({
            "model": model_spec.name, "plan": f"{phase} dop={dop}" + (" +2 migrations" if migrations else ""),
            "ranks": len(program.ranks), "nodes": nodes, "cold_ms": cold * 1e3,
            "cached_ms": statistics.median(cached) * 1e3,
        })
    return rows


def simulated_run(iterations: int) -> dict:
    spec = load_spec(ROOT / "specs" / "tiny-cpu.toml")
    evaluator = Evaluator(spec, requests=400)
    plans: list[IterationPlan] = []
    for strategy, label, count in SEGMENTS:
        scheduler = next(c for c in evaluator.candidates(strategy) if c.label == label).make()
        emitted: list[IterationPlan] = []
        schedule = scheduler.schedule

        def capture(state, schedule=schedule, emitted=emitted):
            plan = schedule(state)
            if plan is not None:
                emitted.append(plan)
            return plan

        scheduler.schedule = capture
        simulate(scheduler, evaluator.workload())
        plans += emitted[:count]
    plans = plans[:iterations]
    lowering = Lowering(build_model(spec.model, device="meta"), attention=spec.runtime.attention)
    seconds = []
    built = 0  # plans that needed at least one new graph
    for plan in plans:
        misses = lowering.cache.misses
        started = time.perf_counter()
        lowering.lower(plan)
        seconds.append(time.perf_counter() - started)
        built += lowering.cache.misses > misses
    ordered = sorted(seconds)
    return {
        "iterations": len(plans), "cached_plans": len(plans) - built, "graphs": len(lowering.cache.graphs),
        "hits": lowering.cache.hits,
        "misses": lowering.cache.misses, "hit_rate": lowering.cache.hit_rate,
        "verified_plan_shapes": len(lowering.cache.verified),
        "mean_ms": statistics.fmean(seconds) * 1e3, "p50_ms": ordered[len(ordered) // 2] * 1e3,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1e3, "max_ms": ordered[-1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()

    rows = []
    for preset in ("tiny", "llama3-8b"):
        rows += time_plans(ModelSpec(preset=preset, name=preset), arguments.repeats)
    print(f"{'model':10s} {'plan':28s} {'ranks':>5s} {'nodes':>7s} {'cold (ms)':>10s} {'cached (ms)':>12s}")
    for row in rows:
        print(f"{row['model']:10s} {row['plan']:28s} {row['ranks']:5d} {row['nodes']:7,d} {row['cold_ms']:10.1f} {row['cached_ms']:12.3f}")
    run = simulated_run(arguments.iterations)
    print(
        f"\nsimulated run, tiny CPU spec: {run['iterations']} iterations, {run['graphs']} distinct graphs, "
        f"cache hits {run['hits']} / misses {run['misses']} ({run['hit_rate']:.1%}), "
        f"{run['verified_plan_shapes']} comm proofs; {run['cached_plans'] / run['iterations']:.1%} of plans built no graph"
    )
    print(
        f"lower + verify per iteration: mean {run['mean_ms']:.3f} ms, p50 {run['p50_ms']:.3f} ms, "
        f"p99 {run['p99_ms']:.3f} ms, max {run['max_ms']:.1f} ms (target: cached <= 1 ms)"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps({"plans": rows, "simulated_run": run}, indent=2))


if __name__ == "__main__":
    main()
