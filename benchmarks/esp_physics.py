"""Where elastic SP can pay, from the cost model alone: the slack a spec's SLOs leave a prompt
prefilled on the fewest instances, and a context decoded by one instance.

    python benchmarks/esp_physics.py [--spec specs/lwm7b-a800x8.toml] [--ttft "max(5x prefill, 5s) at p90"]
        [--tpot "30ms at p90"] [--lengths 8K,32K,100K,200K,400K] [--json benchmarks/results/esp_physics.json]

ESP's choices beyond "spread a prompt only when its KV does not fit" (what elastic-rigid
keeps) are a higher prefill DoP, decode scale-up and migration. A higher DoP pays only where
a prompt's prefill at the DoP its KV needs leaves too little of its TTFT bound for queueing;
scale-up pays only where one instance cannot decode the KV it holds within the TPOT bound.
Per tp this prints both margins: the TTFT target over the prefill time at every DoP (≥ 1:
it meets the bound when it starts at once; the queueing it may absorb is the excess), and
one step of an instance decoding all the KV it can hold (any batch: the KV read dominates)
against the TPOT bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baselines import SPEC
from policy_quality import with_slo

from espc import load_spec
from espc.frontend.units import Kind, parse_quantity
from espc.planner.sim.costmodel import CostModel, DecodeLoad
from espc.planner.sim.metrics import isolated_prefill


def physics(spec_path: Path, slo: dict[str, str], lengths: list[int]) -> dict:
    """The TTFT margin per (tp, prompt length, dop) and the TPOT margin of a full instance per tp."""
    spec = with_slo(load_spec(spec_path), slo)
    cost = CostModel.from_spec(spec)
    isolated = isolated_prefill(cost)
    tpot_s = spec.slo.tpot.target()
    rows = []
    for tp in cost.tp_choices():
        capacity = cost.kv_capacity_tokens(tp)
        if capacity <= 0:
            continue
        full_step_s = cost.decode_step_time([DecodeLoad(1, capacity, 0, 0)], tp)
        prefills = []
        for length in lengths:
            target_s = spec.slo.ttft.target(isolated(length))
            needed = -(-length // capacity)  # the fewest instances whose KV holds the prompt
            times = cost.alone_prefill_times(length, tp)
            prefills.append({
                "prompt_tokens": length, "ttft_target_s": target_s, "fewest_instances": needed,
                "prefill_s": [float(t) for t in times],
            })
        rows.append({
            "tp": tp, "instances": len(cost.cluster.instances(tp)), "kv_capacity_tokens": capacity,
            "full_instance_decode_step_s": full_step_s, "tpot_target_s": tpot_s, "prefills": prefills,
        })
    return {"spec": str(spec_path), "slo": f"ttft {spec.slo.ttft.shorthand()}, tpot {spec.slo.tpot.shorthand()}", "rows": rows}


def render(result: dict) -> str:
    lines = [f"{Path(result['spec']).name}: {result['slo']}"]
    for row in result["rows"]:
        decode_margin = row["tpot_target_s"] / row["full_instance_decode_step_s"]
        lines.append(
            f"\ntp {row['tp']} ({row['instances']} instance{'s' if row['instances'] != 1 else ''}, {row['kv_capacity_tokens']:,} KV tokens each): "
            f"one step of a full instance {row['full_instance_decode_step_s'] * 1e3:.1f} ms against "
            f"{row['tpot_target_s'] * 1e3:g} ms TPOT: margin {decode_margin:.2f}× "
            + ("(a full instance misses it: decode scale-up can pay)" if decode_margin < 1
               else "(memory binds before TPOT: scale-up pays only where prefills stall decodes)")
        )
        lines.append(f"  {'prompt':>9s} {'target':>9s}  TTFT target / prefill time at dop 1 … {row['instances']} "
                     "(* the fewest instances its KV needs)")
        for prefill in row["prefills"]:
            fewest = prefill["fewest_instances"]
            margins = [
                f"{prefill['ttft_target_s'] / seconds:6.1f}{'*' if dop == fewest else ' '}"
                for dop, seconds in enumerate(prefill["prefill_s"], 1) if dop >= fewest
            ]
            skipped = ["     - "] * min(fewest - 1, len(prefill["prefill_s"]))
            lines.append(f"  {prefill['prompt_tokens']:>9,} {prefill['ttft_target_s']:8.1f}s  " + " ".join(skipped + margins))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--ttft", help="replace the spec's TTFT bound")
    parser.add_argument("--tpot", help="replace the spec's TPOT bound")
    parser.add_argument("--lengths", default="8K,32K,100K,200K,400K")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    slo = {name: bound for name, bound in (("ttft", arguments.ttft), ("tpot", arguments.tpot)) if bound}
    result = physics(arguments.spec, slo, [int(parse_quantity(text, Kind.TOKENS)) for text in arguments.lengths.split(",")])
    print(render(result))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
