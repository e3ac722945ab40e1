"""Attention kernels behind one contract, with a Triton and a torch implementation.

    attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, *, causal, scale, impl) -> (o, lse)
        q [Nq, Hq, D], k/v [Nk, Hkv, D] (fp32/fp16/bf16, Hq % Hkv == 0, GQA head h uses kv head
        h // (Hq // Hkv)); q_pos/k_pos int64 *global* token positions within each request;
        q_seq/k_seq int64 sequence ids. Query i sees key j iff q_seq[i] == k_seq[j] and (not causal
        or k_pos[j] <= q_pos[i]). Returns o [Nq, Hq, D] fp32 normalised by its own softmax
        denominator and lse [Nq, Hq] fp32 = log(sum exp(scale * score)); a query that sees no
        key gets o = 0, lse = -inf.
    attn_merge(o_parts [P, Nq, Hq, D], lse_parts [P, Nq, Hq], *, impl) -> (o, lse)
        log-sum-exp merge in fp32; parts with lse = -inf contribute nothing.
    attn_decode_partial(..., impl, num_splits=None) -> (o, lse)
        same result as attn_partial, computed split-KV (flash-decoding) for few queries over
        long KV.
    attn_paged(q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq, *, causal, scale, impl,
               num_splits=None) -> (o, lse)
        attn_decode_partial over k = pool[layer, 0, kv_slots], v = pool[layer, 1, kv_slots]
        (pool [layers, 2, slots, Hkv, D], kv_slots int64 [Nk]) without copying the context:
        the Triton kernel loads K/V tiles at their slots; the torch reference reads long runs
        of consecutive slots in place, gathers the rest chunk by chunk (bounded memory) and
        merges.

impl="torch" (default; CPU reference, memory-bounded) or "triton" (CUDA, or CPU under
TRITON_INTERPRET=1). The Triton module is imported on first use so that torch-only callers
never import triton.
"""

from __future__ import annotations

import importlib

import torch

IMPLS = ("torch", "triton")

__all__ = ["IMPLS", "attn_decode_partial", "attn_merge", "attn_paged", "attn_partial"]


def _impl(impl: str):
    if impl == "torch":
        return importlib.import_module(".reference", __name__)
    if impl == "triton":
        return importlib.import_module(".triton_attention", __name__)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")


def attn_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor, k_seq: torch.Tensor,
    *, causal: bool, scale: float, impl: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of local queries over one KV block; see the module docstring for the contract."""
    return _impl(impl).attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale)


def attn_merge(
    o_parts: torch.Tensor, lse_parts: torch.Tensor, *, impl: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of P partial (o, lse) results into one."""
    return _impl(impl).attn_merge(o_parts, lse_parts)


def attn_decode_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor, k_seq: torch.Tensor,
    *, causal: bool, scale: float, impl: str = "torch", num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV (flash-decoding) attn_partial; num_splits=None lets the impl choose."""
    return _impl(impl).attn_decode_partial(
        q, k, v, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale, num_splits=num_splits
    )


def attn_paged(
    q: torch.Tensor, pool: torch.Tensor, layer: int, kv_slots: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor, k_seq: torch.Tensor,
    *, causal: bool, scale: float, impl: str = "torch", num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention over the keys at `kv_slots` of the paged pool's layer `layer`, read
    in place; num_splits=None lets the impl choose."""
    return _impl(impl).attn_paged(
        q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale, num_splits=num_splits
    )
