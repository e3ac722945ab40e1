"""Calibration of the analytical cost model against LoongServe's published latencies.

    python benchmarks/calibration.py [--json calibration.json]

Prints, for LWM-Text-1M on 8 × A800-80G (specs/lwm7b-a800x8.toml) with the default
parameters: each anchor's measured and predicted seconds and the error, the 100K / 1K
prefill ratio per split of the GPUs, and the parameters; `--json` also writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from espc import load_spec
from espc.planner.sim.costmodel import CostModel, anchor_table, format_anchor_table

SPEC = Path(__file__).resolve().parent.parent / "specs" / "lwm7b-a800x8.toml"
RATIO_CONFIGS = ((1, 1), (1, 8), (2, 4), (4, 2), (8, 1))


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
            "cost_model": cost.to_dict(),
        }
        arguments.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
