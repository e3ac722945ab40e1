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
    PlanError,
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

    def extend(self, ring, lengths: dict[int, int], keep_on=None):
        """Continue requests on `ring` by `lengths` new tokens each (a fresh request starts at
        0), retaining evenly over `keep_on` (default: the ring)."""
        items, chunks = [], {}
        for request, n in lengths.items():
            start = len(self.sequences.get(request, ()))
            chunks[request] = self.tokens(n)
            items.append(PrefillItem(request, start, start + n, even_retention(start, start + n, keep_on or ring)))
        plan, results = self.run([PrefillBatch(tuple(ring), tuple(items))], tokens=chunks)
        for request, chunk in chunks.items():
            self.sequences[request] = torch.cat((self.sequences.get(request, chunk[:0]), chunk))
        check_logits(results, {request: self.sequences[request] for request in lengths})
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


def test_chunked_prefill_continues_from_the_prefix_where_it_lives(harness):
    """Chunks of odd sizes on rings of 2 and 3 (one member holding none of the prefix), a
    prefix retained on one instance, a fresh request and a 1-token chunk (a decode step
    piggybacked, Sarathi-style) in one batch: the logits of every chunk's last token equal
    the float64 forward of the whole sequence so far, and only the chunk's own KV travels
    the ring — the prefix stays where it is, queries and (o, lse) answers go to it."""
    session = Session(harness, seed=14)
    try:
        session.extend((0, 1), {70: 101, 71: 5})
        plan, results = session.extend((1, 0), {70: 57, 71: 1}, keep_on=(1,))
        assert session.held[0][70] == (TokenRange(0, 51),) and session.held[1][70] == (TokenRange(51, 158),)
        assert sum(_bytes(results, "ring")) == 58 * KV_TOKEN_BYTES  # the chunks' own KV, one hop
        assert sum(_bytes(results, "migration")) == 0
        plan, results = session.extend((2, 0, 1), {70: 43, 71: 1, 72: 29})
        assert sum(_bytes(results, "ring")) == 2 * 73 * KV_TOKEN_BYTES
        traffic = expected_traffic(plan, TINY, torch.float32)
        assert _bytes(results, "query") == [traffic[rank]["query"] if rank in traffic else 0 for rank in range(WORLD)]
        assert _bytes(results, "query")[2] > 0  # rank 2 holds no prefix: it asks the others
        session.decode((0, 1, 2), {70: 2, 71: 0, 72: 1})  # decoding goes on from the chunks' KV
    finally:
        session.free_all()


def test_continued_prefill_beside_migrations_reads_the_kv_resident_before_the_plan(harness):
    """A request's prefix is split by a migration, then continued on a ring of its holders
    while, in the same plan, the rest of its prefix migrates between ring members and another
    request migrates in: the chunk attends to the KV resident before the plan, once."""
    session = Session(harness, seed=15)
    try:
        session.extend((0, 1), {80: 77, 81: 64})
        session.run(migrations=[Migration(80, 1, 3, TokenRange(39, 77))])
        assert session.held[3][80] == (TokenRange(39, 77),) and 80 not in session.held[1]
        batch = PrefillBatch((3, 0), (PrefillItem(80, 77, 100, even_retention(77, 100, (3, 0))),))
        migrations = [Migration(80, 0, 3, TokenRange(0, 39)), Migration(81, 1, 0, TokenRange(32, 64))]
        chunk = {80: session.tokens(23)}
        plan, results = session.run([batch], migrations, tokens=chunk)
        session.sequences[80] = torch.cat((session.sequences[80], chunk[80]))
        check_logits(results, {80: session.sequences[80]})
        assert session.held[3][80] == (TokenRange(0, 89),) and session.held[0][80] == (TokenRange(89, 100),)
        assert session.held[0][81] == (TokenRange(0, 64),)
        session.extend((0, 3), {80: 1, 81: 3})
    finally:
        session.free_all()


def test_invalid_plan_fails_in_the_parent_before_any_rank_waits(harness):
    gap = IterationPlan(0, (PrefillBatch((0, 1), (PrefillItem(50, 0, 20, even_retention(0, 10, (0,))),)),))
    with pytest.raises(PlanError, match="retention gap \\[10, 20\\)"):
        harness.run(gap, {50: torch.zeros(20, dtype=torch.long)})
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
