"""Triton attention kernels and their launchers (CUDA, or the Triton interpreter on CPU in tests).

Four entry points with the contract of `espc.backend.kernels`:
- `attn_partial`: one program per (block of query rows, kv head). Rows are the flattened
  (query, head-in-GQA-group) pairs, so a K/V tile is loaded once for the whole group — the
  same layout serves prefill and decode. Masks come from global positions and sequence ids
  (striped ring layouts, packed requests); tiles with no visible key are skipped.
- `attn_decode_partial`: flash-decoding — the KV range is split into chunks handled by
  separate programs (third grid axis), whose partials are then merged.
- `attn_paged`: the same flash-decoding over K/V read in place from a paged KV pool: the
  kernel is given views of the layer's K and V in the pool and the slot of each key
  (KV_ROWS, GATHER), and loads its K/V tiles at those rows; no copy of the context is made.
- `attn_merge`: log-sum-exp merge of partials, streamed over parts.

Numerics: fp32 accumulators and online softmax in the exp2 domain; fp32 dots use IEEE
precision (TF32 would miss the 1e-5 tolerance). Under the interpreter, tiles are upcast to
fp32 before `tl.dot` (UPCAST) because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_attn_args, check_merge_args, check_paged_args, check_splits

_INTERPRET = bool(triton.knobs.runtime.interpret)
_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KV_ROWS, QPOS, KPOS, QSEQ, KSEQ, O, LSE,
    stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_os, stride_om, stride_oh, stride_od,
    stride_ls, stride_lm, stride_lh,
    n_q, n_k, split_size, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Partial attention of BLOCK_M (query, head) rows of one kv head over KV split `program_id(2)`.

    Key j is row j of K and V, or with GATHER row KV_ROWS[j] (a slot of a paged pool).

    Writes o (normalised) and natural-log lse for split s at O + s*stride_os, LSE + s*stride_ls;
    rows that see no key get o = 0, lse = -inf. qk_scale is softmax scale * log2(e).
    """
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = (rows // GROUP).to(tl.int64)
    head = (kv_head * GROUP + rows % GROUP).to(tl.int64)
    row_ok = q_idx < n_q
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + q_idx[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPOS + q_idx, mask=row_ok, other=0)
    q_seq = tl.load(QSEQ + q_idx, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    k_start = split * split_size
    k_end = tl.minimum(k_start + split_size, n_k)
    for start_n in range(k_start, k_end, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < k_end
        k_pos = tl.load(KPOS + cols, mask=col_ok, other=0)
        k_seq = tl.load(KSEQ + cols, mask=col_ok, other=0)
        visible = row_ok[:, None] & col_ok[None, :] & (q_seq[:, None] == k_seq[None, :])
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if tl.max(visible.to(tl.int32)) > 0:
            if GATHER:
                kv_rows = tl.load(KV_ROWS + cols, mask=col_ok, other=0)
            else:
                kv_rows = cols
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(
                K + kv_rows[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0,
            )
            v = tl.load(
                V + kv_rows[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked row: exp2 -> 0, not NaN
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    log2_sum = m_i + tl.math.log2(tl.where(seen, l_i, 1.0))
    lse = tl.where(seen, log2_sum * 0.6931471805599453, float("-inf"))  # log2 -> natural log
    split_off = split.to(tl.int64)
    tl.store(
        O + split_off * stride_os + q_idx[:, None] * stride_om + head[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        o, mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + split_off * stride_ls + q_idx * stride_lm + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _attn_merge_kernel(
    OP, LSEP, O, LSE,
    stride_ops, stride_opm, stride_oph, stride_opd,
    stride_lps, stride_lpm, stride_lph,
    stride_om, stride_oh, stride_od,
    stride_lm, stride_lh,
    n_parts, n_rows, n_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge BLOCK_R (query, head) rows over `n_parts` partials with a streaming log-sum-exp."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    q_idx = rows // n_heads
    head = rows % n_heads
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    lse_ptrs = LSEP + q_idx * stride_lpm + head * stride_lph
    o_ptrs = OP + q_idx[:, None] * stride_opm + head[:, None] * stride_oph + offs_d[None, :] * stride_opd
    for _ in range(0, n_parts):
        lse_p = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        o_p = tl.load(o_ptrs, mask=mask, other=0.0)
        lse_ptrs += stride_lps
        o_ptrs += stride_ops
        m_new = tl.maximum(m_i, lse_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(lse_p - m_safe)
        acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, o_p * w[:, None], 0.0)
        l_i = l_i * alpha + w
        m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(O + q_idx[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :] * stride_od, o, mask=mask)
    tl.store(LSE + q_idx * stride_lm + head * stride_lh, lse, mask=row_ok)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"triton attention needs CUDA tensors (got {t.device}); on CPU use impl='torch' or TRITON_INTERPRET=1"
        )


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_n(q) -> int:
    """KV tile length: small under the interpreter; on GPU, K/V tiles of at most 16 KiB per stage."""
    if _INTERPRET:
        return 16
    return 64 if _head_dim_pad(q.shape[2]) * q.element_size() <= 256 else 32


def _launch_fwd(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale, num_splits, block_m, block_n, kv_rows=None):
    """Run the forward kernel over `num_splits` KV chunks -> ([S, Nq, Hq, D], [S, Nq, Hq]) fp32.

    `kv_rows` [Nk] int64: key j is row kv_rows[j] of k and v (views of a pool layer's K and V);
    None: key j is row j."""
    nq, hq, d = q.shape
    nk, hkv = k_pos.shape[0], k.shape[1]
    assert kv_rows is not None or k.shape[0] == nk, f"{k.shape[0]} K rows for {nk} key positions"
    assert kv_rows is None or kv_rows.shape == (nk,), f"kv_rows {tuple(kv_rows.shape)} for {nk} key positions"
    split_size = triton.cdiv(triton.cdiv(nk, num_splits), block_n) * block_n
    num_splits = triton.cdiv(nk, split_size)
    o = torch.empty((num_splits, nq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((num_splits, nq, hq), dtype=torch.float32, device=q.device)
    group = hq // hkv
    q_pos, k_pos, q_seq, k_seq = (t.contiguous() for t in (q_pos, k_pos, q_seq, k_seq))
    grid = (triton.cdiv(nq * group, block_m), hkv, num_splits)
    gather = kv_rows is not None
    _attn_fwd_kernel[grid](
        q, k, v, kv_rows.contiguous() if gather else k_pos, q_pos, k_pos, q_seq, k_seq, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
        nq, nk, split_size, scale * _LOG2E,
        GROUP=group, HEAD_DIM=d, HEAD_DIM_PAD=_head_dim_pad(d),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), UPCAST=_INTERPRET, GATHER=gather,
        num_warps=4, num_stages=2,
    )
    return o, lse


def _empty_result(q):
    nq, hq, d = q.shape
    o = torch.zeros((nq, hq, d), dtype=torch.float32, device=q.device)
    return o, torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)


def attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float):
    """Masked partial attention -> (o [Nq, Hq, D] fp32, lse [Nq, Hq] fp32); see module docstring."""
    check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq)
    _check_device(q)
    if q.shape[0] == 0 or k.shape[0] == 0 or q.shape[1] == 0:
        return _empty_result(q)
    block_m = 16 if _INTERPRET else 64
    o, lse = _launch_fwd(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale, 1, block_m, _block_n(q))
    return o[0], lse[0]


def attn_merge(o_parts, lse_parts):
    """Log-sum-exp merge of [P, Nq, Hq, D] / [P, Nq, Hq] fp32 partials -> (o, lse)."""
    check_merge_args(o_parts, lse_parts)
    _check_device(o_parts)
    n_parts, nq, hq, d = o_parts.shape
    o = torch.zeros((nq, hq, d), dtype=torch.float32, device=o_parts.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=o_parts.device)
    if n_parts == 0 or nq * hq == 0:
        return o, lse
    block_r = 16 if _INTERPRET else 32
    _attn_merge_kernel[(triton.cdiv(nq * hq, block_r),)](
        o_parts, lse_parts, o, lse,
        *o_parts.stride(), *lse_parts.stride(), *o.stride(), *lse.stride(),
        n_parts, nq * hq, hq,
        HEAD_DIM=d, HEAD_DIM_PAD=_head_dim_pad(d), BLOCK_R=block_r,
    )
    return o, lse


def _default_splits(q, nk: int, block_m: int, kv_heads: int) -> int:
    """Enough splits to give ~2 programs per SM, but no chunk shorter than 256 keys."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 4
    programs = triton.cdiv(q.shape[0] * (q.shape[1] // kv_heads), block_m) * kv_heads
    return max(1, min(triton.cdiv(nk, 256), triton.cdiv(2 * sms, programs)))


def attn_decode_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float, num_splits=None):
    """Flash-decoding variant of `attn_partial` for few queries over long KV (same result).

    The KV range is cut into `num_splits` chunks (default: sized to fill the GPU), each
    processed by its own programs; the per-chunk partials are merged by `attn_merge`.
    """
    check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq)
    check_splits("attn_decode_partial", num_splits)
    _check_device(q)
    return _split_kv(q, k, v, None, q_pos, k_pos, q_seq, k_seq, causal, scale, num_splits)


def attn_paged(q, pool, layer: int, kv_slots, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float, num_splits=None):
    """`attn_decode_partial` over the K/V rows at `kv_slots` of `pool[layer]`, read in place.

    pool [layers, 2, slots, Hkv, D]: the kernel gets views of the layer's K and V (no copy)
    and loads each tile's rows at their slots.
    """
    check_paged_args(q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq)
    check_splits("attn_paged", num_splits)
    _check_device(q)
    return _split_kv(q, pool[layer, 0], pool[layer, 1], kv_slots, q_pos, k_pos, q_seq, k_seq, causal, scale, num_splits)


def _split_kv(q, k, v, kv_rows, q_pos, k_pos, q_seq, k_seq, causal, scale, num_splits):
    """The flash-decoding launch shared by `attn_decode_partial` and `attn_paged`."""
    nk = k_pos.shape[0]
    if q.shape[0] == 0 or nk == 0 or q.shape[1] == 0:
        return _empty_result(q)
    # Decode rows are (few queries) x (GQA group): small M tiles waste little. Many queries (a
    # continued prefill over its resident prefix) take attn_partial's GPU tile.
    rows = q.shape[0] * (q.shape[1] // k.shape[1])
    block_m = 64 if rows >= 256 and not _INTERPRET else 16
    splits = num_splits if num_splits is not None else _default_splits(q, nk, block_m, k.shape[1])
    o_parts, lse_parts = _launch_fwd(
        q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale, splits, block_m, _block_n(q), kv_rows
    )
    if o_parts.shape[0] == 1:
        return o_parts[0], lse_parts[0]
    return attn_merge(o_parts, lse_parts)
