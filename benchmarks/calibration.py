"""Calibration of the analytical cost model against LoongServe's published latencies.

    python benchmarks/calibration.py [--json calibration.json]

Prints, for LWM-Text-1M on 8 × A800-80G (specs/lwm7b-a800x8.toml) with the default
parameters: each anchor's measured and predicted seconds and the error, the 100K / 1K
prefill ratio per split of the GPUs, the KV slots of one TP2 instance beside LoongServe's
210K, and the parameters; `--json` also writes them.

Every anchor is in-sample: the default CostParameters were set by hand to reproduce all of
them (none was held out), so the errors show the fit, not a prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from espc import load_spec
from espc.planner.sim.costmodel import CostModel, anchor_table, format_anchor_table

SPEC = Path(__file__).resolve().parent.parent / "specs" / "lwm7b-a800x8.toml"
RATIO_CONFIGS = ((1, 1), (1, 8), (2, 4), (4, 2), (8, 1))
LOONGSERVE_TP2_SLOTS = 210_000  # KV slots per TP=2 instance (shared/anchors/README.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    arguments = parser.parse_args()

    cost = CostModel.from_spec(load_spec(SPEC))
    results = anchor_table(cost)
    ratios = {
        f"SP{sp}·TP{tp}": cost.prefill_time([100_000], sp, tp) / cost.prefill_time([1000], sp, tp)
        for sp, tp in RATIO_CONFIGS
    }
    print(format_anchor_table(results))
    print("(every anchor in-sample: the defaults were fitted to all of them)")
    print()
    slots = cost.kv_capacity_tokens(2)
    # The memory fraction at which one TP2 instance holds LoongServe's 210K slots: what its
    # runtime keeps back beyond the weights (activations, ring and all-reduce buffers).
    loongserve_fraction = (LOONGSERVE_TP2_SLOTS * cost.instance_kv_bytes_per_token(2) + cost.model.weight_bytes) / (
        2 * cost.device.memory
    )
    print(
        f"KV slots per TP2 instance: ours {slots:,} at memory_fraction {cost.memory_fraction:g}, LoongServe "
        f"{LOONGSERVE_TP2_SLOTS:,} — the same at memory_fraction {loongserve_fraction:.3f} (LoongServe keeps "
        f"{(cost.memory_fraction - loongserve_fraction) * 2 * cost.device.memory / 2**30:.1f} GiB more per instance "
        "for activations and communication buffers, which the cost model does not price)"
    )
    print()
    print("100K / 1K prefill (published: 105.97×): " + ", ".join(f"{name} {ratio:.1f}×" for name, ratio in ratios.items()))
    print()
    print(cost)
    if arguments.json:
        report = {
            "anchors": [
                {
                    "config": f"SP{r.anchor.sp}·TP{r.anchor.tp}", "case": r.anchor.case, "phase": r.anchor.phase,
                    "measured_s": r.anchor.measured_s, "predicted_s": r.predicted_s, "relative_error": r.relative_error,
                }
                for r in results
            ],
            "prefill_ratio_100k_to_1k": ratios,
            "kv_slots_tp2": {"ours": slots, "loongserve": LOONGSERVE_TP2_SLOTS, "matching_memory_fraction": loongserve_fraction},
            "cost_model": cost.to_dict(),
        }
        arguments.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
