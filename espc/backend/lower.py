"""IterationPlan + model -> one torch.fx GraphModule per rank, built together (MPMD).

Each rank of a plan is one elastic instance with a KV pool tensor [layers, 2, slots,
kv_heads, head_dim] (see `espc.backend.ops`). With tensor parallelism (tp > 1) an instance is
tp processes, each with its shard of the model (`espc.backend.tensor_parallel`: its query
and KV heads, its ffn columns, its KV heads in the pool); they run the same graph, which
all-reduces the row-parallel `o_proj` and MLP outputs over the instance's TP group, and
TP rank t exchanges the ring, decode and migration messages with TP rank t of the other
instances (`Program.peer_ranks`). The graphs reuse the model's own modules for the
embedding, norms, projections (`Attention.qkv`, `o_proj`), MLP and `lm_head`, and replace its
attention with elastic sequence parallelism:

- prefill on a ring of d instances: global token j of a request lives on ring position
  j % d (striped, so causal work is balanced). Per layer a rank projects its own tokens and
  passes KV blocks around the ring d - 1 times; it attends to each block as it arrives while
  the next one is already in flight, then merges the d partials. Retention: each rank writes
  into its pool exactly the token ranges its `Retention` names, taken from the blocks that
  pass by, so scaling a request down to fewer instances moves no extra byte. Logits of a
  request's last token come out on the rank holding that token (`Program.outputs`).
- decode: a request's master appends the new token's KV to its pool and sends the query to
  every other instance holding a shard of the request; those compute (o, lse) over their
  shard and send it back; the master merges it with its own partial and runs the rest of the
  layer. Adding instances to a decode batch moves no KV. A master emits its requests' logits.
- continued prefill (an item with start > 0: a chunk of a chunked prefill, a decode step
  piggybacked on a chunk as a 1-token item, or a prompt after a cached prefix): its tokens
  attend to each other on the ring as above, and to the KV of [0, start) already resident
  in the pools, which stays where it is — the decode path's remote-KV exchange: each rank
  attends its own queries to the prefix it holds and sends them to every other ring member,
  which answers with (o, lse) over the prefix it holds; one merge takes the ring's partials
  and the prefix's. Every instance holding part of the prefix must therefore be in the ring
  (`Program.inputs` refuses a plan that puts one elsewhere).
- migrations: the source packs the KV of a token range (every layer) into one contiguous
  buffer at the start of the iteration; the destination unpacks it into newly allocated
  slots at the end, so the transfer overlaps the batch. Frees and the source's release of
  migrated tokens are slot bookkeeping, in the one order `Program.inputs` applies.

A graph's structure depends only on the rank's `Role` (phase, batch size, number of
migrations sent and received) and the model; token ids, positions, sequence ids, slot
indices and peer ranks are graph inputs (`Program.inputs`), and peers are named relative to
the rank (next/previous on the ring, k-th peer of a decode batch), so every member of a
batch runs the same graph. Graphs are cached per Role and reused across iterations; the
comm-matching proof is cached per plan shape.

`Lowering.lower` is the backend's entry point: it builds the graphs (or takes them from the
cache) and runs them through the pass pipeline (`espc.backend.passes.PIPELINE`), writing
each stage's dump (`espc.backend.printing`) on request. Both of those modules take a
`Program` and import this one for annotations only, so the backend's imports form no circle.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.fx as fx

from espc.backend import ops
from espc.backend.cache import GraphCache
from espc.backend.passes import PIPELINE, check_comm
from espc.backend.printing import format_comm, format_program
from espc.backend.tensor_parallel import local_heads, world_rank
from espc.model.llama import Llama
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    RequestId,
    TokenRange,
    even_retention,
)

_ops = torch.ops.espc
_LONG = torch.int64


@dataclass(frozen=True, slots=True, order=True)
class Role:
    """The shape signature of one rank's work in an iteration: all its graph depends on."""

    phase: str  # "prefill", "decode" or "idle" (migrations only)
    size: int  # instances in the rank's batch (0 when idle)
    sends: int  # migrations it sends
    receives: int  # migrations it receives
    prefix: bool = False  # a prefill batch continuing requests from their resident KV

    def __str__(self) -> str:
        where = f"{self.phase} dop={self.size}" if self.size else "idle"
        if self.prefix:
            where += " +resident prefix"
        return f"{where}, migrations out={self.sends} in={self.receives}"

    @property
    def name(self) -> str:
        return f"{self.phase}_d{self.size}{'_prefix' if self.prefix else ''}_s{self.sends}_r{self.receives}"


@dataclass(frozen=True, slots=True)
class CommMeta:
    """What a `send_recv_start` node exchanges, by placeholder and message names that
    `RankBinding.peers` and `.messages` resolve for one plan (the verifier's input)."""

    channel: int
    layer: int | None
    sends: tuple[tuple[str, str], ...]  # (peer placeholder, message name)
    recvs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RankBinding:
    """One rank's part of a plan: its Role, what it works on, and how its graph's names
    resolve. `peers`: int placeholder -> rank. `messages`: message name -> a plan-wide label
    of the tokens the message carries (both ends of a message must agree on it)."""

    rank: int
    role: Role
    position: int  # the rank's index in its batch's instances (0 when idle)
    batch: PrefillBatch | DecodeBatch | None
    sends: tuple[Migration, ...]
    receives: tuple[Migration, ...]
    peers: Mapping[str, int]
    messages: Mapping[str, tuple]


class SlotTable(Protocol):
    """Token-granular bookkeeping of one rank's KV pool: what the lowering asks of
    `espc.backend.kvpool.PagedKVTable`."""

    def resident(self, request: RequestId) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, slots) of the request's tokens held in this pool."""

    def allocate(self, request: RequestId, positions: torch.Tensor) -> torch.Tensor:
        """Reserve one slot per position for the request; the slots, in the same order."""

    def release(self, request: RequestId, span: TokenRange | None = None) -> None:
        """Drop the request's tokens in `span` (all of them when None)."""

    def take_moves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, destinations) of the slots the releases since the last call moved: the
        graph copies them at once, all reads before any write."""


# --------------------------------------------------------------------------------- binding


def bind(plan: IterationPlan) -> dict[int, RankBinding]:
    """Every participating rank's binding; peers and message labels come from the plan alone."""
    sends: dict[int, list[tuple[int, Migration]]] = defaultdict(list)
    receives: dict[int, list[tuple[int, Migration]]] = defaultdict(list)
    for index, migration in enumerate(plan.migrations):
        sends[migration.src].append((index, migration))
        receives[migration.dst].append((index, migration))

    def binding(rank, role, position, batch, peers, messages) -> RankBinding:
        for k, (index, migration) in enumerate(sends[rank]):
            peers[f"mig_out{k}_peer"] = migration.dst
            messages[f"mig_out{k}"] = ("migration", index)
        for k, (index, migration) in enumerate(receives[rank]):
            peers[f"mig_in{k}_peer"] = migration.src
            messages[f"mig_in{k}"] = ("migration", index)
        return RankBinding(
            rank, role, position, batch, tuple(m for _, m in sends[rank]), tuple(m for _, m in receives[rank]),
            peers, messages,
        )

    bindings: dict[int, RankBinding] = {}
    for b, batch in enumerate(plan.batches):
        ring = batch.instances
        d = len(ring)
        prefix = isinstance(batch, PrefillBatch) and any(item.start for item in batch.items)
        for p, rank in enumerate(ring):
            role = Role(batch.phase, d, len(sends[rank]), len(receives[rank]), prefix)
            peers: dict[str, int] = {}
            messages: dict[str, tuple] = {}
            if isinstance(batch, PrefillBatch):
                if d > 1:
                    peers["ring_next"], peers["ring_prev"] = ring[(p + 1) % d], ring[(p - 1) % d]
                for s in range(d - 1):  # exchange s passes on the block that originated s hops back
                    messages[f"ring_send{s}"] = ("ring", b, (p - s) % d)
                    messages[f"ring_recv{s}"] = ("ring", b, (p - s - 1) % d)
            if isinstance(batch, DecodeBatch) or prefix:
                # Remote KV: a "decode" or "prefix" label is (batch, asking position, holder position).
                kind = "prefix" if prefix else "decode"
                for k in range(1, d):
                    q = (p + k) % d
                    peers[f"peer{k}"] = ring[q]
                    messages[f"q_to{k}"] = messages[f"answer_from{k}"] = (kind, b, p, q)
                    messages[f"q_from{k}"] = messages[f"answer_to{k}"] = (kind, b, q, p)
            bindings[rank] = binding(rank, role, p, batch, peers, messages)
    for rank in sorted((sends.keys() | receives.keys()) - bindings.keys()):
        bindings[rank] = binding(rank, Role("idle", 0, len(sends[rank]), len(receives[rank])), 0, None, {}, {})
    return bindings


# ---------------------------------------------------------------------------- graph building


class _Builder:
    """fx.Graph construction with names that read well in dumps."""

    def __init__(self, model: Llama, attention: str, tp: int = 1):
        spec = model.spec
        self.graph = fx.Graph()
        # This rank's heads: all of them at tp = 1, its shard's otherwise (`shard_model`).
        self.heads, self.kv_heads = local_heads(model)
        self.layers, self.head_dim = spec.layers, spec.head_dim
        self.tp = tp
        self.dtype = model.dtype
        self.attention = attention
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        self.block_shape = [2, -1, self.kv_heads, self.head_dim]  # a KV block; -1: tokens

    def input(self, name: str) -> fx.Node:
        return self.graph.placeholder(name)

    def call(self, target: Callable, *args: Any, name: str | None = None, **meta: Any) -> fx.Node:
        node = self.graph.create_node("call_function", target, args, name=name)
        node.meta.update(meta)
        return node

    def item(self, node: fx.Node, index: int, name: str | None = None) -> fx.Node:
        return self.call(operator.getitem, node, index, name=name)

    def module(self, target: str, *args: Any) -> fx.Node:
        return self.graph.call_module(target, args)

    def halves(self, block: fx.Node) -> tuple[fx.Node, fx.Node]:
        """K and V of a block [2, n, kv_heads, head_dim]."""
        return self.item(block, 0, f"{block.name}_k"), self.item(block, 1, f"{block.name}_v")

    def attention_partial(self, q, kv, q_pos, k_pos, q_seq, k_seq, name: str) -> tuple[fx.Node, fx.Node]:
        k, v = kv
        result = self.call(
            _ops.attn_partial.default, q, k, v, q_pos, k_pos, q_seq, k_seq, True, self.scale, self.attention,
            name=name,
        )
        return self.item(result, 0, f"{name}_o"), self.item(result, 1, f"{name}_lse")

    def attention_paged(self, q, pool, layer: int, slots, q_pos, k_pos, q_seq, k_seq, name: str) -> tuple[fx.Node, fx.Node]:
        """Attention of q over the keys at token `slots` of the pool's layer, read in place
        (split-KV; the kernel chooses the splits): no copy of the context."""
        result = self.call(
            _ops.attn_paged.default, q, pool, layer, slots, q_pos, k_pos, q_seq, k_seq, True, self.scale,
            self.attention, None, name=name,
        )
        return self.item(result, 0, f"{name}_o"), self.item(result, 1, f"{name}_lse")

    def merge(self, layer: int, o_parts: fx.Node, lse_parts: fx.Node) -> fx.Node:
        merged = self.call(_ops.attn_merge.default, o_parts, lse_parts, self.attention, name=f"merge{layer}")
        return self.item(merged, 0, f"attn{layer}")

    def exchange(self, sends, send_to, recv_rows, recv_from, shape, dtype, channel: str, meta: CommMeta, name: str):
        """send_recv_start + send_recv_wait; the overlap pass later hoists the start."""
        ticket = self.call(
            ops.COMM_START, sends, send_to, recv_rows, recv_from, shape, dtype, ops.CHANNELS[channel],
            name=f"{name}_start", comm=meta,
        )
        return self.call(ops.COMM_WAIT, ticket, recv_rows, shape, dtype, name=f"{name}_wait")

    def layer_out(self, layer: int, x: fx.Node, o: fx.Node) -> fx.Node:
        """The rest of a decoder layer after attention: o_proj, residual, MLP, residual. With
        tp > 1 the row-parallel o_proj and MLP give partial sums, all-reduced over the TP group."""
        o = self.graph.call_method("to", (o, self.dtype))
        o = self.graph.call_method("flatten", (o, 1))
        x = self.call(operator.add, x, self.reduced(self.module(f"layers.{layer}.self_attn.o_proj", o), f"attn_out{layer}"))
        mlp_in = self.module(f"layers.{layer}.post_attention_layernorm", x)
        return self.call(operator.add, x, self.reduced(self.module(f"layers.{layer}.mlp", mlp_in), f"mlp_out{layer}"))

    def reduced(self, partial: fx.Node, name: str) -> fx.Node:
        """A row-parallel layer's output made whole: the TP all-reduce (nothing at tp = 1)."""
        return partial if self.tp == 1 else self.call(_ops.tp_all_reduce.default, partial, name=f"{name}_all_reduce")

    def qkv(self, layer: int, x: fx.Node, cos: fx.Node, sin: fx.Node):
        h = self.module(f"layers.{layer}.input_layernorm", x)
        attn = self.graph.get_attr(f"layers.{layer}.self_attn")
        qkv = self.graph.call_method("qkv", (attn, h, cos, sin))
        return self.item(qkv, 0, f"q{layer}"), self.item(qkv, 1, f"k{layer}"), self.item(qkv, 2, f"v{layer}")

    def embed(self, tokens: fx.Node, pos: fx.Node):
        x = self.module("embed_tokens", tokens)
        rope = self.module("rotary", pos, self.dtype)
        return x, self.item(rope, 0, "cos"), self.item(rope, 1, "sin")


def _build(model: Llama, role: Role, attention: str, tp: int = 1) -> fx.GraphModule:
    g = _Builder(model, attention, tp)
    pool = g.input("pool")
    migration_wait = _migrations_start(g, role, pool)
    outputs: tuple[fx.Node, ...]
    if role.phase == "prefill":
        outputs = (_prefill(g, role, pool),)
    elif role.phase == "decode":
        outputs = (_decode(g, role, pool),)
    else:
        outputs = ()
    if migration_wait is not None:
        migration_wait()
    g.graph.output(outputs)
    return fx.GraphModule(model, g.graph, class_name=role.name)


def _migrations_start(g: _Builder, role: Role, pool: fx.Node) -> Callable[[], None] | None:
    """Pack and post every migration of the rank first; returns the epilogue (wait, unpack)."""
    if not (role.sends or role.receives):
        return None
    out_peers = [g.input(f"mig_out{k}_peer") for k in range(role.sends)]
    out_slots = [g.input(f"mig_out{k}_slots") for k in range(role.sends)]
    in_peers = [g.input(f"mig_in{k}_peer") for k in range(role.receives)]
    in_slots = [g.input(f"mig_in{k}_slots") for k in range(role.receives)]
    buffers = [g.call(_ops.kv_pack.default, pool, slots, name=f"mig_out{k}_kv") for k, slots in enumerate(out_slots)]
    shape = [g.layers, 2, -1, g.kv_heads, g.head_dim]
    meta = CommMeta(
        ops.CHANNELS["migration"], None,
        tuple((f"mig_out{k}_peer", f"mig_out{k}") for k in range(role.sends)),
        tuple((f"mig_in{k}_peer", f"mig_in{k}") for k in range(role.receives)),
    )
    ticket = g.call(
        ops.COMM_START, buffers, out_peers, in_slots, in_peers, shape, g.dtype, ops.CHANNELS["migration"],
        name="migrate_start", comm=meta,
    )

    compact = (g.input("compact_src"), g.input("compact_dst")) if role.sends else None

    def finish() -> None:
        received = g.call(ops.COMM_WAIT, ticket, in_slots, shape, g.dtype, name="migrate_wait")
        for k, slots in enumerate(in_slots):
            g.call(_ops.kv_unpack.default, pool, slots, g.item(received, k, f"mig_in{k}_kv"), name=f"mig_in{k}_store")
        if compact is not None:  # the table's compaction after the sends' releases: last of all
            moved = g.call(_ops.kv_pack.default, pool, compact[0], name="compact_kv")
            g.call(_ops.kv_unpack.default, pool, compact[1], moved, name="compact_store")

    return finish


class _RemoteKV:
    """The remote-KV exchange of a batch of m instances, one layer at a time: a rank's
    queries go to every other member (`ask`), each member attends the queries it receives to
    the KV it holds and sends the (o, lse) back, and the asker lines the answers up with its
    own partial (`answer`). Multi-master decode reads a request's shards this way, a
    continued prefill its resident prefix. Inputs, per peer k = 1..m-1: `peer{k}` (its rank),
    `q_to{k}_index` (rows of this rank's queries it gets), `q_from{k}_pos`/`_seq` (the
    positions and sequence ids of the queries it sends here)."""

    def __init__(self, g: _Builder, m: int):
        self.g, self.m = g, m
        self.peers = [g.input(f"peer{k}") for k in range(1, m)]
        self.send_index = [g.input(f"q_to{k}_index") for k in range(1, m)]
        self.recv_pos = [g.input(f"q_from{k}_pos") for k in range(1, m)]
        self.recv_seq = [g.input(f"q_from{k}_seq") for k in range(1, m)]
        self.in_pos = g.call(torch.cat, self.recv_pos, name="q_in_pos")
        self.in_seq = g.call(torch.cat, self.recv_seq, name="q_in_seq")
        self.names = tuple(f"peer{k}" for k in range(1, m))

    def ask(self, layer: int, q: fx.Node) -> fx.Node:
        """Post this rank's queries to its peers and the receives of theirs: the ticket."""
        g = self.g
        queries = g.call(_ops.query_scatter.default, q, self.send_index, name=f"query_scatter{layer}")
        meta = CommMeta(
            ops.CHANNELS["query"], layer, tuple((p, f"q_to{k}") for k, p in enumerate(self.names, 1)),
            tuple((p, f"q_from{k}") for k, p in enumerate(self.names, 1)),
        )
        return g.call(
            ops.COMM_START, queries, self.peers, self.recv_pos, self.peers, [-1, g.heads, g.head_dim], g.dtype,
            ops.CHANNELS["query"], name=f"query{layer}_start", comm=meta,
        )

    def answer(
        self, layer: int, ticket: fx.Node, pool: fx.Node, kv_slots, kv_pos, kv_seq, o: fx.Node, lse: fx.Node
    ) -> tuple[fx.Node, fx.Node]:
        """Answer the peers' queries over the local KV (at `kv_slots` of the pool, read in
        place), and gather their answers to this rank's queries beside its own partial
        (o, lse): [m, n, Hq, D], [m, n, Hq]."""
        g = self.g
        received = g.call(ops.COMM_WAIT, ticket, self.recv_pos, [-1, g.heads, g.head_dim], g.dtype, name=f"query{layer}_wait")
        q_in = g.call(torch.cat, received, name=f"q_in{layer}")
        o_in, lse_in = g.attention_paged(
            q_in, pool, layer, kv_slots, self.in_pos, kv_pos, self.in_seq, kv_seq, f"attn_peer{layer}"
        )
        answers = g.call(_ops.partial_pack.default, o_in, lse_in, self.recv_pos, name=f"partial_pack{layer}")
        meta = CommMeta(
            ops.CHANNELS["partial"], layer, tuple((p, f"answer_to{k}") for k, p in enumerate(self.names, 1)),
            tuple((p, f"answer_from{k}") for k, p in enumerate(self.names, 1)),
        )
        answer_shape = [-1, g.heads, g.head_dim + 1]  # o with lse as the last column
        got = g.exchange(
            answers, self.peers, self.send_index, self.peers, answer_shape, torch.float32, "partial", meta, f"partial{layer}"
        )
        parts = g.call(_ops.partial_gather.default, o, lse, got, self.send_index, name=f"partial_gather{layer}")
        return g.item(parts, 0, f"remote_o{layer}"), g.item(parts, 1, f"remote_lse{layer}")


def _prefill(g: _Builder, role: Role, pool: fx.Node) -> fx.Node:
    d = role.size
    tokens, pos, seq = g.input("tokens"), g.input("pos"), g.input("seq")
    recv_pos = [g.input(f"ring_recv{s}_pos") for s in range(d - 1)]
    recv_seq = [g.input(f"ring_recv{s}_seq") for s in range(d - 1)]
    keep_index = [g.input(f"keep{s}_index") for s in range(d)]
    keep_slots = [g.input(f"keep{s}_slots") for s in range(d)]
    last_index = g.input("last_index")
    ring_next, ring_prev = (g.input("ring_next"), g.input("ring_prev")) if d > 1 else (None, None)
    if role.prefix:  # the resident prefix KV this rank holds of the batch's continued requests
        prefix_slots, prefix_pos, prefix_seq = g.input("prefix_slots"), g.input("prefix_pos"), g.input("prefix_seq")
    remote = _RemoteKV(g, d) if role.prefix and d > 1 else None
    # Block s originated s hops back on the ring; block 0 is the rank's own tokens.
    block_pos, block_seq = [pos, *recv_pos], [seq, *recv_seq]

    x, cos, sin = g.embed(tokens, pos)
    for layer in range(g.layers):
        q, k, v = g.qkv(layer, x, cos, sin)
        # The queries leave for the prefix holders first: they are in flight during the ring.
        ticket = remote.ask(layer, q) if remote is not None else None
        block = g.call(torch.stack, [k, v], name=f"kv{layer}_0")
        o_parts, lse_parts = [], []
        for s in range(d):
            kv = (k, v) if s == 0 else g.halves(block)
            o, lse = g.attention_partial(q, kv, pos, block_pos[s], seq, block_seq[s], f"attn{layer}_{s}")
            o_parts.append(o)
            lse_parts.append(lse)
            kept = g.call(torch.index_select, block, 1, keep_index[s], name=f"keep{layer}_{s}")
            g.call(_ops.kv_store.default, pool, layer, keep_slots[s], kept, name=f"retain{layer}_{s}")
            if s < d - 1:
                meta = CommMeta(ops.CHANNELS["ring"], layer, (("ring_next", f"ring_send{s}"),), (("ring_prev", f"ring_recv{s}"),))
                received = g.exchange(
                    [block], [ring_next], [recv_pos[s]], [ring_prev], g.block_shape, g.dtype, "ring", meta,
                    f"ring{layer}_{s}",
                )
                block = g.item(received, 0, f"kv{layer}_{s + 1}")
        if role.prefix:
            o, lse = g.attention_paged(q, pool, layer, prefix_slots, pos, prefix_pos, seq, prefix_seq, f"attn_prefix{layer}")
            if ticket is None:  # a ring of one: the whole prefix is local
                o_parts.append(o)
                lse_parts.append(lse)
        if len(o_parts) == 1:
            o = o_parts[0]
        else:
            o_stack = g.call(torch.stack, o_parts, name=f"o_parts{layer}")
            lse_stack = g.call(torch.stack, lse_parts, name=f"lse_parts{layer}")
            if ticket is not None:  # the prefix partials: this rank's and its peers' answers
                assert remote is not None  # a ticket comes from remote.ask
                o_prefix, lse_prefix = remote.answer(layer, ticket, pool, prefix_slots, prefix_pos, prefix_seq, o, lse)
                o_stack = g.call(torch.cat, [o_stack, o_prefix], name=f"o_all{layer}")
                lse_stack = g.call(torch.cat, [lse_stack, lse_prefix], name=f"lse_all{layer}")
            o = g.merge(layer, o_stack, lse_stack)
        x = g.layer_out(layer, x, o)
    last = g.call(torch.index_select, x, 0, last_index)
    return g.module("lm_head", g.module("norm", last))


def _decode(g: _Builder, role: Role, pool: fx.Node) -> fx.Node:
    m = role.size
    tokens, pos, seq, new_slots = g.input("tokens"), g.input("pos"), g.input("seq"), g.input("new_slots")
    kv_slots, kv_pos, kv_seq = g.input("kv_slots"), g.input("kv_pos"), g.input("kv_seq")
    remote = _RemoteKV(g, m) if m > 1 else None

    x, cos, sin = g.embed(tokens, pos)
    for layer in range(g.layers):
        q, k, v = g.qkv(layer, x, cos, sin)
        ticket = remote.ask(layer, q) if remote is not None else None
        new_kv = g.call(torch.stack, [k, v], name=f"new_kv{layer}")
        g.call(_ops.kv_store.default, pool, layer, new_slots, new_kv, name=f"append{layer}")
        # The context is read where it lies in the pool (after the append above): no layer
        # copies it out, here or for the peers' queries.
        o, lse = g.attention_paged(q, pool, layer, kv_slots, pos, kv_pos, seq, kv_seq, f"attn_local{layer}")
        if remote is not None:
            assert ticket is not None  # asked above: remote is set
            o_parts, lse_parts = remote.answer(layer, ticket, pool, kv_slots, kv_pos, kv_seq, o, lse)
            o = g.merge(layer, o_parts, lse_parts)
        x = g.layer_out(layer, x, o)
    return g.module("lm_head", g.module("norm", x))


# --------------------------------------------------------------------------------- inputs


def _arange(start: int, end: int, step: int) -> torch.Tensor:
    return torch.arange(start, max(start, end), step, dtype=_LONG)


def _striped(batch: PrefillBatch, origin: int) -> list[torch.Tensor]:
    """Positions of each request's tokens that live on ring position `origin`, ascending."""
    d = len(batch.instances)
    return [_arange(item.start + (origin - item.start) % d, item.end, d) for item in batch.items]


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.empty(0, dtype=_LONG)


def _with_seq(per_request: list[torch.Tensor], ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = range(len(per_request)) if ids is None else ids
    return _cat(per_request), _cat([torch.full_like(p, i) for i, p in zip(ids, per_request)])


def _prefill_inputs(
    b: RankBinding, kv: SlotTable, tokens: Mapping[RequestId, torch.Tensor], reads: bool = True
) -> dict[str, Any]:
    batch = b.batch
    assert isinstance(batch, PrefillBatch)  # a "prefill" role is bound to its batch (`bind`)
    d, p, rank = len(batch.instances), b.position, b.rank
    local = _striped(batch, p)
    inputs: dict[str, Any] = {}
    inputs["pos"], inputs["seq"] = _with_seq(local)
    ids = []
    for item, positions in zip(batch.items, local):
        chunk = tokens[item.request_id]
        if chunk.shape != (item.num_tokens,):
            raise ValueError(
                f"request {item.request_id}: prefill of tokens [{item.start}, {item.end}) needs "
                f"{item.num_tokens} token ids, got shape {tuple(chunk.shape)}"
            )
        ids.append(chunk[positions - item.start])
    inputs["tokens"] = _cat(ids)
    if b.role.prefix and reads:  # before the retained tokens below are allocated: the prefix only
        inputs.update(_prefix_inputs(b, kv, local))
    for s in range(d):
        origin = (p - s) % d
        block = _striped(batch, origin)
        if s:
            inputs[f"ring_recv{s - 1}_pos"], inputs[f"ring_recv{s - 1}_seq"] = _with_seq(block)
        rows, slots, offset = [], [], 0
        for item, positions in zip(batch.items, block):
            first = item.start + (origin - item.start) % d
            for kept in item.retention:
                if kept.instance != rank:
                    continue
                span = kept.range
                kept_positions = _arange(span.start + (origin - span.start) % d, span.end, d)
                rows.append(offset + (kept_positions - first) // d)
                slots.append(kv.allocate(item.request_id, kept_positions))
            offset += len(positions)
        inputs[f"keep{s}_index"], inputs[f"keep{s}_slots"] = _cat(rows), _cat(slots)
    last = []
    offset = 0
    for item, positions in zip(batch.items, local):
        if len(positions) and positions[-1] == item.end - 1:
            last.append(offset + len(positions) - 1)
        offset += len(positions)
    inputs["last_index"] = torch.tensor(last, dtype=_LONG)
    return inputs


def _prefix_inputs(b: RankBinding, kv: SlotTable, local: list[torch.Tensor]) -> dict[str, Any]:
    """What a rank of a continued prefill reads of the resident prefix [0, start) of its
    requests: the tokens it holds, and (ring of d > 1) the rows of the queries it exchanges
    with every other member. `local`: positions of its own tokens, per request."""
    batch = b.batch
    assert isinstance(batch, PrefillBatch)  # only prefill roles read a prefix this way
    d, p = len(batch.instances), b.position
    prefix_pos, prefix_slots, prefix_seq = [], [], []
    for i, item in enumerate(batch.items):
        if not item.start:
            continue
        positions, slots = kv.resident(item.request_id)
        beyond = positions[positions >= item.start]
        if len(beyond):
            raise ValueError(
                f"request {item.request_id}: prefill of tokens [{item.start}, {item.end}) continues a resident "
                f"prefix [0, {item.start}), but instance {b.rank} already holds positions {beyond.tolist()[:8]} "
                f"at or past {item.start}"
            )
        prefix_pos.append(positions)
        prefix_slots.append(slots)
        prefix_seq.append(torch.full_like(positions, i))
    inputs = {"prefix_pos": _cat(prefix_pos), "prefix_slots": _cat(prefix_slots), "prefix_seq": _cat(prefix_seq)}
    # Every query of a continued request asks every peer: only the peers know what they hold.
    rows, offset = [], 0
    for item, positions in zip(batch.items, local):
        if item.start:
            rows.append(_arange(offset, offset + len(positions), 1))
        offset += len(positions)
    asked = _cat(rows)
    for k in range(1, d):
        theirs = [pos if item.start else pos[:0] for item, pos in zip(batch.items, _striped(batch, (p + k) % d))]
        inputs[f"q_to{k}_index"] = asked
        inputs[f"q_from{k}_pos"], inputs[f"q_from{k}_seq"] = _with_seq(theirs)
    return inputs


def _check_prefix_holders(plan: IterationPlan, rank: int, kv: SlotTable) -> None:
    """A continued prefill reads its prefix where it lives: a rank outside the ring must
    hold none of it (the plan would silently attend to part of the prefix otherwise)."""
    for batch in plan.batches:
        if not isinstance(batch, PrefillBatch) or rank in batch.instances:
            continue
        for item in batch.items:
            held = len(kv.resident(item.request_id)[0]) if item.start else 0
            if held:
                raise ValueError(
                    f"request {item.request_id}: instance {rank} holds {held} tokens of the resident prefix "
                    f"[0, {item.start}) that its prefill of [{item.start}, {item.end}) attends to, but is not in "
                    f"the ring {list(batch.instances)}; a continued prefill reads its prefix where it lives, so "
                    "every instance holding part of it must be in the ring"
                )


def _decode_inputs(
    b: RankBinding, kv: SlotTable, tokens: Mapping[RequestId, torch.Tensor], reads: bool = True
) -> dict[str, Any]:
    batch = b.batch
    assert isinstance(batch, DecodeBatch)  # a "decode" role is bound to its batch (`bind`)
    m, p, rank, ring = len(batch.instances), b.position, b.rank, batch.instances
    inputs: dict[str, Any] = {}
    masters = [i for i, item in enumerate(batch.items) if item.master == rank]
    held = [dict(item.shards) for item in batch.items]
    kv_pos, kv_slots, kv_seq = [], [], []
    for i, item in enumerate(batch.items):
        if held[i].get(rank, 0) and reads:
            positions, slots = kv.resident(item.request_id)
            if len(positions) != held[i][rank]:
                raise ValueError(
                    f"decode request {item.request_id}: the plan gives instance {rank} a shard of "
                    f"{held[i][rank]} tokens but its pool holds {len(positions)}"
                )
            kv_pos.append(positions)
            kv_slots.append(slots)
            kv_seq.append(torch.full_like(positions, i))
    ids, pos, new_slots = [], [], []
    for i in masters:
        item = batch.items[i]
        chunk = tokens[item.request_id]
        if chunk.shape != (1,):
            raise ValueError(f"request {item.request_id}: a decode step needs 1 token id, got shape {tuple(chunk.shape)}")
        ids.append(chunk)
        pos.append(torch.tensor([item.context_len], dtype=_LONG))
        new_slots.append(kv.allocate(item.request_id, pos[-1]))
    inputs["tokens"], inputs["new_slots"] = _cat(ids), _cat(new_slots)
    inputs["pos"], inputs["seq"] = _with_seq(pos, masters)
    inputs["kv_slots"] = _cat(kv_slots + new_slots)
    inputs["kv_pos"] = _cat(kv_pos + pos)
    inputs["kv_seq"] = _cat(kv_seq + [torch.full((1,), i, dtype=_LONG) for i in masters])
    for k in range(1, m):
        peer = ring[(p + k) % m]
        inputs[f"q_to{k}_index"] = torch.tensor(
            [row for row, i in enumerate(masters) if held[i].get(peer, 0)], dtype=_LONG
        )
        theirs = [i for i, item in enumerate(batch.items) if item.master == peer and held[i].get(rank, 0)]
        inputs[f"q_from{k}_pos"] = torch.tensor([batch.items[i].context_len for i in theirs], dtype=_LONG)
        inputs[f"q_from{k}_seq"] = torch.tensor(theirs, dtype=_LONG)
    return inputs


def _migration_inputs(b: RankBinding, kv: SlotTable, reads: bool = True) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for k, migration in enumerate(b.sends if reads else ()):
        positions, slots = kv.resident(migration.request_id)
        span = migration.range
        inside = (positions >= span.start) & (positions < span.end)
        if int(inside.sum()) != len(span):
            raise ValueError(f"{migration}: instance {b.rank} holds {int(inside.sum())} of its {len(span)} tokens")
        order = positions[inside].argsort()
        inputs[f"mig_out{k}_slots"] = slots[inside][order]
    for k, migration in enumerate(b.receives):
        span = migration.range
        inputs[f"mig_in{k}_slots"] = kv.allocate(migration.request_id, _arange(span.start, span.end, 1))
    return inputs


# -------------------------------------------------------------------------------- program


@dataclass(frozen=True)
class Program:
    """The IR of a lowered plan: one GraphModule per rank (shared between ranks of equal Role)
    and the bindings that give each graph its inputs. `fresh`: Roles whose graphs were built
    for this plan (the graph passes transform those; cached ones already went through them).
    `verified`: the comm-matching proof holds for this plan.

    A "rank" here is an elastic instance, as in the plan. With `tp` > 1 an instance is `tp`
    world ranks that run the same graph on their own shards; TP rank t of an instance talks
    only to TP rank t of the others (`peer_ranks`), so each TP slice exchanges exactly the
    messages of the instance-level program, and the comm proof over instances covers every
    slice (the TP all-reduces stay inside an instance, called in the same order by all of
    its ranks)."""

    plan: IterationPlan
    bindings: Mapping[int, RankBinding]
    modules: Mapping[Role, fx.GraphModule]
    fresh: frozenset[Role] = frozenset()
    verified: bool = False
    tp: int = 1

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.bindings))

    def graph(self, rank: int) -> fx.GraphModule:
        return self.modules[self.bindings[rank].role]

    def fresh_modules(self) -> list[fx.GraphModule]:
        """The graphs built for this plan, which the graph passes transform (cached ones
        went through them when they were built)."""
        return [self.modules[role] for role in sorted(self.fresh)]

    def peer_ranks(self, rank: int, tp_rank: int = 0) -> dict[str, int]:
        """The world ranks behind instance `rank`'s peer placeholders, for its TP rank
        `tp_rank` (the same TP rank of each peer instance); the instances at tp = 1."""
        return {name: world_rank(peer, tp_rank, self.tp) for name, peer in self.bindings[rank].peers.items()}

    def comm_key(self) -> tuple:
        """Everything the comm proof depends on: Roles, peers and message labels."""
        return tuple(
            (rank, b.role, tuple(b.peers.items()), tuple(b.messages.items()))
            for rank, b in sorted(self.bindings.items())
        )

    def inputs(
        self, rank: int, kv: SlotTable, tokens: Mapping[RequestId, torch.Tensor], pool: torch.Tensor | None,
        tp_rank: int = 0, *, reads: bool = True,
    ) -> dict[str, Any] | None:
        """Apply the plan to `rank`'s slot table `kv` and return the rank's graph inputs, or
        None when the rank runs no graph in this plan (it only frees). Call it for every rank
        of the world, once per plan. `tokens`: per request, the ids of the prefill chunk
        [start, end), or the one new token of a decode step. `tp_rank`: whose peers the
        inputs name (`peer_ranks`); the other inputs are the same for every TP rank.
        `reads=False` applies the same bookkeeping without naming the resident KV the graph
        reads (decode shards, a continued prefill's prefix, a migration's source slots): the
        inputs then lack those, and the call costs O(new tokens) instead of O(context).

        This is the one order of a plan's slot bookkeeping; every copy of a table goes
        through it — the driver's mirror of each worker's (`reads=False`), the worker's own
        and the gloo harness's rank's:

        1. The plan's frees release first. `IterationPlan.verify` and the scheduler's
           `ClusterState` count a plan's capacity after its frees, so a plan may put new KV
           into the space it frees (a preemption); a freed request is in no batch or
           migration of the plan, so the graph reads nothing of it.
        2. The inputs allocate the slots the graph writes (retained prefill tokens, decode
           appends, migrations in) and name those it reads. The batch's come first: the KV
           a batch reads (decode shards, a continued prefill's prefix) is what was resident
           before the plan, never the slots a migration into the rank is still to fill.
        3. A migration's source releases the tokens it sends: step 2 named their slots for
           the pack, which runs first in the graph, and a rank runs its plans in order, so
           only a later plan can reuse them (`IterationPlan.verify` does not credit that
           release to the plan itself either). The table compacts the request it releases
           from (`PagedKVTable`); the graph moves those slots last (`compact_kv`).
        """
        for request in self.plan.frees:
            kv.release(request)
        _check_prefix_holders(self.plan, rank, kv)
        b = self.bindings.get(rank)
        if b is None:
            return None
        inputs = {"pool": pool, **self.peer_ranks(rank, tp_rank)}
        if b.role.phase == "prefill":
            inputs.update(_prefill_inputs(b, kv, tokens, reads))
        elif b.role.phase == "decode":
            inputs.update(_decode_inputs(b, kv, tokens, reads))
        inputs.update(_migration_inputs(b, kv, reads))
        for migration in b.sends:
            kv.release(migration.request_id, migration.range)
        if b.sends:
            inputs["compact_src"], inputs["compact_dst"] = kv.take_moves()
        return inputs

    def outputs(self, rank: int) -> tuple[RequestId, ...]:
        """The requests whose logits are the rows of `rank`'s output, in order."""
        b = self.bindings.get(rank)
        if b is None or b.batch is None:
            return ()
        if isinstance(b.batch, DecodeBatch):
            return tuple(item.request_id for item in b.batch.items if item.master == rank)
        d = len(b.batch.instances)
        return tuple(
            item.request_id for item in b.batch.items if (item.end - 1) % d == b.position
        )

    def run(
        self, rank: int, pool: torch.Tensor, kv: SlotTable, tokens: Mapping[RequestId, torch.Tensor], tp_rank: int = 0
    ) -> dict[RequestId, torch.Tensor]:
        """Apply the plan to `rank`'s table (`inputs`) and execute its graph (as TP rank
        `tp_rank` of the instance), in one process that holds both the pool and its table:
        logits per request."""
        inputs = self.inputs(rank, kv, tokens, pool, tp_rank)
        if inputs is None:
            return {}
        # The table's bookkeeping is host tensors; the graph runs where the pool lives.
        inputs = {name: value.to(pool.device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        outputs = self.graph(rank)(**inputs)
        if not outputs:
            return {}
        return dict(zip(self.outputs(rank), outputs[0].unbind(0)))

    def verify(self) -> None:
        """Prove that every rank's sends and receives match in order (raises CommError)."""
        check_comm(self)

    def __str__(self) -> str:
        return format_program(self)


def run_pipeline(program: Program, dump_ir: Path | None = None, skip: Iterable[str] = ()) -> Program:
    """Run the passes of PIPELINE (minus `skip`), then regenerate the code of the graphs they
    changed. With `dump_ir`, write 00-plan.txt, 01-lower.txt and one file per pass into that
    directory."""
    skip = set(skip)

    def dump(index: int, name: str, text: str) -> None:
        if dump_ir is not None:
            Path(dump_ir).mkdir(parents=True, exist_ok=True)
            (Path(dump_ir) / f"{index:02d}-{name}.txt").write_text(text + "\n", encoding="utf-8")

    if dump_ir is not None:
        dump(0, "plan", str(program.plan))
        dump(1, "lower", format_program(program, comm=False))
    for index, (name, run) in enumerate(PIPELINE, start=2):
        if name in skip:
            continue
        program = run(program)
        if dump_ir is not None:
            dump(index, name, format_comm(program) if name == "verify_comm" else format_program(program, comm=False))
    for module in program.fresh_modules():
        module.recompile()
    return program


class Lowering:
    """Lowers plans for one model; keeps the graph cache. The driver lowers every rank of a
    plan (on a `meta`-device model: only the structure is needed) and verifies; a worker
    lowers its own rank on its real model, `verify=False` (same code, same graphs)."""

    def __init__(self, model: Llama, *, attention: str = "torch", tp: int = 1, cache: GraphCache | None = None):
        spec, (heads, _) = model.spec, local_heads(model)
        if heads * tp != spec.heads:
            raise ValueError(
                f"tp={tp}: a rank's model has {heads} of the {spec.heads} query heads, not {spec.heads} / {tp}; "
                "shard it first (espc.backend.tensor_parallel.shard_model)"
            )
        self.model = model
        self.tp = tp
        self.attention = attention
        self.cache = cache if cache is not None else GraphCache()

    def warm_up(self, max_dop: int) -> int:
        """Build and cache the graph of every Role without migrations up to `max_dop`
        instances: prefill (fresh, and continuing a resident prefix) and decode at each
        DoP. A Role's graph does not depend on which rank runs it, so one-request plans on
        instances 0 … d−1 stand for every batch of that shape; otherwise the first batch
        of each shape would pay the graph's construction in its latency. A shape the
        backend does not lower (NotImplementedError) is skipped: a batch of it fails when
        it comes. Returns the number of graphs built now."""
        built = len(self.cache.graphs)
        for d in range(1, max_dop + 1):
            ring = tuple(range(d))
            batches: list[PrefillBatch | DecodeBatch] = [
                PrefillBatch(ring, (PrefillItem(0, start, start + d, even_retention(start, start + d, ring)),))
                for start in (0, d)  # fresh; continuing a resident prefix [0, d)
            ]
            batches.append(DecodeBatch(ring, (DecodeItem(0, 0, tuple((instance, 1) for instance in ring)),)))
            for batch in batches:
                try:
                    self.lower(IterationPlan(0, (batch,)), ranks=(0,), verify=False)
                except NotImplementedError:
                    continue
        return len(self.cache.graphs) - built

    def lower(
        self, plan: IterationPlan, *, ranks: tuple[int, ...] | None = None, verify: bool = True,
        dump_ir: Path | None = None,
    ) -> Program:
        """The per-rank graphs of `plan` after the pass pipeline. `ranks` restricts lowering
        to some ranks (the comm proof then needs `verify=False`: it spans every rank).
        `dump_ir`: write each stage into that directory (bypasses the cache)."""
        plan.verify()
        if verify and ranks is not None:
            raise ValueError("the comm proof spans every rank: lower all ranks, or pass verify=False")
        bindings = bind(plan)
        if ranks is not None:
            bindings = {rank: bindings[rank] for rank in ranks if rank in bindings}
        modules: dict[Role, fx.GraphModule] = {}
        fresh = set()
        for b in bindings.values():
            if b.role in modules:
                continue
            cached = None if dump_ir is not None else self.cache.get(b.role)
            if cached is None:
                cached = _build(self.model, b.role, self.attention, self.tp)
                fresh.add(b.role)
            modules[b.role] = cached
        program = Program(plan, bindings, modules, frozenset(fresh), tp=self.tp)
        if verify and dump_ir is None and program.comm_key() in self.cache.verified:
            program = replace(program, verified=True)
        program = run_pipeline(program, dump_ir, skip=() if verify else ("verify_comm",))
        for role in fresh:
            self.cache.put(role, program.modules[role])
        if verify:
            self.cache.verified.add(program.comm_key())
        return program
