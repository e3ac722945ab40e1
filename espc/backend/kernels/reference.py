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
# Upper bound on the K and V bytes `attn_paged` gathers out of the pool at once (4 MiB): a long
# context is read chunk by chunk, so no call copies a layer's whole context.
_GATHER_BUDGET = 1 << 22
# `attn_paged` attends to a run of consecutive slots holding at least this many bytes of K
# and V in place (a view of the pool: a prefill's pages, allocated together); shorter runs
# (the pages a decode fills one at a time, interleaved with other requests') are gathered,
# as a part of its own costs more in calls and merging than copying them does (measured on
# the tiny model: 4 requests of 513 tokens, 0.45 ms read in place, 0.55 ms gathered).
VIEW_MIN_BYTES = 1 << 16
# Below this many queries of one sequence (short chunks, or decode steps where some key lies
# past a query) the dense path is cheaper than the fused kernel, which needs K and V copied
# out per query head under GQA once the mask is causal.
FLASH_MIN_QUERIES = 32


def check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq) -> None:
    """Raise ValueError naming the offending argument unless the inputs meet the contract."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"attn: q, k, v must be 3-D [N, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attn: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attn: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_queries_over_keys("attn", q, k, k.shape[0], q_pos, k_pos, q_seq, k_seq, (v,))


def check_paged_args(q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq) -> None:
    """Raise ValueError naming the offending argument unless `attn_paged`'s inputs meet the
    contract: pool [layers, 2, slots, Hkv, D] of q's dtype, 0 <= layer < layers, kv_slots
    int64 [Nk]. Slot values are checked against the pool on the CPU only: on CUDA that check
    would synchronise the stream in every layer (the slots come from the pool's own table)."""
    if q.dim() != 3:
        raise ValueError(f"attn_paged: q must be 3-D [N, H, D], got {tuple(q.shape)}")
    if pool.dim() != 5 or pool.shape[1] != 2:
        raise ValueError(f"attn_paged: pool must be [layers, 2, slots, kv_heads, head_dim], got {tuple(pool.shape)}")
    if not 0 <= layer < pool.shape[0]:
        raise ValueError(f"attn_paged: layer {layer} is outside the pool's {pool.shape[0]} layers")
    if kv_slots.dtype != torch.int64 or kv_slots.dim() != 1:
        raise ValueError(f"attn_paged: kv_slots must be int64 of shape (Nk,), got {kv_slots.dtype} {tuple(kv_slots.shape)}")
    if q.dtype != pool.dtype:
        raise ValueError(f"attn_paged: q dtype {q.dtype} differs from the pool's {pool.dtype}")
    _check_queries_over_keys("attn_paged", q, pool[layer, 0], kv_slots.shape[0], q_pos, k_pos, q_seq, k_seq, (kv_slots,))
    if kv_slots.device.type == "cpu" and kv_slots.numel():
        low, high = int(kv_slots.min()), int(kv_slots.max())
        if low < 0 or high >= pool.shape[2]:
            raise ValueError(f"attn_paged: kv_slots span [{low}, {high}], outside the pool's {pool.shape[2]} slots")


def check_splits(op: str, num_splits: int | None) -> None:
    """Raise ValueError unless num_splits is None (the impl chooses) or >= 1."""
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")


def _check_queries_over_keys(op: str, q, keys, nk: int, q_pos, k_pos, q_seq, k_seq, others) -> None:
    """Shared checks: q [Nq, Hq, D] against `keys` [*, Hkv, D] (k, or a pool layer's K) of nk
    rows; positions and sequence ids; one device for q, keys, `others` and the index tensors."""
    nq, hq, d = q.shape
    hkv, dk = keys.shape[-2:]
    if dk != d:
        raise ValueError(f"{op}: head dim of q ({d}) and k/v ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads ({hq}) must be a positive multiple of kv heads ({hkv})")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: dtype {q.dtype} not in fp32/fp16/bf16")
    for name, t, n in (("q_pos", q_pos, nq), ("k_pos", k_pos, nk), ("q_seq", q_seq, nq), ("k_seq", k_seq, nk)):
        if t.dtype != torch.int64 or t.shape != (n,):
            raise ValueError(f"{op}: {name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (q, keys, *others, q_pos, k_pos, q_seq, k_seq)}
    if len(devices) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")


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
    """Masked attention of q over one KV block -> (o [Nq, Hq, D] fp32, lse [Nq, Hq] fp32).

    Sequence by sequence: a packed batch never computes scores between two requests. Where a
    sequence's mask is "every key" (decode) or plain causal once the keys are sorted by
    position (a prefill's own tokens, or a ring block from an earlier stripe), PyTorch's fused
    CPU flash attention runs it; other masks take the blocked dense path.
    """
    check_attn_args(q, k, v, q_pos, k_pos, q_seq, k_seq)
    nq, hq, d = q.shape
    if nq and k.shape[0] and bool((q_seq == q_seq[0]).all()) and bool((k_seq == q_seq[0]).all()):
        o, lse = _sequence_attention(q, k, v, q_pos, k_pos, causal, scale)  # one request (a decode step)
        return o.contiguous(), lse.contiguous()
    o = q.new_zeros((nq, hq, d), dtype=torch.float32)
    lse = q.new_full((nq, hq), float("-inf"), dtype=torch.float32)
    if nq == 0 or k.shape[0] == 0:
        return o, lse
    for sequence in torch.unique(q_seq):
        rows = (q_seq == sequence).nonzero().squeeze(1)
        keys = (k_seq == sequence).nonzero().squeeze(1)
        if keys.numel():
            o[rows], lse[rows] = _sequence_attention(q[rows], k[keys], v[keys], q_pos[rows], k_pos[keys], causal, scale)
    return o, lse


def _sequence_attention(q, k, v, q_pos, k_pos, causal: bool, scale: float):
    """One sequence's queries over its (non-empty) keys."""
    nq, nk = q.shape[0], k.shape[0]
    if not causal or bool(k_pos.max() <= q_pos.min()):  # every query sees every key (decode)
        return _flash_grouped(q, k, v, scale)
    if nq < FLASH_MIN_QUERIES:
        return _masked_attention(q, k, v, q_pos, k_pos, causal, scale)
    if not bool((k_pos[1:] >= k_pos[:-1]).all()):
        k_pos, order = k_pos.sort()
        k, v = k[order], v[order]
    visible = torch.searchsorted(k_pos, q_pos, right=True)
    skipped = int((visible == 0).sum())  # leading queries before every key: o = 0, lse = -inf
    staircase = torch.arange(1, nq - skipped + 1, device=q.device).clamp(max=nk)
    if bool((visible[:skipped] == 0).all()) and torch.equal(visible[skipped:], staircase):
        o = q.new_zeros((nq, q.shape[1], q.shape[2]), dtype=torch.float32)
        lse = q.new_full((nq, q.shape[1]), float("-inf"), dtype=torch.float32)
        o[skipped:], lse[skipped:] = _flash_causal(q[skipped:], k, v, scale)
        return o, lse
    return _masked_attention(q, k, v, q_pos, k_pos, causal, scale)


def _flash_causal(q, k, v, scale: float):
    """PyTorch's fused attention, top-left causal, in fp32, returning its log-sum-exp."""
    if q.shape[0] == 0:  # the fused kernel divides by the query count
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_zeros(q.shape[:2], dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    as_batch = lambda t: t.float().transpose(0, 1)[None]  # noqa: E731 — [1, H, N, D]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        as_batch(q), as_batch(k.repeat_interleave(group, dim=1)), as_batch(v.repeat_interleave(group, dim=1)),
        0.0, True, scale=scale,
    )
    return o[0].transpose(0, 1), lse[0].transpose(0, 1)


def _flash_grouped(q, k, v, scale: float):
    """PyTorch's fused attention, unmasked, in fp32, returning its log-sum-exp. Under GQA the
    G query heads of a KV head see the same keys, so its Nq × G queries are one batch row
    over that head's K and V, which are read where they lie (a view of the pool is fine)
    instead of copied once per query head."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    queries = q.float().reshape(nq, hkv, group, d).transpose(0, 1).reshape(1, hkv, nq * group, d)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries, k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None], 0.0, False, scale=scale,
    )
    o = o[0].reshape(hkv, nq, group, d).transpose(0, 1).reshape(nq, hq, d)
    return o, lse[0].reshape(hkv, nq, group).transpose(0, 1).reshape(nq, hq)


def _masked_attention(q, k, v, q_pos, k_pos, causal: bool, scale: float):
    """Dense attention with an explicit position mask, in query blocks of bounded size."""
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    group = hq // hkv
    o = q.new_zeros((nq, hq, d), dtype=torch.float32)
    lse = q.new_full((nq, hq), float("-inf"), dtype=torch.float32)
    k32, v32 = k.float(), v.float()
    block = max(1, _SCORE_BUDGET // (hq * nk))
    for start in range(0, nq, block):
        end = min(start + block, nq)
        qb = q[start:end].float().reshape(end - start, hkv, group, d)
        s = torch.einsum("bhgd,nhd->hgbn", qb, k32) * scale
        if causal:
            s.masked_fill_(k_pos[None, :] > q_pos[start:end, None], float("-inf"))
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
    check_splits("attn_decode_partial", num_splits)
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


def attn_paged(q, pool, layer: int, kv_slots, q_pos, k_pos, q_seq, k_seq, *, causal: bool, scale: float, num_splits=None):
    """`attn_partial` over the K/V rows at `kv_slots` of `pool[layer]` ([layers, 2, slots, Hkv, D]).

    Split-KV like `attn_decode_partial`: the keys are cut into parts, each attended to by the
    queries of its sequences and merged into their running result. A run of consecutive
    slots holding at least VIEW_MIN_BYTES of K and V is read in place; the other keys are
    gathered, at most `_GATHER_BUDGET` bytes at a time, so memory stays bounded whatever the
    context. `num_splits` (None: 1) cuts every part further into at most ceil(Nk / num_splits)
    keys.
    """
    check_paged_args(q, pool, layer, kv_slots, q_pos, k_pos, q_seq, k_seq)
    check_splits("attn_paged", num_splits)
    parts = list(_paged_parts(pool[layer], kv_slots, num_splits or 1))
    if len(parts) == 1:
        keys, k, v = parts[0]
        return attn_partial(q, k, v, q_pos, k_pos[keys], q_seq, k_seq[keys], causal=causal, scale=scale)
    nq, hq, d = q.shape
    o = q.new_zeros((nq, hq, d), dtype=torch.float32)
    lse = q.new_full((nq, hq), float("-inf"), dtype=torch.float32)
    for keys, k, v in parts:
        part_seq = k_seq[keys]
        if bool((part_seq == part_seq[0]).all()):  # a run of one request's pages: only its queries
            rows = (q_seq == part_seq[0]).nonzero().flatten()
            if not len(rows):
                continue
            part_o, part_lse = _sequence_attention(q[rows], k, v, q_pos[rows], k_pos[keys], causal, scale)
            o[rows], lse[rows] = attn_merge(torch.stack((o[rows], part_o)), torch.stack((lse[rows], part_lse)))
        else:
            part_o, part_lse = attn_partial(q, k, v, q_pos, k_pos[keys], q_seq, part_seq, causal=causal, scale=scale)
            o, lse = attn_merge(torch.stack((o, part_o)), torch.stack((lse, part_lse)))
    return o, lse


def _paged_parts(layer_kv, kv_slots, num_splits: int):
    """(keys, k, v) parts covering `kv_slots` of `layer_kv` [2, slots, Hkv, D], at least one
    (empty when there are no keys), none empty otherwise: `keys` indexes kv_slots (a slice or
    an index tensor), k and v [n, Hkv, D] are a view of a run of slots or a gathered copy (see
    `attn_paged`)."""
    nk = kv_slots.shape[0]
    most = max(1, -(-nk // num_splits))
    token_bytes = 2 * layer_kv[0, 0].numel() * layer_kv.element_size()
    rows_per_gather = max(1, min(most, _GATHER_BUDGET // token_bytes))
    breaks = torch.nonzero(kv_slots.diff() != 1).flatten() + 1
    if nk and not len(breaks) and nk * token_bytes >= VIEW_MIN_BYTES:  # one long run (one request's context)
        first = int(kv_slots[0])
        for piece in range(0, nk, most):
            kv = layer_kv[:, first + piece:first + min(piece + most, nk)]
            yield slice(piece, piece + most), kv[0], kv[1]
        return
    starts = torch.cat((breaks.new_zeros(1), breaks))  # of the runs of consecutive slots
    lengths = torch.diff(starts, append=starts.new_full((1,), nk))
    long = lengths * token_bytes >= VIEW_MIN_BYTES
    for start, length, slot in zip(starts[long].tolist(), lengths[long].tolist(), kv_slots[starts[long]].tolist()):
        for piece in range(start, start + length, most):
            end = min(piece + most, start + length)
            kv = layer_kv[:, slot + piece - start:slot + end - start]
            yield slice(piece, end), kv[0], kv[1]
    if not bool(long.any()):  # every key is gathered (the common case of short contexts)
        for piece in range(0, max(nk, 1), rows_per_gather):
            k, v = _gather(layer_kv, kv_slots[piece:piece + rows_per_gather])
            yield slice(piece, piece + rows_per_gather), k, v
    elif not bool(long.all()):
        scattered = torch.nonzero((~long).repeat_interleave(lengths)).flatten()  # the keys of short runs
        for piece in range(0, len(scattered), rows_per_gather):
            keys = scattered[piece:piece + rows_per_gather]
            k, v = _gather(layer_kv, kv_slots[keys])
            yield keys, k, v


def _gather(layer_kv, slots):
    """layer_kv [2, slots, Hkv, D] at `slots` -> [2, n, Hkv, D]. A head-major pool's layer
    (`espc.backend.kvpool.pool_tensor`) is one matrix of D-wide rows, a row per (K or V, head,
    slot): gathering those rows by one index is 5-10x faster than indexing the slot dimension
    of either layout, and keeps the result head-major."""
    planes = layer_kv.transpose(1, 2)  # [2, Hkv, slots, D]
    if not planes.is_contiguous():
        return layer_kv.index_select(1, slots)
    kinds, heads, size, d = planes.shape
    rows = (torch.arange(kinds * heads, device=slots.device) * size)[:, None] + slots
    return planes.reshape(-1, d).index_select(0, rows.flatten()).view(kinds, heads, -1, d).transpose(1, 2)
