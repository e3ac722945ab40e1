"""The one table of numeric tolerances for comparisons against float64 references.

Keyed by the *input* dtype of the computation under test; values are kwargs for
`torch.testing.assert_close`. Distributed tests scale atol with world size on top of this.
"""

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}

PLANNER_TOLERANCES: dict[str, dict[str, float]] = {
    # Prefill segment times from prefix sums vs prefill_time over the same batch (float64
    # rounding of sums of up to a few hundred terms); kwargs for pytest.approx.
    "segment_times": {"rel": 1e-9, "abs": 0.0},
    # The MILP's rate vs the brute-force optimum of the same fluid model: HiGHS stops at a
    # relative MIP gap of 1e-4 and its feasibility tolerance is 1e-7.
    "milp_rate": {"rel": 1e-3, "abs": 1e-9},
}
