"""The first request after start against a warm one, graph warm-up on and off.

    python benchmarks/first_request.py [--prompt-tokens 1000] [--new-tokens 16] [--warm 4]
        [--repeats 3] [--json benchmarks/results/first_request.json]

On specs/tiny-cpu.toml's four CPU workers, per batch shape — static-sp "groups=1+1+1+1"
(prefill and decode on one instance) and "groups=2+2" (a DoP-2 ring prefill and a decode
over two instances) — and with `warm_up` on (the default: every batch shape's graphs built
at start-up, the first call of each op and the first message between two ranks paid then:
the worker's `_warm_up`) and off: start an `espc.Engine` and send requests of
--prompt-tokens random ids and --new-tokens greedy tokens one after another. The router
sends consecutive requests to the groups in turn, so the first request of each group is a
first request; after one per group come --warm per group, warm ones. TTFT and TPOT are the
engine's own records; the table shows the slowest first request, the median warm one, and
their ratio (target ≤ 2× for TTFT with warm-up on); each row is the median over --repeats
engine starts (ratios taken per start). Prefix caching is off so
that the later requests compute what the first did. Timing depends on the machine's load:
nothing here decides a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from espc import Engine, SamplingParams, load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "tiny-cpu.toml"
SHAPES = {"dop 1": "tp=1, groups=1+1+1+1", "dop 2": "tp=1, groups=2+2"}


def serve(configuration: str, warm_up: bool, prompt_tokens: int, new_tokens: int, warm: int) -> dict:
    groups = len(configuration.split("groups=")[1].split("+"))
    spec = load_spec(SPEC)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"prefix_caching": False})})
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    with Engine(spec, base_dir=SPEC.parent, strategy="static-sp", configuration=configuration, warm_up=warm_up) as engine:
        for _ in range(groups * (warm + 1)):
            engine.generate([rng.integers(0, spec.model.vocab, prompt_tokens).tolist()], params)
        records = engine.result().records
        served = {instance for record in engine._driver.timeline for instance in record.instances}
    assert len(served) == groups * int(configuration.split("groups=")[1].split("+")[0]), "a group served nothing"
    ttft = [r.first_token_s - r.arrival_s for r in records]
    tpot = [(r.finish_s - r.first_token_s) / max(r.output_len - 1, 1) for r in records]
    first_ttft, first_tpot = max(ttft[:groups]), max(tpot[:groups])
    warm_ttft, warm_tpot = statistics.median(ttft[groups:]), statistics.median(tpot[groups:])
    return {
        "groups": groups, "first_ttft_s": first_ttft, "warm_ttft_s": warm_ttft, "first_tpot_s": first_tpot,
        "warm_tpot_s": warm_tpot, "ttft_ratio": first_ttft / warm_ttft, "tpot_ratio": first_tpot / warm_tpot,
        "samples": {"ttft": ttft, "tpot": tpot},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "first_request.json")
    arguments = parser.parse_args()
    load = os.getloadavg()
    rows = []
    for shape, configuration in SHAPES.items():
        for warm_up in (True, False):
            starts = [
                serve(configuration, warm_up, arguments.prompt_tokens, arguments.new_tokens, arguments.warm)
                for _ in range(arguments.repeats)
            ]
            row = {key: statistics.median(start[key] for start in starts) for key in starts[0] if key.endswith(("_s", "ratio"))}
            rows.append({"shape": shape, "configuration": configuration, "warm_up": warm_up, **row, "starts": starts})
    print(f"first request after start vs warm ones ({arguments.prompt_tokens}-token prompt, {arguments.new_tokens} "
          f"tokens; the slowest first request of a group, the median of {arguments.warm} warm per group; median "
          f"of {arguments.repeats} engine starts; load average {load[0]:.1f})")
    print(f"{'shape':<7}{'warm-up':>8}{'first TTFT':>12}{'warm TTFT':>11}{'ratio':>9}{'first TPOT':>12}{'warm TPOT':>11}{'ratio':>9}")
    for row in rows:
        print(
            f"{row['shape']:<7}{'on' if row['warm_up'] else 'off':>8}{row['first_ttft_s'] * 1e3:>10.1f}ms"
            f"{row['warm_ttft_s'] * 1e3:>9.1f}ms{row['ttft_ratio']:>8.2f}×{row['first_tpot_s'] * 1e3:>10.2f}ms"
            f"{row['warm_tpot_s'] * 1e3:>9.2f}ms{row['tpot_ratio']:>8.2f}×"
        )
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps({
        "benchmark": "first_request", "spec": str(SPEC.relative_to(ROOT)), "target_ttft_ratio": 2.0,
        "prompt_tokens": arguments.prompt_tokens, "new_tokens": arguments.new_tokens, "warm": arguments.warm,
        "repeats": arguments.repeats,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average_before": load},
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
