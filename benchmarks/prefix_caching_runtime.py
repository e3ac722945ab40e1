"""Prefix caching on the real runtime (4 CPU worker processes, specs/tiny-cpu.toml's model):
what a cache hit saves, measured against the same engine with `[runtime] prefix_caching = false`.

    python benchmarks/prefix_caching_runtime.py [--repeats 5] [--prompt-tokens 2000]
        [--spec specs/tiny-cpu-prefix.toml] [--requests 64] [--rate 3] [--search-seconds 5]
        [--no-calibrate] [--json benchmarks/results/prefix_caching_runtime.json]

The workers are profiled first (`espc profile --quick`'s grid) and the spec compiled with
that calibration (`espc compile --calibration`'s path), so that the scheduler's timing
decisions and the simulator's predictions use this machine's measured costs: the analytic
CPU model is far off (espc's tiny default runs uncalibrated).

1. Repeated prompt. The compiled policy (whatever compile chose for the spec) is served
   by `espc.Engine` twice, caching on and off; per repeat, a fresh random prompt of
   --prompt-tokens ids is sent, waited for, then sent again. TTFT is the engine's own record
   (arrival to first token on the driver's clock). The table shows the median cold and
   repeated TTFT and their ratio (target ≤ 0.3× with caching on; ~1× off), and the cached
   tokens the engine reports for the repeat.
2. Workload replay. The same compiled policy replays the spec's workload (a shared system
   prompt in two groups: specs/tiny-cpu-prefix.toml) in real time at --rate requests/s (the
   spec's 8/s is more than four CPU workers prefill without a cache), caching on and off, and
   the simulator predicts both from the calibrated costs: TTFT p50/p90, P90 attainment, and
   the share of prompt tokens read from the cache.

Timing depends on the machine's load: run it on a quiet one; nothing here decides a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from espc import load_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.policy import Policy
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import isolated_prefill, summarize
from espc.planner.sim.simulator import simulate
from espc.planner.sim.workload import generate
from espc.runtime.engine import Engine, EngineOptions, build_scheduler
from espc.runtime.profile import Grid, profile
from espc.runtime.replay import replay
from espc.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def caching(spec: Spec, on: bool) -> Spec:
    return spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"prefix_caching": on})})


def ttft_s(engine: Engine, request_id: int) -> float:
    record = next(r for r in engine.result().records if r.id == request_id)
    assert record.ttft_s is not None, f"request {request_id} produced no token"
    return record.ttft_s


def repeated_prompt(spec: Spec, policy: Policy, repeats: int, tokens: int) -> dict:
    rows = {}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, spec.model.vocab, tokens).tolist() for _ in range(repeats)]
    for on in (True, False):
        cold, warm, cached = [], [], []
        with Engine(caching(spec, on), policy) as engine:
            params = SamplingParams(max_new_tokens=1)
            # Warm-up: a worker lowers each graph shape the first time it runs it, so every
            # instance first serves a prompt, then the same prompt again (a continued prefill).
            warm_up = [rng.integers(0, spec.model.vocab, tokens).tolist() for _ in range(engine.stats()["instances"])]
            engine.generate(warm_up, params, timeout=300)
            engine.generate(warm_up, params, timeout=300)
            for prompt in prompts:
                for times in (cold, warm):
                    handle = engine.submit(prompt, params)
                    completion = handle.result(timeout=300)
                    times.append(ttft_s(engine, completion.request_id))
                cached.append(completion.cached_tokens)
            engine.check_kv()
        rows["on" if on else "off"] = {
            "cold_ttft_s": statistics.median(cold), "repeat_ttft_s": statistics.median(warm),
            "ratio": statistics.median(w / c for w, c in zip(warm, cold)), "cached_tokens": statistics.median(cached),
            "samples": {"cold": cold, "repeat": warm},
        }
    return rows


def workload_replay(spec: Spec, policy: Policy, requests: int, rate: float | None) -> dict:
    rows = {}
    workload = generate(spec.workload, base_dir=ROOT / "specs", requests=requests, rate=rate)
    cost = CostModel.from_dict(policy.cost_parameters)
    prefill_s = isolated_prefill(cost)
    for on in (True, False):
        served = caching(spec, on)
        with Engine(served, policy) as engine:
            started = time.monotonic()
            done = replay(engine, workload)
            wall_s = time.monotonic() - started
            engine.check_kv()
            cache = engine.stats()["prefix_cache"]
        measured = summarize(done.result, served.slo, prefill_s)
        # The simulator drives a fresh scheduler of the same policy at the runtime's KV capacity.
        scheduler = build_scheduler(served, policy, ROOT / "specs", EngineOptions())
        predicted_result = simulate(scheduler, workload, prefix_caching=on)
        predicted = summarize(predicted_result, served.slo, prefill_s)
        hit_share = cache["hit_tokens"] / cache["queried_tokens"] if on and cache["queried_tokens"] else 0.0
        rows["on" if on else "off"] = {
            "measured": {"ttft_p50_s": measured.ttft.p50, "ttft_p90_s": measured.ttft.p90, "attainment": measured.attainment,
                         "hit_share": hit_share, "failed": len(done.failed), "wall_s": wall_s},
            "simulated": {"ttft_p50_s": predicted.ttft.p50, "ttft_p90_s": predicted.ttft.p90, "attainment": predicted.attainment,
                          "hit_share": predicted_result.prefix_hit_rate},
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "tiny-cpu-prefix.toml"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=3.0, help="replay arrival rate (requests/s); 0: the spec's")
    parser.add_argument("--search-seconds", type=float, default=5.0)
    parser.add_argument("--no-calibrate", action="store_true", help="compile with the spec's analytic cost model")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "prefix_caching_runtime.json"))
    args = parser.parse_args()
    spec = load_spec(args.spec)
    cost = None
    if not args.no_calibrate:
        print("profiling the workers (espc profile --quick) ...")
        cost = profile(spec, grid=Grid.quick(spec)).cost
    options = CompileOptions(search_seconds=args.search_seconds)
    policy = compile_spec(spec, spec_hash(spec), Path(args.spec).parent, options, cost=cost).policy
    print(f"compiled {args.spec}{'' if cost is None else ' (calibrated)'}: {policy.strategy} ({policy.configuration})")
    repeated = repeated_prompt(spec, policy, args.repeats, args.prompt_tokens)
    print(f"\nrepeated {args.prompt_tokens}-token prompt, median of {args.repeats} (TTFT on the engine's clock):")
    print(f"{'prefix caching':<16}{'cold TTFT':>12}{'repeat TTFT':>14}{'repeat/cold':>13}{'cached tokens':>15}")
    for name, row in repeated.items():
        print(f"{name:<16}{row['cold_ttft_s'] * 1e3:>10.1f}ms{row['repeat_ttft_s'] * 1e3:>12.1f}ms{row['ratio']:>12.2f}×{row['cached_tokens']:>15.0f}")
    replayed = workload_replay(spec, policy, args.requests, args.rate or None)
    rate = f"{args.rate:g} requests/s" if args.rate else "the spec's rate"
    print(f"\n{args.requests} requests of the spec's workload at {rate} replayed in real time, and simulated:")
    print(f"{'prefix caching':<16}{'':<11}{'TTFT p50':>10}{'TTFT p90':>10}{'attainment':>12}{'hit share':>11}")
    for name, row in replayed.items():
        for source in ("measured", "simulated"):
            cells = row[source]
            print(f"{name:<16}{source:<11}{cells['ttft_p50_s'] * 1e3:>8.1f}ms{cells['ttft_p90_s'] * 1e3:>8.1f}ms"
                  f"{cells['attainment']:>12.1%}{cells['hit_share']:>11.1%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "spec": args.spec, "policy": f"{policy.strategy} ({policy.configuration})", "calibrated": cost is not None,
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "requests": args.requests, "rate": args.rate, "repeated_prompt": repeated, "workload_replay": replayed,
    }, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
