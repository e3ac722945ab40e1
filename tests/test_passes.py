"""The pass pipeline: DCE keeps side effects, overlap hoists message starts without reordering
messages, and the comm verifier accepts lowered plans and names the ops of broken ones."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.fx as fx
from torch import nn

from espc.backend import ops
from espc.backend.lower import CommMeta, Lowering, Program, RankBinding, Role, _build, bind
from espc.backend.passes import PIPELINE, CommError, check_comm, comm_ops, dce, overlap
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    TokenRange,
    even_retention,
)

TINY = ModelSpec(preset="tiny")
ATTN = torch.ops.espc.attn_partial.default


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, device="meta")


def mixed_plan() -> IterationPlan:
    """A prefill ring of 4, a decode batch of 3 and migrations between them and an idle rank."""
    prefill = PrefillBatch((0, 1, 2, 3), (PrefillItem(1, 0, 50, even_retention(0, 50, (2, 3))),))
    decode = DecodeBatch((4, 5, 6), (DecodeItem(2, 4, ((4, 9), (5, 3), (6, 0))), DecodeItem(3, 6, ((5, 7),))))
    migrations = (Migration(4, 7, 1, TokenRange(0, 16)), Migration(5, 5, 7, TokenRange(3, 9)), Migration(6, 7, 1, TokenRange(0, 2)))
    return IterationPlan(0, (prefill, decode), migrations)


def raw_program(model, plan: IterationPlan) -> Program:
    """The lowering's graphs before any pass."""
    bindings = bind(plan)
    modules = {b.role: _build(model, b.role, "torch") for b in bindings.values()}
    return Program(plan, bindings, modules, frozenset(modules))


def test_pipeline_is_one_flat_named_list():
    assert [name for name, _ in PIPELINE] == ["dce", "overlap", "verify_comm"]


def test_lowered_plans_verify(model):
    program = Lowering(model).lower(mixed_plan())
    assert program.verified
    program.verify()
    assert comm_ops(program, 7)[0].sends[0][0] == 1  # the idle rank sends its migration to rank 1


def test_dce_drops_dead_values_and_keeps_messages_and_pool_writes(model):
    program = raw_program(model, IterationPlan(0, (PrefillBatch((0,), (PrefillItem(1, 0, 5, even_retention(0, 5, (0,))),)),)))
    graph = program.graph(0).graph
    names = {node.name for node in graph.nodes}
    assert "attn0_0_lse" in names  # one partial needs no merge: its lse is dead
    kept = [node.name for node in graph.nodes if node.target in ops.SIDE_EFFECT_OPS]
    dce(program)
    names = {node.name for node in graph.nodes}
    assert "attn0_0_lse" not in names
    assert kept == [node.name for node in graph.nodes if node.target in ops.SIDE_EFFECT_OPS]


def _position(graph: fx.Graph) -> dict[str, int]:
    return {node.name: index for index, node in enumerate(graph.nodes)}


def test_overlap_sends_the_next_block_before_attending_to_the_current_one(model):
    program = raw_program(model, mixed_plan())
    graph = program.graph(1).graph
    comm_before = [node.name for node in graph.nodes if node.target in (ops.COMM_START, ops.COMM_WAIT)]
    order = _position(graph)
    assert order["ring0_0_start"] > order["attn0_0"]  # the naive order: compute, then pass on
    overlap(program)
    order = _position(graph)
    for layer in range(TINY.layers):
        for step in range(3):
            assert order[f"ring{layer}_{step}_start"] < order[f"attn{layer}_{step}"]
    assert comm_before == [node.name for node in graph.nodes if node.target in (ops.COMM_START, ops.COMM_WAIT)]
    decode = program.graph(5).graph
    order = _position(decode)
    assert order["query0_start"] < order["append0"] < order["attn_local0"] < order["query0_wait"]


def test_mismatched_messages_name_both_ops(model):
    program = Lowering(model).lower(mixed_plan())
    binding = program.bindings[2]
    wrong = dict(binding.messages, ring_recv0=("ring", 0, 3))  # expects a block that rank 1 does not send
    broken = replace(program, bindings={**program.bindings, 2: replace(binding, messages=wrong)}, verified=False)
    with pytest.raises(CommError) as error:
        check_comm(broken)
    assert any(
        "rank 1 `ring0_0_start` sends batch 0 KV block of ring position 1, layer 0" in v
        and "rank 2 `ring0_0_start` expects batch 0 KV block of ring position 3" in v
        for v in error.value.violations
    ), error.value.violations


def test_a_reversed_ring_on_one_rank_is_rejected(model):
    program = Lowering(model).lower(mixed_plan())
    binding = program.bindings[1]
    peers = dict(binding.peers, ring_next=binding.peers["ring_prev"], ring_prev=binding.peers["ring_next"])
    broken = replace(program, bindings={**program.bindings, 1: replace(binding, peers=peers)}, verified=False)
    with pytest.raises(CommError, match="`ring0_0_wait`"):
        check_comm(broken)


def test_a_message_to_a_rank_without_a_graph_is_rejected(model):
    program = Lowering(model).lower(mixed_plan())
    bindings = {rank: b for rank, b in program.bindings.items() if rank != 7}
    with pytest.raises(CommError, match="rank 1 `migrate_start` receives from rank 7, which runs no graph in this plan"):
        check_comm(replace(program, bindings=bindings, verified=False))


def _hand_written(steps: list[tuple[str, ...]]) -> fx.GraphModule:
    """A graph of message ops only: ("recv" | "send" | "wait", name[, channel]) (channel
    "ring" unless named), peer placeholder `peer`."""
    graph = fx.Graph()
    peer = graph.placeholder("peer")
    rows = graph.placeholder("rows")
    tickets = {}
    for kind, name, *channel_name in steps:
        channel = ops.CHANNELS[channel_name[0] if channel_name else "ring"]
        if kind == "wait":
            start = tickets[name]
            graph.create_node("call_function", ops.COMM_WAIT, (start, [rows], [-1], torch.float32), name=f"{name}_wait")
            continue
        sends, recvs = ([rows], []) if kind == "send" else ([], [rows])
        peers = ([peer], []) if kind == "send" else ([], [peer])
        meta = CommMeta(channel, 0, (("peer", "m"),) if kind == "send" else (), (("peer", "m"),) if kind == "recv" else ())
        node = graph.create_node(
            "call_function", ops.COMM_START, (sends, peers[0], [rows] if recvs else [], peers[1], [-1], torch.float32, channel),
            name=f"{name}_start",
        )
        node.meta["comm"] = meta
        tickets[name] = node
    graph.output(None)
    return fx.GraphModule(nn.Module(), graph)


def _two_ranks(steps0, steps1) -> Program:
    plan = IterationPlan(0, ())
    modules, bindings = {}, {}
    for rank, steps in ((0, steps0), (1, steps1)):
        role = Role(f"hand{rank}", 0, 0, 0)
        modules[role] = _hand_written(steps)
        bindings[rank] = RankBinding(rank, role, 0, None, (), (), {"peer": 1 - rank}, {"m": ("hand", 0)})
    return Program(plan, bindings, modules)


def test_receive_before_send_on_both_ranks_deadlocks_and_names_the_ops():
    steps = [("recv", "get"), ("wait", "get"), ("send", "put"), ("wait", "put")]
    with pytest.raises(CommError) as error:
        check_comm(_two_ranks(steps, steps))
    assert error.value.violations == [
        "deadlock: rank 0 blocks in `get_wait`: its receive of hand 0, layer 0 from rank 1 on channel ring "
        "(message 0 from rank 1 to rank 0) is never matched; rank 1 is blocked in `get_wait`",
        "deadlock: rank 1 blocks in `get_wait`: its receive of hand 0, layer 0 from rank 0 on channel ring "
        "(message 0 from rank 0 to rank 1) is never matched; rank 0 is blocked in `get_wait`",
    ]
    # Either rank sending first (or both posting before waiting) is fine.
    check_comm(_two_ranks([("send", "put"), ("recv", "get"), ("wait", "put"), ("wait", "get")], steps))


def test_unmatched_and_unwaited_messages_are_rejected():
    with pytest.raises(CommError, match="rank 0 blocks in `put_wait`: its send of hand 0, layer 0 to rank 1 .* rank 1 has finished"):
        check_comm(_two_ranks([("send", "put"), ("wait", "put")], []))
    with pytest.raises(CommError) as error:
        check_comm(_two_ranks([("send", "put")], []))
    assert error.value.violations == [
        "rank 0 `put_start` sends hand 0, layer 0 to rank 1 on channel ring, which never receives it",
        "rank 0 `put_start` starts messages it never waits for",
    ]


def test_messages_match_in_order_per_rank_pair_whatever_their_channel():
    """NCCL ignores P2P tags: the k-th send from a to b meets the k-th receive at b from a.
    Rank 1 receives the query message first and the ring message second, rank 0 sends them
    the other way round — fine where each channel is a tag of its own, a mismatch on NCCL."""
    sender = [("send", "block", "ring"), ("send", "query", "query"), ("wait", "block"), ("wait", "query")]
    swapped = [("recv", "query", "query"), ("recv", "block", "ring"), ("wait", "query"), ("wait", "block")]
    with pytest.raises(CommError) as error:
        check_comm(_two_ranks(sender, swapped))
    assert error.value.violations[:2] == [
        "message 0 from rank 0 to rank 1: rank 0 `block_start` sends hand 0, layer 0 ((-1,), torch.float32) on "
        "channel ring, but rank 1 `query_start` expects hand 0, layer 0 ((-1,), torch.float32) on channel query",
        "message 1 from rank 0 to rank 1: rank 0 `query_start` sends hand 0, layer 0 ((-1,), torch.float32) on "
        "channel query, but rank 1 `block_start` expects hand 0, layer 0 ((-1,), torch.float32) on channel ring",
    ]
    in_order = [("recv", "block", "ring"), ("recv", "query", "query"), ("wait", "query"), ("wait", "block")]
    check_comm(_two_ranks(sender, in_order))


def test_every_lowered_shape_keeps_one_message_order_per_rank_pair(model):
    """The lowering orders messages so the per-pair proof holds where several kinds of
    messages share a pair of ranks: migrations in both directions between members of a ring
    and of a decode batch, two migrations of one pair, an idle sender."""
    prefill = PrefillBatch((0, 1), (PrefillItem(1, 0, 9, even_retention(0, 9, (0, 1))),))
    decode = DecodeBatch((2, 3, 4), (DecodeItem(2, 2, ((2, 4), (3, 3), (4, 2))), DecodeItem(3, 3, ((2, 1), (3, 5)))))
    migrations = (
        Migration(4, 2, 1, TokenRange(0, 4)), Migration(5, 1, 2, TokenRange(0, 3)), Migration(5, 3, 0, TokenRange(3, 6)),
        Migration(6, 5, 0, TokenRange(0, 2)), Migration(7, 5, 0, TokenRange(0, 1)), Migration(8, 0, 1, TokenRange(0, 2)),
    )
    program = Lowering(model).lower(IterationPlan(0, (prefill, decode), migrations))
    assert program.verified
    channels: dict[tuple[int, int], set[str]] = {}  # (src, dst) -> channels of its messages
    for rank in program.ranks:
        for op in comm_ops(program, rank):
            for peer, _ in op.sends:
                channels.setdefault((rank, peer), set()).add(op.channel)
    assert channels[(0, 1)] == {"ring", "migration"}  # two kinds of messages share the pair
    assert channels[(2, 3)] == {"query", "partial"}
