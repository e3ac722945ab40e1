"""Readable, deterministic text of lowered programs: a node table, Python code, Graphviz dot,
and each rank's message schedule. `Program.__str__` and the pipeline's stage dumps
(`--dump-ir`) print through here; `espc graph` (`espc.backend.dump`) adds svg on top."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from espc.backend import ops
from espc.backend.passes import comm_ops, describe_message

if TYPE_CHECKING:
    from espc.backend.lower import Program

FORMATS = ("table", "code", "dot")


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


def format_rank(program: Program, rank: int, fmt: str = "table") -> str:
    binding = program.bindings[rank]
    module = program.graph(rank)
    peers = ", ".join(f"{k}={v}" for k, v in binding.peers.items()) or "none"
    body = format_table(module.graph) if fmt == "table" else module.code.strip()
    where = f" position {binding.position}" if binding.batch is not None else ""
    return f"# rank {rank}{where}: {binding.role}; {len(module.graph.nodes)} nodes; peers {peers}\n{body}"


def format_program(program: Program, ranks: tuple[int, ...] | None = None, fmt: str = "table", comm: bool = True) -> str:
    """The plan, each rank's graph (table or code) and the message schedule; or the ranks'
    graphs as Graphviz dot."""
    ranks = program.ranks if ranks is None else ranks
    if fmt == "dot":
        return format_dot({f"rank {rank}": program.graph(rank).graph for rank in ranks})
    if fmt not in ("table", "code"):
        raise ValueError(f"unknown graph format {fmt!r}; choose from {', '.join(FORMATS)}")
    parts = [str(program.plan), *(format_rank(program, rank, fmt) for rank in ranks)]
    if comm:
        parts.append(format_comm(program, ranks))
    return "\n\n".join(parts)


def format_comm(program: Program, ranks: tuple[int, ...] | None = None) -> str:
    """Each rank's message ops in order, with peers and what each message carries."""
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
    shape = "x".join("n" if s == -1 else str(s) for s in message[2])
    return f"{describe_message(message)} [{shape} {str(message[3]).removeprefix('torch.')}]"
