"""Sim vs real: profile the CPU workers, compile the tiny spec with that calibration, simulate
its workload, then run the same workload on the engine: TTFT and TPOT p50 and p90 of the
real run within 20% of the simulator's prediction, overall and per phase (prefill DoP,
decode on one instance or spread over several).

    python benchmarks/sim_vs_real.py [--calibration FILE | --quick-profile] [--save-calibration FILE]
        [--search-seconds S] [--strategy NAME [--configuration LABEL]] [--rate R] [--requests N]
        [--seed S] [--warmup N] [--kv-capacity T] [--json PATH] [--text PATH]

The user's flow `espc profile` → `espc compile --calibration` → `espc simulate` vs `espc run`
on specs/tiny-cpu.toml (4 CPU worker processes over gloo, one torch thread each), in one
process:

1. calibrate: `espc.runtime.profile.profile(spec)` measures prefill and decode at every DoP,
   migrations, the runtime's dispatch and its contention (iterations while other instances
   are busy: four workers share two cores here) on the spec's workers and fits the cost
   model (or --calibration FILE, written by `espc profile`). This happens before, and apart
   from, the run it is compared with: nothing measured on that run feeds the prediction;
2. compile: `compile_spec` with that cost model (the MILP, simulated verification, local
   search, every baseline), as `espc compile --calibration` does; the artifact's policy is
   served. --strategy NAME serves another of the compiled candidates (e.g. `elastic` when
   compile chose a baseline: the compiled elastic policy);
3. simulate: the spec's workload (64 requests, Poisson 8 req/s) through the scheduler
   `espc run` builds for that policy (`espc.runtime.engine.build_scheduler`);
4. run: the same workload replayed in real time (`espc.runtime.replay`, as `espc run`) on an
   Engine of that policy, after an untimed warm-up trace (another seed);
5. compare: TTFT and TPOT p50 / p90 sim vs real for every request and per class, each run's
   requests classed by what its own scheduler did with them: the DoP of their prefill, and
   whether their decode read KV on one instance or several (multi-master decode). Counted
   in both: prefills at DoP > 1, decode steps over several instances, migrations.

Where they differ, the diagnostics say why: per (phase, DoP, more instances busy than CPU
cores or not) the cost model's prediction of each batch, alone and at the run's contention,
vs its measured dispatch-to-completion and the workers' own seconds in it (the
rest is the driver and the queues), and how many instances were busy at once against the
CPU cores. As a diagnostic (never the target), the trace is simulated again with the real
run's median per-batch driver time and gap between an instance's back-to-back batches added
to every batch.

Writes benchmarks/results/sim_vs_real.json and the printed tables to sim_vs_real.txt.
Numbers are what they are: nothing is tuned to pass. Timing depends on the machine's load:
run it on a quiet machine; nothing here decides a test.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "sim_vs_real.json"
TOLERANCE = 0.20
THREADS = 1  # torch threads per worker: the runtime's default, and what `espc profile` measures


# ------------------------------------------------------------------------------- stages


def calibrate(spec, arguments):
    """(Calibration, what it came from): profiled now, before the run, or read from a file."""
    from espc.planner.sim.calibration import format_calibration, load_calibration, write_calibration

    if arguments.calibration is not None:
        calibration = load_calibration(arguments.calibration, spec)
        source, seconds = f"file {arguments.calibration}", None
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
    return calibration, {
        "source": source, "profile_seconds": seconds, "conditions": dict(calibration.conditions),
        "grid_points": len(errors), "fit_mean_abs_error": statistics.fmean(errors) if errors else None,
        "fit_max_abs_error": max(errors) if errors else None,
    }


def compile_policy(spec, cost, arguments):
    """The policy `espc compile --calibration` writes for `spec` with `cost`."""
    from espc.planner.compile.artifact import spec_hash
    from espc.planner.compile.compiler import CompileOptions, compile_spec

    print(f"compiling (search {arguments.search_seconds:g} s) ...", flush=True)
    started = time.perf_counter()
    policy = compile_spec(spec, spec_hash(spec), SPEC.parent, CompileOptions(arguments.search_seconds), cost=cost).policy
    seconds = time.perf_counter() - started
    print(f"compiled in {seconds:.0f} s: {policy.strategy} ({policy.configuration}): {policy.reason}")
    return policy, seconds


class PlanLog:
    """What a scheduler decided, watched from outside without changing it: every plan's
    batches with the cost model's prediction of each (`batch_seconds`, what the simulator
    charges), and per request the DoP of its prefill and the most instances its decode read
    KV on (the multi-master spread)."""

    def __init__(self, scheduler):
        self.batches: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.prefill_dop: dict[int, int] = {}
        self.decode_span: dict[int, int] = {}
        self.prefill_batches: list[tuple[int, tuple[int, ...]]] = []  # (DoP, requests)
        # (instances of the batch, most instances one of its requests reads KV on, requests)
        self.decode_steps: list[tuple[int, int, tuple[int, ...]]] = []
        self.migrations: list[tuple[int, int]] = []  # (request, tokens)
        schedule = scheduler.schedule

        def observed(state):
            plan = schedule(state)
            if plan is not None:
                self.record(plan, scheduler.batch_seconds)
            return plan

        scheduler.schedule = observed

    def record(self, plan, batch_seconds) -> None:
        for batch in plan.batches:
            ids = tuple(item.request_id for item in batch.items)
            self.batches[(batch.phase, tuple(batch.instances), ids)].append(batch_seconds(batch))
            if batch.phase == "prefill":
                self.prefill_batches.append((len(batch.instances), ids))
                for request in ids:
                    self.prefill_dop[request] = max(self.prefill_dop.get(request, 0), len(batch.instances))
            else:
                spans = [sum(1 for _, tokens in item.shards if tokens > 0) for item in batch.items]
                for request, span in zip(ids, spans):
                    self.decode_span[request] = max(self.decode_span.get(request, 0), span)
                self.decode_steps.append((len(batch.instances), max(spans), ids))
        self.migrations += [(migration.request_id, len(migration.range)) for migration in plan.migrations]

    def predicted(self, batch) -> float | None:
        """The prediction of the next batch like `batch` (a BatchRecord), in plan order."""
        waiting = self.batches.get((batch.phase, tuple(batch.instances), tuple(batch.request_ids)))
        return waiting.popleft() if waiting else None

    def counts(self, requests) -> dict:
        """ESP's decisions for `requests`: batches per (phase, DoP), decode steps over several
        instances, requests that decoded on several, migrations and tokens moved."""
        requests = set(requests)
        prefill = collections.Counter(dop for dop, ids in self.prefill_batches if requests.intersection(ids))
        decode = [(instances, span) for instances, span, ids in self.decode_steps if requests.intersection(ids)]
        return {
            "prefill_batches_by_dop": dict(sorted(prefill.items())),
            "prefill_dop_gt1_batches": sum(n for dop, n in prefill.items() if dop > 1),
            "decode_steps_multi_instance": sum(1 for instances, _ in decode if instances > 1),
            "decode_steps_spread_kv": sum(1 for _, span in decode if span > 1),
            "requests_decoded_on_several": sum(1 for r in requests if self.decode_span.get(r, 0) > 1),
            "migrations": sum(1 for r, _ in self.migrations if r in requests),
            "migrated_tokens": sum(tokens for r, tokens in self.migrations if r in requests),
        }


def simulate_policy(spec, policy, options, requests):
    """(SimulationResult, PlanLog) of the simulator driving the scheduler `espc run` builds."""
    from espc.planner.sim.simulator import simulate
    from espc.runtime.engine import build_scheduler

    scheduler = build_scheduler(spec, policy, SPEC.parent, options)
    log = PlanLog(scheduler)
    result = simulate(scheduler, requests, record_timeline=True, prefix_caching=spec.runtime.prefix_caching)
    return result, log, scheduler


def run_policy(spec, policy, options, requests, warmup, seed):
    """(SimulationResult on the engine's clock, PlanLog, per-batch rows, info) of the engine
    serving `policy` on `requests` in real time, after the untimed `warmup` trace."""
    from espc.runtime.engine import Engine
    from espc.runtime.replay import replay

    print("starting the engine ...", flush=True)
    started = time.perf_counter()
    engine = Engine(spec, policy, base_dir=SPEC.parent, **options.model_dump(exclude_none=True))
    log = PlanLog(engine.scheduler)
    with engine:
        print(f"{engine.stats()['instances']} workers up in {time.perf_counter() - started:.1f} s", flush=True)
        if warmup:
            done = replay(engine, warmup, seed=seed + 1000)
            print(f"warm-up: {len(warmup)} requests in {done.wall_s:.1f} s", flush=True)
        log.batches.clear()  # the timed trace's predictions only
        before = len(engine.batch_costs())
        cache_before = engine.stats()["graph_cache"]
        done = replay(engine, requests, seed=seed)
        print(f"timed trace: {len(requests)} requests (trace {requests[-1].arrival_s:.1f} s) in {done.wall_s:.1f} s", flush=True)
        served = engine.result()
        costs = engine.batch_costs()[before:]
        stats = engine.stats()
        failures = engine.failures
    timeline = served.timeline[before:]  # the driver records a finished batch in both at once
    model = engine.scheduler.deployment.cost
    rows = []
    for batch, cost in zip(timeline, costs):
        assert (batch.start_s, batch.instances) == (cost.start_s, cost.instances), (batch, cost)
        predicted = log.predicted(batch)
        others = sum(len(o.instances) for o in timeline if o.start_s <= batch.start_s < o.end_s) - len(batch.instances)
        rows.append({
            "phase": batch.phase, "dop": len(batch.instances), "requests": len(batch.request_ids), "tokens": batch.tokens,
            "start_s": batch.start_s, "measured_s": batch.end_s - batch.start_s, "predicted_s": predicted,
            # what the simulator would charge the batch were this run's concurrency at its start to last
            "contended_s": None if predicted is None else predicted * model.contention_factor(batch.phase, len(batch.instances), others),
            "worker_s": cost.worker_s, "busy_instances": busy_during(batch, timeline),
        })
    info = {
        "failed": done.failed, "graph_cache_before_timed": cache_before, "graph_cache_after": stats["graph_cache"],
        "failures": failures, "engine_iterations_total": stats["iterations"],
    }
    return done.result, log, rows, info


# ------------------------------------------------------------------------------ compare


def classes_of(log: PlanLog, records) -> dict[str, list]:
    """Each run's requests by what its own scheduler did with them."""
    classes: dict[str, list] = collections.defaultdict(list)
    for record in records:
        classes["all"].append(record)
        classes[f"prefill dop {log.prefill_dop.get(record.id, 0)}"].append(record)
        span = log.decode_span.get(record.id, 0)
        if span:
            classes["decode 1 instance" if span == 1 else "decode >1 instance"].append(record)
    return classes


def latency(records, metric: str, percentile: int) -> float:
    """TTFT of completed requests, or TPOT of those with two or more output tokens."""
    if metric == "TTFT":
        values = [r.ttft_s for r in records if r.completed]
    else:
        values = [r.tpot_s for r in records if r.completed and r.output_len > 1]
    return float(np.percentile(values, percentile)) if values else math.nan


def compare(sim_classes, real_classes) -> list[dict]:
    order = ["all"] + sorted(k for k in sim_classes.keys() | real_classes.keys() if k.startswith("prefill"))
    order += [k for k in ("decode 1 instance", "decode >1 instance") if k in sim_classes or k in real_classes]
    rows = []
    for name in order:
        sim, real = sim_classes.get(name, []), real_classes.get(name, [])
        for metric in ("TTFT", "TPOT"):
            for percentile in (50, 90):
                s, r = latency(sim, metric, percentile), latency(real, metric, percentile)
                ratio = r / s if s and not math.isnan(s) and not math.isnan(r) else math.nan
                rows.append({
                    "class": name, "metric": f"{metric} p{percentile}", "sim_requests": len(sim), "real_requests": len(real),
                    "sim_s": s, "real_s": r, "real_over_sim": ratio,
                    "within_20pct": bool(abs(ratio - 1) <= TOLERANCE) if not math.isnan(ratio) else None,
                })
    return rows


def format_compare(rows: list[dict]) -> str:
    header = f"{'class':<19} {'metric':<9} {'n sim':>5} {'n real':>6} {'sim':>10} {'real':>10} {'real/sim':>9} {'≤ 20%?':>7}"
    lines = [header, "─" * len(header)]
    for row in rows:
        verdict = "-" if row["within_20pct"] is None else "yes" if row["within_20pct"] else "NO"
        lines.append(
            f"{row['class']:<19} {row['metric']:<9} {row['sim_requests']:>5} {row['real_requests']:>6} "
            f"{_ms(row['sim_s']):>10} {_ms(row['real_s']):>10} {_ratio(row['real_over_sim']):>9} {verdict:>7}"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1e3:.1f} ms"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}×"


def format_counts(sim: dict, real: dict) -> str:
    labels = {
        "prefill_batches_by_dop": "prefill batches by DoP",
        "prefill_dop_gt1_batches": "prefills at DoP > 1",
        "decode_steps_multi_instance": "decode steps over >1 instance",
        "decode_steps_spread_kv": "decode steps reading KV on >1 instance",
        "requests_decoded_on_several": "requests decoded on >1 instance",
        "migrations": "migrations",
        "migrated_tokens": "tokens migrated",
    }
    lines = [f"{'ESP decisions (timed trace)':<40} {'sim':>22} {'real':>22}"]
    for key, label in labels.items():
        lines.append(f"{label:<40} {str(sim[key]):>22} {str(real[key]):>22}")
    return "\n".join(lines)


def busy_during(batch, timeline) -> float:
    """Instances busy while `batch` ran (its own included), time-weighted over its span."""
    span = batch.end_s - batch.start_s
    if span <= 0:
        return float(len(batch.instances))
    overlap = sum(
        len(other.instances) * max(0.0, min(other.end_s, batch.end_s) - max(other.start_s, batch.start_s))
        for other in timeline if other is not batch
    )
    return len(batch.instances) + overlap / span


def iteration_summary(rows: list[dict], cores: int) -> list[dict]:
    """Per (phase, dop, whether more instances than CPU cores were busy during the batch):
    medians of measured / predicted and worker / measured, and sums."""
    groups: dict[tuple[str, int, bool], list[dict]] = collections.defaultdict(list)
    for row in rows:
        if row["predicted_s"] is not None:
            groups[(row["phase"], row["dop"], row["busy_instances"] > cores)].append(row)
    summary = []
    for (phase, dop, contended), members in sorted(groups.items()):
        summary.append({
            "phase": phase, "dop": dop, "busy_over_cores": contended, "batches": len(members),
            "mean_busy_instances": statistics.fmean(m["busy_instances"] for m in members),
            "mean_requests": statistics.fmean(m["requests"] for m in members),
            "predicted_median_s": statistics.median(m["predicted_s"] for m in members),
            "measured_median_s": statistics.median(m["measured_s"] for m in members),
            "measured_over_predicted_median": statistics.median(m["measured_s"] / m["predicted_s"] for m in members),
            "contended_median_s": statistics.median(m["contended_s"] for m in members),
            "measured_over_contended_median": statistics.median(m["measured_s"] / m["contended_s"] for m in members),
            "worker_median_s": statistics.median(m["worker_s"] for m in members),
            "worker_over_predicted_median": statistics.median(m["worker_s"] / m["predicted_s"] for m in members),
            "driver_ipc_median_s": statistics.median(m["measured_s"] - m["worker_s"] for m in members),
            "predicted_sum_s": sum(m["predicted_s"] for m in members),
            "measured_sum_s": sum(m["measured_s"] for m in members),
        })
    return summary


def format_iterations(summary: list[dict]) -> str:
    header = (
        f"{'phase':<8} {'dop':>3} {'busy':>9} {'batches':>7} {'req/batch':>9} │ {'predicted':>10} {'measured':>10} {'meas/pred':>9} │ "
        f"{'× contention':>12} {'meas/that':>9} │ "
        f"{'worker':>10} {'work/pred':>9} {'driver+IPC':>10} │ {'Σ predicted':>11} {'Σ measured':>11}"
    )
    lines = [header, "─" * len(header)]
    for s in summary:
        lines.append(
            f"{s['phase']:<8} {s['dop']:>3} {('> ' if s['busy_over_cores'] else '≤ ') + 'cores':>9} {s['batches']:>7} "
            f"{s['mean_requests']:>9.1f} │ "
            f"{s['predicted_median_s'] * 1e3:7.2f} ms {s['measured_median_s'] * 1e3:7.2f} ms "
            f"{s['measured_over_predicted_median']:>8.2f}× │ {s['contended_median_s'] * 1e3:9.2f} ms "
            f"{s['measured_over_contended_median']:>8.2f}× │ {s['worker_median_s'] * 1e3:7.2f} ms "
            f"{s['worker_over_predicted_median']:>8.2f}× {s['driver_ipc_median_s'] * 1e3:7.2f} ms │ "
            f"{s['predicted_sum_s']:>9.2f} s {s['measured_sum_s']:>9.2f} s"
        )
    return "\n".join(lines)


def measured_overhead(rows: list[dict], timeline) -> dict[str, float]:
    """What the calibration did not see, per phase, from the real run: the median of a
    batch's dispatch-to-completion minus its slowest worker's own seconds (driver, IPC),
    plus the median gap between back-to-back batches of an instance (the driver loop's turn)."""
    overhead = {}
    for phase in ("prefill", "decode"):
        values = [row["measured_s"] - row["worker_s"] for row in rows if row["phase"] == phase]
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


def simulate_with_overhead(spec, policy, options, requests, overhead: dict[str, float]):
    """Diagnostic only: the same simulation with `overhead[phase] + overhead["gap"]` added
    to every batch's predicted seconds (the scheduler plans with the cost model as before;
    only the simulator's clock charges more)."""
    from espc.planner.sim.simulator import simulate
    from espc.runtime.engine import build_scheduler

    scheduler = build_scheduler(spec, policy, SPEC.parent, options)
    log = PlanLog(scheduler)
    predicted = scheduler.batch_seconds
    scheduler.batch_seconds = lambda batch: predicted(batch) + overhead[batch.phase] + overhead["gap"]
    return simulate(scheduler, requests, record_timeline=True, prefix_caching=spec.runtime.prefix_caching), log


def concurrency(timeline, cores: int) -> dict:
    """Time-weighted number of busy instances over the span of the timeline, and the share
    of that span with more busy instances than CPU cores."""
    events = []
    for batch in timeline:
        events.append((batch.start_s, len(batch.instances)))
        events.append((batch.end_s, -len(batch.instances)))
    if not events:
        return {"mean_busy_instances": 0.0, "share_over_cores": 0.0, "span_s": 0.0}
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
    parser.add_argument("--rate", type=float, default=None, help="arrival rate (req/s); default the spec's")
    parser.add_argument("--requests", type=int, default=None, help="requests in the trace; default the spec's")
    parser.add_argument("--seed", type=int, default=None, help="workload seed; default the spec's")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--calibration", type=Path, help="a calibration file from `espc profile` instead of profiling now")
    source.add_argument("--quick-profile", action="store_true", help="profile on the quick grid (seconds; not for planning)")
    parser.add_argument("--save-calibration", type=Path, help="write the calibration measured now here")
    parser.add_argument("--search-seconds", type=float, default=5.0, help="compile's local search budget (make run's 5)")
    parser.add_argument("--strategy", help="serve this compiled candidate instead of compile's choice (e.g. elastic)")
    parser.add_argument("--configuration", help="with --strategy: its configuration label (see `espc compare`)")
    parser.add_argument("--kv-capacity", type=int, default=None, help="KV tokens per instance (default: the spec's memory)")
    parser.add_argument("--warmup", type=int, default=16, help="requests of the untimed warm-up trace (another seed)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--text", type=Path, help="the printed tables (default: the JSON's path with .txt)")
    arguments = parser.parse_args()
    text = arguments.text or arguments.json.with_suffix(".txt")
    command = shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    load = os.getloadavg()

    from espc import load_spec
    from espc.planner.sim.metrics import isolated_prefill, summarize
    from espc.planner.sim.workload import generate
    from espc.runtime.engine import EngineOptions

    started = time.perf_counter()
    spec = load_spec(SPEC)
    seed = spec.workload.seed if arguments.seed is None else arguments.seed
    calibration, cost_info = calibrate(spec, arguments)
    policy, compile_seconds = compile_policy(spec, calibration.cost, arguments)
    options = EngineOptions(
        threads=THREADS, strategy=arguments.strategy, configuration=arguments.configuration, kv_capacity=arguments.kv_capacity,
    )
    requests = generate(spec.workload, base_dir=SPEC.parent, rate=arguments.rate, seed=seed, requests=arguments.requests)
    warmup = generate(spec.workload, base_dir=SPEC.parent, rate=arguments.rate, seed=seed + 1000, requests=arguments.warmup) if arguments.warmup else []

    sim_result, sim_log, scheduler = simulate_policy(spec, policy, options, requests)
    served = {"strategy": options.strategy or policy.strategy, "scheduler": scheduler.name,
              "compiled_choice": f"{policy.strategy} ({policy.configuration})", "reason": policy.reason,
              "elastic_policy": str(policy.elastic) if policy.elastic else None, "compile_seconds": compile_seconds}
    print(f"serving {served['scheduler']}")
    real_result, real_log, rows, info = run_policy(spec, policy, options, requests, warmup, seed)
    real_records = sorted(real_result.records, key=lambda r: r.id)
    for record, request in zip(real_records, requests):  # the engine numbers requests in arrival order
        assert (record.prompt_len, record.output_len) == (request.prompt_len, request.output_len), (record, request)
    real_ids = {record.id for record in real_records}

    rows_compared = compare(classes_of(sim_log, sim_result.records), classes_of(real_log, real_records))
    sim_counts, real_counts = sim_log.counts(r.id for r in requests), real_log.counts(real_ids)
    prefill_s = isolated_prefill(scheduler.deployment.cost)
    sim_summary, real_summary = summarize(sim_result, spec.slo, prefill_s), summarize(real_result, spec.slo, prefill_s)
    cores = os.cpu_count() or 1
    per_iteration = iteration_summary(rows, cores)
    overhead = measured_overhead(rows, real_result.timeline)
    adjusted_result, _ = simulate_with_overhead(spec, policy, options, requests, overhead)
    percentiles = [(metric, p) for metric in ("TTFT", "TPOT") for p in (50, 90)]
    adjusted = {f"{metric} p{p}": latency(adjusted_result.records, metric, p) for metric, p in percentiles}
    real_overall = {f"{metric} p{p}": latency(real_records, metric, p) for metric, p in percentiles}
    concurrency_real, concurrency_sim = concurrency(real_result.timeline, cores), concurrency(sim_result.timeline, cores)
    elapsed = time.perf_counter() - started

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(f"$ {command}")
        print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({cores} CPUs); "
              f"{len(requests)} requests, seed {seed}, rate {arguments.rate or spec.workload.arrival.rate:g} req/s, "
              f"warm-up {len(warmup)}")
        print(f"cost model: {cost_info['source']}; compiled: {served['compiled_choice']}; served: {served['scheduler']}")
        print()
        print("Sim vs real, TTFT and TPOT (TPOT of requests with ≥ 2 output tokens), each run's requests classed by its "
              "own scheduler's decisions; target real/sim within 20%")
        print(format_compare(rows_compared))
        checked = [row for row in rows_compared if row["within_20pct"] is not None]
        print(f"{sum(row['within_20pct'] for row in checked)} of {len(checked)} rows within 20%")
        print()
        print(format_counts(sim_counts, real_counts))
        print()
        print("Per batch of the timed trace, by phase, DoP and whether more instances than CPU cores were busy while it "
              "ran: the cost model's prediction alone, and × its contention factor for the other instances this run had "
              "busy when the batch started, vs the measured dispatch-to-completion, and the workers' own seconds (the "
              "rest is driver + IPC)")
        print(format_iterations(per_iteration))
        print(
            f"busy instances at once (time-weighted): real {concurrency_real['mean_busy_instances']:.2f}, "
            f"sim {concurrency_sim['mean_busy_instances']:.2f}; share of the time with more busy instances than the "
            f"{cores} CPU cores: real {concurrency_real['share_over_cores']:.1%}, sim {concurrency_sim['share_over_cores']:.1%}"
        )
        print(
            "diagnostic, not the target: simulated again with the real run's median driver+IPC per batch (prefill "
            f"{overhead['prefill'] * 1e3:.2f} ms, decode {overhead['decode'] * 1e3:.2f} ms) and gap between an instance's "
            f"batches ({overhead['gap'] * 1e3:.2f} ms) added to every batch: "
            + ", ".join(f"{key} {_ms(value)} (real/that {_ratio(real_overall[key] / value)})" for key, value in adjusted.items())
        )
        if info["failed"] or info["failures"]:
            print(f"problems: {info['failed']} {info['failures']}")
        print(f"{elapsed:.0f} s in all")
    print()
    print(out.getvalue(), end="")

    report = {
        "benchmark": "sim_vs_real",
        "command": command,
        "tolerance": TOLERANCE,
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "cpus": cores,
                    "load_average_before": list(load)},
        "spec": str(SPEC.relative_to(ROOT)),
        "trace": {"requests": len(requests), "seed": seed, "rate": arguments.rate or spec.workload.arrival.rate,
                  "warmup_requests": len(warmup), "kv_capacity": scheduler.deployment.capacity[0]},
        "served": served,
        "cost_model": cost_info | {"fits": calibration.cost.to_dict()},
        "rows": rows_compared,
        "esp_decisions": {"sim": sim_counts, "real": real_counts},
        "sim_summary": dataclasses.asdict(sim_summary),
        "real_summary": dataclasses.asdict(real_summary),
        "iterations": per_iteration,
        "measured_overhead_s": overhead,
        "sim_plus_overhead": adjusted,
        "concurrency": {"real": concurrency_real, "sim": concurrency_sim},
        "engine": info,
        "requests": [
            {"prompt_len": request.prompt_len, "output_len": request.output_len,
             "sim": {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s, "prefill_dop": sim_log.prefill_dop.get(s.id),
                     "decode_instances": sim_log.decode_span.get(s.id)},
             "real": {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "prefill_dop": real_log.prefill_dop.get(r.id),
                      "decode_instances": real_log.decode_span.get(r.id)}}
            for request, s, r in zip(requests, sim_result.records, real_records)
        ],
        "elapsed_s": elapsed,
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    text.write_text(out.getvalue())
    print(f"wrote {arguments.json} and {text}")


if __name__ == "__main__":
    sys.exit(main())
