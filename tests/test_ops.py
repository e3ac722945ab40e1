"""The espc:: custom ops: schemas and fake implementations, KV pool ops, the multi-master decode
ops against a single attention call, side-effect registration, and comm op bookkeeping that
needs no peer (messages between processes are tested in test_backend_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from tolerances import TOLERANCES
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import _side_effectful_functions

from espc.backend import ops
from espc.backend.harness import free_port

espc = torch.ops.espc
LONG = torch.int64
CHECKS = ("test_schema", "test_faketensor")


def _qkv(nq=5, nk=9, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(nq, hq, d, generator=g), torch.randn(nk, hkv, d, generator=g), torch.randn(nk, hkv, d, generator=g))


def _pool(layers=2, slots=12, hkv=2, d=16, seed=1):
    return torch.randn(layers, 2, slots, hkv, d, generator=torch.Generator().manual_seed(seed))


def test_pure_ops_pass_opcheck():
    q, k, v = _qkv()
    pos_q, pos_k = torch.arange(4, 9), torch.arange(9)
    seq_q, seq_k = torch.zeros(5, dtype=LONG), torch.zeros(9, dtype=LONG)
    torch.library.opcheck(espc.attn_partial, (q, k, v, pos_q, pos_k, seq_q, seq_k, True, 0.25, "torch"), test_utils=CHECKS)
    o, lse = espc.attn_partial(q, k, v, pos_q, pos_k, seq_q, seq_k, True, 0.25, "torch")
    torch.library.opcheck(espc.attn_merge, (torch.stack([o, o]), torch.stack([lse, lse]), "torch"), test_utils=CHECKS)
    index = [torch.tensor([0, 3]), torch.tensor([], dtype=LONG)]
    torch.library.opcheck(espc.query_scatter, (q, index), test_utils=CHECKS)
    torch.library.opcheck(espc.partial_pack, (o, lse, [torch.zeros(2), torch.zeros(0), torch.zeros(3)]), test_utils=CHECKS)
    answers = [torch.randn(2, 4, 17), torch.randn(0, 4, 17)]
    torch.library.opcheck(espc.partial_gather, (o, lse, answers, index), test_utils=CHECKS)
    pool = _pool()
    paged = (q, pool, 1, torch.tensor([5, 2, 7, 0, 11, 3, 9, 1, 4]), pos_q, pos_k, seq_q, seq_k, True, 0.25, "torch")
    torch.library.opcheck(espc.attn_paged, paged, test_utils=CHECKS)
    torch.library.opcheck(espc.attn_paged, (*paged, 2), test_utils=CHECKS)
    torch.library.opcheck(espc.kv_pack, (pool, torch.tensor([5, 2, 7])), test_utils=CHECKS)
    torch.library.opcheck(espc.kv_store, (pool.clone(), 0, torch.tensor([1, 4]), torch.randn(2, 2, 2, 16)), test_utils=CHECKS)
    torch.library.opcheck(espc.kv_unpack, (pool.clone(), torch.tensor([3]), torch.randn(2, 2, 1, 2, 16)), test_utils=CHECKS)


def test_kv_store_and_pack_unpack_round_trip():
    pool = torch.zeros(2, 2, 10, 2, 16)
    block = torch.randn(2, 3, 2, 16)
    slots = torch.tensor([7, 0, 4])
    espc.kv_store(pool, 1, slots, block)
    torch.testing.assert_close(pool[1][:, slots], block, rtol=0, atol=0)
    assert pool[0].abs().sum() == 0 and pool[1, :, [1, 2, 3, 5, 6, 8, 9]].abs().sum() == 0
    buffer = espc.kv_pack(pool, slots)
    assert buffer.shape == (2, 2, 3, 2, 16) and buffer.is_contiguous()  # one buffer per migration
    other = torch.zeros_like(pool)
    espc.kv_unpack(other, torch.tensor([1, 2, 3]), buffer)
    torch.testing.assert_close(other[:, :, 1:4], pool[:, :, [7, 0, 4]], rtol=0, atol=0)


def test_multi_master_decode_ops_reproduce_one_attention_call():
    """Queries of two requests over KV spread across their master and two peers (peer 2 holds
    none of request 1: its row stays o = 0, lse = -inf) merge to the unsplit attention."""
    q, k, v = _qkv(nq=2, nk=30)
    q_pos, q_seq = torch.tensor([17, 11]), torch.tensor([0, 1])
    k_pos = torch.cat([torch.arange(18), torch.arange(12)])  # request 0: 18 tokens, request 1: 12
    k_seq = torch.cat([torch.zeros(18, dtype=LONG), torch.ones(12, dtype=LONG)])
    holder = torch.tensor([0] * 6 + [1] * 6 + [2] * 6 + [0] * 6 + [1] * 6)  # master 0, peers 1 and 2
    scale = 1 / math.sqrt(16)
    expected = espc.attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, True, scale, "torch")

    def partial(queries, rows, where):
        return espc.attn_partial(queries, k[where], v[where], q_pos[rows], k_pos[where], q_seq[rows], k_seq[where], True, scale, "torch")

    o, lse = partial(q, torch.arange(2), holder == 0)
    to_peer = [torch.tensor([0, 1]), torch.tensor([0])]
    answers = []
    for peer, (queries, rows) in enumerate(zip(espc.query_scatter(q, to_peer), to_peer), start=1):
        answers += espc.partial_pack(*partial(queries, rows, holder == peer), [rows])
    o_parts, lse_parts = espc.partial_gather(o, lse, answers, to_peer)
    assert o_parts.shape == (3, 2, 4, 16)
    assert torch.isneginf(lse_parts[2, 1]).all() and (o_parts[2, 1] == 0).all()
    merged = espc.attn_merge(o_parts, lse_parts, "torch")
    for got, want in zip(merged, expected):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_comm_fakes_give_receive_shapes_without_a_process_group():
    with FakeTensorMode():
        rows = [torch.empty(3, dtype=LONG), torch.empty(0, dtype=LONG)]
        ticket = espc.send_recv_start([torch.empty(2, 2, 5, 16)], [1], rows, [1, 2], [2, -1, 2, 16], torch.float32, 1)
        received = espc.send_recv_wait(ticket, rows, [2, -1, 2, 16], torch.float32)
    assert ticket.shape == () and [tuple(r.shape) for r in received] == [(2, 3, 2, 16), (2, 0, 2, 16)]


def test_comm_and_pool_writes_are_registered_side_effects_and_survive_dce():
    assert set(ops.SIDE_EFFECT_OPS) <= _side_effectful_functions
    graph = fx.Graph()
    pool, slots, block = graph.placeholder("pool"), graph.placeholder("slots"), graph.placeholder("block")
    graph.call_function(espc.kv_store.default, (pool, 0, slots, block))
    graph.call_function(espc.kv_pack.default, (pool, slots))  # pure and unused: dropped
    ticket = graph.call_function(ops.COMM_START, ([block], [1], [], [], [2, -1, 2, 16], torch.float32, 1))
    graph.call_function(ops.COMM_WAIT, (ticket, [], [2, -1, 2, 16], torch.float32))  # result unused: kept
    graph.output(None)
    graph.eliminate_dead_code()
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [espc.kv_store.default, ops.COMM_START, ops.COMM_WAIT]


def test_comm_start_without_a_process_group_says_so():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        espc.send_recv_start([], [], [], [], [-1], torch.float32, 1)


def test_empty_messages_are_not_sent_but_calls_are_counted():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ops.reset_comm_counters()
        rows = [torch.empty(0, dtype=LONG)]
        # Rank 0 of 1 has no peer: a non-empty message would fail, an empty one is skipped.
        ticket = espc.send_recv_start([torch.empty(0, 4, 16)], [0], rows, [0], [-1, 4, 16], torch.float32, ops.CHANNELS["query"])
        (received,) = espc.send_recv_wait(ticket, rows, [-1, 4, 16], torch.float32)
        assert received.shape == (0, 4, 16)
        assert ops.comm_counters()["query"] == {"calls": 1, "messages": 0, "bytes_sent": 0, "bytes_received": 0}
        assert ops.comm_counters()["ring"]["calls"] == 0
    finally:
        dist.destroy_process_group()
