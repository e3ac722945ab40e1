"""Malformed specs and the diagnostics `espc check` gives for them.

Every problem in a spec file must come out as `FILE:LINE:COL: field.path: message`
(optionally followed by a `    hint: ...` line) on stderr, with exit status 2 and no
traceback. Each case below takes a valid base spec (TOML or its DSL twin), changes one
thing, and states where the error must point: the key of the offending field, the
table/section header for a missing field, or the offending token for a syntax error.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from espc.cli.main import app
from espc.frontend.errors import Diagnostic, SpecError

# Line numbers of the TOML base, for reading the cases below:
#   1 [model]         5 [cluster]      8 [[cluster.nodes]]   12 [slo]
#   2 preset          6 tp            9 device               13 ttft
#   3 max_context                     10 devices             14 tpot
#  16 [workload]     21 [policy]      25 [runtime]
#  17 lengths        22 strategy      26 backend
#  18 arrival        23 max_dop       27 attention
#  19 requests
TOML_BASE = """\
[model]
preset = "tiny"
max_context = 4096

[cluster]
tp = 1

[[cluster.nodes]]
device = "cpu"
devices = 4

[slo]
ttft = "max(25x prefill, 2s) at p90"
tpot = "200ms at p90"

[workload]
lengths = "zipf(1.2, 8, 2K)"
arrival = "poisson(2.0)"
requests = 64

[policy]
strategy = "elastic"
max_dop = 4

[runtime]
backend = "gloo"
attention = "torch"
"""

# The DSL twin; statements inside blocks start at column 5.
#   1 model tiny {     4 cluster {      8 slo {       12 workload {     17 policy elastic {
#   2 max_context      5 tp 1           9 ttft        13 lengths        18 max_dop 4
#                      6 cpu x 4       10 tpot        14 arrival        20 runtime {
#                                                     15 requests       21 backend, 22 attention
DSL_BASE = """\
model tiny {
    max_context 4096
}
cluster {
    tp 1
    cpu x 4
}
slo {
    ttft <= max(25x prefill, 2s) at p90
    tpot <= 200ms at p90
}
workload {
    lengths zipf(1.2, 8, 2K)
    arrival poisson(2.0)
    requests 64
}
policy elastic {
    max_dop 4
}
runtime {
    backend gloo
    attention torch
}
"""


def _edit(base: str, edits: tuple[tuple[str, str], ...]) -> str:
    text = base
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} must occur exactly once in the base spec"
        text = text.replace(old, new)
    return text


def toml(*edits: tuple[str, str]) -> tuple[str, str]:
    return ".toml", _edit(TOML_BASE, edits)


def dsl(*edits: tuple[str, str]) -> tuple[str, str]:
    return ".esp", _edit(DSL_BASE, edits)


@dataclass(frozen=True)
class Case:
    id: str
    source: tuple[str, str]  # (suffix, text)
    line: int
    column: int
    path: str
    message: str
    hint: str | None = None
    absent: tuple[str, ...] = ()  # must appear nowhere in the output


TWO_CPU_NODES_TOML = ("devices = 4", 'devices = 4\n\n[[cluster.nodes]]\ndevice = "cpu"\ndevices = 4')
WITH_NETWORK_TOML = ("tp = 1", 'tp = 1\ninter_node_bandwidth = "100GB/s"')  # adds line 7
WITH_NETWORK_DSL = ("tp 1", "tp 1; inter_node_bandwidth 100GB/s")

CASES = [
    # ------------------------------------------------------------------ TOML syntax
    Case("toml-syntax-unclosed-table-header", toml(("[slo]", "[slo")), 12, 5, "syntax", "expected ']'"),
    Case("toml-syntax-missing-equals", toml(("requests = 64", "requests 64")), 19, 10, "syntax", "expected '='"),
    Case("toml-syntax-bad-escape-in-string", toml(('backend = "gloo"', r'backend = "gl\qoo"')), 26, 16, "syntax", "unescaped '\\' in a string"),
    Case(
        "toml-syntax-unterminated-string", toml(('backend = "gloo"', 'backend = "gloo')), 26, 16, "syntax", "string",
    ),
    Case(
        "toml-syntax-duplicate-key", toml(("requests = 64", 'arrival = "poisson(1.0)"')), 19, 1, "syntax", "arrival",
    ),
    Case(
        "toml-syntax-duplicate-table", toml(("[policy]", "[slo]")), 21, 1, "syntax", "[slo]", absent=("('slo',)",),
    ),
    # ------------------------------------------------------------------ DSL syntax
    Case("dsl-syntax-missing-closing-brace", dsl(("    attention torch\n}", "    attention torch\n")), 22, 20, "syntax", "ends too early", hint="expected '}'"),
    Case("dsl-syntax-unexpected-character", dsl(("requests 64", "requests @64")), 15, 14, "syntax", "unexpected character '@'"),
    Case(
        "dsl-syntax-hint-names-internal-terminal", dsl(("requests 64", "requests @64")), 15, 14, "syntax", "unexpected character '@'",
        hint="expected", absent=("__anon",),
    ),
    Case("dsl-syntax-call-not-closed", dsl(("arrival poisson(2.0)", "arrival poisson(2.0")), 14, 24, "syntax", "unexpected", hint="expected ')'"),
    Case("dsl-syntax-bound-missing-value", dsl(("tpot <= 200ms at p90", "tpot <= at p90")), 10, 13, "syntax", "unexpected 'at'", hint="a number"),
    Case(
        "dsl-syntax-bad-string-escape", dsl(("requests 64", r'requests "6\q4"')), 15, 16, "syntax", "invalid \\escape",
    ),
    # ------------------------------------------------------------------ unknown keys
    Case("toml-unknown-section", toml(("[policy]", "[polcy]")), 21, 1, "polcy", "unknown field 'polcy'", hint="did you mean 'policy'?"),
    Case("toml-unknown-model-field", toml(("max_context = 4096", "max_contex = 4096")), 3, 1, "model.max_contex", "unknown field 'max_contex'", hint="did you mean 'max_context'?"),
    Case("toml-unknown-cluster-field", toml(("tp = 1", "tpp = 1")), 6, 1, "cluster.tpp", "unknown field 'tpp'", hint="did you mean 'tp'?"),
    Case("toml-unknown-node-field", toml(("devices = 4", 'devices = 4\nnmae = "n0"')), 11, 1, "cluster.nodes[0].nmae", "unknown field 'nmae'", hint="did you mean 'name'?"),
    Case(
        "toml-unknown-device-field", toml(('device = "cpu"', 'device = { name = "cpu", memroy = "1GiB" }')), 9, 26,
        "cluster.nodes[0].device.memroy", "unknown field 'memroy'", hint="did you mean 'memory'?",
    ),
    Case("toml-unknown-slo-field", toml(('tpot = "200ms at p90"', 'tpot = "200ms at p90"\nttfb = 1')), 15, 1, "slo.ttfb", "unknown field 'ttfb'", hint="did you mean 'ttft'?"),
    Case("toml-unknown-workload-field", toml(("requests = 64", "request = 64")), 19, 1, "workload.request", "unknown field 'request'", hint="did you mean 'requests'?"),
    Case("toml-unknown-policy-field", toml(("max_dop = 4", "max_dops = 4")), 23, 1, "policy.max_dops", "unknown field 'max_dops'", hint="did you mean 'max_dop'?"),
    Case("toml-unknown-runtime-field", toml(('attention = "torch"', 'atention = "torch"')), 27, 1, "runtime.atention", "unknown field 'atention'", hint="did you mean 'attention'?"),
    Case("dsl-unknown-section", dsl(("runtime {", "runtim {")), 20, 1, "runtim", "unknown field 'runtim'", hint="did you mean 'runtime'?"),
    Case(
        "dsl-unknown-section-with-argument", dsl(("policy elastic {", "polcy elastic {")), 17, 1, "polcy", "unknown field 'polcy'",
        hint="did you mean 'policy'?",
    ),
    Case("dsl-unknown-model-field", dsl(("max_context 4096", "max_contex 4096")), 2, 5, "model.max_contex", "unknown field 'max_contex'", hint="did you mean 'max_context'?"),
    Case("dsl-unknown-device-field", dsl(("cpu x 4", "cpu x 4 { memroy 1GiB }")), 6, 15, "cluster.nodes[0].device.memroy", "unknown field 'memroy'", hint="did you mean 'memory'?"),
    Case("dsl-unknown-workload-field", dsl(("requests 64", "request 64")), 15, 5, "workload.request", "unknown field 'request'", hint="did you mean 'requests'?"),
    Case("dsl-unknown-policy-field", dsl(("max_dop 4", "max_dops 4")), 18, 5, "policy.max_dops", "unknown field 'max_dops'", hint="did you mean 'max_dop'?"),
    Case("dsl-unknown-runtime-field", dsl(("attention torch", "atention torch")), 22, 5, "runtime.atention", "unknown field 'atention'", hint="did you mean 'attention'?"),
    # ------------------------------------------------------------------ wrong types
    Case("toml-string-for-int", toml(("requests = 64", 'requests = "sixty-four"')), 19, 1, "workload.requests", "valid integer"),
    Case(
        "toml-bool-for-int", toml(("requests = 64", "requests = true")), 19, 1, "workload.requests", "integer",
    ),
    Case("toml-bool-for-token-count", toml(("max_context = 4096", "max_context = true")), 3, 1, "model.max_context", "expected a token count, got a boolean"),
    Case("toml-table-for-value", toml(("requests = 64", "requests = { n = 64 }")), 19, 1, "workload.requests", "valid integer, got {'n': 64}"),
    Case(
        "toml-float-for-int", toml(("max_dop = 4", "max_dop = 2.5")), 23, 1, "policy.max_dop", "valid integer, got 2.5",
        absent=("got a number",),
    ),
    Case("dsl-name-for-int", dsl(("max_dop 4", "max_dop true")), 18, 5, "policy.max_dop", "valid integer"),
    Case("dsl-block-for-value", dsl(("requests 64", "requests { n 64 }")), 15, 5, "workload.requests", "valid integer, got {'n': 64}"),
    Case(
        "dsl-section-without-block", dsl(("policy elastic {\n    max_dop 4\n}", "policy elastic\n\n")), 17, 1, "policy", "block",
        absent=("instance of",),
    ),
    Case(
        "toml-unknown-rope-scaling-type", toml(("max_context = 4096", 'rope_scaling = { type = "yarn", factor = 2.0 }')), 3, 1,
        "model.rope_scaling", "'yarn'", absent=("found using",),
    ),
    # ------------------------------------------------------------------ units
    Case(
        "toml-size-unit-case", toml(('device = "cpu"', 'device = { name = "cpu", memory = "80GIB" }')), 9, 26,
        "cluster.nodes[0].device.memory", "unknown size unit 'GIB'", hint="did you mean 'GiB'?",
    ),
    Case("dsl-size-unit-case", dsl(("cpu x 4", "cpu x 4 { memory 80GIB }")), 6, 15, "cluster.nodes[0].device.memory", "unknown size unit 'GIB'", hint="did you mean 'GiB'?"),
    Case("toml-unknown-bandwidth-unit", toml(("tp = 1", 'tp = 1\ninter_node_bandwidth = "100 furlongs"')), 7, 1, "cluster.inter_node_bandwidth", "unknown bandwidth unit 'furlongs'", hint="bandwidth units: TB/s"),
    Case("dsl-unknown-bandwidth-unit", dsl(("tp 1", "tp 1; inter_node_bandwidth 100Gbit/s")), 5, 11, "cluster.inter_node_bandwidth", "unknown bandwidth unit 'Gbit/s'", hint="did you mean 'Gb/s'?"),
    Case("toml-negative-duration", toml(("max_dop = 4", 'starvation_bound = "-5s"')), 23, 1, "policy.starvation_bound", "duration must not be negative"),
    Case("dsl-negative-duration", dsl(("max_dop 4", "starvation_bound -5s")), 18, 5, "policy.starvation_bound", "duration must not be negative"),
    Case("toml-fractional-token-count", toml(("max_context = 4096", 'max_context = "4.0005K"')), 3, 1, "model.max_context", "'4.0005K' is not a whole number of tokens"),
    Case("toml-one-and-a-half-tokens", toml(("max_context = 4096", "max_context = 1.5")), 3, 1, "model.max_context", "1.5 is not a whole number of tokens"),
    Case("dsl-one-and-a-half-tokens", dsl(("max_context 4096", "max_context 1.5")), 2, 5, "model.max_context", "1.5 is not a whole number of tokens"),
    Case(
        "toml-token-unit-hint", toml(('lengths = "zipf(1.2, 8, 2K)"', 'lengths = "zipf(1.2, 8, 2KB)"')), 17, 1,
        "workload.lengths.max", "unknown token count unit 'KB'", hint="did you mean 'K'?", absent=("K, )",),
    ),
    # ------------------------------------------------------------------ shorthands
    Case("toml-unknown-distribution", toml(('lengths = "zipf(1.2, 8, 2K)"', 'lengths = "zipff(1.2, 8, 2K)"')), 17, 1, "workload.lengths", "unknown length distribution 'zipff'"),
    Case(
        "toml-unknown-arrival", toml(('arrival = "poisson(2.0)"', 'arrival = "poison(2.0)"')), 18, 1, "workload.arrival",
        "unknown arrival process 'poison'", hint="did you mean 'poisson'?",
    ),
    Case("dsl-unknown-arrival", dsl(("arrival poisson(2.0)", "arrival poison(2.0)")), 14, 5, "workload.arrival", "unknown arrival process 'poison'"),
    Case("toml-distribution-arity", toml(('lengths = "zipf(1.2, 8, 2K)"', 'lengths = "zipf(1.2, 8, 2K, 4)"')), 17, 1, "workload.lengths", "zipf(alpha, min, max) takes 3 arguments, got 4"),
    Case("toml-unknown-keyword-argument", toml(('arrival = "poisson(2.0)"', 'arrival = "poisson(rat=2.0)"')), 18, 1, "workload.arrival", "poisson(rate) has no argument 'rat'"),
    Case("dsl-unknown-keyword-argument", dsl(("arrival poisson(2.0)", "arrival gamma(rate=2.0, cv=1.0, burst=3)")), 14, 5, "workload.arrival", "gamma(rate, cv) has no argument 'burst'"),
    Case("toml-zipf-min-equals-max", toml(('lengths = "zipf(1.2, 8, 2K)"', 'lengths = "zipf(1.2, 2K, 2K)"')), 17, 1, "workload.lengths.max", "max(2000) must exceed min(2000)"),
    Case("dsl-zipf-min-above-max", dsl(("lengths zipf(1.2, 8, 2K)", "lengths zipf(1.2, 4K, 2K)")), 13, 5, "workload.lengths.max", "max(2000) must exceed min(4000)"),
    Case("toml-bad-percentile", toml(('tpot = "200ms at p90"', 'tpot = "200ms at q90"')), 14, 1, "slo.tpot", "write the percentile as p<number>"),
    Case("dsl-bad-percentile", dsl(("tpot <= 200ms at p90", "tpot <= 200ms at q90")), 10, 5, "slo.tpot", "not 'q90'"),
    Case("toml-tpot-scaled-by-prefill", toml(('tpot = "200ms at p90"', 'tpot = "25x prefill at p90"')), 14, 1, "slo.tpot", "only ttft can scale with the prefill time"),
    Case("dsl-tpot-scaled-by-prefill", dsl(("tpot <= 200ms at p90", "tpot <= 25x prefill at p90")), 10, 5, "slo.tpot", "only ttft can scale with the prefill time"),
    # ------------------------------------------------------------------ presets
    Case("toml-unknown-model-preset", toml(('preset = "tiny"', 'preset = "llama3-8"')), 2, 1, "model.preset", "unknown model preset 'llama3-8'", hint="did you mean 'llama3-8b'?"),
    Case("dsl-unknown-model-preset", dsl(("model tiny {", "model tinyy {")), 1, 7, "model.preset", "unknown model preset 'tinyy'", hint="did you mean 'tiny'?"),
    Case(
        "toml-unknown-device-without-fields", toml(('device = "cpu"', 'device = "B200"')), 9, 1, "cluster.nodes[0].device.name",
        "unknown device 'B200' and no kind, memory", hint="did you mean 'H200'?",
    ),
    Case("dsl-unknown-device-without-fields", dsl(("cpu x 4", "gpu B200 x 4")), 6, 9, "cluster.nodes[0].device.name", "unknown device 'B200' and no memory", hint="did you mean 'H200'?"),
    Case(
        "toml-cuda-kind-for-cpu-preset", toml(('device = "cpu"', 'device = { name = "cpu", kind = "cuda" }')), 9, 26,
        "cluster.nodes[0].device.kind", "device 'cpu' is a cpu device, not cuda", hint="write `cpu x N`",
    ),
    Case(
        "dsl-gpu-keyword-for-cpu-preset", dsl(("cpu x 4", "gpu cpu x 4")), 6, 5, "cluster.nodes[0].device.kind",
        "device 'cpu' is a cpu device, not cuda", hint="write `cpu x N`",
    ),
    # ------------------------------------------------------------------ topology
    Case("toml-tp-does-not-divide-node", toml(("tp = 1", "tp = 3")), 6, 1, "cluster.tp", "tp(3) does not divide the 4 devices of nodes[0] (node0)", hint="tp can be 1, 2, 4"),
    Case("dsl-tp-does-not-divide-node", dsl(("tp 1", "tp 3")), 5, 5, "cluster.tp", "tp(3) does not divide the 4 devices of nodes[0]", hint="tp can be 1, 2, 4"),
    Case("toml-tp-does-not-divide-heads", toml(("tp = 1", "tp = 8"), ("devices = 4", "devices = 8")), 6, 1, "cluster.tp", "tp(8) does not divide model.heads(4)"),
    Case("toml-kv-heads-do-not-divide-heads", toml(("max_context = 4096", "kv_heads = 3")), 3, 1, "model.kv_heads", "heads(4) is not a multiple of kv_heads(3)", hint="grouped-query attention"),
    Case("dsl-kv-heads-do-not-divide-heads", dsl(("max_context 4096", "kv_heads 3")), 2, 5, "model.kv_heads", "heads(4) is not a multiple of kv_heads(3)"),
    Case(
        "toml-mixed-device-kinds", toml(WITH_NETWORK_TOML, ("devices = 4", 'devices = 4\n\n[[cluster.nodes]]\ndevice = "A100"\ndevices = 4')), 14, 1,
        "cluster.nodes[1].device.kind", "node1 has cuda devices but node0 has cpu",
    ),
    Case("dsl-mixed-device-kinds", dsl(WITH_NETWORK_DSL, ("cpu x 4", "gpu A100 x 4; cpu x 4")), 6, 19, "cluster.nodes[1].device.kind", "node1 has cpu devices but node0 has cuda"),
    Case(
        "toml-duplicate-node-names", toml(WITH_NETWORK_TOML, ("devices = 4", 'devices = 4\nname = "n"\n\n[[cluster.nodes]]\nname = "n"\ndevice = "cpu"\ndevices = 4')),
        15, 1, "cluster.nodes[1].name", "node name 'n' is also used by nodes[0]",
    ),
    Case("dsl-duplicate-node-names", dsl(WITH_NETWORK_DSL, ("cpu x 4", "cpu x 4 as n; cpu x 4 as n")), 6, 30, "cluster.nodes[1].name", "node name 'n' is also used by nodes[0]"),
    Case("toml-two-nodes-without-network", toml(TWO_CPU_NODES_TOML), 5, 1, "cluster.inter_node_bandwidth", "required with 2 nodes", hint="100GB/s"),
    Case("dsl-two-nodes-without-network", dsl(("cpu x 4", "cpu x 4\n    cpu x 4")), 4, 1, "cluster.inter_node_bandwidth", "required with 2 nodes"),
    # ------------------------------------------------------------------ memory
    Case(
        "toml-weights-do-not-fit", toml(('device = "cpu"', 'device = { name = "cpu", memory = "256KiB" }')), 6, 1, "cluster.tp",
        "weights 489KiB / tp(1) = 489KiB per device exceed memory_fraction(0.9) × 256KiB = 230KiB", hint="raise tp",
    ),
    Case(
        "dsl-weights-do-not-fit-without-tp",
        dsl(("model tiny {", "model llama2-70b {"), ("    tp 1\n", "\n"), ("cpu x 4", "gpu A100 x 1"), ("backend gloo", "backend nccl")),
        6, 9, "cluster.nodes[0].device.memory", "weights 128GiB / tp(1) = 128GiB per device exceed memory_fraction(0.9) × 80GiB = 72GiB",
    ),
    Case(
        "toml-context-kv-does-not-fit", toml(("max_context = 4096", 'max_context = "16Mi"')), 3, 1, "model.max_context",
        "needs 16,777,216 × 512B = 8GiB of KV cache, but the cluster holds 7.2GiB", hint="lower max_context",
    ),
    Case("dsl-context-kv-does-not-fit", dsl(("max_context 4096", "max_context 16Mi")), 2, 5, "model.max_context", "= 8GiB of KV cache"),
    Case(
        "toml-huge-context", toml(("max_context = 4096", 'max_context = "1e400"')), 3, 1, "model.max_context", "token count '1e400' is out of range",
    ),
    # ------------------------------------------------------------------ runtime
    Case("toml-nccl-on-cpu", toml(('backend = "gloo"', 'backend = "nccl"')), 26, 1, "runtime.backend", "nccl needs cuda devices", hint='use backend = "gloo"'),
    Case("dsl-nccl-on-cpu", dsl(("backend gloo", "backend nccl")), 21, 5, "runtime.backend", "nccl needs cuda devices"),
    Case("toml-triton-on-cpu", toml(('attention = "torch"', 'attention = "triton"')), 27, 1, "runtime.attention", "triton attention needs cuda devices", hint='use attention = "torch"'),
    Case("dsl-triton-on-cpu", dsl(("attention torch", "attention triton")), 22, 5, "runtime.attention", "triton attention needs cuda devices"),
    # ------------------------------------------------------------------ policy
    Case("toml-max-dop-above-instances", toml(("max_dop = 4", "max_dop = 5")), 23, 1, "policy.max_dop", "max_dop(5) > instances(4) = devices(4) / tp(1)"),
    Case("dsl-max-dop-above-instances", dsl(("max_dop 4", "max_dop 5")), 18, 5, "policy.max_dop", "max_dop(5) > instances(4)"),
    Case("toml-sp-size-does-not-divide", toml(("max_dop = 4", "sp_size = 3")), 23, 1, "policy.sp_size", "sp_size(3) does not divide instances(4)"),
    Case(
        "toml-pools-do-not-add-up", toml(("max_dop = 4", "prefill_instances = 1\ndecode_instances = 2")), 24, 1, "policy.decode_instances",
        "prefill_instances(1) + decode_instances(2) ≠ instances(4)",
    ),
    Case("dsl-pools-do-not-add-up", dsl(("max_dop 4", "prefill_instances 1; decode_instances 2")), 18, 26, "policy.decode_instances", "≠ instances(4)"),
    # ------------------------------------------------------------------ workload
    Case("toml-no-lengths-and-no-trace", toml(('lengths = "zipf(1.2, 8, 2K)"', "")), 16, 1, "workload.lengths", "give prompt lengths"),
    Case("dsl-no-lengths-and-no-trace", dsl(("lengths zipf(1.2, 8, 2K)", "")), 12, 1, "workload.lengths", "give prompt lengths"),
    Case("toml-lengths-and-trace", toml(("requests = 64", 'trace = "reqs.csv"')), 17, 1, "workload.lengths", "a trace carries its own lengths"),
    Case("toml-trace-arrival-without-trace", toml(('arrival = "poisson(2.0)"', 'arrival = "trace(2.0)"')), 18, 1, "workload.arrival", "trace arrivals need a trace", hint="add trace ="),
    Case("dsl-trace-arrival-without-trace", dsl(("arrival poisson(2.0)", "arrival trace")), 14, 5, "workload.arrival", "trace arrivals need a trace"),
    Case(
        "toml-unknown-trace-suffix", toml(('lengths = "zipf(1.2, 8, 2K)"', 'trace = "reqs.parquet"')), 17, 1, "workload.trace.format",
        "cannot tell the trace format from the suffix '.parquet'", hint='set format = "azure"',
    ),
    Case(
        "toml-trace-without-suffix", toml(('lengths = "zipf(1.2, 8, 2K)"', 'trace = { path = "reqs" }')), 17, 1, "workload.trace.format",
        "cannot tell the trace format", absent=("'no suffix'",),
    ),
    Case(
        "toml-zipf-max-above-context", toml(('lengths = "zipf(1.2, 8, 2K)"', 'lengths = "zipf(1.2, 8, 8K)"')), 17, 1, "workload.lengths",
        "reaches 8,000 tokens > model.max_context (4,096)", hint="lower the distribution's max",
    ),
    Case("dsl-zipf-max-above-context", dsl(("lengths zipf(1.2, 8, 2K)", "lengths zipf(1.2, 8, 8K)")), 13, 5, "workload.lengths", "> model.max_context (4,096)"),
    # ------------------------------------------------------------------ prefix structure
    Case(
        "toml-shared-prompt-below-one-block", toml(("requests = 64", "requests = 64\n\n[workload.prefix]\nshared_tokens = 100")), 22, 1,
        "workload.prefix.shared_tokens", "shared_tokens(100) < one 512-token block: nothing of it is shareable", hint="at least 512",
    ),
    Case(
        "toml-turns-without-think-time", toml(("requests = 64", "requests = 64\n\n[workload.prefix]\nturns = 2")), 21, 1,
        "workload.prefix.think_time", "turns(2) need the time between turns", hint="think_time =",
    ),
    Case(
        "toml-prefix-field-misspelt", toml(("requests = 64", "requests = 64\n\n[workload.prefix]\nshared_token = 1536")), 22, 1,
        "workload.prefix.shared_token", "unknown field 'shared_token'", hint="did you mean 'shared_tokens'?",
    ),
    Case(
        "toml-sessions-outgrow-the-context",
        toml(("requests = 64", 'requests = 64\nprefix = { shared_tokens = 2048, turns = 2, think_time = "10s" }')), 20, 1, "workload.prefix",
        "the longest prompt reaches shared_tokens(2,048) + 2 messages × 2,000 + 1 reply × 1,000 = 7,048 tokens > model.max_context (4,096)",
    ),
    Case(
        "toml-prefix-with-trace", toml(('lengths = "zipf(1.2, 8, 2K)"', 'trace = "reqs.jsonl"'), ("requests = 64", "requests = 64\nprefix = { shared_tokens = 1024 }")),
        20, 1, "workload.prefix", "a trace carries its own prefix structure",
    ),
    Case("toml-prefix-caching-not-a-flag", toml(('attention = "torch"', 'attention = "torch"\nprefix_caching = "yes"')), 28, 1, "runtime.prefix_caching", "valid boolean"),
    Case("dsl-groups-without-shared-prompt", dsl(("requests 64", "requests 64\n    prefix { groups 2 }")), 16, 14, "workload.prefix.groups", "groups(2) of system prompts need shared_tokens > 0"),
    Case("dsl-zero-turns", dsl(("requests 64", "requests 64\n    prefix { turns 0 }")), 16, 14, "workload.prefix.turns", "greater than 0"),
    Case(
        "dsl-think-time-without-turns", dsl(("requests 64", "requests 64\n    prefix { shared_tokens 1024; think_time 10s }")), 16, 34,
        "workload.prefix.think_time", "think_time is the time between turns; it needs turns > 1",
    ),
    Case(
        "dsl-sessions-outgrow-the-context", dsl(("requests 64", "requests 64\n    prefix { shared_tokens 3Ki; turns 2; think_time 1s }")), 16, 5,
        "workload.prefix", "= 8,072 tokens > model.max_context (4,096)", hint="fewer turns",
    ),
    Case("dsl-prefix-caching-not-a-flag", dsl(("attention torch", "attention torch; prefix_caching 1")), 22, 22, "runtime.prefix_caching", "valid boolean"),
    # ------------------------------------------------------------------ DSL statements
    Case("dsl-duplicate-field", dsl(("requests 64", "arrival poisson(1.0)")), 15, 5, "workload.arrival", "arrival is given twice (first at line 14, column 5)"),
    Case("dsl-duplicate-section", dsl(("policy elastic {", "slo {"), ("max_dop 4", "attainment 90%")), 17, 1, "slo", "slo is given twice (first at line 8, column 1)"),
    Case(
        "dsl-preset-twice", dsl(("max_context 4096", "preset tiny")), 2, 5, "model.preset", "given twice",
    ),
    Case("dsl-node-without-x", dsl(("cpu x 4", "cpu 4")), 6, 5, "cluster.nodes[0]", "a cpu node needs a device count", hint="`cpu x COUNT`"),
    Case("dsl-gpu-node-without-name", dsl(("cpu x 4", "gpu x 4")), 6, 5, "cluster.nodes[0]", "a gpu node needs a device name", hint="write `gpu DEVICE x COUNT"),
    Case("dsl-node-stray-word", dsl(("cpu x 4", "cpu x 4 named n")), 6, 13, "cluster.nodes[0]", "unexpected 'named'"),
    Case("dsl-value-and-block", dsl(("requests 64", "requests 64 { n 1 }")), 15, 5, "workload.requests", "requests takes a value or a block, not both"),
    Case("dsl-two-values", dsl(("requests 64", "requests 64 128")), 15, 5, "workload.requests", "requests takes one value, got 2"),
    Case(
        "dsl-argument-before-plain-section", dsl(("runtime {", "runtime fast {")), 20, 9, "runtime", "unexpected argument 'fast' before the block",
        hint="only `model PRESET { ... }` and `policy STRATEGY { ... }` take one",
    ),
    Case("dsl-second-argument-before-model-block", dsl(("model tiny {", "model tiny big {")), 1, 12, "model", "unexpected argument 'big' before the block"),
]


def _streams(result) -> tuple[str, str | None]:
    """(stderr, stdout) of a CliRunner result. The installed typer (0.29) captures stderr apart
    and `output` mixes both; older Click-based runners raise ValueError for `stderr` unless
    created with mix_stderr=False, and then only the mixed output is there (stdout None)."""
    try:
        return result.stderr, result.stdout
    except ValueError:
        return result.output, None


def _diagnostics(text: str) -> list[tuple[str, str | None]]:
    """Split error output into (diagnostic line, hint or None)."""
    found: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        if line.startswith("    hint: ") and found and found[-1][1] is None:
            found[-1] = (found[-1][0], line.removeprefix("    hint: "))
        elif line.strip():
            found.append((line, None))
    return found


runner = CliRunner()


def _check(tmp_path: Path, source: tuple[str, str]):
    suffix, text = source
    path = tmp_path / f"spec{suffix}"
    path.write_text(text, encoding="utf-8")
    return path, runner.invoke(app, ["check", str(path)])


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_malformed_spec(tmp_path: Path, case: Case) -> None:
    path, result = _check(tmp_path, case.source)
    stderr, stdout = _streams(result)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    if stdout is not None:
        assert stdout == "", "diagnostics belong on stderr"

    prefix = f"{path}:{case.line}:{case.column}: {case.path}: "
    matching = [(line, hint) for line, hint in _diagnostics(stderr) if line.startswith(prefix)]
    assert matching, f"no diagnostic starts with {prefix!r}:\n{stderr}"
    assert any(case.message in line for line, _ in matching), f"{case.message!r} not in:\n{stderr}"
    if case.hint is not None:
        assert any(case.message in line and hint and case.hint in hint for line, hint in matching), f"hint {case.hint!r} not in:\n{stderr}"
    for text in case.absent:
        assert text not in stderr, f"{text!r} should not be in:\n{stderr}"


def test_enough_cases() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 45
    dsl_cases = sum(case.source[0] == ".esp" for case in CASES)
    assert dsl_cases * 4 >= len(CASES), "about a third of the cases should be DSL"


def test_base_specs_are_valid(tmp_path: Path) -> None:
    for source in (toml(), dsl()):
        path, result = _check(tmp_path, source)
        assert result.exit_code == 0, result.output
        assert f"# {path}: valid" in result.output


# One error inside a node, one diagnostic: pydantic also reports the node tuple as too short
# (it counts only the nodes that validated), which is noise for the user.
NODE_ERRORS = [
    pytest.param(toml(("devices = 4", 'devices = "four"')), id="toml-node-devices-not-int"),
    pytest.param(toml(('device = "cpu"', 'device = "B200"')), id="toml-unknown-device"),
    pytest.param(dsl(("cpu x 4", "cpu x 4 { memory 80GIB }")), id="dsl-device-memory-unit"),
]


@pytest.mark.parametrize("source", NODE_ERRORS)
def test_node_error_is_reported_once(tmp_path: Path, source: tuple[str, str]) -> None:
    _, result = _check(tmp_path, source)
    stderr, _ = _streams(result)
    assert result.exit_code == 2
    assert "at least 1 item" not in stderr
    assert len(_diagnostics(stderr)) == 1, stderr


class _TooSlow(Exception):
    pass


def _too_slow(signum, frame):
    raise _TooSlow


def test_huge_device_count_is_answered_quickly(tmp_path: Path) -> None:
    source = toml(("tp = 1", "tp = 7"), ("devices = 4", "devices = 1_000_000_000_000"))
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        path, result = _check(tmp_path, source)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    stderr, _ = _streams(result)
    assert result.exit_code == 2, repr(result.exception)
    assert f"{path}:10:1: cluster.nodes[0].devices: input should be less than or equal to 1024" in stderr


# ---------------------------------------------------------------------- files, and a real process


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = runner.invoke(app, ["check", str(path)])
    stderr, _ = _streams(result)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert stderr.startswith(f"{path}: spec: cannot read the file: ")
    assert "No such file" in stderr


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(TOML_BASE, encoding="utf-8")
    result = runner.invoke(app, ["check", str(path)])
    stderr, _ = _streams(result)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{path}: spec: cannot tell the spec syntax from the suffix '.yaml'; name it .toml or .esp" in stderr


SUBPROCESS_CASES = ["toml-syntax-missing-equals", "dsl-unknown-section", "toml-context-kv-does-not-fit"]


@pytest.mark.parametrize("case", [case for case in CASES if case.id in SUBPROCESS_CASES], ids=lambda case: case.id)
def test_real_process(tmp_path: Path, case: Case) -> None:
    suffix, text = case.source
    path = tmp_path / f"spec{suffix}"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "espc", "check", str(path)], capture_output=True, text=True, encoding="utf-8", timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert f"{path}:{case.line}:{case.column}: {case.path}: " in done.stderr
    assert case.message in done.stderr


def test_subprocess_cases_exist() -> None:
    assert len([case for case in CASES if case.id in SUBPROCESS_CASES]) == len(SUBPROCESS_CASES)


def test_a_spec_error_survives_pickling():
    """Across a process pool (the benchmarks) the error keeps its diagnostics and its message."""
    error = SpecError([Diagnostic("spec.toml", 12, 5, "cluster.tp", "tp(3) does not divide 8 devices", "try 2")])
    restored = pickle.loads(pickle.dumps(error))
    assert restored.diagnostics == error.diagnostics and str(restored) == str(error)
