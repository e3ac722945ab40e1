"""Plan -> per-rank FX lowering in one process: numerics of single-instance graphs against the
float64 forward, graph shape independence and the cache, graph inputs of the striped layout,
clear errors, dumps and `espc graph`. Multi-rank execution is in test_backend_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tolerances import TOLERANCES
from typer.testing import CliRunner

from espc.backend import ops
from espc.backend.dump import representative_plan
from espc.backend.kvpool import PagedKVTable, pool_tensor
from espc.backend.lower import Lowering, Role
from espc.cli.main import app
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model, rope_frequencies
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PlanError,
    PrefillBatch,
    PrefillItem,
    Retention,
    TokenRange,
    even_retention,
)

TINY = ModelSpec(preset="tiny")
SPECS = Path(__file__).parent.parent / "specs"
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


@pytest.fixture(scope="module")
def reference():
    return build_model(TINY, dtype=torch.float64)


def kv_pool(tokens: int) -> tuple[PagedKVTable, torch.Tensor]:
    """One rank's table for `tokens` tokens of up to 4 requests, and its pool tensor."""
    table = PagedKVTable(tokens, page_size=16, max_requests=4)
    return table, pool_tensor(TINY, table.num_slots, torch.float32)


def prefill_plan(ring, lengths: dict[int, int], keep_on=None, iteration=0) -> IterationPlan:
    items = tuple(PrefillItem(r, 0, n, even_retention(0, n, keep_on or ring)) for r, n in lengths.items())
    return IterationPlan(iteration, (PrefillBatch(tuple(ring), items),))


def assert_matches(row: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCES[torch.float32]
    assert ((row.double() - expected).abs().max() / expected.abs().max()).item() <= tolerance["rtol"]
    torch.testing.assert_close(row.double(), expected, **tolerance)


def test_single_instance_prefill_then_decode_matches_reference(model, reference):
    lowering = Lowering(model)
    table, pool = kv_pool(512)
    generator = torch.Generator().manual_seed(0)
    sequences = {r: torch.randint(0, 256, (n,), generator=generator) for r, n in {1: 1, 2: 37, 3: 300}.items()}
    with torch.inference_mode():
        program = lowering.lower(prefill_plan((0,), {r: len(s) for r, s in sequences.items()}))
        logits = program.run(0, pool, table, sequences)
        for request, sequence in sequences.items():
            assert_matches(logits[request], reference(sequence)[-1])
        for step in range(2):
            new = {r: torch.randint(0, 256, (1,), generator=generator) for r in sequences}
            items = tuple(DecodeItem(r, 0, ((0, len(s)),)) for r, s in sequences.items())
            program = lowering.lower(IterationPlan(1 + step, (DecodeBatch((0,), items),)))
            logits = program.run(0, pool, table, new)
            for request in sequences:
                sequences[request] = torch.cat((sequences[request], new[request]))
                assert_matches(logits[request], reference(sequences[request])[-1])
    assert table.held() == {r: (TokenRange(0, len(s)),) for r, s in sequences.items()}


def test_graph_structure_depends_only_on_the_plan_shape(model):
    lowering = Lowering(model)
    first = lowering.lower(prefill_plan((0, 1, 2), {1: 1000, 2: 37}))
    assert (lowering.cache.misses, lowering.cache.hits) == (1, 0)  # one graph for the whole ring
    # Other lengths, another number of requests, other instances, another retention: same shape.
    second = lowering.lower(prefill_plan((5, 3, 4), {7: 5, 8: 9001, 9: 1}, keep_on=(3,)))
    assert (lowering.cache.misses, lowering.cache.hits) == (1, 1)
    assert {second.graph(rank) for rank in (5, 3, 4)} == {first.graph(0)}
    assert len(lowering.cache.verified) == 2  # other peers: the comm proof ran again
    lowering.lower(prefill_plan((5, 3, 4), {10: 77}))
    assert len(lowering.cache.verified) == 2 and lowering.cache.hit_rate == pytest.approx(2 / 3)


def test_warm_up_builds_every_shape_a_plan_without_migrations_uses(model):
    lowering = Lowering(model)
    assert lowering.warm_up(3) == 9  # per DoP: prefill fresh and continuing a prefix, decode
    assert lowering.warm_up(3) == 0
    misses = lowering.cache.misses
    decode = DecodeBatch((4, 6), (DecodeItem(1, 4, {4: 10, 6: 7}), DecodeItem(2, 6, {6: 3})))
    continued = PrefillBatch((5, 2, 1), (PrefillItem(3, 32, 40, even_retention(32, 40, (5, 2, 1))),))
    lowering.lower(IterationPlan(0, (decode, continued)))
    assert lowering.cache.misses == misses  # built at warm-up, whatever the instances
    lowering.lower(prefill_plan((0, 1, 2, 3), {1: 8}))
    assert lowering.cache.misses == misses + 1  # DoP 4 was not warmed


def test_graph_ops_per_role(model):
    lowering = Lowering(model)
    plan = IterationPlan(
        0,
        (
            PrefillBatch((0, 1, 2), (PrefillItem(1, 0, 10, even_retention(0, 10, (0,))),)),
            DecodeBatch((3, 4), (DecodeItem(2, 3, ((3, 4), (4, 0))),)),
        ),
        (Migration(5, 6, 0, TokenRange(0, 8)),),
    )
    program = lowering.lower(plan)

    def count(rank, target):
        return sum(node.target is target for node in program.graph(rank).graph.nodes)

    layers = TINY.layers
    assert program.bindings[0].role == Role("prefill", 3, 0, 1)
    assert program.bindings[6].role == Role("idle", 0, 1, 0)
    assert program.graph(1) is program.graph(2)  # every member of a ring runs the same graph
    assert count(1, ops.COMM_START) == layers * 2 and count(1, torch.ops.espc.attn_partial.default) == layers * 3
    assert count(0, ops.COMM_START) == layers * 2 + 1  # and one migration exchange
    assert count(3, ops.COMM_START) == 2 * layers  # queries out, partials back
    # Decode reads its shard in place, for its own queries and for its peers': no context copy.
    assert count(3, torch.ops.espc.attn_paged.default) == 2 * layers
    assert count(6, ops.COMM_START) == 1 and count(6, torch.ops.espc.kv_pack.default) == 2  # and its compaction
    assert [n.name for n in program.graph(6).graph.nodes][-3:] == ["compact_kv", "compact_store", "output"]  # last
    assert count(0, torch.ops.espc.kv_unpack.default) == 1


def test_striped_layout_inputs_and_retention_rows(model):
    lowering = Lowering(model)
    ring = (4, 7, 9)
    retention = (Retention(9, TokenRange(0, 6)), Retention(7, TokenRange(6, 11)))
    plan = IterationPlan(0, (PrefillBatch(ring, (PrefillItem(3, 0, 11, retention), PrefillItem(5, 0, 2, even_retention(0, 2, (4,))))),))
    program = lowering.lower(plan)
    table, pool = kv_pool(64)
    tokens = {3: torch.arange(100, 111), 5: torch.arange(200, 202)}
    inputs = program.inputs(7, table, tokens, pool)  # ring position 1
    assert inputs["pos"].tolist() == [1, 4, 7, 10, 1]
    assert inputs["seq"].tolist() == [0, 0, 0, 0, 1]
    assert inputs["tokens"].tolist() == [101, 104, 107, 110, 201]
    assert (inputs["ring_next"], inputs["ring_prev"]) == (9, 4)
    assert inputs["ring_recv0_pos"].tolist() == [0, 3, 6, 9, 0]  # from position 0
    assert inputs["ring_recv1_pos"].tolist() == [2, 5, 8]  # from position 2
    # Rank 7 keeps [6, 11) of request 3: from its own block 7, 10; from block 0: 6, 9; block 2: 8.
    assert inputs["keep0_index"].tolist() == [2, 3]
    assert inputs["keep1_index"].tolist() == [2, 3]
    assert inputs["keep2_index"].tolist() == [2]
    assert inputs["last_index"].tolist() == [3, 4]  # token 10 of request 3 and token 1 of request 5
    assert program.outputs(7) == (3, 5)
    assert table.held() == {3: (TokenRange(6, 11),)}


def test_decode_inputs_check_shards_against_the_pool(model):
    lowering = Lowering(model)
    table, pool = kv_pool(64)
    table.allocate(1, torch.arange(0, 10))
    plan = IterationPlan(0, (DecodeBatch((0, 1), (DecodeItem(1, 1, ((0, 12), (1, 3))),)),))
    program = lowering.lower(plan)
    with pytest.raises(ValueError, match="request 1: the plan gives instance 0 a shard of 12 tokens but its pool holds 10"):
        program.inputs(0, table, {}, pool)


def test_migration_source_sends_its_tokens_in_position_order(model):
    table, pool = kv_pool(64)
    table.allocate(1, torch.tensor([5, 2, 3, 4]))
    plan = IterationPlan(0, (), (Migration(1, 0, 1, TokenRange(2, 5)),))
    program = Lowering(model).lower(plan)
    inputs = program.inputs(0, table, {}, pool)
    assert inputs["mig_out0_slots"].tolist() == [1, 2, 3] and inputs["mig_out0_peer"] == 1
    assert table.held() == {1: (TokenRange(5, 6),)}  # the source released what it packs


def test_clear_errors(model):
    with pytest.raises(ValueError, match="shard it first"):  # tp = 2 needs a TP shard of the model
        Lowering(model, tp=2)
    with pytest.raises(PlanError, match="instance 0 appears twice"):
        Lowering(model).lower(prefill_plan((0, 0), {1: 4}, keep_on=(0,)))
    with pytest.raises(ValueError, match="the comm proof spans every rank"):
        Lowering(model).lower(prefill_plan((0, 1), {1: 4}), ranks=(0,))


def test_dumps_are_deterministic_and_dump_ir_writes_every_stage(model, tmp_path):
    plan = representative_plan("decode", 3)
    first = str(Lowering(model).lower(plan))
    assert first == str(Lowering(model).lower(plan))
    assert "# rank 2 position 2: decode dop=3" in first and "verified: every send meets its receive" in first
    Lowering(model).lower(plan, dump_ir=tmp_path)
    stages = sorted(path.name for path in tmp_path.iterdir())
    assert stages == ["00-plan.txt", "01-lower.txt", "02-dce.txt", "03-overlap.txt", "04-verify_comm.txt"]
    assert "query0_start" in (tmp_path / "03-overlap.txt").read_text()
    assert "recv <- 0" in (tmp_path / "04-verify_comm.txt").read_text()


def test_rope_scaling_llama3_keeps_high_and_divides_low_frequencies():
    plain = rope_frequencies(ModelSpec(preset="llama3-8b"))
    scaled = rope_frequencies(ModelSpec(preset="llama3.1-8b"))
    assert scaled[0] == plain[0]  # wavelength 2π: far below the high-frequency cut-off
    assert scaled[-1] == pytest.approx(plain[-1] / 8)
    linear = rope_frequencies(ModelSpec(preset="tiny", rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear, rope_frequencies(TINY) / 4)


def test_random_weights_are_seeded_and_shared_across_dtypes():
    a, b = build_model(TINY), build_model(TINY, dtype=torch.float64)
    torch.testing.assert_close(a.layers[1].mlp.up_proj.weight.double(), b.layers[1].mlp.up_proj.weight, rtol=0, atol=0)
    other = build_model(TINY.model_copy(update={"weights": "random:1"}))
    assert not torch.equal(a.embed_tokens.weight, other.embed_tokens.weight)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dop", "3"], "# rank 2 position 2: prefill dop=3"),
        (["--phase", "decode", "--rank", "1", "--format", "code"], "torch.ops.espc.send_recv_start.default"),
        (["--dop", "2", "--format", "dot"], 'subgraph "cluster_rank 1"'),
    ],
)
def test_espc_graph_prints_the_lowered_graphs(args, expected):
    result = runner.invoke(app, ["graph", str(SPECS / "tiny-cpu.toml"), *args])
    assert result.exit_code == 0, result.output
    assert expected in result.output


@pytest.mark.parametrize(
    "spec, args, message",
    [
        ("tiny-cpu.toml", ["--dop", "5"], "--dop 5: the cluster has 4 elastic instances"),
        ("tiny-cpu.toml", ["--rank", "2"], "--rank 2: the plan runs on ranks 0 to 1"),
    ],
)
def test_espc_graph_rejects_bad_arguments_clearly(spec, args, message):
    result = runner.invoke(app, ["graph", str(SPECS / spec), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_espc_graph_writes_a_file_and_explains_missing_graphviz(tmp_path, monkeypatch):
    out = tmp_path / "graph.txt"
    result = runner.invoke(app, ["graph", str(SPECS / "tiny-cpu.toml"), "--phase", "decode", "-o", str(out)])
    assert result.exit_code == 0 and "message schedule" in out.read_text()
    monkeypatch.setattr("shutil.which", lambda name: None)
    result = runner.invoke(app, ["graph", str(SPECS / "tiny-cpu.toml"), "--format", "svg"])
    assert result.exit_code == 2 and "needs Graphviz's `dot` program" in result.output


def test_espc_graph_dump_ir_writes_every_stage(tmp_path):
    result = runner.invoke(app, ["graph", str(SPECS / "tiny-cpu.toml"), "--dump-ir", str(tmp_path / "ir")])
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (tmp_path / "ir").iterdir())
    assert written, "no stage was written"
    assert any("dce" in name for name in written) and any("overlap" in name for name in written)
