"""A small CPU spec for the compile tests, kept apart from specs/tiny-cpu.toml (which is
tuned to show what ESP does, and changes with it): the tiny random-weight model on CPU
workers slowed to 1 GFLOP/s, so that goodput trials stay at a few dozen requests."""

from __future__ import annotations

SLOW_CPU = 'device = { name = "cpu", peak_flops = "1GFLOP/s", memory_bandwidth = "200MB/s" }'


def small_spec_text(
    heads: int = 4, kv_heads: int = 2, devices: int = 4, tp: int | None = 1, strategy: str = "auto",
) -> str:
    """The spec as TOML: `heads` query heads of 16 dimensions sharing `kv_heads`, `devices`
    CPU workers on one node, `tp` pinned (None: compile chooses) and `strategy`."""
    pinned = "" if tp is None else f"tp = {tp}                     # pinned"
    return f"""
[model]
preset = "tiny"
heads = {heads}
kv_heads = {kv_heads}
hidden = {16 * heads}
weights = "random:0"
max_context = 4096

[cluster]
{pinned}

[[cluster.nodes]]
{SLOW_CPU}
devices = {devices}

[slo]
ttft = "max(25x prefill, 2s) at p90"
tpot = "200ms at p90"
attainment = "90%"

[workload]
lengths = "zipf(1.2, 8, 2K)"
outputs = "uniform(1, 32)"
arrival = "poisson(2.0)"
requests = 64
seed = 0

[policy]
strategy = "{strategy}"
length_buckets = 3

[runtime]
backend = "gloo"
attention = "torch"
kv_block_size = 16
memory_fraction = 0.5
"""
