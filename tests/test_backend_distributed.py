"""Lowered plans executed by 4 gloo ranks on the CPU against a float64 single-process forward.

One process group serves the whole module. Every rank checks its own comm counters against
`expected_traffic` before it answers (the harness fails the run otherwise); the tests check
logits, retained KV and the zero-KV-traffic claims here in the parent. Each test frees its
requests at the end so the pools start empty for the next.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tolerances import TOLERANCES

from espc.backend.harness import Harness, HarnessError, expected_traffic
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

TINY = ModelSpec(preset="tiny", max_context=8192)
WORLD = 4
KV_TOKEN_BYTES = 2 * TINY.kv_heads * TINY.head_dim * 4 * TINY.layers  # every layer, fp32


@pytest.fixture(scope="module")
def harness():
    with Harness(TINY, WORLD, slots=12288, timeout=120) as running:
        yield running


@functools.cache
def _reference_model():
    return build_model(TINY, dtype=torch.float64)


def reference_logits(sequence: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return _reference_model()(sequence)[-1]


def check_logits(results, sequences: dict[int, torch.Tensor]) -> None:
    """Every request's logits come from exactly one rank and match the float64 forward."""
    tolerance = TOLERANCES[torch.float32]
    answered = {}
    for result in results:
        for request, row in result.logits.items():
            assert request not in answered, f"request {request} answered by ranks {answered[request]} and {result.rank}"
            answered[request] = result.rank
            expected = reference_logits(sequences[request])
            error = ((row.double() - expected).abs().max() / expected.abs().max()).item()
            assert error <= tolerance["rtol"], f"rank {result.rank} request {request}: max relative error {error:.2e}"
            torch.testing.assert_close(row.double(), expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * WORLD)
    assert answered.keys() == sequences.keys()


class Session:
    """Requests' token sequences and the KV each rank holds, across iterations."""

    def __init__(self, harness: Harness, seed: int):
        self.harness = harness
        self.generator = torch.Generator().manual_seed(seed)
        self.sequences: dict[int, torch.Tensor] = {}
        self.held: dict[int, dict[int, tuple[TokenRange, ...]]] = {}
        self.iteration = 0

    def tokens(self, n: int) -> torch.Tensor:
        return torch.randint(0, TINY.vocab, (n,), generator=self.generator)

    def run(self, batches=(), migrations=(), frees=(), tokens=None):
        plan = IterationPlan(self.iteration, tuple(batches), tuple(migrations), tuple(frees))
        self.iteration += 1
        results = self.harness.run(plan, tokens or {})
        self.held = {result.rank: result.held for result in results}
        return plan, results

    def prefill(self, ring, lengths: dict[int, int], keep_on=None):
        """Prefill fresh requests on `ring`, retaining evenly over `keep_on` (default: the ring)."""
        chunks = {request: self.tokens(n) for request, n in lengths.items()}
        items = tuple(PrefillItem(r, 0, n, even_retention(0, n, keep_on or ring)) for r, n in lengths.items())
        plan, results = self.run([PrefillBatch(tuple(ring), items)], tokens=chunks)
        self.sequences.update(chunks)
        check_logits(results, chunks)
        return plan, results

    def shards(self, request: int, instances) -> tuple[tuple[int, int], ...]:
        return tuple((i, sum(map(len, self.held[i].get(request, ())))) for i in instances)

    def decode(self, instances, masters: dict[int, int]):
        """One decode step of `masters` (request -> master) with shards on every instance."""
        new = {request: self.tokens(1) for request in masters}
        items = tuple(DecodeItem(r, m, self.shards(r, instances)) for r, m in masters.items())
        plan, results = self.run([DecodeBatch(tuple(instances), items)], tokens=new)
        for request, token in new.items():
            self.sequences[request] = torch.cat((self.sequences[request], token))
        check_logits(results, {r: self.sequences[r] for r in masters})
        return plan, results

    def free_all(self) -> None:
        if self.sequences:
            self.run(frees=sorted(self.sequences))
        assert all(not held for held in self.held.values()), self.held
        self.sequences.clear()


def _bytes(results, channel: str) -> list[int]:
    return [result.counters[channel]["bytes_sent"] for result in results]


PREFILLS = [
    ((0,), {1: 1, 2: 37, 3: 1000}),
    ((2, 1), {4: 4097, 5: 37}),
    ((0, 1, 2), {6: 1, 7: 1000, 8: 37}),
    ((3, 2, 1, 0), {9: 4097, 10: 1, 11: 1000, 12: 37}),
]


@pytest.mark.parametrize("ring, lengths", PREFILLS, ids=[f"dop{len(r)}" for r, _ in PREFILLS])
def test_prefill_matches_reference_and_retains_assigned_ranges(harness, ring, lengths):
    session = Session(harness, seed=len(ring))
    try:
        plan, results = session.prefill(ring, lengths)
        for item in plan.batches[0].items:
            for kept in item.retention:
                assert session.held[kept.instance][item.request_id] == (kept.range,)
        assert sum(len(held) for rank, held in session.held.items() if rank not in ring) == 0
        traffic = expected_traffic(plan, TINY, torch.float32)
        assert _bytes(results, "ring") == [traffic.get(rank, {}).get("ring", 0) for rank in range(WORLD)]
        tokens = sum(lengths.values())
        assert sum(_bytes(results, "ring")) == (len(ring) - 1) * tokens * KV_TOKEN_BYTES
    finally:
        session.free_all()


def test_scale_down_moves_no_extra_bytes_and_decode_scale_up_moves_no_kv(harness):
    session = Session(harness, seed=10)
    try:
        ring = (0, 1, 2, 3)
        plan, results = session.prefill(ring, {20: 1000, 21: 37}, keep_on=(1, 2))
        assert session.held[0] == {} and session.held[3] == {}
        assert session.held[1] == {20: (TokenRange(0, 500),), 21: (TokenRange(0, 19),)}
        assert session.held[2] == {20: (TokenRange(500, 1000),), 21: (TokenRange(19, 37),)}
        # Retaining on 2 of 4 instances costs exactly the ring's own traffic: nothing extra.
        total = sum(sum(result.counters[c]["bytes_sent"] for c in result.counters) for result in results)
        assert total == (len(ring) - 1) * 1037 * KV_TOKEN_BYTES

        session.decode((1, 2), {20: 1, 21: 2})  # several masters on the retaining instances
        # Scale up to 4 instances: new masters 3 and 0 hold no KV yet (0-token shards).
        plan, results = session.decode(ring, {20: 3, 21: 0})
        assert dict(plan.batches[0].items[0].shards)[3] == 0
        for channel in ("ring", "migration"):
            assert _bytes(results, channel) == [0] * WORLD
        assert session.held[3][20] == (TokenRange(1001, 1002),)
        session.decode(ring, {20: 3, 21: 0})
    finally:
        session.free_all()


def test_decode_on_one_instance_with_one_master(harness):
    session = Session(harness, seed=11)
    try:
        session.prefill((1,), {30: 37, 31: 5})
        for _ in range(2):
            plan, results = session.decode((1,), {30: 1, 31: 1})
            assert sum(sum(result.counters[c]["bytes_sent"] for c in result.counters) for result in results) == 0
    finally:
        session.free_all()


def test_migration_overlapping_a_prefill_then_decode(harness):
    session = Session(harness, seed=12)
    try:
        session.prefill((0, 1), {40: 301})
        migrations = [Migration(40, 1, 3, TokenRange(151, 301)), Migration(40, 0, 2, TokenRange(100, 151))]
        other = {41: session.tokens(77)}
        prefill = PrefillBatch((0, 1), (PrefillItem(41, 0, 77, even_retention(0, 77, (0, 1))),))
        plan, results = session.run([prefill], migrations, tokens=other)
        session.sequences.update(other)
        check_logits(results, other)
        assert _bytes(results, "migration") == [51 * KV_TOKEN_BYTES, 150 * KV_TOKEN_BYTES, 0, 0]
        assert session.held[0][40] == (TokenRange(0, 100),) and 40 not in session.held[1]
        assert session.held[2][40] == (TokenRange(100, 151),) and session.held[3][40] == (TokenRange(151, 301),)
        session.decode((0, 2, 3), {40: 3})
        session.decode((0, 1, 2, 3), {40: 2, 41: 1})
    finally:
        session.free_all()


def test_unsupported_plan_fails_in_the_parent_before_any_rank_waits(harness):
    chunked = IterationPlan(0, (PrefillBatch((0, 1), (PrefillItem(50, 10, 20, even_retention(10, 20, (0,))),)),))
    with pytest.raises(NotImplementedError, match="request 50: prefill of tokens \\[10, 20\\)"):
        harness.run(chunked, {50: torch.zeros(10, dtype=torch.long)})
    session = Session(harness, seed=13)  # the group still works
    try:
        session.prefill((0, 1), {51: 9})
    finally:
        session.free_all()


def test_a_failing_rank_raises_instead_of_hanging():
    with Harness(TINY, 2, slots=64, timeout=60) as small:
        # Rank 1 has no KV of request 60 although the plan says it holds 5 tokens.
        plan = IterationPlan(0, (DecodeBatch((0, 1), (DecodeItem(60, 0, ((0, 0), (1, 5))),)),))
        with pytest.raises(HarnessError, match="plan gives instance 1 a shard of 5 tokens but its pool holds 0"):
            small.run(plan, {60: torch.zeros(1, dtype=torch.long)})
