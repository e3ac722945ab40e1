"""Readable, deterministic dumps of lowered programs: a node table, Python code, Graphviz dot
(and svg when Graphviz's `dot` is installed), and each rank's message schedule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from espc.backend import ops
from espc.backend.lower import Lowering
from espc.frontend.spec import Spec
from espc.planner.plan import DecodeBatch, DecodeItem, IterationPlan, PrefillBatch, PrefillItem, even_retention
from espc.runtime.model import build_model

if TYPE_CHECKING:
    from espc.backend.lower import Program

FORMATS = ("table", "code", "dot", "svg")


class GraphvizMissing(RuntimeError):
    pass


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _arg(value) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(map(_arg, value))
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def format_table(graph: fx.Graph) -> str:
    rows = [(node.name, node.op, _target(node), ", ".join(map(_arg, node.args))) for node in graph.nodes]
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(("name", "op", "target"))]
    lines = [f"{'name':{widths[0]}}  {'op':{widths[1]}}  {'target':{widths[2]}}  args"]
    lines += [f"{n:{widths[0]}}  {o:{widths[1]}}  {t:{widths[2]}}  {a}".rstrip() for n, o, t, a in rows]
    return "\n".join(lines)


_COMM = {ops.COMM_START, ops.COMM_WAIT}
_POOL = {torch.ops.espc.kv_store.default, torch.ops.espc.kv_unpack.default}


def _dot_body(graph: fx.Graph, prefix: str) -> list[str]:
    lines = []
    for node in graph.nodes:
        label = f"{node.name}\\n{_target(node)}".replace('"', "'")
        style = ""
        if node.target in _COMM:
            style = ', style=filled, fillcolor="#ffd8a8"'
        elif node.target in _POOL:
            style = ', style=filled, fillcolor="#c5dbff"'
        elif node.op in ("placeholder", "output"):
            style = ", shape=ellipse"
        lines.append(f'"{prefix}{node.name}" [label="{label}"{style}];')
    for node in graph.nodes:
        lines += [f'"{prefix}{source.name}" -> "{prefix}{node.name}";' for source in node.all_input_nodes]
    return lines


def format_dot(graphs: dict[str, fx.Graph]) -> str:
    """Data flow as one Graphviz digraph, a cluster per graph; messages in orange, pool
    writes in blue."""
    lines = ["digraph espc {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for name, graph in graphs.items():
        lines.append(f'  subgraph "cluster_{name}" {{')
        lines.append(f'    label="{name}";')
        lines += [f"    {line}" for line in _dot_body(graph, f"{name}/")]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


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


def format_rank(program: Program, rank: int, fmt: str = "table") -> str:
    binding = program.bindings[rank]
    module = program.graph(rank)
    peers = ", ".join(f"{k}={v}" for k, v in binding.peers.items()) or "none"
    body = format_table(module.graph) if fmt == "table" else module.code.strip()
    where = f" position {binding.position}" if binding.batch is not None else ""
    return f"# rank {rank}{where}: {binding.role}; {len(module.graph.nodes)} nodes; peers {peers}\n{body}"


def format_program(program: Program, ranks: tuple[int, ...] | None = None, fmt: str = "table", comm: bool = True) -> str:
    """The plan, each rank's graph (table, code, dot or svg) and the message schedule."""
    ranks = program.ranks if ranks is None else ranks
    if fmt in ("dot", "svg"):
        dot = format_dot({f"rank {rank}": program.graph(rank).graph for rank in ranks})
        return dot if fmt == "dot" else to_svg(dot)
    if fmt not in ("table", "code"):
        raise ValueError(f"unknown graph format {fmt!r}; choose from {', '.join(FORMATS)}")
    parts = [str(program.plan), *(format_rank(program, rank, fmt) for rank in ranks)]
    if comm:
        parts.append(format_comm(program, ranks))
    return "\n\n".join(parts)


def format_comm(program: Program, ranks: tuple[int, ...] | None = None) -> str:
    """Each rank's message ops in order, with peers and what each message carries."""
    from espc.backend.passes import comm_ops

    status = "verified: every send meets its receive, no deadlock" if program.verified else "not verified"
    lines = [f"# message schedule ({status})"]
    for rank in program.ranks if ranks is None else ranks:
        lines.append(f"rank {rank}:")
        for op in comm_ops(program, rank):
            if op.is_wait:
                lines.append(f"  wait  {op.node} ({op.start})")
                continue
            lines.append(f"  start {op.node} [{op.channel}]")
            lines += [f"    send -> {peer}: {_message(m)}" for peer, m in op.sends]
            lines += [f"    recv <- {peer}: {_message(m)}" for peer, m in op.recvs]
    return "\n".join(lines)


def _message(message: tuple) -> str:
    from espc.backend.passes import _describe

    shape = "x".join("n" if s == -1 else str(s) for s in message[2])
    return f"{_describe(message)} [{shape} {str(message[3]).removeprefix('torch.')}]"


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
    lowering = Lowering(build_model(spec.model, device="meta"), attention=spec.runtime.attention, tp=spec.cluster.tp or 1)
    program = lowering.lower(representative_plan(phase, dop), dump_ir=dump_ir)
    return format_program(program, None if rank is None else (rank,), fmt)
