"""Tensor parallelism inside an elastic instance: sharding, lowering and gloo runs on the CPU
against the float64 single-process forward (which knows nothing of TP).

Models of odd sizes: an ffn that tp does not divide, GQA with fewer KV heads than TP ranks
(a KV head replicated on the ranks whose query heads read it) and with more. Every TP rank
of an instance answers with the instance's logits: they must be identical across the
instance's ranks (an all-reduce gives every rank the same sum) and match the reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hf_checkpoints import greedy_continuation, random_llama
from tolerances import TOLERANCES

from espc import load_spec
from espc.backend.dump import render_graph
from espc.backend.harness import Harness
from espc.backend.lower import Lowering
from espc.backend.tensor_parallel import param_shard, shard_model, tp_groups, tp_shard
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
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams
from espc.runtime.weights import load_model, model_spec_from_hf_config
from tests.kv_checks import assert_only_cache_holds_kv

# 4 query heads over 1 KV head (tp 2 replicates it), an ffn of 75 columns (split 38 / 37).
ONE_KV = ModelSpec(preset="tiny", kv_heads=1, ffn=75, weights="random:3", max_context=4096)
# 8 query heads over 4 KV heads: tp 2 splits both; 3 layers.
FOUR_KV = ModelSpec(preset="tiny", layers=3, heads=8, kv_heads=4, head_dim=8, ffn=101, weights="random:5", max_context=4096)
# The assert_close part of the table, loosened for fp32 sums reduced in another order.
TP_RTOL = 1e-4


# ------------------------------------------------------------------------------ sharding


def test_shards_partition_heads_and_ffn_and_replicate_kv_heads_below_tp():
    shards = [tp_shard(ONE_KV, 2, t) for t in range(2)]
    assert [list(s.q_heads) for s in shards] == [[0, 1], [2, 3]]
    assert [list(s.kv_heads) for s in shards] == [[0], [0]]  # 1 KV head, replicated
    assert [(s.ffn.start, s.ffn.stop) for s in shards] == [(0, 38), (38, 75)]
    shards = [tp_shard(FOUR_KV, 4, t) for t in range(4)]
    assert [list(s.kv_heads) for s in shards] == [[0], [1], [2], [3]]
    assert [list(s.q_heads) for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    spec = ModelSpec(preset="tiny", heads=8, kv_heads=2, head_dim=8)
    assert [list(tp_shard(spec, 8, t).kv_heads) for t in range(8)] == [[0]] * 4 + [[1]] * 4
    with pytest.raises(ValueError, match=r"tp\(3\) does not divide model.heads\(4\)"):
        tp_shard(ONE_KV, 3, 0)
    assert tp_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_sharded_linears_sum_to_the_whole_layer():
    """Column-parallel q/k/v/gate/up and row-parallel o/down: the shards' outputs, concatenated
    (column) or summed (row), are the whole model's, in float64."""
    whole = build_model(ONE_KV, dtype=torch.float64)
    ranks = [shard_model(build_model(ONE_KV, dtype=torch.float64), 2, t) for t in range(2)]
    x = torch.randn(5, ONE_KV.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = whole.layers[1]
    gate_up = torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    torch.testing.assert_close(sum(r.layers[1].mlp(x) for r in ranks), layer.mlp(x))
    torch.testing.assert_close(torch.cat([r.layers[1].mlp.up_proj(x) for r in ranks], 1), layer.mlp.up_proj(x))
    assert gate_up.shape == (5, 75)
    o_in = torch.randn(5, ONE_KV.heads * ONE_KV.head_dim, dtype=torch.float64)
    halves = o_in.chunk(2, dim=1)
    torch.testing.assert_close(sum(r.layers[1].self_attn.o_proj(h) for r, h in zip(ranks, halves)), layer.self_attn.o_proj(o_in))
    for r in ranks:  # the one KV head, whole on both ranks
        torch.testing.assert_close(r.layers[1].self_attn.k_proj(x), layer.self_attn.k_proj(x))
        assert (r.layers[1].self_attn.heads, r.layers[1].self_attn.kv_heads) == (2, 1)
    assert param_shard(ONE_KV, tp_shard(ONE_KV, 2, 1), "layers.0.input_layernorm.weight") is None


def test_lowering_refuses_a_model_that_is_not_sharded():
    with pytest.raises(ValueError, match=r"has 4 of the 4 query heads, not 4 / 2; shard it first"):
        Lowering(build_model(ONE_KV, device="meta"), tp=2)


def test_tp_graph_all_reduces_after_o_proj_and_mlp():
    lowering = Lowering(shard_model(build_model(FOUR_KV, device="meta"), 2, 0), tp=2)
    items = (PrefillItem(1, 0, 9, even_retention(0, 9, (0, 1))),)
    program = lowering.lower(IterationPlan(0, (PrefillBatch((0, 1), items),)))
    names = [node.name for node in program.graph(0).graph.nodes if node.target is torch.ops.espc.tp_all_reduce.default]
    assert names == [f"{part}_out{layer}_all_reduce" for layer in range(3) for part in ("attn", "mlp")]
    assert program.peer_ranks(0, 1) == {"ring_next": 3, "ring_prev": 3}  # TP rank 1 of instance 1


# ------------------------------------------------------------------------------ gloo runs


@functools.cache
def _reference(spec: ModelSpec):
    return build_model(spec, dtype=torch.float64)


def check_logits(spec: ModelSpec, results, sequences: dict[int, torch.Tensor], tp: int) -> None:
    """Every TP rank of the one instance answering a request gives the same row, which
    matches the float64 forward of the request's whole sequence."""
    tolerance = TOLERANCES[torch.float32]
    answers: dict[int, dict[int, torch.Tensor]] = {}
    for result in results:
        for request, row in result.logits.items():
            answers.setdefault(request, {})[result.rank] = row
    assert answers.keys() == sequences.keys()
    for request, rows in answers.items():
        instances = {rank // tp for rank in rows}
        assert len(rows) == tp and len(instances) == 1, f"request {request}: answered by ranks {sorted(rows)}"
        first, *others = rows.values()
        for row in others:
            assert torch.equal(row, first), f"request {request}: TP ranks {sorted(rows)} disagree"
        with torch.inference_mode():
            expected = _reference(spec)(sequences[request])[-1]
        error = ((first.double() - expected).abs().max() / expected.abs().max()).item()
        assert error <= TP_RTOL, f"request {request}: max relative error {error:.2e}"
        torch.testing.assert_close(first.double(), expected, rtol=TP_RTOL, atol=tolerance["atol"] * len(results))


class Session:
    """Requests' sequences and what each instance holds, across iterations of a harness."""

    def __init__(self, harness: Harness, spec: ModelSpec, seed: int):
        self.harness, self.spec, self.tp = harness, spec, harness.tp
        self.generator = torch.Generator().manual_seed(seed)
        self.sequences: dict[int, torch.Tensor] = {}
        self.held: dict[int, dict] = {}
        self.iteration = 0

    def run(self, batches=(), migrations=(), frees=(), tokens=None, new=None):
        plan = IterationPlan(self.iteration, tuple(batches), tuple(migrations), tuple(frees))
        self.iteration += 1
        results = self.harness.run(plan, tokens or {})
        for result in results:  # the TP ranks of an instance keep the same table
            assert result.held == results[result.rank - result.rank % self.tp].held
        self.held = {result.rank // self.tp: result.held for result in results}
        for request, chunk in (tokens or {}).items():
            self.sequences[request] = torch.cat((self.sequences.get(request, chunk[:0]), chunk))
        check_logits(self.spec, results, {r: self.sequences[r] for r in (new or tokens or {})}, self.tp)
        return results

    def prefill(self, ring, lengths: dict[int, int], keep_on=None):
        chunks = {r: torch.randint(0, self.spec.vocab, (n,), generator=self.generator) for r, n in lengths.items()}
        items = tuple(PrefillItem(r, 0, n, even_retention(0, n, keep_on or ring)) for r, n in lengths.items())
        return self.run([PrefillBatch(tuple(ring), items)], tokens=chunks)

    def decode(self, instances, masters: dict[int, int], migrations=()):
        new = {r: torch.randint(0, self.spec.vocab, (1,), generator=self.generator) for r in masters}
        items = tuple(
            DecodeItem(r, m, tuple((i, sum(map(len, self.held[i].get(r, ())))) for i in instances))
            for r, m in masters.items()
        )
        return self.run([DecodeBatch(tuple(instances), items)], migrations, tokens=new)

    def free_all(self) -> None:
        self.run(frees=sorted(self.sequences))
        assert all(not held for held in self.held.values()), self.held
        self.sequences.clear()


def test_one_instance_of_tp2_prefill_and_decode_with_a_replicated_kv_head():
    """2 ranks, one instance, 1 KV head for 2 TP ranks: prefill of odd lengths, then decode."""
    with Harness(ONE_KV, 2, tp=2, slots=2048, timeout=60) as harness:
        session = Session(harness, ONE_KV, seed=1)
        session.prefill((0,), {1: 37, 2: 1, 3: 200})
        for _ in range(2):
            results = session.decode((0,), {1: 0, 2: 0, 3: 0})
            assert all(r.counters["tp"]["calls"] == 2 * ONE_KV.layers for r in results)
        session.free_all()


def test_two_instances_of_tp2_ring_prefill_multi_master_decode_and_migration():
    """4 ranks = 2 instances × tp 2 (4 KV heads split): ring prefill at DoP 2 retained on one
    instance and on both, multi-master decode across the instances, a migration beside a
    decode; TP rank t talks to TP rank t of the other instance only."""
    with Harness(FOUR_KV, 4, tp=2, slots=4096, timeout=90) as harness:
        session = Session(harness, FOUR_KV, seed=2)
        results = session.prefill((1, 0), {1: 301, 2: 4})
        ring = [r.counters["ring"]["bytes_sent"] for r in results]
        kv_token = FOUR_KV.layers * 2 * 2 * FOUR_KV.head_dim * 4  # 2 of the 4 KV heads per rank, fp32
        assert sum(ring) == 2 * 305 * kv_token  # each TP slice passes every block once
        session.prefill((0, 1), {3: 77}, keep_on=(1,))
        assert session.held[0].get(3) is None and session.held[1][3] == (TokenRange(0, 77),)
        session.decode((0, 1), {1: 0, 2: 1, 3: 0})  # request 3: master 0 holds none of its KV
        # Request 1 (instance 1 holds [0, 151)) moves [100, 151) to instance 0 beside a decode.
        results = session.decode((0, 1), {2: 0}, migrations=[Migration(1, 1, 0, TokenRange(100, 151))])
        assert [r.counters["migration"]["bytes_sent"] for r in results] == [0, 0, 51 * kv_token, 51 * kv_token]
        assert session.held[1][1] == (TokenRange(0, 100),)
        session.decode((0, 1), {1: 1, 3: 1})
        session.free_all()


def test_four_instances_of_tp2_like_loongserve():
    """8 ranks = 4 instances × tp 2 (LoongServe's SP·TP layout at tiny scale), 1 KV head
    replicated: a DoP-4 ring prefill, scale-down by retention, then a DoP-3 decode."""
    with Harness(ONE_KV, 8, tp=2, slots=2048, timeout=120) as harness:
        session = Session(harness, ONE_KV, seed=4)
        session.prefill((3, 2, 1, 0), {1: 203, 2: 9}, keep_on=(0, 2))
        session.decode((0, 2, 3), {1: 3, 2: 0})
        session.free_all()


# ------------------------------------------------------------------------------ the engine

TP2_SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu-tp2.toml"
NEW_TOKENS = 5


@pytest.mark.parametrize(
    "how",
    [
        {"strategy": "static-sp", "configuration": "tp=2, groups=1+1"},
        {"strategy": "static-sp", "configuration": "tp=2, groups=2"},
        {"strategy": "disaggregated", "configuration": "tp=2, 1P+1D"},
        {"strategy": "elastic"},
    ],
    ids=["dop1", "dop2", "disaggregated", "elastic"],
)
def test_engine_on_tiny_cpu_tp2_generates_the_float64_greedy_tokens(how):
    """specs/tiny-cpu-tp2.toml end to end: 4 worker processes, 2 instances of tp 2; greedy
    tokens and every step's logits equal the float64 forward's."""
    spec = load_spec(TP2_SPEC)
    prompts = [list(range(3, 3 + n)) for n in (7, 33, 61)]
    with Engine(spec, kv_capacity=2048, **how) as engine:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS, return_logits=True)) for p in prompts]
        completions = [handle.result(timeout=120) for handle in handles]
        engine.check_kv()
        stats = engine.stats()
    assert_only_cache_holds_kv(stats)  # per instance: 2 of them, 4 worker processes
    if how.get("strategy") == "disaggregated":  # prefill on one instance, KV migrated to the other
        assert stats["migrated_tokens"] > 0
    reference = _reference(spec.model)
    for prompt, completion in zip(prompts, completions):
        assert completion.finish_reason == "length", completion.error
        with torch.no_grad():
            expected = reference(torch.tensor(prompt + completion.token_ids[:-1]))[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(completion.logits).double(), expected, rtol=TP_RTOL, atol=TP_RTOL)
        assert completion.token_ids == expected.argmax(-1).tolist()


def test_sharded_hugging_face_checkpoint_generates_what_transformers_generates(tmp_path):
    """A random GQA checkpoint with 1 KV head (replicated on both TP ranks) and an odd ffn,
    each rank reading only its slices of the safetensors file: espc at tp 2 and DoP 2
    generates transformers' greedy tokens."""
    config, hf = random_llama(tmp_path, intermediate_size=81, kv_heads=1, seed=2)
    spec = load_spec(TP2_SPEC)
    model = ModelSpec(**model_spec_from_hf_config(config.to_dict(), weights=str(tmp_path), dtype="float32"))
    shard = load_model(model, tp=2, tp_rank=1)  # rank 1's slices, straight from the file
    whole = hf.model.layers[0]
    assert torch.equal(shard.layers[0].self_attn.q_proj.weight, whole.self_attn.q_proj.weight[24:])
    assert torch.equal(shard.layers[0].self_attn.k_proj.weight, whole.self_attn.k_proj.weight)
    assert torch.equal(shard.layers[0].mlp.down_proj.weight, whole.mlp.down_proj.weight[:, 40:])
    prompts = [list(range(5, 5 + n)) for n in (9, 21)]
    checkpoint_spec = spec.model_copy(update={"model": model})
    with Engine(checkpoint_spec, strategy="static-sp", configuration="tp=2, groups=2", kv_capacity=1024) as engine:
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), timeout=120)
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == greedy_continuation(hf, prompt, NEW_TOKENS)


def test_espc_graph_of_loongserves_layout_shows_tp_all_reduces_inside_the_ring_prefill():
    """specs/tiny-cpu-tp2x4.toml (4 instances × tp 2, lwm7b-a800x8's shape): each layer of a
    DoP-4 ring prefill passes KV blocks of the rank's 2 KV heads and all-reduces o_proj and
    the MLP over the instance's TP group."""
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu-tp2x4.toml")
    assert spec.cluster.tp == 2 and spec.cluster.num_devices == 8
    text = render_graph(spec, "prefill", 4, rank=1)
    for layer in range(spec.model.layers):
        assert f"attn_out{layer}_all_reduce" in text and f"mlp_out{layer}_all_reduce" in text
        assert f"ring{layer}_2_start" in text  # d - 1 = 3 ring exchanges per layer
    assert "[2, -1, 2, 16]" in text  # a KV block of 2 of the 4 KV heads
