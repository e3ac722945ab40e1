"""The `espc::` torch.library ops that lowered graphs call, each with a fake implementation.

Attention: `attn_partial`, `attn_merge`, and `attn_paged`, which attends to K/V read in place
from the pool at given slots (the kernels of `espc.backend.kernels`).
Multi-master decode: `query_scatter` (a master's queries, one message per peer),
`partial_pack` (a peer's (o, lse) answers, one message per master) and `partial_gather`
(a master lines the answers up with its own partial for `attn_merge`).
KV pool: `kv_store` (one layer, token-granular slots), `kv_pack`, `kv_unpack`
(every layer of a token set as ONE contiguous buffer: a migration).
Communication: `send_recv_start` issues a batch of point-to-point sends and receives on the
world group and returns a ticket; `send_recv_wait` waits for the ticket and returns what was
received. Splitting the two lets a graph compute while messages are in flight (the ring of
a prefill passes the next KV block while attending to the current one).

The KV pool of a rank is one tensor [layers, 2, slots, kv_heads, head_dim]: `pool[l, 0]` and
`pool[l, 1]` are layer l's K and V, each [slots, kv_heads, head_dim]. A KV *block* is
[2, n, kv_heads, head_dim] (K and V of n tokens), the unit the prefill ring passes around.

Every message size is known to both ends from the plan: a receive is described by a 1-D
tensor with one entry per expected row (`recv_rows`, e.g. the positions of the tokens) and a
row shape with -1 where the rows go. Zero-row messages are not sent at all; both ends know.
Tensor parallelism: `tp_all_reduce` sums a tensor over the rank's TP group (the ranks of
its elastic instance, `espc.backend.tensor_parallel`), after the row-parallel `o_proj` and
MLP; the group is registered once per process with `set_tp_group`.

Comm ops count calls, messages and bytes per channel (`comm_counters`; the all-reduces as
`tp`). Ops that communicate
or write the pool are registered with `torch.fx.node.has_side_effect`, else DCE drops them.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.fx.node import has_side_effect

from espc.backend import kernels

# Channels name kinds of messages; each is sent as its own tag, but nothing relies on tags:
# NCCL ignores them and matches the k-th send a -> b with the k-th receive at b from a. The
# comm verifier (`espc.backend.passes.check_comm`) proves that order per rank pair, channel
# included, so messages match whether or not the transport separates tags (gloo does).
CHANNELS = {"ring": 1, "query": 2, "partial": 3, "migration": 4}
CHANNEL_NAMES = {tag: name for name, tag in CHANNELS.items()}

_COUNTER_FIELDS = ("calls", "messages", "bytes_sent", "bytes_received")
_counters: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COUNTER_FIELDS, 0))
# Tickets of started exchanges: id -> (works to wait for, receive buffers).
_pending: dict[int, tuple[list, list[torch.Tensor]]] = {}
_tickets = itertools.count()
# This process's TP group (its instance's ranks), set once at start-up; None: tp = 1.
_tp_group: list[dist.ProcessGroup | None] = [None]


def comm_counters() -> dict[str, dict[str, int]]:
    """Per channel: start calls, messages sent, bytes sent and received by this process;
    under `tp`, its TP all-reduces (messages: 0; bytes: the tensors reduced)."""
    return {name: dict(_counters[name]) for name in (*CHANNELS, "tp")}


def set_tp_group(group: dist.ProcessGroup) -> None:
    """Register the TP group `tp_all_reduce` reduces over (see `tensor_parallel.init_tp_group`)."""
    _tp_group[0] = group


def reset_comm_counters() -> None:
    _counters.clear()
    _pending.clear()


def _row_shape(rows: int, shape: list[int]) -> list[int]:
    return [rows if size == -1 else size for size in shape]


# ----------------------------------------------------------------------------------- attention


@torch.library.custom_op("espc::attn_partial", mutates_args=())
def attn_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor, k_seq: torch.Tensor,
    causal: bool, scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [Nq, Hq, D] fp32, lse [Nq, Hq] fp32) of q over one KV block, masked by global
    positions and sequence ids."""
    return kernels.attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale, impl=impl)


@attn_partial.register_fake
def _(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale, impl):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("espc::attn_paged", mutates_args=())
def attn_paged(
    q: torch.Tensor, pool: torch.Tensor, layer: int, kv_slots: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor, k_seq: torch.Tensor,
    causal: bool, scale: float, impl: str, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn_partial` over the keys held at token slots `kv_slots` [Nk] of layer `layer` of the
    pool, read in place (split-KV; `num_splits` None: the kernel chooses)."""
    return kernels.attn_paged(
        q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale, impl=impl,
        num_splits=num_splits,
    )


@attn_paged.register_fake
def _(q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq, causal, scale, impl, num_splits=None):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("espc::attn_merge", mutates_args=())
def attn_merge(o_parts: torch.Tensor, lse_parts: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of [P, Nq, Hq, D] partials into (o, lse), in fp32."""
    return kernels.attn_merge(o_parts, lse_parts, impl=impl)


@attn_merge.register_fake
def _(o_parts, lse_parts, impl):
    return o_parts.new_empty(o_parts.shape[1:]), lse_parts.new_empty(lse_parts.shape[1:])


# ------------------------------------------------------------------------- multi-master decode


@torch.library.custom_op("espc::query_scatter", mutates_args=())
def query_scatter(q: torch.Tensor, index: list[torch.Tensor]) -> list[torch.Tensor]:
    """One message per peer: the rows `index[k]` of the master's queries q [n, Hq, D]."""
    return [q.index_select(0, rows) for rows in index]


@query_scatter.register_fake
def _(q, index):
    return [q.new_empty((rows.shape[0], *q.shape[1:])) for rows in index]


@torch.library.custom_op("espc::partial_pack", mutates_args=())
def partial_pack(o: torch.Tensor, lse: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a peer's answers into one message per master: consecutive chunks of len(rows[k])
    rows, each [r, Hq, D + 1] with lse as the last column (one buffer per message)."""
    messages, start = [], 0
    for r in rows:
        end = start + r.shape[0]
        messages.append(torch.cat((o[start:end], lse[start:end, :, None]), dim=-1))
        start = end
    return messages


@partial_pack.register_fake
def _(o, lse, rows):
    return [o.new_empty((r.shape[0], o.shape[1], o.shape[2] + 1)) for r in rows]


@torch.library.custom_op("espc::partial_gather", mutates_args=())
def partial_gather(
    o: torch.Tensor, lse: torch.Tensor, answers: list[torch.Tensor], index: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The master's partials for attn_merge: its own (o, lse) [n, ...] and, per peer, the
    answers [r, Hq, D + 1] placed at rows index[k]; rows a peer did not answer (it holds no
    KV of that request) stay o = 0, lse = -inf. Returns [1 + peers, n, Hq, D] and
    [1 + peers, n, Hq]."""
    n, heads, dim = o.shape
    o_parts = o.new_zeros((1 + len(answers), n, heads, dim))
    lse_parts = lse.new_full((1 + len(answers), n, heads), float("-inf"))
    o_parts[0], lse_parts[0] = o, lse
    for part, (answer, rows) in enumerate(zip(answers, index), start=1):
        o_parts[part].index_copy_(0, rows, answer[..., :dim])
        lse_parts[part].index_copy_(0, rows, answer[..., dim])
    return o_parts, lse_parts


@partial_gather.register_fake
def _(o, lse, answers, index):
    parts = 1 + len(answers)
    return o.new_empty((parts, *o.shape)), lse.new_empty((parts, *lse.shape))


# --------------------------------------------------------------------------------- KV pool


@torch.library.custom_op("espc::kv_store", mutates_args=("pool",))
def kv_store(pool: torch.Tensor, layer: int, slots: torch.Tensor, block: torch.Tensor) -> None:
    """Write a block [2, n, Hkv, D] of layer `layer` into the pool at token slots [n]."""
    pool[layer].index_copy_(1, slots, block.to(pool.dtype))


@kv_store.register_fake
def _(pool, layer, slots, block):
    return None


@torch.library.custom_op("espc::kv_pack", mutates_args=())
def kv_pack(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Every layer's K and V at `slots` as one contiguous buffer [layers, 2, n, Hkv, D]."""
    return pool.index_select(2, slots)


@kv_pack.register_fake
def _(pool, slots):
    return pool.new_empty((*pool.shape[:2], slots.shape[0], *pool.shape[3:]))


@torch.library.custom_op("espc::kv_unpack", mutates_args=("pool",))
def kv_unpack(pool: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
    """Write a buffer from `kv_pack` into this pool at `slots`."""
    pool.index_copy_(2, slots, buffer)


@kv_unpack.register_fake
def _(pool, slots, buffer):
    return None


# ---------------------------------------------------------------------------- communication


@torch.library.custom_op("espc::send_recv_start", mutates_args=())
def send_recv_start(
    sends: list[torch.Tensor], send_to: list[int],
    recv_rows: list[torch.Tensor], recv_from: list[int], recv_shape: list[int], dtype: torch.dtype,
    channel: int,
) -> torch.Tensor:
    """Issue sends[k] -> rank send_to[k] and receives from recv_from[k] of len(recv_rows[k])
    rows of `recv_shape` (-1 marks the rows), all at once with batch_isend_irecv on the world
    group. Returns a ticket for `send_recv_wait`.

    Devices and streams (NCCL): a receive buffer is allocated on the device of its row
    descriptor, which the worker places with every graph input on its pool's device
    (`espc.runtime.worker`), so it is a tensor of the rank's own GPU. No stream is created:
    the process group runs the transfers on its internal communication stream, ordered after
    the work already queued on the current stream; `send_recv_wait` makes the current
    stream wait for them (`Work.wait`, without blocking the host), and the process group
    records the tensors on its stream so the caching allocator reuses none in flight. The
    ticket is a host-side scalar."""
    if not dist.is_initialized():
        raise RuntimeError("espc::send_recv_start: torch.distributed is not initialised (no process group)")
    ops, sent, received = [], 0, 0
    buffers = []
    for tensor, peer in zip(sends, send_to, strict=True):
        if tensor.numel():
            tensor = tensor.contiguous()
            ops.append(dist.P2POp(dist.isend, tensor, peer, tag=channel))
            sent += tensor.nbytes
    for rows, peer in zip(recv_rows, recv_from, strict=True):
        buffer = torch.empty(_row_shape(rows.shape[0], recv_shape), dtype=dtype, device=rows.device)
        buffers.append(buffer)
        if buffer.numel():
            ops.append(dist.P2POp(dist.irecv, buffer, peer, tag=channel))
            received += buffer.nbytes
    counters = _counters[CHANNEL_NAMES[channel]]
    counters["calls"] += 1
    counters["messages"] += sum(op.op is dist.isend for op in ops)
    counters["bytes_sent"] += sent
    counters["bytes_received"] += received
    ticket = next(_tickets)
    _pending[ticket] = (dist.batch_isend_irecv(ops) if ops else [], buffers)
    return torch.tensor(ticket)


@send_recv_start.register_fake
def _(sends, send_to, recv_rows, recv_from, recv_shape, dtype, channel):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("espc::send_recv_wait", mutates_args=())
def send_recv_wait(
    ticket: torch.Tensor, recv_rows: list[torch.Tensor], recv_shape: list[int], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Wait for every send and receive of `ticket`; the received tensors, in order."""
    works, buffers = _pending.pop(int(ticket))
    for work in works:
        work.wait()
    return buffers


@send_recv_wait.register_fake
def _(ticket, recv_rows, recv_shape, dtype):
    return [torch.empty(_row_shape(rows.shape[0], recv_shape), dtype=dtype, device=rows.device) for rows in recv_rows]


@torch.library.custom_op("espc::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over this rank's TP group: the whole output of a row-parallel layer
    from each rank's partial. Every rank of an instance runs the same graph, so the
    all-reduces of a group are called in the same order on all of its ranks."""
    group = _tp_group[0]
    if group is None:
        raise RuntimeError("espc::tp_all_reduce: no TP group registered (tensor_parallel.init_tp_group at start-up)")
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    counters = _counters["tp"]
    counters["calls"] += 1
    counters["bytes_sent"] += out.nbytes
    counters["bytes_received"] += out.nbytes
    return out


@tp_all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


# Ops that DCE must keep although nothing reads their result: messages and pool writes.
SIDE_EFFECT_OPS = (
    torch.ops.espc.send_recv_start.default,
    torch.ops.espc.send_recv_wait.default,
    torch.ops.espc.kv_store.default,
    torch.ops.espc.kv_unpack.default,
    torch.ops.espc.tp_all_reduce.default,  # a collective: every rank of the group must call it
)
COMM_START = torch.ops.espc.send_recv_start.default
COMM_WAIT = torch.ops.espc.send_recv_wait.default
for _op in SIDE_EFFECT_OPS:
    has_side_effect(_op)
