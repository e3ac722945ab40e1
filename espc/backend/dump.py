"""`espc graph`: lower a representative plan for a spec's model and print it, in any format of
`espc.backend.printing` or as svg (Graphviz's `dot` renders the dot text). It sits above the
whole backend (it builds a model and lowers), so only the CLI, tests and benchmarks import it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from espc.backend.lower import Lowering
from espc.backend.printing import format_program
from espc.backend.tensor_parallel import shard_model
from espc.frontend.spec import Spec
from espc.model.llama import build_model
from espc.planner.plan import DecodeBatch, DecodeItem, IterationPlan, PrefillBatch, PrefillItem, even_retention


class GraphvizMissing(RuntimeError):
    """svg was asked for, but Graphviz's `dot` is not installed: the user can install it or
    take the dot text instead."""


def to_svg(dot: str) -> str:
    executable = shutil.which("dot")
    if executable is None:
        raise GraphvizMissing(
            "--format svg needs Graphviz's `dot` program, which is not on PATH; install graphviz "
            "(e.g. `apt install graphviz`) or use --format dot and render it elsewhere"
        )
    result = subprocess.run([executable, "-Tsvg"], input=dot, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"graphviz dot failed: {result.stderr.strip()}")
    return result.stdout


def representative_plan(phase: str, dop: int) -> IterationPlan:
    """An iteration on instances 0..dop-1 with two requests (the graphs do not depend on
    their lengths): a prefill retaining evenly over the ring, or a decode whose first
    request is sharded over every instance and whose second lives on instance 0 alone."""
    ring = tuple(range(dop))
    if phase == "prefill":
        items = tuple(PrefillItem(request, 0, length, even_retention(0, length, ring)) for request, length in ((0, 1000), (1, 37)))
        return IterationPlan(0, (PrefillBatch(ring, items),))
    if phase == "decode":
        spread = DecodeItem(0, 0, tuple((instance, 512) for instance in ring))
        local = DecodeItem(1, dop - 1, ((0, 37),))
        return IterationPlan(0, (DecodeBatch(ring, (spread, local)),))
    raise ValueError(f"unknown phase {phase!r}; choose prefill or decode")


def render_graph(
    spec: Spec, phase: str, dop: int, rank: int | None = None, fmt: str = "table", dump_ir: Path | None = None
) -> str:
    """`espc graph`: lower a representative plan for `spec`'s model and dump it; with
    `dump_ir`, also write every pipeline stage's graphs into that directory."""
    instances = spec.cluster.num_devices // (spec.cluster.tp or 1)
    if not 1 <= dop <= instances:
        raise ValueError(f"--dop {dop}: the cluster has {instances} elastic instances; choose 1 to {instances}")
    if rank is not None and not 0 <= rank < dop:
        raise ValueError(f"--rank {rank}: the plan runs on ranks 0 to {dop - 1}")
    tp = spec.cluster.tp or 1  # the graphs of TP rank 0; every TP rank runs the same, on its shard
    model = shard_model(build_model(spec.model, device="meta"), tp, 0)
    lowering = Lowering(model, attention=spec.runtime.attention, tp=tp)
    program = lowering.lower(representative_plan(phase, dop), dump_ir=dump_ir)
    ranks = None if rank is None else (rank,)
    if fmt == "svg":
        return to_svg(format_program(program, ranks, "dot"))
    return format_program(program, ranks, fmt)
