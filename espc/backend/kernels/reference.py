"""Torch reference attention kernels (the default on CPU) and the argument checks both impls share.

Contract (see `espc.backend.kernels`): queries attend to keys of the same sequence id and,
when causal, only to keys whose *global* position is <= theirs, so striped ring layouts and
packed multi-request calls mask correctly. Accumulation is fp32; a query that sees no key gets
o = 0, lse = -inf.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Upper bound on score-matrix elements materialised at once (64 MiB in fp32): queries are
# processed in blocks so a 16K x 16K causal prefill never builds the full [Hq, Nq, Nk] matrix.
_SCORE_BUDGET = 1 << 24


def check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq) -> None:
    """Raise ValueError naming the offending argument unless the inputs meet the contract."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"attn: q, k, v must be 3-D [N, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attn: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    nq, hq, d = q.shape
    nk, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"attn: head dim of q ({d}) and k/v ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"attn: query heads ({hq}) must be a positive multiple of kv heads ({hkv})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"attn: {name} dtype {t.dtype} not in fp32/fp16/bf16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attn: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t, n in (("q_pos", q_pos, nq), ("k_pos", k_pos, nk), ("q_seq", q_seq, nq), ("k_seq", k_seq, nk)):
        if t.dtype != torch.int64 or t.shape != (n,):
            raise ValueError(f"attn: {name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (q, k, v, q_pos, k_pos, q_seq, k_seq)}
    if len(devices) != 1:
        raise ValueError(f"attn: all inputs must be on one device, got {sorted(map(str, devices))}")


def check_merge_args(o_parts, lse_parts) -> None:
    """Raise ValueError unless o_parts is fp32 [P, Nq, Hq, D] and lse_parts fp32 [P, Nq, Hq]."""
    if o_parts.dim() != 4 or lse_parts.shape != o_parts.shape[:3]:
        raise ValueError(
            "attn_merge: need o_parts [P, Nq, Hq, D] and lse_parts [P, Nq, Hq], "
            f"got {tuple(o_parts.shape)} and {tuple(lse_parts.shape)}"
        )
    if o_parts.dtype != torch.float32 or lse_parts.dtype != torch.float32:
        raise ValueError(f"attn_merge: parts must be float32, got {o_parts.dtype} and {lse_parts.dtype}")
    if o_parts.device != lse_parts.device:
        raise ValueError(f"attn_merge: o_parts on {o_parts.device} but lse_parts on {lse_parts.device}")


def attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float):
    """Masked attention of q over one KV block -> (o [Nq, Hq, D] fp32, lse [Nq, Hq] fp32)."""
    check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq)
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    group = hq // hkv
    o = q.new_zeros((nq, hq, d), dtype=torch.float32)
    lse = q.new_full((nq, hq), float("-inf"), dtype=torch.float32)
    if nq == 0 or nk == 0:
        return o, lse
    k32, v32 = k.float(), v.float()
    block = max(1, _SCORE_BUDGET // (hq * nk))
    for start in range(0, nq, block):
        end = min(start + block, nq)
        qb = q[start:end].float().reshape(end - start, hkv, group, d)
        s = torch.einsum("bhgd,nhd->hgbn", qb, k32) * scale
        visible = q_seq[start:end, None] == k_seq[None, :]
        if causal:
            visible &= k_pos[None, :] <= q_pos[start:end, None]
        s.masked_fill_(~visible, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows seeing nothing: exp -> 0, not NaN
        p = torch.exp(s - m)
        denom = p.sum(dim=-1)  # [Hkv, G, B]
        ob = torch.einsum("hgbn,nhd->bhgd", p, v32)
        denom_b = denom.permute(2, 0, 1)  # [B, Hkv, G]
        ob = ob / torch.where(denom_b > 0, denom_b, torch.ones_like(denom_b))[..., None]
        o[start:end] = ob.reshape(end - start, hq, d)
        lse[start:end] = (m.squeeze(-1) + torch.log(denom)).permute(2, 0, 1).reshape(end - start, hq)
    return o, lse


def attn_merge(o_parts, lse_parts):
    """Log-sum-exp merge of P partial results; parts with lse = -inf contribute nothing."""
    check_merge_args(o_parts, lse_parts)
    m = lse_parts.amax(dim=0) if lse_parts.shape[0] else lse_parts.new_full(lse_parts.shape[1:], float("-inf"))
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_parts - m)  # [P, Nq, Hq]; 0 for empty parts
    contrib = torch.where(w[..., None] > 0, o_parts * w[..., None], torch.zeros_like(o_parts))
    denom = w.sum(dim=0)
    o = contrib.sum(dim=0) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    return o, m + torch.log(denom)


def attn_decode_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float, num_splits=None):
    """Split-KV attention: partials over `num_splits` contiguous KV chunks, then merged.

    Same result as `attn_partial`; it mirrors the Triton flash-decoding path so the merge is
    exercised on CPU too. `num_splits=None` means one chunk.
    """
    check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"attn_decode_partial: num_splits must be >= 1, got {num_splits}")
    nk = k.shape[0]
    splits = max(1, min(num_splits or 1, nk))
    chunk = -(-nk // splits) if nk else 0
    parts = [
        attn_partial(q, k[s:s + chunk], v[s:s + chunk], q_pos, k_pos[s:s + chunk], q_seq, k_seq[s:s + chunk],
                     causal=causal, scale=scale)
        for s in range(0, max(nk, 1), max(chunk, 1))
    ]
    if len(parts) == 1:
        return parts[0]
    return attn_merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
