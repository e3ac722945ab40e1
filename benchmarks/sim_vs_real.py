"""Sim vs real: profile the CPU workers, compile, simulate a 64-request trace, then run the same
trace for real: mean and P90 TTFT/TPOT within 20% of the simulator's prediction.

    python benchmarks/sim_vs_real.py [--rate R] [--requests N] [--seed S] [--strategy NAME]
        [--calibration FILE | --analytical] [--save-calibration FILE] [--quick-profile]
        [--compile] [--search-seconds S] [--kv-capacity T] [--warmup N] [--json PATH]

On specs/tiny-cpu.toml (4 CPU worker processes over gloo, one torch thread each):

1. calibrate: `espc.runtime.profile.profile(spec)` measures prefill, decode and migration on
   the spec's workers and fits the cost model (or --calibration FILE from `espc profile`;
   --analytical skips it and uses `CostModel.from_spec`);
2. compile: the elastic policy MILP on that cost model (`Evaluator.candidates("elastic")`);
   with --compile the whole compiler (`compile_spec`: MILP, simulated verification, local
   search, every baseline) and its chosen strategy. --strategy NAME serves a baseline instead
   (its best configuration by simulated attainment on this trace);
3. simulate the spec's workload (64 requests, Poisson 2 req/s by default) with that
   scheduler, cost model and KV capacity;
4. replay the same requests on `espc.runtime.engine.Engine` with the *same* scheduler
   (a fresh one from the same candidate, so the same cost model decides DoPs and batches):
   each request submitted at its arrival time with prompt_len random token ids and
   max_new_tokens = output_len (greedy, no stop tokens, so output lengths match). A warm-up
   trace (another seed) runs first so that every worker has built its graphs; only the timed
   trace is measured;
5. print sim vs real (the simulator's summary table, then mean / P90 TTFT and TPOT, e2e and
   attainment with real/sim and whether within 20%), and where they differ: per iteration the
   cost model's prediction vs the measured duration (timeline: dispatch to completion) vs the
   workers' own seconds, and how many instances were busy at once against the CPU cores. As a
   diagnostic (not the target), the trace is simulated again with the per-iteration time the
   calibration cannot see (the real run's median driver+IPC time per batch and gap between
   back-to-back batches) added to every batch: what is left is contention and cost-model error.

Writes benchmarks/results/sim_vs_real.json by default. Numbers are what they are: nothing is
tuned to pass.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "sim_vs_real.json"
TOLERANCE = 0.20
THREADS = 1


# ------------------------------------------------------------------------------- stages


def calibrate(spec, arguments) -> tuple[object, dict]:
    """(cost model, what it came from)."""
    from espc.planner.sim.calibration import format_calibration, load_calibration, write_calibration
    from espc.planner.sim.costmodel import CostModel

    if arguments.analytical:
        return CostModel.from_spec(spec), {"source": "analytical (CostModel.from_spec)"}
    if arguments.calibration is not None:
        calibration = load_calibration(arguments.calibration, spec)
        source = f"file {arguments.calibration}"
        seconds = None
    else:
        from espc.runtime.profile import Grid, profile

        print("profiling the workers (espc.runtime.profile) ...", flush=True)
        started = time.perf_counter()
        calibration = profile(spec, grid=Grid.quick(spec) if arguments.quick_profile else None)
        seconds = time.perf_counter() - started
        source = f"profiled now ({'quick' if arguments.quick_profile else 'full'} grid, {seconds:.0f} s)"
        if arguments.save_calibration is not None:
            write_calibration(arguments.save_calibration, calibration)
            source += f", saved to {arguments.save_calibration}"
    print(f"cost model: calibrated, {source}")
    print(format_calibration(calibration))
    errors = [abs(error) for _, _, error in calibration.errors()]
    return calibration.cost, {
        "source": source, "profile_seconds": seconds, "conditions": dict(calibration.conditions),
        "grid_points": len(errors), "fit_mean_abs_error": statistics.fmean(errors) if errors else None,
        "fit_max_abs_error": max(errors) if errors else None,
    }


def choose_candidate(spec, evaluator, arguments) -> tuple[object, object, dict]:
    """(candidate, policy or None, description) of what both the simulator and the engine serve."""
    if arguments.compile:
        from espc.planner.compile.artifact import spec_hash
        from espc.planner.compile.compiler import CompileOptions, compile_spec

        print(f"compiling (search {arguments.search_seconds:g} s) ...", flush=True)
        started = time.perf_counter()
        result = compile_spec(
            spec, spec_hash(spec), SPEC.parent, CompileOptions(arguments.search_seconds, arguments.compile_requests),
            cost=evaluator.cost,
        )
        policy = result.policy
        seconds = time.perf_counter() - started
        print(f"compiled in {seconds:.0f} s: {policy.strategy} ({policy.configuration}): {policy.reason}")
        strategy, configuration = policy.strategy, policy.configuration
        if policy.elastic is not None:
            evaluator.elastic = policy.elastic
        how = {"compiled": True, "compile_seconds": seconds, "reason": policy.reason}
    else:
        policy, strategy, configuration = None, arguments.strategy, None
        how = {"compiled": False}
    family = evaluator.candidates(strategy)
    if configuration is None and len(family) > 1:
        configuration = evaluator.simulate_strategy(strategy, arguments.rate, arguments.seed).configuration
        how["configuration_chosen_by"] = "best simulated attainment on this trace"
    chosen = [c for c in family if configuration is None or c.label == configuration]
    if not chosen:
        raise SystemExit(f"strategy {strategy} has no configuration {configuration!r}")
    candidate = chosen[0]
    how |= {"strategy": strategy, "configuration": candidate.label}
    if strategy == "elastic":
        how["elastic_policy"] = str(evaluator.elastic)
    return candidate, policy, how


class Observer:
    """Watches the engine's scheduler and driver from outside, without changing what they do:
    the cost model's prediction of every planned batch (the scheduler's own `batch_seconds`,
    what the simulator would charge) and the workers' StepResult seconds per iteration."""

    def __init__(self, scheduler):
        self.predicted: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.worker_seconds: dict[tuple[int, int], float] = {}  # (iteration, rank) -> seconds
        self.lock = threading.Lock()
        schedule = scheduler.schedule

        def observed(state):
            plan = schedule(state)
            if plan is not None:
                with self.lock:
                    for batch in plan.batches:
                        key = (batch.phase, tuple(batch.instances), tuple(item.request_id for item in batch.items))
                        self.predicted[key].append((plan.iteration, scheduler.batch_seconds(batch)))
            return plan

        scheduler.schedule = observed

    def attach(self, driver) -> None:
        answer = driver._answer

        def observed(rank, iteration, result):
            if result is not None:
                with self.lock:
                    self.worker_seconds[(result.iteration, rank)] = result.seconds
            answer(rank, iteration, result)

        driver._answer = observed

    def iterations(self, timeline, requests: set[int]) -> list[dict]:
        """One row per batch of the timed requests: measured, predicted, worker seconds."""
        rows = []
        with self.lock:
            pending = {key: collections.deque(values) for key, values in self.predicted.items()}
            workers = dict(self.worker_seconds)
        for batch in sorted(timeline, key=lambda b: b.start_s):
            key = (batch.phase, tuple(batch.instances), tuple(batch.request_ids))
            if not pending.get(key):
                continue
            iteration, predicted = pending[key].popleft()
            if not set(batch.request_ids) & requests:
                continue
            seconds = [workers.get((iteration, rank)) for rank in batch.instances]
            rows.append({
                "phase": batch.phase, "dop": len(batch.instances), "requests": len(batch.request_ids),
                "tokens": batch.tokens, "start_s": batch.start_s, "measured_s": batch.end_s - batch.start_s,
                "predicted_s": predicted,
                "worker_s": max(seconds) if all(s is not None for s in seconds) else None,
            })
        return rows


def replay(spec, policy, candidate, requests, warmup, arguments) -> tuple[object, list[dict], dict]:
    """Run the trace on the engine: (SimulationResult of the timed requests, iteration rows, info)."""
    from espc.planner.sim.simulator import SimulationResult
    from espc.runtime.engine import Engine
    from espc.runtime.sampling import SamplingParams

    scheduler = candidate.make()
    observer = Observer(scheduler)
    rng = random.Random(arguments.seed)
    vocab = spec.model.vocab
    print("starting the engine ...", flush=True)
    started = time.perf_counter()
    try:
        engine = Engine(spec, policy, base_dir=SPEC.parent, scheduler=scheduler, threads=THREADS)
    except NotImplementedError as error:  # e.g. a compiled best-static at tp > 1
        raise SystemExit(
            f"the runtime cannot serve {candidate.strategy} ({candidate.label}): {error}; "
            f"choose a strategy with --strategy instead of --compile"
        ) from None
    with engine:
        observer.attach(engine._driver)
        print(f"{engine.stats()['instances']} workers up in {time.perf_counter() - started:.1f} s", flush=True)

        def run(trace, label: str) -> list:
            prompts = [[rng.randrange(vocab) for _ in range(r.prompt_len)] for r in trace]
            handles = []
            begin = time.monotonic()
            for request, prompt in zip(trace, prompts):
                delay = begin + request.arrival_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                handles.append(engine.submit(prompt, SamplingParams(max_new_tokens=request.output_len)))
            submitted = time.monotonic() - begin
            completions = [handle.result(timeout=600) for handle in handles]
            print(
                f"{label}: {len(trace)} requests submitted over {submitted:.1f} s (trace: {trace[-1].arrival_s:.1f} s), "
                f"done after {time.monotonic() - begin:.1f} s", flush=True,
            )
            return completions

        if warmup:
            run(warmup, "warm-up")
        cache_before = engine.stats()["graph_cache"]
        completions = run(requests, "timed trace")
        result = engine.result()
        stats = engine.stats()
        failures = engine.failures
    ids = {c.request_id for c in completions}
    bad = [c for c in completions if c.error or c.finish_reason != "length"]
    records = [r for r in result.records if r.id in ids]
    for record, request in zip(records, requests):
        assert (record.prompt_len, record.output_len) == (request.prompt_len, request.output_len), (record, request)
    timeline = [b for b in result.timeline if set(b.request_ids) & ids]
    iterations = observer.iterations(result.timeline, ids)
    busy = [0.0] * len(result.instance_busy_s)
    for batch in timeline:
        for instance in batch.instances:
            busy[instance] += batch.end_s - batch.start_s
    finished = [r.finish_s for r in records if r.finish_s is not None]
    duration = max(finished) - min(r.arrival_s for r in records) if finished else 0.0
    migrated = sum(r.migrated_tokens for r in records)
    real = SimulationResult(
        f"{candidate.strategy} (engine)", records, duration, len({row["start_s"] for row in iterations}), busy,
        migrated, migrated * spec.model.kv_bytes_per_token, timeline,
    )
    info = {
        "not_length_finished": [(c.request_id, c.finish_reason, c.error) for c in bad],
        "graph_cache_before_timed": cache_before, "graph_cache_after": stats["graph_cache"],
        "failures": failures, "engine_iterations_total": stats["iterations"],
    }
    return real, iterations, info


def measured_overhead(iterations: list[dict], timeline) -> dict[str, float]:
    """What the calibration cannot see, per phase, from the real run: the median of an
    iteration's dispatch-to-completion minus its slowest worker's own seconds (driver, IPC),
    plus the median gap between back-to-back batches of an instance (the driver loop's turn)."""
    overhead = {}
    for phase in ("prefill", "decode"):
        values = [row["measured_s"] - row["worker_s"] for row in iterations if row["phase"] == phase and row["worker_s"] is not None]
        overhead[phase] = statistics.median(values) if values else 0.0
    gaps = []
    last_end: dict[int, float] = {}
    for batch in sorted(timeline, key=lambda b: b.start_s):
        for instance in batch.instances:
            if instance in last_end and 0 <= batch.start_s - last_end[instance] < 0.05:
                gaps.append(batch.start_s - last_end[instance])
        for instance in batch.instances:
            last_end[instance] = batch.end_s
    overhead["gap"] = statistics.median(gaps) if gaps else 0.0
    return overhead


def simulate_with_overhead(candidate, requests, overhead: dict[str, float], evaluator):
    """Diagnostic only: the same simulation with `overhead[phase] + overhead["gap"]` added to
    every batch's predicted seconds (the scheduler's decisions are unchanged: it plans with
    the cost model; only the simulator's clock uses batch_seconds)."""
    from espc.planner.sim.metrics import summarize
    from espc.planner.sim.simulator import simulate

    scheduler = candidate.make()
    predicted = scheduler.batch_seconds
    scheduler.batch_seconds = lambda batch: predicted(batch) + overhead[batch.phase] + overhead["gap"]
    result = simulate(scheduler, requests, record_timeline=True)
    return summarize(dataclasses.replace(result, strategy=f"{result.strategy} + overhead"), evaluator.spec.slo, evaluator.prefill_s)


# ------------------------------------------------------------------------------ reports


METRICS = (
    # (label, getter, checked against the 20% target)
    ("TTFT mean", lambda s: s.ttft.mean, True),
    ("TTFT p90", lambda s: s.ttft.p90, True),
    ("TPOT mean", lambda s: s.tpot.mean, True),
    ("TPOT p90", lambda s: s.tpot.p90, True),
    ("e2e mean", lambda s: s.e2e.mean, False),
    ("e2e p90", lambda s: s.e2e.p90, False),
    ("queueing mean", lambda s: s.queueing.mean, False),
    ("attainment", lambda s: s.attainment, False),
    ("mean utilisation", lambda s: s.mean_utilisation, False),
)


def compare_rows(sim, real, adjusted) -> list[dict]:
    rows = []
    for label, get, checked in METRICS:
        s, r, a = get(sim), get(real), get(adjusted)
        ratio = r / s if s and not math.isnan(s) else math.nan
        rows.append({
            "metric": label, "sim": s, "real": r, "real_over_sim": ratio, "checked": checked,
            "within_20pct": (abs(ratio - 1) <= TOLERANCE) if not math.isnan(ratio) else False,
            "sim_plus_overhead": a, "real_over_sim_plus_overhead": r / a if a and not math.isnan(a) else math.nan,
        })
    return rows


def _value(label: str, value: float) -> str:
    if label in ("attainment", "mean utilisation"):
        return f"{value:.1%}"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3f} s"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}×"


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'metric':<17} {'sim':>11} {'real':>11} {'real/sim':>9} {'within 20%?':>12} │ "
        f"{'sim+overhead':>12} {'real/(sim+overhead)':>19}"
    )
    lines = [header, "─" * len(header)]
    for row in rows:
        verdict = ("yes" if row["within_20pct"] else "NO") if row["checked"] else f"({'yes' if row['within_20pct'] else 'no'})"
        lines.append(
            f"{row['metric']:<17} {_value(row['metric'], row['sim']):>11} {_value(row['metric'], row['real']):>11} "
            f"{_ratio(row['real_over_sim']):>9} {verdict:>12} │ {_value(row['metric'], row['sim_plus_overhead']):>12} "
            f"{_ratio(row['real_over_sim_plus_overhead']):>19}"
        )
    return "\n".join(lines)


def iteration_summary(rows: list[dict]) -> list[dict]:
    """Per (phase, dop): medians of measured / predicted and worker / measured, and sums."""
    groups: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["phase"], row["dop"])].append(row)
    summary = []
    for (phase, dop), members in sorted(groups.items()):
        workers = [m for m in members if m["worker_s"] is not None]
        summary.append({
            "phase": phase, "dop": dop, "batches": len(members),
            "mean_requests": statistics.fmean(m["requests"] for m in members),
            "measured_median_s": statistics.median(m["measured_s"] for m in members),
            "predicted_median_s": statistics.median(m["predicted_s"] for m in members),
            "measured_over_predicted_median": statistics.median(m["measured_s"] / m["predicted_s"] for m in members),
            "measured_sum_s": sum(m["measured_s"] for m in members),
            "predicted_sum_s": sum(m["predicted_s"] for m in members),
            "worker_median_s": statistics.median(m["worker_s"] for m in workers) if workers else None,
            "driver_ipc_median_s": statistics.median(m["measured_s"] - m["worker_s"] for m in workers) if workers else None,
        })
    return summary


def format_iterations(summary: list[dict]) -> str:
    header = (
        f"{'phase':<8} {'dop':>3} {'batches':>7} {'req/batch':>9} │ {'predicted':>10} {'measured':>10} {'meas/pred':>9} │ "
        f"{'worker':>10} {'driver+IPC':>10} │ {'Σ predicted':>11} {'Σ measured':>11}"
    )
    lines = [header, "─" * len(header)]
    for s in summary:
        worker = f"{s['worker_median_s'] * 1e3:7.2f} ms" if s["worker_median_s"] is not None else "-"
        driver = f"{s['driver_ipc_median_s'] * 1e3:7.2f} ms" if s["driver_ipc_median_s"] is not None else "-"
        lines.append(
            f"{s['phase']:<8} {s['dop']:>3} {s['batches']:>7} {s['mean_requests']:>9.1f} │ "
            f"{s['predicted_median_s'] * 1e3:7.2f} ms {s['measured_median_s'] * 1e3:7.2f} ms "
            f"{s['measured_over_predicted_median']:>8.2f}× │ {worker:>10} {driver:>10} │ "
            f"{s['predicted_sum_s']:>9.2f} s {s['measured_sum_s']:>9.2f} s"
        )
    return "\n".join(lines)


def concurrency(timeline, cores: int) -> dict:
    """Time-weighted number of busy instances over the span of the timeline, and the share
    of that span with more busy instances than CPU cores."""
    events = []
    for batch in timeline:
        events.append((batch.start_s, len(batch.instances)))
        events.append((batch.end_s, -len(batch.instances)))
    if not events:
        return {"mean_busy_instances": 0.0, "share_over_cores": 0.0}
    events.sort()
    busy = 0
    weighted = over = 0.0
    last = events[0][0]
    for moment, change in events:
        weighted += busy * (moment - last)
        if busy > cores:
            over += moment - last
        busy += change
        last = moment
    span = events[-1][0] - events[0][0]
    return {"mean_busy_instances": weighted / span if span else 0.0, "share_over_cores": over / span if span else 0.0,
            "span_s": span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=None, help="arrival rate (req/s); default the spec's (2)")
    parser.add_argument("--requests", type=int, default=None, help="requests in the trace; default the spec's (64)")
    parser.add_argument("--seed", type=int, default=None, help="workload seed; default the spec's (0)")
    parser.add_argument("--strategy", default="elastic", help="elastic (the MILP policy) or a baseline: static-sp, static-tp, ...")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--calibration", type=Path, help="a calibration file from `espc profile` instead of profiling now")
    source.add_argument("--analytical", action="store_true", help="the analytical cost model (CostModel.from_spec), no calibration")
    parser.add_argument("--save-calibration", type=Path, help="write the calibration measured now here")
    parser.add_argument("--quick-profile", action="store_true", help="profile on the quick grid (seconds; not for planning)")
    parser.add_argument("--compile", action="store_true", help="run the whole compiler and serve its chosen strategy")
    parser.add_argument("--search-seconds", type=float, default=3.0, help="with --compile: the local search budget")
    parser.add_argument("--compile-requests", type=int, default=100, help="with --compile: requests per simulated trial")
    parser.add_argument("--kv-capacity", type=int, default=None, help="KV tokens per instance (default: the spec's memory)")
    parser.add_argument("--warmup", type=int, default=16, help="requests of the untimed warm-up trace (another seed)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    arguments = parser.parse_args()

    from rich.console import Console

    from espc import load_spec
    from espc.planner.compile.evaluation import Evaluator
    from espc.planner.compile.report import summary_table
    from espc.planner.sim.metrics import summarize
    from espc.planner.sim.workload import generate

    started = time.perf_counter()
    load = os.getloadavg()
    spec = load_spec(SPEC)
    seed = spec.workload.seed if arguments.seed is None else arguments.seed
    arguments.seed = seed
    cost, cost_info = calibrate(spec, arguments)
    evaluator = Evaluator(spec, SPEC.parent, cost=cost, kv_capacity=arguments.kv_capacity)
    requests = generate(spec.workload, base_dir=SPEC.parent, rate=arguments.rate, seed=seed, requests=arguments.requests)
    warmup = generate(spec.workload, base_dir=SPEC.parent, rate=arguments.rate, seed=seed + 1000, requests=arguments.warmup) if arguments.warmup else []
    candidate, policy, served = choose_candidate(spec, evaluator, arguments)
    print(f"serving {served['strategy']} ({served['configuration']})")
    if "elastic_policy" in served:
        print(served["elastic_policy"])
    sim_result, sim = evaluator.run(candidate, requests, timeline=True)
    sim_iterations = collections.Counter((b.phase, len(b.instances)) for b in sim_result.timeline)
    real_result, iterations, info = replay(spec, policy, candidate, requests, warmup, arguments)
    real = summarize(real_result, spec.slo, evaluator.prefill_s)
    cores = os.cpu_count() or 1
    real_concurrency = concurrency(real_result.timeline, cores)
    sim_concurrency = concurrency(sim_result.timeline, cores)
    per_iteration = iteration_summary(iterations)
    overhead = measured_overhead(iterations, real_result.timeline)
    adjusted = simulate_with_overhead(candidate, requests, overhead, evaluator)
    rows = compare_rows(sim, real, adjusted)
    elapsed = time.perf_counter() - started

    print()
    Console(width=160).print(summary_table([sim, real], f"{len(requests)} requests, seed {seed}, "
                                           f"rate {arguments.rate or spec.workload.arrival.rate:g} req/s"))
    print()
    print(f"Sim vs real ({served['strategy']} {served['configuration']}, {len(requests)} requests, "
          f"cost model: {cost_info['source']}): target mean and P90 TTFT/TPOT within 20% of the simulator")
    print(format_rows(rows))
    checked = [row for row in rows if row["checked"]]
    print(f"{sum(row['within_20pct'] for row in checked)} of {len(checked)} checked metrics within 20% "
          f"(rows in parentheses are informational)")
    print(
        "sim+overhead is a diagnostic, not the target: the same simulation with the real run's median per-iteration "
        f"driver+IPC time added to every batch (prefill {overhead['prefill'] * 1e3:.2f} ms, decode "
        f"{overhead['decode'] * 1e3:.2f} ms) plus the median gap between an instance's back-to-back batches "
        f"({overhead['gap'] * 1e3:.2f} ms)"
    )
    print()
    print("Per iteration of the timed trace: the cost model's prediction (what the simulator charges) vs the measured "
          "dispatch-to-completion, and the workers' own seconds")
    print(format_iterations(per_iteration))
    print(
        f"busy instances at once (time-weighted): real {real_concurrency['mean_busy_instances']:.2f}, "
        f"sim {sim_concurrency['mean_busy_instances']:.2f}; real share of time with more busy instances than the "
        f"{cores} CPU cores: {real_concurrency['share_over_cores']:.1%}; load average before the run {load[0]:.2f}"
    )
    print(f"sim batches by (phase, dop): {dict(sorted(sim_iterations.items()))}")
    print(f"graph cache: before the timed trace {info['graph_cache_before_timed']}; after {info['graph_cache_after']}")
    if info["not_length_finished"] or info["failures"]:
        print(f"problems: {info['not_length_finished']} {info['failures']}")
    print(f"{elapsed:.0f} s in all")

    report = {
        "benchmark": "sim_vs_real",
        "tolerance": TOLERANCE,
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "cpus": cores,
                    "load_average_before": list(load)},
        "spec": str(SPEC.relative_to(ROOT)),
        "trace": {"requests": len(requests), "seed": seed, "rate": arguments.rate or spec.workload.arrival.rate,
                  "warmup_requests": len(warmup), "kv_capacity": arguments.kv_capacity or candidate.make().deployment.capacity[0]},
        "served": served,
        "cost_model": cost_info | {"fits": cost.to_dict()},
        "rows": rows,
        "sim_summary": dataclasses.asdict(sim),
        "real_summary": dataclasses.asdict(real),
        "iterations": per_iteration,
        "measured_overhead_s": overhead,
        "sim_plus_overhead_summary": dataclasses.asdict(adjusted),
        "concurrency": {"real": real_concurrency, "sim": sim_concurrency},
        "sim_batches": {f"{phase} dop {dop}": n for (phase, dop), n in sorted(sim_iterations.items())},
        "engine": info,
        "requests": [
            {"id": request.id, "arrival_s": request.arrival_s, "prompt_len": request.prompt_len, "output_len": request.output_len,
             "sim_ttft_s": s.ttft_s, "real_ttft_s": r.ttft_s, "sim_tpot_s": s.tpot_s, "real_tpot_s": r.tpot_s}
            for request, s, r in zip(requests, sim_result.records, real_result.records)
        ],
        "elapsed_s": elapsed,
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {arguments.json}")


if __name__ == "__main__":
    sys.exit(main())
