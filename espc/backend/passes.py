"""Passes over a lowered `Program`, each a plain function Program -> Program, run as one flat
named pipeline:

- `dce`: dead-code elimination that keeps side effects (messages, pool writes: see
  `ops.SIDE_EFFECT_OPS`).
- `overlap`: hoists every `send_recv_start` to just after the last node it needs and the
  previous message op, so a transfer is in flight while the rank computes (the prefill ring
  passes block s + 1 while attending to block s; a master's queries leave before it attends
  to its own shard). Message ops never move past one another: the order the verifier proves
  is the order that runs.
- `verify_comm`: the comm-matching proof across ranks (`check_comm`): messages match in
  order per rank pair, whatever their channel, because NCCL ignores P2P tags.

Graph passes only touch graphs built for this plan (`Program.fresh`); cached graphs already
went through them. They edit the fx.Graph; `espc.backend.lower.run_pipeline` runs PIPELINE,
writes each stage's readable dump on request and regenerates the Python code once at the end.
This module needs nothing of the lowering at run time (a `Program` is only read, and copied
with `dataclasses.replace`), so the lowering can call it without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch.fx as fx

from espc.backend import ops

if TYPE_CHECKING:
    from espc.backend.lower import Program

Pass = Callable[["Program"], "Program"]


class CommError(ValueError):
    """The ranks' sends and receives do not match, or would deadlock; `violations` names the ops."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("\n".join(violations))
        self.violations = violations


def dce(program: Program) -> Program:
    for module in program.fresh_modules():
        module.graph.eliminate_dead_code()
    return program


def overlap(program: Program) -> Program:
    for module in program.fresh_modules():
        hoist_starts(module.graph)
    return program


def hoist_starts(graph: fx.Graph) -> None:
    """Move each send_recv_start right after the latest of its inputs and the message op
    before it."""
    order: dict[fx.Node, float] = {node: index for index, node in enumerate(graph.nodes)}
    previous_comm = None
    for node in list(graph.nodes):
        if node.target is ops.COMM_START:
            anchors = list(node.all_input_nodes) + ([previous_comm] if previous_comm is not None else [])
            anchor = max(anchors, key=order.__getitem__)
            if anchor.next is not node:
                anchor.append(node)
                order[node] = order[anchor] + 0.5  # between the anchor and its old successor
        if node.target in (ops.COMM_START, ops.COMM_WAIT):
            previous_comm = node
    graph.lint()


def verify_comm(program: Program) -> Program:
    if not program.verified:
        check_comm(program)
    return replace(program, verified=True)


PIPELINE: tuple[tuple[str, Pass], ...] = (("dce", dce), ("overlap", overlap), ("verify_comm", verify_comm))


# --------------------------------------------------------------------- the comm verifier


@dataclass(frozen=True, slots=True)
class CommOp:
    """A message op of one rank, resolved against the plan: peers are ranks, messages are
    (label, layer, row shape, dtype) — equal descriptors mean equal sizes on both ends."""

    rank: int
    node: str
    start: str  # the start node this op belongs to (itself for a start)
    channel: str
    sends: tuple[tuple[int, tuple], ...]
    recvs: tuple[tuple[int, tuple], ...]

    @property
    def is_wait(self) -> bool:
        return self.node != self.start


def comm_ops(program: Program, rank: int) -> list[CommOp]:
    """`rank`'s message ops in execution order. Every message of a start shares the start's
    row shape and dtype (true of every exchange the lowering emits)."""
    binding = program.bindings[rank]
    ops_: list[CommOp] = []
    starts: dict[str, CommOp] = {}
    for node in program.graph(rank).graph.nodes:
        if node.target is ops.COMM_START:
            meta = node.meta["comm"]
            shape, dtype = tuple(node.args[4]), node.args[5]

            def resolve(pairs):
                return tuple(
                    (_peer(binding, node.name, name), (binding.messages.get(message, message), meta.layer, shape, dtype))
                    for name, message in pairs
                )

            op = CommOp(rank, node.name, node.name, ops.CHANNEL_NAMES[meta.channel], resolve(meta.sends), resolve(meta.recvs))
            starts[node.name] = op
            ops_.append(op)
        elif node.target is ops.COMM_WAIT:
            start = starts[node.args[0].name]
            ops_.append(replace(start, node=node.name))
    return ops_


def _peer(binding, node: str, name: str) -> int:
    if name not in binding.peers:
        raise CommError([f"rank {binding.rank} `{node}`: peer `{name}` is not bound by the plan"])
    return binding.peers[name]


def describe_label(label: tuple) -> str:
    """A message label from `lower.bind` in words."""
    kind, *where = label
    if kind == "ring":
        return f"batch {where[0]} KV block of ring position {where[1]}"
    if kind == "decode":
        return f"batch {where[0]} decode, master position {where[1]} <-> shard position {where[2]}"
    if kind == "prefix":
        return f"batch {where[0]} resident prefix, query position {where[1]} <-> holder position {where[2]}"
    if kind == "migration":
        return f"migration {where[0]}"
    return " ".join(map(str, label))


def describe_message(message: tuple) -> str:
    """A message of `comm_ops` (label, layer, row shape, dtype) in words: label and layer."""
    label, layer, _, _ = message
    where = "" if layer is None else f", layer {layer}"
    return f"{describe_label(label) if isinstance(label, tuple) else label}{where}"


def check_comm(program: Program) -> None:
    """Simulate every rank's message ops and prove that each send meets a receive with the
    same message on the same channel, in the same order, and that no rank waits forever.

    Semantics: a start posts its sends and receives without blocking; a wait blocks until
    each of its messages is matched by the peer's posted counterpart (rendezvous — safe
    whether or not the transport buffers sends). Messages from rank a to rank b match
    first-in first-out *per rank pair*, whatever their channel: NCCL ignores P2P tags and
    pairs the k-th send a -> b with the k-th receive at b from a. The k-th messages must
    also agree on the channel, so the proof holds as well where tags do separate messages
    (gloo): each channel's subsequence then matches in order too. Raises CommError naming
    the ops at fault.
    """
    ranks = program.ranks
    sequences = {rank: comm_ops(program, rank) for rank in ranks}
    errors: list[str] = []
    # (src, dst) -> posted sends / receives, as (op, message); channels share the pair's queue
    posted_sends: dict[tuple, list[tuple[CommOp, tuple]]] = {}
    posted_recvs: dict[tuple, list[tuple[CommOp, tuple]]] = {}
    # start node -> its messages as (direction, (src, dst), index)
    tickets: dict[tuple[int, str], list[tuple[str, tuple, int]]] = {}
    waited: set[tuple[int, str]] = set()

    def check_pair(key: tuple, index: int) -> None:
        """Message `index` from src to dst (`key`) has both ends posted: they must agree."""
        sends, recvs = posted_sends.get(key, []), posted_recvs.get(key, [])
        if index < len(sends) and index < len(recvs):
            (send_op, sent), (recv_op, expected) = sends[index], recvs[index]
            if sent != expected or send_op.channel != recv_op.channel:
                src, dst = key
                errors.append(
                    f"message {index} from rank {src} to rank {dst}: rank {src} `{send_op.node}` sends "
                    f"{describe_message(sent)} {sent[2:]} on channel {send_op.channel}, but rank {dst} "
                    f"`{recv_op.node}` expects {describe_message(expected)} {expected[2:]} on channel {recv_op.channel}"
                )

    def post(op: CommOp) -> None:
        entries = []
        for direction, pairs, posted in (("send", op.sends, posted_sends), ("recv", op.recvs, posted_recvs)):
            for peer, message in pairs:
                if peer == op.rank or peer not in program.bindings:
                    verb = "sends to" if direction == "send" else "receives from"
                    why = "is itself" if peer == op.rank else "runs no graph in this plan"
                    errors.append(f"rank {op.rank} `{op.node}` {verb} rank {peer}, which {why}")
                    continue
                key = (op.rank, peer) if direction == "send" else (peer, op.rank)
                queue = posted.setdefault(key, [])
                entries.append((direction, key, len(queue)))
                queue.append((op, message))
                check_pair(key, len(queue) - 1)
        tickets[(op.rank, op.node)] = entries

    def matched(direction: str, key: tuple, index: int) -> bool:
        other = posted_recvs if direction == "send" else posted_sends
        return index < len(other.get(key, []))

    pc = dict.fromkeys(ranks, 0)
    progress = True
    while progress:
        progress = False
        for rank in ranks:
            sequence = sequences[rank]
            while pc[rank] < len(sequence):
                op = sequence[pc[rank]]
                if not op.is_wait:
                    post(op)
                elif all(matched(*entry) for entry in tickets[(rank, op.start)]):
                    waited.add((rank, op.start))
                else:
                    break
                pc[rank] += 1
                progress = True

    blocked = [rank for rank in ranks if pc[rank] < len(sequences[rank])]
    for rank in blocked:
        op = sequences[rank][pc[rank]]
        for direction, (src, dst), index in tickets[(rank, op.start)]:
            if matched(direction, (src, dst), index):
                continue
            peer = dst if direction == "send" else src
            where = (
                f"rank {peer} is blocked in `{sequences[peer][pc[peer]].node}`" if peer in blocked
                else f"rank {peer} has finished"
            )
            mine = posted_sends if direction == "send" else posted_recvs
            message = mine[(src, dst)][index][1]
            verb = f"its send of {describe_message(message)} to" if direction == "send" else f"its receive of {describe_message(message)} from"
            errors.append(
                f"deadlock: rank {rank} blocks in `{op.node}`: {verb} rank {peer} on channel {op.channel} "
                f"(message {index} from rank {src} to rank {dst}) is never matched; {where}"
            )
    if not blocked:
        for key in sorted(posted_sends.keys() | posted_recvs.keys()):
            sends, recvs = posted_sends.get(key, []), posted_recvs.get(key, [])
            src, dst = key
            for op, message in sends[len(recvs):]:
                errors.append(f"rank {src} `{op.node}` sends {describe_message(message)} to rank {dst} on channel {op.channel}, which never receives it")
            for op, message in recvs[len(sends):]:
                errors.append(f"rank {dst} `{op.node}` receives {describe_message(message)} from rank {src} on channel {op.channel}, which never sends it")
        for rank in ranks:
            errors += [
                f"rank {rank} `{op.node}` starts messages it never waits for"
                for op in sequences[rank] if not op.is_wait and (rank, op.node) not in waited
            ]
    if errors:
        raise CommError(list(dict.fromkeys(errors)))
