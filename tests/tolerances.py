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
