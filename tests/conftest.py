"""Test-wide settings and fixtures. Triton kernels run on the CPU only through the
interpreter, and the flag must be set before any `@triton.jit` function is defined."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402  (after the flag: see the module docstring)

import pytest  # noqa: E402

TINY_SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"


@pytest.fixture(scope="module")
def spec():
    """The tiny CPU default (a module may define its own `spec` instead)."""
    from espc import load_spec

    return load_spec(TINY_SPEC)


@pytest.fixture(scope="module")
def reference(spec):
    """The spec's model in float64: the reference every runtime output is compared with."""
    import torch

    from espc.model.llama import build_model

    return build_model(spec.model, dtype=torch.float64)
