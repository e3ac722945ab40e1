"""Attention kernels (torch reference and Triton under the interpreter) against a float64 oracle.

The oracle below is a naive full softmax over the masked score matrix in float64; it shares no
code with `espc.backend.kernels`. Triton cases are few and small (the interpreter is slow);
the torch reference gets a wider grid.
"""

import itertools
import math

import pytest
import torch
from tolerances import TOLERANCES

from espc.backend.kernels import attn_decode_partial, attn_merge, attn_paged, attn_partial, reference

IMPLS = ["torch", "triton"]


def oracle(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale):
    """float64 (o, lse) by full softmax; rows that see nothing -> o = 0, lse = -inf."""
    hq, hkv = q.shape[1], k.shape[1]
    k64 = k.double().repeat_interleave(hq // hkv, dim=1)
    v64 = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k64) * scale
    visible = q_seq[:, None] == k_seq[None, :]
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, Nq]; -inf where nothing is visible
    p = torch.where(visible, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    o = torch.einsum("hqk,khd->qhd", p, v64)
    return o, lse.T


def make_inputs(nq, nk, hq, hkv, d, layout, dtype, seed=0):
    """Random q/k/v plus positions and sequence ids for one of three layouts.

    contig:  one request, keys 0..nk-1, queries are the last nq positions of [0, max(nq, nk)).
    striped: ring of 3 instances, queries on instance 1 (pos 3j+1), keys on instance 2 (3j+2);
             under causal the first query sees no key.
    striped_before: the same ring, keys from instance 0 (pos 3j), before the queries' stripe:
             under causal query j sees keys 0..j (plain causal once sorted).
    packed:  several requests in one call, ids unsorted on the key side; request 3 has keys
             but no queries, and a query request may have no keys (fully masked rows).
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, hq, d, generator=g).to(dtype)
    k = torch.randn(nk, hkv, d, generator=g).to(dtype)
    v = torch.randn(nk, hkv, d, generator=g).to(dtype)
    if layout == "contig":
        total = max(nq, nk)
        q_pos, k_pos = torch.arange(total - nq, total), torch.arange(nk)
        q_seq, k_seq = torch.zeros(nq, dtype=torch.long), torch.zeros(nk, dtype=torch.long)
    elif layout == "striped":
        q_pos, k_pos = torch.arange(nq) * 3 + 1, torch.arange(nk) * 3 + 2
        q_seq, k_seq = torch.zeros(nq, dtype=torch.long), torch.zeros(nk, dtype=torch.long)
    elif layout == "striped_before":
        q_pos, k_pos = torch.arange(nq) * 3 + 1, torch.arange(nk) * 3
        q_seq, k_seq = torch.zeros(nq, dtype=torch.long), torch.zeros(nk, dtype=torch.long)
    elif layout == "packed":
        q_seq = torch.randint(0, 3, (nq,), generator=g).sort().values
        k_seq = torch.randint(0, 4, (nk,), generator=g)
        q_pos = torch.randint(0, 2 * max(nk, 1), (nq,), generator=g)
        k_pos = torch.randint(0, 2 * max(nk, 1), (nk,), generator=g)
    else:
        raise AssertionError(layout)
    return q, k, v, q_pos, k_pos, q_seq, k_seq


def check(actual, expected, dtype):
    o, lse = actual
    o_ref, lse_ref = expected
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o.double(), o_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(lse.double(), lse_ref, **TOLERANCES[dtype])
    assert (o[torch.isneginf(lse)] == 0).all()


# (nq, nk, hq, hkv, d, causal, layout, dtype): small enough for the interpreter, yet covering odd
# sizes, head dims 16/80, GQA 4:2, 4:4, 8:1, all layouts and all dtypes.
CASES = [
    (1, 1, 4, 2, 16, False, "contig", torch.float32),
    (7, 37, 4, 4, 80, True, "contig", torch.float32),
    (37, 7, 8, 1, 16, True, "striped", torch.float32),
    (100, 100, 4, 2, 80, True, "striped", torch.float32),
    (37, 100, 4, 2, 16, False, "packed", torch.float32),
    (100, 37, 8, 1, 80, True, "packed", torch.float32),
    (7, 100, 4, 2, 80, True, "contig", torch.float16),
    (37, 37, 4, 2, 16, False, "striped", torch.float16),
    (100, 7, 8, 1, 16, True, "packed", torch.bfloat16),
    (37, 100, 4, 4, 80, True, "contig", torch.bfloat16),
    (1, 37, 8, 1, 80, False, "striped", torch.bfloat16),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_partial_matches_float64(impl, case):
    nq, nk, hq, hkv, d, causal, layout, dtype = case
    args = make_inputs(nq, nk, hq, hkv, d, layout, dtype)
    scale = 1 / math.sqrt(d)
    check(attn_partial(*args, causal=causal, scale=scale, impl=impl), oracle(*args, causal, scale), dtype)


# The torch reference is cheap: every (Nq, Nk) pair in {1, 7, 37, 100}^2 for every layout and
# mask, cycling heads, head dim and dtype through the combinations.
_SIZES = [1, 7, 37, 100]
_HEADS = [(4, 2), (4, 4), (8, 1)]
TORCH_GRID = [
    (nq, nk, *_HEADS[i % 3], (16, 80)[i % 2], causal, layout, (torch.float32, torch.float16, torch.bfloat16)[i % 3])
    for i, (nq, nk, layout, causal) in enumerate(
        itertools.product(_SIZES, _SIZES, ["contig", "striped", "striped_before", "packed"], [False, True])
    )
]


@pytest.mark.parametrize("case", TORCH_GRID, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_torch_grid_matches_float64(case):
    nq, nk, hq, hkv, d, causal, layout, dtype = case
    args = make_inputs(nq, nk, hq, hkv, d, layout, dtype, seed=nq * 1000 + nk)
    check(attn_partial(*args, causal=causal, scale=0.3, impl="torch"), oracle(*args, causal, 0.3), dtype)


def test_torch_reference_processes_queries_in_blocks(monkeypatch):
    """With a tiny score budget the reference loops over many query blocks; results are unchanged."""
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 4 * 300 * 7)  # 7 queries per block
    args = make_inputs(333, 300, 4, 2, 16, "contig", torch.float32)
    check(attn_partial(*args, causal=True, scale=0.25), oracle(*args, True, 0.25), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_kv_shard(impl, dtype):
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(7, 0, 4, 2, 80, "contig", dtype)
    o, lse = attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=True, scale=0.1, impl=impl)
    assert o.shape == (7, 4, 80) and lse.shape == (7, 4)
    assert (o == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows(impl):
    """Disjoint sequence ids: nothing is visible, so every row is o = 0, lse = -inf."""
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(7, 37, 4, 2, 16, "contig", torch.float32)
    o, lse = attn_partial(q, k, v, q_pos, k_pos, q_seq, k_seq + 1, causal=False, scale=0.1, impl=impl)
    assert (o == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_queries(impl):
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(0, 37, 4, 2, 80, "contig", torch.float16)
    for fn in (attn_partial, attn_decode_partial):
        o, lse = fn(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=True, scale=0.1, impl=impl)
        assert o.shape == (0, 4, 80) and lse.shape == (0, 4) and o.dtype == lse.dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views(impl):
    """q/k/v as views into fused projections (non-contiguous heads and tokens)."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(37, 4 + 2 + 2, 16, generator=g)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    pos, seq = torch.arange(37), torch.zeros(37, dtype=torch.long)
    args = (q, k, v, pos, pos, seq, seq)
    check(attn_partial(*args, causal=True, scale=0.25, impl=impl), oracle(*args, True, 0.25), torch.float32)


def _split_partials(args, bounds, causal, scale, impl):
    q, k, v, q_pos, k_pos, q_seq, k_seq = args
    parts = [
        attn_partial(q, k[a:b], v[a:b], q_pos, k_pos[a:b], q_seq, k_seq[a:b], causal=causal, scale=scale, impl=impl)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "layout,bounds",
    [("striped", [0, 0, 13, 13, 37, 37]), ("packed", [0, 5, 6, 37]), ("contig", [0, 37])],
    ids=["with-empty-parts", "uneven", "single"],
)
def test_merge_of_kv_splits_equals_unsplit(impl, layout, bounds):
    args = make_inputs(7, 37, 8, 1, 80, layout, torch.float32, seed=3)
    o_parts, lse_parts = _split_partials(args, bounds, True, 0.2, impl)
    check(attn_merge(o_parts, lse_parts, impl=impl), oracle(*args, True, 0.2), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_single_part_is_identity(impl):
    g = torch.Generator().manual_seed(2)
    o_parts, lse_parts = torch.randn(1, 7, 4, 80, generator=g), torch.randn(1, 7, 4, generator=g)
    lse_parts[0, 3, 1] = float("-inf")
    o_parts[0, 3, 1] = 0
    o, lse = attn_merge(o_parts, lse_parts, impl=impl)
    assert torch.equal(o, o_parts[0]) and torch.equal(lse, lse_parts[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_ignores_empty_parts_and_all_empty(impl):
    """A part with lse = -inf contributes nothing, whatever its o holds; all-empty -> 0 / -inf."""
    g = torch.Generator().manual_seed(4)
    o_parts, lse_parts = torch.randn(3, 5, 2, 16, generator=g), torch.randn(3, 5, 2, generator=g)
    lse_parts[1] = float("-inf")
    o_parts[1] = float("nan")
    lse_parts[:, 4] = float("-inf")  # query 4: every part empty
    o, lse = attn_merge(o_parts, lse_parts, impl=impl)
    keep = [0, 2]
    o_exp, lse_exp = attn_merge(o_parts[keep], lse_parts[keep], impl="torch")
    torch.testing.assert_close(o[:4], o_exp[:4], **TOLERANCES[torch.float32])
    torch.testing.assert_close(lse[:4], lse_exp[:4], **TOLERANCES[torch.float32])
    assert (o[4] == 0).all() and torch.isneginf(lse[4]).all() and not o.isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "nq,hq,hkv,d,dtype,splits",
    [
        (1, 8, 1, 80, torch.float32, 7),
        (2, 4, 2, 16, torch.float32, None),
        (3, 4, 4, 80, torch.bfloat16, 3),
        (4, 8, 1, 16, torch.float16, 1),
        (4, 4, 2, 80, torch.float32, 19),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_decode_split_kv_matches_float64(impl, nq, hq, hkv, d, dtype, splits):
    """Decode: each request's newest token(s) over 300 cached keys of two packed requests."""
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(nq, hq, d, generator=g).to(dtype)
    k, v = (torch.randn(300, hkv, d, generator=g).to(dtype) for _ in range(2))
    k_seq = (torch.arange(300) >= 180).long()  # request 0: 180 keys, request 1: 120 keys
    k_pos = torch.where(k_seq == 0, torch.arange(300), torch.arange(300) - 180)
    q_seq = torch.arange(nq) % 2
    q_pos = torch.where(q_seq == 0, 179, 119) - torch.arange(nq) // 2
    args = (q, k, v, q_pos, k_pos, q_seq, k_seq)
    out = attn_decode_partial(*args, causal=True, scale=d**-0.5, impl=impl, num_splits=splits)
    check(out, oracle(*args, True, d**-0.5), dtype)


def test_unknown_impl_is_a_clear_error():
    args = make_inputs(1, 1, 1, 1, 16, "contig", torch.float32)
    with pytest.raises(ValueError, match="unknown attention impl 'cuda'"):
        attn_partial(*args, causal=False, scale=1.0, impl="cuda")
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn_merge(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1), impl="flash")


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_clear_errors(impl):
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(3, 5, 4, 2, 16, "contig", torch.float32)
    bad = [
        ((q, k, v[:, :1], q_pos, k_pos, q_seq, k_seq), "k and v shapes differ"),
        ((q[:, :3], k, v, q_pos, k_pos, q_seq, k_seq), "multiple of kv heads"),
        ((q, k.half(), v.half(), q_pos, k_pos, q_seq, k_seq), "dtypes differ"),
        ((q, k, v, q_pos.int(), k_pos, q_seq, k_seq), "q_pos must be int64"),
        ((q, k, v, q_pos, k_pos, q_seq, k_seq[:4]), r"k_seq must be int64 of shape \(5,\)"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            attn_partial(*args, causal=True, scale=1.0, impl=impl)
    with pytest.raises(ValueError, match="must be float32"):
        attn_merge(torch.zeros(2, 3, 4, 16).half(), torch.zeros(2, 3, 4), impl=impl)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        attn_decode_partial(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=True, scale=1.0, impl=impl, num_splits=0)



def in_pool(k, v, layers=3, layer=1, spare=23, seed=0):
    """A pool [layers, 2, slots, Hkv, D] holding k/v of layer `layer` at scattered slots in
    random order (pages of no request are contiguous here); every other slot and layer is NaN,
    so a read outside the given slots poisons the result. Returns (pool, slots)."""
    nk, hkv, d = k.shape
    slots = torch.randperm(nk + spare, generator=torch.Generator().manual_seed(seed))[:nk]
    pool = torch.full((layers, 2, nk + spare, hkv, d), float("nan"), dtype=k.dtype)
    pool[layer, 0, slots], pool[layer, 1, slots] = k, v
    return pool, slots


# (nq, nk, hq, hkv, d, causal, layout, dtype, splits): decode-like (few queries, packed
# requests) and prefix-like (many queries) reads, odd sizes, GQA, more splits than keys.
PAGED_CASES = [
    (1, 37, 8, 1, 80, True, "contig", torch.float32, None),
    (3, 100, 4, 2, 16, True, "packed", torch.float32, 3),
    (7, 61, 4, 4, 80, False, "striped", torch.float32, 1),
    (37, 37, 4, 2, 16, True, "striped_before", torch.bfloat16, 2),
    (2, 7, 8, 1, 16, True, "contig", torch.float16, 19),
    (5, 100, 4, 2, 80, True, "packed", torch.bfloat16, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_paged_matches_float64(impl, case):
    """attn_paged reads K/V in place at permuted slots of one layer of a pool and gives
    attn_partial's result over those keys."""
    nq, nk, hq, hkv, d, causal, layout, dtype, splits = case
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(nq, nk, hq, hkv, d, layout, dtype, seed=nk)
    pool, slots = in_pool(k, v)
    scale = 1 / math.sqrt(d)
    out = attn_paged(q, pool, 1, slots, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=scale, impl=impl, num_splits=splits)
    check(out, oracle(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, scale), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_empty_shard(impl):
    """No slots (a shard of 0 tokens): o = 0, lse = -inf, and nothing of the pool is read."""
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(3, 0, 4, 2, 16, "contig", torch.float32)
    pool = torch.full((2, 2, 9, 2, 16), float("nan"))
    o, lse = attn_paged(q, pool, 0, torch.empty(0, dtype=torch.long), q_pos, k_pos, q_seq, k_seq, causal=True, scale=0.2, impl=impl)
    assert o.shape == (3, 4, 16) and (o == 0).all() and torch.isneginf(lse).all()


def test_torch_paged_reads_a_long_context_in_bounded_chunks(monkeypatch):
    """With a gather budget of 7 keys' K and V, the reference reads 300 keys in 43 chunks
    (one index_select each, none larger than the budget) and merges them to the same result."""
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(2, 300, 4, 2, 16, "packed", torch.float32, seed=5)
    pool, slots = in_pool(k, v)
    monkeypatch.setattr(reference, "_GATHER_BUDGET", 7 * 2 * 2 * 16 * 4)
    gathered = []
    index_select = torch.Tensor.index_select

    def counted(self, dim, index):
        gathered.append(index.numel())
        return index_select(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", counted)
    out = attn_paged(q, pool, 1, slots, q_pos, k_pos, q_seq, k_seq, causal=True, scale=0.25, impl="torch")
    monkeypatch.undo()
    assert len(gathered) == 43 and max(gathered) == 7 and sum(gathered) == 300
    check(out, oracle(q, k, v, q_pos, k_pos, q_seq, k_seq, True, 0.25), torch.float32)


RUN = 24  # keys per run of consecutive slots in `in_runs`


def in_runs(k, v, head_major: bool, layers=3, layer=1, seed=0):
    """Like `in_pool`, but as a long request's KV lies: its first RUN keys in one run of
    consecutive slots (a prefill's pages), then keys scattered one by one (decode pages
    interleaved with other requests'), then a second run, and nothing in between; laid out
    slot-major or head-major (as `pool_tensor` lays it out). Returns (pool, slots)."""
    nk, hkv, d = k.shape
    assert nk > 2 * RUN
    first = torch.arange(2, 2 + RUN)
    region = 2 + RUN + 1  # past a gap: no single joins the first run
    picks = torch.randperm(3 * nk, generator=torch.Generator().manual_seed(seed))[:nk - 2 * RUN]
    singles = region + 2 * picks  # two apart: no two singles are consecutive
    second = torch.arange(region + 6 * nk + 1, region + 6 * nk + 1 + RUN)
    slots = torch.cat((first, singles, second))
    size = int(second[-1]) + 3
    if head_major:
        pool = torch.full((layers, 2, hkv, size, d), float("nan"), dtype=k.dtype).transpose(2, 3)
    else:
        pool = torch.full((layers, 2, size, hkv, d), float("nan"), dtype=k.dtype)
    pool[layer, 0, slots], pool[layer, 1, slots] = k, v
    return pool, slots


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_major", [False, True], ids=["slot-major", "head-major"])
@pytest.mark.parametrize("nq,causal,layout,dtype,splits", [
    (1, True, "contig", torch.float32, None),  # a decode step: every key visible
    (3, True, "packed", torch.bfloat16, 3),  # requests mixed within the runs
    (2, True, "by_run", torch.float32, None),  # two requests' decode steps, one per run
    (40, True, "contig", torch.float32, 2),  # a chunk: causal among its own keys
    (5, False, "striped", torch.float16, None),
], ids=str)
def test_paged_reads_runs_in_place(monkeypatch, impl, head_major, nq, causal, layout, dtype, splits):
    """Keys in runs of consecutive slots around scattered ones (`in_runs`), GQA 8:2, odd
    count, in either pool layout: the same result as attn_partial over those keys; the torch
    reference, taking a run of RUN keys as long enough to read in place, gathers only the
    scattered keys."""
    nk = 2 * RUN + 37
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(nq, nk, 8, 2, 16, "contig" if layout == "by_run" else layout, dtype, seed=nq)
    if layout == "by_run":  # request 0 holds the first run and the singles, request 1 the second run
        q_seq, q_pos = torch.tensor([0, 1]), torch.tensor([nk - RUN, RUN])
        k_seq = torch.cat((torch.zeros(nk - RUN, dtype=torch.long), torch.ones(RUN, dtype=torch.long)))
        k_pos = torch.cat((torch.arange(nk - RUN), torch.arange(RUN)))
    pool, slots = in_runs(k, v, head_major)
    monkeypatch.setattr(reference, "VIEW_MIN_BYTES", RUN * 2 * 2 * 16 * k.element_size())
    gathered = []
    gather = reference._gather

    def counted(layer_kv, keys):
        gathered.append(keys.numel())
        return gather(layer_kv, keys)

    monkeypatch.setattr(reference, "_gather", counted)
    out = attn_paged(q, pool, 1, slots, q_pos, k_pos, q_seq, k_seq, causal=causal, scale=0.25, impl=impl, num_splits=splits)
    check(out, oracle(q, k, v, q_pos, k_pos, q_seq, k_seq, causal, 0.25), dtype)
    if impl == "torch":
        assert sum(gathered) == nk - 2 * RUN


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("head_major", [False, True], ids=["slot-major", "head-major"])
def test_torch_paged_reads_one_run_in_place(monkeypatch, splits, head_major):
    """One request's whole context in one run of slots (a decode step after its prefill):
    read in place, in `splits` pieces, nothing gathered, the same result."""
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(1, 53, 8, 2, 16, "contig", torch.float32, seed=3)
    shape = (3, 2, 2, 70, 16) if head_major else (3, 2, 70, 2, 16)
    pool = torch.full(shape, float("nan"))
    pool = pool.transpose(2, 3) if head_major else pool
    slots = torch.arange(9, 9 + 53)
    pool[1, 0, slots], pool[1, 1, slots] = k, v
    monkeypatch.setattr(reference, "VIEW_MIN_BYTES", 1)
    monkeypatch.setattr(reference, "_gather", lambda *_: pytest.fail("gathered a run it could read in place"))
    out = attn_paged(q, pool, 1, slots, q_pos, k_pos, q_seq, k_seq, causal=True, scale=0.25, impl="torch", num_splits=splits)
    check(out, oracle(q, k, v, q_pos, k_pos, q_seq, k_seq, True, 0.25), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_bad_arguments_are_clear_errors(impl):
    q, k, v, q_pos, k_pos, q_seq, k_seq = make_inputs(3, 5, 4, 2, 16, "contig", torch.float32)
    pool, slots = in_pool(k, v, layers=2, spare=3)
    bad = [
        ((q, pool[0], 0, slots), r"pool must be \[layers, 2, slots, kv_heads, head_dim\], got \(2, 8, 2, 16\)"),
        ((q, pool, 2, slots), "layer 2 is outside the pool's 2 layers"),
        ((q, pool, 1, slots.int()), "kv_slots must be int64"),
        ((q, pool, 1, slots + 3), r"kv_slots span \[\d+, \d+\], outside the pool's 8 slots"),
        ((q.half(), pool, 1, slots), "q dtype torch.float16 differs from the pool's torch.float32"),
        ((q[:, :3], pool, 1, slots), "multiple of kv heads"),
        ((q, pool, 1, slots[:4]), r"k_pos must be int64 of shape \(4,\)"),
    ]
    for (q_, pool_, layer, slots_), message in bad:
        with pytest.raises(ValueError, match=message):
            attn_paged(q_, pool_, layer, slots_, q_pos, k_pos, q_seq, k_seq, causal=True, scale=1.0, impl=impl)
    with pytest.raises(ValueError, match="attn_paged: num_splits must be >= 1"):
        attn_paged(q, pool, 1, slots, q_pos, k_pos, q_seq, k_seq, causal=True, scale=1.0, impl=impl, num_splits=0)
