"""Chunked prefill (Sarathi-Serve) through the backend and the runtime: a prefill item with
start > 0 attends to its request's KV already resident in the pools, plus its own tokens.

In one process: the real `ChunkedScheduler`'s plans (an odd token budget, decode steps
piggybacked as 1-token chunks) lowered and run on per-instance pools and greedy-decoded
against the float64 forward, with both attention kernels (Triton under the interpreter on a
tiny case); the graphs a continuation adds; plans whose prefix is not where the ring reads
it are refused. Multi-rank continuations (rings of 2 and 3, a member holding none of the
prefix, migrations in the same plan) run in test_backend_distributed.py. End to end:
`espc.Engine(strategy="chunked")` against the float64 reference, and `espc compile` +
`espc run` of a chunked spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from espc.backend import ops
from espc.backend.kvpool import PagedKVTable, pool_tensor
from espc.backend.lower import Lowering, Role
from espc.cli.main import app
from espc.model.llama import build_model
from espc.planner.plan import IterationPlan, PrefillBatch, PrefillItem, even_retention
from espc.planner.sim.cluster_state import ClusterState
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.strategies import ChunkedScheduler, Deployment
from espc.planner.sim.workload import Request
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams
from tests.kv_checks import assert_only_cache_holds_kv

TINY = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"
# Logits of a request whose attention is merged from chunks, prefix shards and a ring (fp32)
# against the float64 forward of the whole sequence.
LOGITS = {"rtol": 1e-4, "atol": 1e-4}


def chunked_spec(spec, chunk_tokens: int):
    return spec.model_copy(update={"policy": spec.policy.model_copy(update={"strategy": "chunked", "chunk_tokens": chunk_tokens})})


def assert_greedy_matches(reference, prompt: list[int], generated: list[int], logits: list[torch.Tensor]) -> None:
    """`generated` is the float64 forward's greedy continuation and each logits row its own."""
    with torch.no_grad():
        expected = reference(torch.tensor(prompt + generated[:-1]))[len(prompt) - 1:]
    torch.testing.assert_close(torch.stack(logits).double(), expected, **LOGITS)
    assert generated == expected.argmax(-1).tolist()


def serve_in_process(spec, prompts: list[list[int]], chunk: int, new_tokens: int, attention: str):
    """Drive the real ChunkedScheduler on 4 instances in this process, as the driver does:
    each plan is verified against the scheduler's state, lowered, and run on every
    instance's own pool and table. Returns per request its logits rows and greedy tokens,
    and the plans."""
    cost = CostModel.from_spec(spec)
    deployment = Deployment.build(cost, 1, 256)
    scheduler = ChunkedScheduler(deployment, chunk)
    state = ClusterState(deployment.capacity, check=True)
    model = build_model(spec.model)
    lowering = Lowering(model, attention=attention)
    tables = [PagedKVTable(capacity, 16, len(prompts)) for capacity in deployment.capacity]
    pools = [pool_tensor(spec.model, table.num_slots, torch.float32) for table in tables]
    for index, prompt in enumerate(prompts):
        assert scheduler.admit(state, state.arrive(Request(index, 0.0, len(prompt), new_tokens))) is None
    generated: dict[int, list[int]] = {index: [] for index in range(len(prompts))}
    logits: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(prompts))}
    plans = []
    while (plan := scheduler.schedule(state)) is not None:
        plans.append(plan)
        tokens = {}
        produces = set()
        for batch in plan.batches:
            for item in batch.items:
                sequence = prompts[item.request_id] + generated[item.request_id]
                tokens[item.request_id] = torch.tensor(sequence[item.start:item.end])
                target = state.requests[item.request_id].prefill_target
                if target is None or item.end >= target:
                    produces.add(item.request_id)
        program = lowering.lower(plan)
        state.start(plan)
        rows = {}
        with torch.inference_mode():
            for rank, (table, pool) in enumerate(zip(tables, pools)):
                rows.update(program.run(rank, pool, table, tokens))
        for batch in plan.batches:
            for state_done in state.complete(batch):
                for table in tables:
                    table.release(state_done.id)
        for request in produces:
            logits[request].append(rows[request])
            generated[request].append(int(rows[request].argmax()))
    assert all(table.used_tokens == 0 for table in tables)
    return generated, logits, plans


def test_chunked_scheduler_plans_with_piggybacked_decodes_match_the_float64_reference(spec, reference):
    prompts = [list(range(3, 3 + n)) for n in (7, 13, 33, 61, 29, 5, 17, 3, 11)]
    generated, logits, plans = serve_in_process(spec, prompts, chunk=11, new_tokens=3, attention="torch")
    for index, prompt in enumerate(prompts):
        assert len(generated[index]) == 3
        assert_greedy_matches(reference, prompt, generated[index], logits[index])
    items = [item for plan in plans for batch in plan.batches for item in batch.items]
    assert max(sum(item.num_tokens for item in batch.items) for plan in plans for batch in plan.batches) <= 11
    assert any(item.start and item.num_tokens > 1 for item in items)  # a chunk continuing a prompt
    assert any(item.start and item.num_tokens == 1 for item in items)  # a decode step piggybacked
    mixed = [batch for plan in plans for batch in plan.batches if len({item.start > 0 for item in batch.items}) == 2]
    assert mixed, "no batch mixed a fresh prefill with a continuation"


def test_triton_kernels_serve_a_continuation(spec, reference):
    """Tiny: the interpreter runs every Triton program on the CPU."""
    prompts = [list(range(40, 49)), list(range(7, 12))]
    generated, logits, _ = serve_in_process(spec, prompts, chunk=6, new_tokens=2, attention="triton")
    for index, prompt in enumerate(prompts):
        assert_greedy_matches(reference, prompt, generated[index], logits[index])


def continuation(ring, request=1, start=4, end=9) -> IterationPlan:
    return IterationPlan(0, (PrefillBatch(tuple(ring), (PrefillItem(request, start, end, even_retention(start, end, ring)),)),))


def test_a_continuation_adds_the_prefix_exchange_to_its_own_graphs(spec):
    model = build_model(spec.model, device="meta")
    lowering = Lowering(model)
    layers = spec.model.layers

    def count(program, rank, target):
        return sum(node.target is target for node in program.graph(rank).graph.nodes)

    fresh = lowering.lower(IterationPlan(0, (PrefillBatch((0, 1), (PrefillItem(1, 0, 9, even_retention(0, 9, (0, 1))),)),)))
    two = lowering.lower(continuation((0, 1)))
    one = lowering.lower(continuation((2,)))
    assert two.bindings[0].role == Role("prefill", 2, 0, 0, prefix=True) and fresh.bindings[0].role == Role("prefill", 2, 0, 0)
    assert two.graph(0) is not fresh.graph(0) and two.graph(0) is two.graph(1)
    # Per layer: the ring's one exchange, the queries out and the (o, lse) answers back.
    assert count(fresh, 0, ops.COMM_START) == layers and count(two, 0, ops.COMM_START) == 3 * layers
    # Attention: own block, the ring's block; the own prefix shard and the peers' queries over
    # it, both read in place from the pool (no copy of the prefix).
    paged, partial = torch.ops.espc.attn_paged.default, torch.ops.espc.attn_partial.default
    assert count(two, 0, partial) == 2 * layers and count(two, 0, paged) == 2 * layers
    assert count(one, 2, ops.COMM_START) == 0 and count(one, 2, partial) == count(one, 2, paged) == layers
    assert "prefill dop=2 +resident prefix" in str(two)


def test_a_prefix_not_where_the_ring_reads_it_is_refused(spec):
    model = build_model(spec.model, device="meta")
    tables = [PagedKVTable(64, 16, 4) for _ in range(2)]
    tables[1].allocate(1, torch.arange(0, 4))
    program = Lowering(model).lower(continuation((0,)))
    program.inputs(0, tables[0], {1: torch.zeros(5, dtype=torch.long)}, None)
    with pytest.raises(ValueError, match=r"request 1: instance 1 holds 4 tokens of the resident prefix \[0, 4\).*not in the ring \[0\]"):
        program.inputs(1, tables[1], {}, None)
    table = PagedKVTable(64, 16, 4)
    table.allocate(1, torch.arange(0, 6))
    with pytest.raises(ValueError, match=r"instance 0 already holds positions \[4, 5\] at or past 4"):
        program.inputs(0, table, {1: torch.zeros(5, dtype=torch.long)}, None)


def test_engine_serves_strategy_chunked(spec, reference):
    prompts = [list(range(3, 3 + n)) for n in (7, 13, 33, 61)]
    with Engine(chunked_spec(spec, 13), kv_capacity=1024) as engine:
        handles = [engine.submit(prompt, SamplingParams(max_new_tokens=6, return_logits=True)) for prompt in prompts]
        completions = [handle.result(timeout=120) for handle in handles]
        engine.check_kv()
        stats = engine.stats()
        timeline = engine.result().timeline
    for prompt, completion in zip(prompts, completions):
        assert completion.finish_reason == "length", completion.error
        assert_greedy_matches(reference, prompt, completion.token_ids, completion.logits)
    assert_only_cache_holds_kv(stats)
    assert all(batch.tokens <= 13 and len(batch.instances) == 1 for batch in timeline)
    assert sum(3 in batch.request_ids for batch in timeline) >= 5 + 6 - 1  # 61 tokens in chunks of <= 13, then decodes


def test_espc_compile_and_run_a_chunked_spec(spec, reference, tmp_path):
    source = TINY.read_text().replace("[runtime]", '[policy]\nstrategy = "chunked"\nchunk_tokens = 16\n\n[runtime]')
    (tmp_path / "chunked.toml").write_text(source)
    runner = CliRunner()
    compiled = runner.invoke(app, ["compile", str(tmp_path / "chunked.toml"), "-o", str(tmp_path / "art"), "--search-seconds", "0", "--requests", "20"])
    assert compiled.exit_code == 0, compiled.output
    prompt = list(range(5, 26))
    result = runner.invoke(app, ["run", str(tmp_path / "art"), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    completion = json.loads(result.stdout)
    with torch.no_grad():
        expected = reference(torch.tensor(prompt + completion["token_ids"][:-1]))[len(prompt) - 1:].argmax(-1).tolist()
    assert completion["token_ids"] == expected
