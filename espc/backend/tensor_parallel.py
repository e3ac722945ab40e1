"""Tensor parallelism inside an elastic instance (Megatron style), applied from outside the model.

An instance of `tp` devices runs `tp` ranks; TP rank t holds:

- attention: the query heads [t·H/tp, (t+1)·H/tp) (column-parallel `q_proj`, row-parallel
  `o_proj`) and the KV heads they read. With kv_heads ≥ tp each rank has kv_heads/tp of
  them; with kv_heads < tp a KV head is replicated on the tp/kv_heads ranks whose query
  heads share it (as vLLM does), so every rank's queries find their KV locally.
- MLP: a contiguous chunk of the ffn columns (`gate_proj`, `up_proj` column-parallel,
  `down_proj` row-parallel); chunks differ by at most one column when tp does not divide ffn.
- the embedding, the norms and `lm_head` whole (replicated): every rank of an instance
  computes the same hidden states and the same logits.

`o_proj` and `down_proj` then produce partial sums that the lowering all-reduces over the
instance's TP group (`espc::tp_all_reduce`, `espc.backend.ops`), right after each, so the
residual stream is whole on every rank again. The KV pool of a rank holds its own KV heads
only ([layers, 2, slots, local kv_heads, head_dim]); the pools of one instance hold the same
tokens at the same slots, so one slot table describes all of them.

`shard_model` shards a built model in place (random weights, or the `meta` structure);
`param_shard` is the slice of one parameter, which `espc.runtime.weights` reads straight
from the safetensors files so a rank never holds the whole checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from espc.backend import ops
from espc.frontend.spec import ModelSpec
from espc.model.llama import Block, Llama


@dataclass(frozen=True, slots=True)
class TPShard:
    """What TP rank `rank` of an instance of `tp` ranks holds of the model's heads and ffn."""

    tp: int
    rank: int
    q_heads: range  # global query heads
    kv_heads: range  # global KV heads (replicated ones included)
    ffn: range  # global ffn columns

    @property
    def local_heads(self) -> int:
        return len(self.q_heads)

    @property
    def local_kv_heads(self) -> int:
        return len(self.kv_heads)


def tp_shard(spec: ModelSpec, tp: int, rank: int) -> TPShard:
    """TP rank `rank`'s part of `spec`'s model; raises ValueError for a tp the heads cannot take."""
    if not 0 <= rank < tp:
        raise ValueError(f"TP rank {rank} is outside an instance of tp = {tp} ranks")
    heads, kv_heads = spec.heads, spec.kv_heads
    if heads % tp:
        raise ValueError(f"tp({tp}) does not divide model.heads({heads}): query heads cannot be split evenly")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tp({tp}) and model.kv_heads({kv_heads}): neither divides the other")
    per_rank = heads // tp
    q_heads = range(rank * per_rank, (rank + 1) * per_rank)
    if kv_heads >= tp:
        kv_per_rank = kv_heads // tp
        kv = range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    else:  # tp / kv_heads consecutive ranks share (replicate) one KV head
        shared = rank // (tp // kv_heads)
        kv = range(shared, shared + 1)
    group = heads // kv_heads  # query heads per KV head (GQA)
    assert q_heads[0] // group == kv[0] and (q_heads[-1]) // group == kv[-1], "query heads must read local KV heads"
    bounds = [round(spec.ffn * t / tp) for t in range(tp + 1)]
    return TPShard(tp, rank, q_heads, kv, range(bounds[rank], bounds[rank + 1]))


def param_shard(spec: ModelSpec, shard: TPShard, name: str) -> tuple[int, int, int] | None:
    """(dim, start, stop) of TP rank's slice of parameter `name` (Llama's names, without the
    `model.` prefix of HF checkpoints), or None when the rank holds it whole."""
    d = spec.head_dim
    last = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if last == "q_proj":
        return 0, shard.q_heads.start * d, shard.q_heads.stop * d
    if last in ("k_proj", "v_proj"):
        return 0, shard.kv_heads.start * d, shard.kv_heads.stop * d
    if last == "o_proj":
        return 1, shard.q_heads.start * d, shard.q_heads.stop * d
    if last in ("gate_proj", "up_proj"):
        return 0, shard.ffn.start, shard.ffn.stop
    if last == "down_proj":
        return 1, shard.ffn.start, shard.ffn.stop
    return None


def shard_model(model: Llama, tp: int, rank: int) -> Llama:
    """Shard `model` in place for TP rank `rank` of `tp`: each Linear of attention and MLP
    keeps its slice (`param_shard`), and the attention modules their local head counts.
    Works on any device, `meta` included. tp = 1 returns the model unchanged."""
    if tp == 1:
        return model
    spec = model.spec
    shard = tp_shard(spec, tp, rank)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            piece = param_shard(spec, shard, f"{name}.weight")
            if piece is None:
                continue
            dim, start, stop = piece
            module.weight = nn.Parameter(
                module.weight.narrow(dim, start, stop - start).clone(), requires_grad=module.weight.requires_grad
            )
            module.out_features, module.in_features = module.weight.shape
    for layer in model.layers:
        attn = cast(Block, layer).self_attn
        attn.heads, attn.kv_heads = shard.local_heads, shard.local_kv_heads
    return model


def local_heads(model: Llama) -> tuple[int, int]:
    """(query heads, KV heads) that `model` computes: the spec's, or its TP shard's."""
    attn = cast(Block, model.layers[0]).self_attn
    return attn.heads, attn.kv_heads


def world_rank(instance: int, tp_rank: int, tp: int) -> int:
    """The world rank of TP rank `tp_rank` of elastic instance `instance`: an instance's ranks
    are consecutive (instance-major), as `ClusterSpec.instances` groups consecutive devices."""
    return instance * tp + tp_rank


def tp_groups(world: int, tp: int) -> list[list[int]]:
    """The world ranks of every instance's TP group, in instance order: the order in which
    every rank must create them (`torch.distributed.new_group` is collective)."""
    if world % tp:
        raise ValueError(f"tp({tp}) does not divide the world of {world} ranks")
    return [[world_rank(instance, t, tp) for t in range(tp)] for instance in range(world // tp)]


def init_tp_group(world: int, tp: int, rank: int) -> None:
    """Create every instance's TP group on this rank (all ranks, same order: gloo and NCCL
    hang otherwise) and register this rank's own for `espc::tp_all_reduce`. Call once, right
    after `init_process_group`; tp = 1 creates nothing."""
    if tp == 1:
        return
    for members in tp_groups(world, tp):
        group = dist.new_group(members)
        if rank in members:
            ops.set_tp_group(group)
