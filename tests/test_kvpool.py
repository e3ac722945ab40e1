"""The paged slot table of a rank's KV pool (`espc.backend.kvpool`): a stateful property test
against a plain-Python model of who holds which positions in which slot, direct tests of the
errors, and the backend's `SlotTable` contract (a lowered plan runs on it and matches the
float64 model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from tolerances import TOLERANCES

from espc.backend.kvpool import KVPoolFull, PagedKVTable, pool_tensor
from espc.backend.lower import Lowering
from espc.frontend.spec import ModelSpec
from espc.model.llama import build_model
from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    PrefillBatch,
    PrefillItem,
    TokenRange,
    even_retention,
)

REQUESTS = st.integers(0, 4)
POSITIONS = 96


def _arange(start: int, end: int, step: int = 1) -> torch.Tensor:
    return torch.arange(start, end, step, dtype=torch.int64)


class TableMachine(RuleBasedStateMachine):
    """Random allocate / release sequences against a plain model: `model` is {request:
    [positions in allocation order]}, `pool` {slot: (request, position)} what a pool tensor
    would hold — written by allocations, moved by the table's compaction moves the way the
    graph applies them (all reads, then all writes). `resident` must match the model, order
    included, and every held token's slot must hold that token.

    The property that makes fragmentation harmless: an allocation fails only when the
    tokens or the request limit do not fit — never for pages."""

    @initialize(capacity=st.integers(0, 80), page_size=st.sampled_from([1, 3, 4, 16]), max_requests=st.integers(1, 4))
    def setup(self, capacity: int, page_size: int, max_requests: int) -> None:
        self.table = PagedKVTable(capacity, page_size, max_requests)
        self.model: dict[int, list[int]] = {}
        self.pool: dict[int, tuple[int, int]] = {}

    def _snapshot(self) -> tuple:
        t = self.table
        resident = {r: tuple(x.tolist() for x in t.resident(r)) for r in range(5)}
        return str(t), t.used_tokens, sorted(t._free_pages), resident, [x.tolist() for x in t.take_moves()]

    def _allocate(self, request: int, positions: torch.Tensor) -> None:
        t, held = self.table, self.model.get(request, [])
        if any(p in held for p in positions.tolist()):
            before = self._snapshot()
            with pytest.raises(ValueError, match=f"request {request}: positions .* already allocated"):
                t.allocate(request, positions)
            assert self._snapshot() == before
            return
        n = len(positions)
        full = n > 0 and (
            (request not in self.model and len(self.model) >= t.max_requests)
            or t.used_tokens + n > t.capacity_tokens
        )
        if full:
            before = self._snapshot()
            with pytest.raises(KVPoolFull, match=f"request {request}: ") as error:
                t.allocate(request, positions)
            assert error.value.request == request
            assert self._snapshot() == before
            return
        slots = t.allocate(request, positions)  # fits the free tokens: must get them
        assert slots.dtype == torch.int64 and len(slots) == n
        if n:
            self.model.setdefault(request, []).extend(positions.tolist())
            self.pool.update((slot, (request, p)) for slot, p in zip(slots.tolist(), positions.tolist()))

    def _apply_moves(self) -> None:
        sources, destinations = self.table.take_moves()
        moved = {d: self.pool.get(s) for s, d in zip(sources.tolist(), destinations.tolist())}
        self.pool.update(moved)
        assert self.table.take_moves()[0].numel() == 0  # taken once

    def _release_span(self, request: int, start: int, length: int) -> None:
        self.table.release(request, TokenRange(start, start + length))
        held = [p for p in self.model.get(request, []) if not start <= p < start + length]
        if held:
            self.model[request] = held
        else:
            self.model.pop(request, None)

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 40))
    def allocate_range(self, request: int, start: int, length: int) -> None:
        self._allocate(request, _arange(start, start + length))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 60), d=st.integers(2, 4))
    def allocate_striped(self, request: int, start: int, length: int, d: int) -> None:
        self._allocate(request, _arange(start, start + length, d))

    @rule(request=REQUESTS)
    def allocate_decode_token(self, request: int) -> None:
        held = self.model.get(request, [])
        self._allocate(request, _arange(max(held, default=-1) + 1, max(held, default=-1) + 2))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 50))
    def release_span(self, request: int, start: int, length: int) -> None:
        self._release_span(request, start, length)
        self._apply_moves()

    @rule(spans=st.lists(st.tuples(REQUESTS, st.integers(0, POSITIONS), st.integers(0, 30)), min_size=2, max_size=4))
    def release_spans_then_move(self, spans: list[tuple[int, int, int]]) -> None:
        """Several migrations out of one rank in one plan: moves compose before the graph runs."""
        for request, start, length in spans:
            self._release_span(request, start, length)
        self._apply_moves()

    @rule(
        steps=st.lists(st.tuples(st.booleans(), REQUESTS, st.integers(0, POSITIONS), st.integers(0, 30)), max_size=5)
    )
    def transaction_rolled_back(self, steps: list[tuple[bool, int, int, int]]) -> None:
        """A plan's bookkeeping that fails part-way leaves the table exactly as it was."""
        t = self.table
        before = self._snapshot()

        class Abort(Exception):
            pass

        with pytest.raises((Abort, KVPoolFull)):  # KVPoolFull: over the request limit
            with t.transaction():
                for allocate, request, start, length in steps:
                    if allocate:
                        held = set(t.resident(request)[0].tolist())
                        positions = [p for p in range(start, start + length) if p not in held]
                        if len(positions) <= t.free_tokens:
                            t.allocate(request, torch.tensor(positions, dtype=torch.int64))
                    else:
                        t.release(request, TokenRange(start, start + length) if length else None)
                        t.take_moves()
                raise Abort
        assert self._snapshot() == before
        t.verify()

    @rule(request=REQUESTS)
    def release_all(self, request: int) -> None:
        self.table.release(request)
        self.model.pop(request, None)

    @precondition(lambda self: len(self.model) > 1)
    @rule()
    def release_everything(self) -> None:
        for request in list(self.model):
            self.table.release(request)
        self.model.clear()
        assert self.table.free_pages == self.table.num_pages and self.table.used_tokens == 0

    @invariant()
    def matches_model(self) -> None:
        t = self.table
        t.verify()
        assert t.requests() == tuple(sorted(self.model))
        slots = []
        for request in range(5):
            positions, held_slots = t.resident(request)
            assert positions.tolist() == self.model.get(request, [])
            assert all(self.pool.get(s) == (request, p) for s, p in zip(held_slots.tolist(), positions.tolist()))
            assert len(t.pages(request)) == math.ceil(len(positions) / t.page_size)  # compacted
            slots += held_slots.tolist()
        assert len(set(slots)) == len(slots) and all(0 <= s < t.num_slots for s in slots)
        assert t.used_tokens == len(slots) <= t.capacity_tokens
        assert t.free_tokens == t.capacity_tokens - len(slots)
        assert t.used_pages + t.free_pages == t.num_pages
        assert t.used_pages == sum(len(t.pages(r)) for r in self.model)

    def teardown(self) -> None:
        if hasattr(self, "table"):
            for request in list(self.model):
                self.table.release(request)
            self.table.verify()
            assert self.table.free_pages == self.table.num_pages and self.table.used_tokens == 0


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


def test_size_and_page_filling():
    table = PagedKVTable(capacity_tokens=100, page_size=16, max_requests=4)
    assert table.num_pages == 7 + 4 and table.num_slots == 11 * 16
    assert table.allocate(1, _arange(0, 20)).tolist() == list(range(20))  # pages 0 and 1
    assert table.allocate(2, _arange(0, 3)).tolist() == [32, 33, 34]  # a page of its own
    assert table.allocate(1, _arange(20, 21)).tolist() == [20]  # decode fills its last page
    assert table.pages(1) == (0, 1) and table.pages(2) == (2,)
    assert table.held() == {1: (TokenRange(0, 21),), 2: (TokenRange(0, 3),)}


def test_freed_slots_are_refilled_lowest_first_and_empty_pages_return():
    table = PagedKVTable(capacity_tokens=64, page_size=4, max_requests=2)
    table.allocate(7, _arange(0, 12))  # pages 0, 1, 2
    table.release(7, TokenRange(2, 8))  # slot 2, 3 of page 0 and all of page 1
    assert table.pages(7) == (0, 2) and table.free_pages == table.num_pages - 2
    assert table.allocate(7, _arange(100, 103)).tolist() == [2, 3, 4]  # own holes, then page 1 again
    assert table.pages(7) == (0, 2, 1)
    table.verify()


def test_striped_subset_and_zero_tokens():
    table = PagedKVTable(capacity_tokens=32, page_size=8, max_requests=1)
    assert table.allocate(3, _arange(1, 32, 4)).tolist() == list(range(8))
    assert table.held()[3] == tuple(TokenRange(p, p + 1) for p in range(1, 32, 4))
    assert len(table.allocate(9, _arange(0, 0))) == 0 and table.requests() == (3,)  # no slot, not resident
    table.release(9)  # a request this rank never held: nothing to do
    table.release(3, TokenRange(100, 200))
    assert table.used_tokens == 8


def test_capacity_error_names_request_and_numbers():
    table = PagedKVTable(capacity_tokens=10, page_size=4, max_requests=2)
    table.allocate(1, _arange(0, 8))
    with pytest.raises(KVPoolFull, match=r"request 2: 3 tokens do not fit, 2 of 10 tokens free"):
        table.allocate(2, _arange(0, 3))
    assert table.requests() == (1,) and table.used_tokens == 8


def test_request_limit_error():
    table = PagedKVTable(capacity_tokens=10, page_size=4, max_requests=1)
    table.allocate(1, _arange(0, 1))
    with pytest.raises(KVPoolFull, match=r"request 2: cannot become resident for 1 tokens, 1 of 1 requests already are"):
        table.allocate(2, _arange(0, 1))


def test_releases_out_of_the_middle_of_pages_compact_the_request():
    # Without compaction request 2 would keep one token in each of its 4 pages, and the 12
    # free tokens would need 3 pages with 2 left: free tokens that cannot be allocated.
    table = PagedKVTable(capacity_tokens=16, page_size=4, max_requests=2)
    table.allocate(2, _arange(0, 16))
    for start in (1, 5, 9, 13):
        table.release(2, TokenRange(start, start + 3))
    # Positions 0, 4, 8, 12 sit at slots 0, 4, 8, 12; the moves bring them into page 0.
    sources, destinations = table.take_moves()
    assert list(zip(sources.tolist(), destinations.tolist())) == [(4, 1), (8, 2), (12, 3)]
    assert table.resident(2)[1].tolist() == [0, 1, 2, 3] and table.pages(2) == (0,)
    assert table.allocate(1, _arange(0, 12)).tolist() == list(range(4, 16))  # every free token
    table.verify()


def test_pool_is_indexed_by_slot_and_laid_out_by_head():
    """`pool_tensor` is indexed [layers, 2, slots, kv_heads, head_dim], and one head's K of a
    run of slots is one contiguous block (what attention reads), not interleaved by head."""
    spec = ModelSpec(preset="tiny")
    pool = pool_tensor(spec, 48, torch.float32)
    assert pool.shape == (spec.layers, 2, 48, spec.kv_heads, spec.head_dim)
    run = pool[1, 0, 5:21, 1]  # layer 1's K of head 1 at slots [5, 21)
    assert run.is_contiguous()
    pool[1, 0, 7, 1] = 3.0  # slot-indexed writes land where slot-indexed reads find them
    assert (run[2] == 3.0).all()


def test_compaction_moves_the_kv_with_its_tokens_in_a_real_pool():
    """A ring of 2 retains [0, 151) on one rank (two striped allocations, as a prefill
    allocates), then migrates [100, 151) away: the moves, applied with the graph's own ops
    (`kv_pack` then `kv_unpack`), leave every held position's K and V in its new slot."""
    spec = ModelSpec(preset="tiny")
    table = PagedKVTable(capacity_tokens=160, page_size=16, max_requests=2)
    pool = pool_tensor(spec, table.num_slots, torch.float32)

    def kv_of(positions: torch.Tensor) -> torch.Tensor:  # [layers, 2, n, kv_heads, head_dim], unique per position
        return positions.double().reshape(1, 1, -1, 1, 1).expand(spec.layers, 2, -1, spec.kv_heads, spec.head_dim) + 0.5

    for origin in (0, 1):
        positions = _arange(origin, 151, 2)
        pool[:, :, table.allocate(4, positions)] = kv_of(positions).float()
    table.release(4, TokenRange(100, 151))
    sources, destinations = table.take_moves()
    assert len(sources) > 0 and len(table.pages(4)) == math.ceil(100 / 16)
    torch.ops.espc.kv_unpack(pool, destinations, torch.ops.espc.kv_pack(pool, sources))
    positions, slots = table.resident(4)
    assert torch.equal(pool[:, :, slots], kv_of(positions).float())
    assert len(table.allocate(5, _arange(0, 60))) == 60 == table.capacity_tokens - 100
    table.verify()


def test_moves_of_one_plan_compose_and_allocation_waits_for_them():
    table = PagedKVTable(capacity_tokens=12, page_size=4, max_requests=1)
    table.allocate(5, _arange(0, 12))
    table.release(5, TokenRange(0, 4))  # page 0 empties: returned, nothing moves
    table.release(5, TokenRange(5, 7))  # [4, 5) and [7, 12) in pages 1, 2: nothing to compact yet
    table.release(5, TokenRange(8, 10))  # 4 tokens left in pages 1 and 2: page 2's move into page 1
    with pytest.raises(RuntimeError, match="request 5: allocating while 2 compaction moves are pending"):
        table.allocate(5, _arange(20, 21))
    sources, destinations = table.take_moves()
    assert list(zip(sources.tolist(), destinations.tolist())) == [(10, 5), (11, 6)]
    assert table.resident(5)[1].tolist() == [4, 7, 5, 6] and table.pages(5) == (1,)
    table.release(5, TokenRange(4, 5))  # one hole in its one page: nothing to compact
    assert table.take_moves()[0].tolist() == [] and table.resident(5)[1].tolist() == [7, 5, 6]
    table.verify()


def test_a_transaction_rolls_every_change_back():
    table = PagedKVTable(capacity_tokens=16, page_size=4, max_requests=2)
    table.allocate(1, _arange(0, 10))
    table.allocate(2, _arange(0, 3))
    before = (str(table), table.used_tokens, table.free_pages, [t.tolist() for t in table.resident(1)])
    with pytest.raises(KVPoolFull, match="request 1: 2 tokens do not fit, 1 of 16 tokens free"):
        with table.transaction():
            table.release(1, TokenRange(2, 9))  # compacts request 1 into one page
            table.take_moves()
            table.allocate(1, _arange(20, 22))
            table.release(2)
            table.allocate(3, _arange(0, 10))
            table.allocate(1, _arange(30, 32))
    assert (str(table), table.used_tokens, table.free_pages, [t.tolist() for t in table.resident(1)]) == before
    table.verify()
    with table.transaction():  # no exception: the changes stay
        table.release(2)
    assert table.requests() == (1,)


def test_bad_positions_are_value_errors():
    table = PagedKVTable(capacity_tokens=10, page_size=4, max_requests=2)
    table.allocate(5, _arange(0, 4))
    with pytest.raises(ValueError, match=r"request 5: positions \[2, 3\] are already allocated"):
        table.allocate(5, _arange(2, 6))
    with pytest.raises(ValueError, match=r"request 5: positions \[7\] given twice"):
        table.allocate(5, torch.tensor([7, 8, 7]))
    with pytest.raises(ValueError, match=r"request 5: positions must be a 1-D integer tensor, got torch.float32"):
        table.allocate(5, torch.tensor([7.0]))
    with pytest.raises(ValueError, match=r"request 5: negative positions \[-1\]"):
        table.allocate(5, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"capacity_tokens=10, page_size=0, max_requests=1"):
        PagedKVTable(10, 0, 1)
    assert table.used_tokens == 4


def test_dump_and_verify():
    table = PagedKVTable(capacity_tokens=16, page_size=4, max_requests=2)
    table.allocate(2, _arange(0, 5))
    table.allocate(1, _arange(0, 8, 2))
    assert str(table) == (
        "PagedKVTable 9/16 tokens, 3/6 pages of 4, 2/2 requests\n"
        "  req 1: 4 tokens [0, 1) [2, 3) [4, 5) [6, 7) pages [2]\n"
        "  req 2: 5 tokens [0, 5) pages [0, 1]"
    )
    table._residents[1].slots[0] = 0  # corrupt: a slot of request 2, outside request 1's page
    with pytest.raises(AssertionError, match=r"request 1: slots \[0\] lie outside its pages \[2\]"):
        table.verify()


def test_lowered_plans_run_on_the_table():
    spec = ModelSpec(preset="tiny")
    model, reference = build_model(spec), build_model(spec, dtype=torch.float64)
    lowering = Lowering(model)
    table = PagedKVTable(capacity_tokens=64, page_size=16, max_requests=2)
    pool = pool_tensor(spec, table.num_slots, torch.float32)
    sequences = {1: torch.arange(3, 40), 2: torch.tensor([7])}
    items = tuple(PrefillItem(r, 0, len(s), even_retention(0, len(s), (0,))) for r, s in sequences.items())
    prefill = IterationPlan(0, (PrefillBatch((0,), items),))
    decode = IterationPlan(1, (DecodeBatch((0,), tuple(DecodeItem(r, 0, ((0, len(s)),)) for r, s in sequences.items())),))
    new = {1: torch.tensor([11]), 2: torch.tensor([12])}

    def check(logits):
        for request, sequence in sequences.items():
            torch.testing.assert_close(logits[request].double(), reference(sequence)[-1], **TOLERANCES[torch.float32])

    with torch.inference_mode():
        check(lowering.lower(prefill).run(0, pool, table, sequences))
        logits = lowering.lower(decode).run(0, pool, table, new)
        sequences = {r: torch.cat((s, new[r])) for r, s in sequences.items()}
        check(logits)
        assert table.held() == {1: (TokenRange(0, 38),), 2: (TokenRange(0, 2),)}
        assert table.pages(1) == (0, 1, 2) and table.pages(2) == (3,)
        lowering.lower(IterationPlan(2, (), frees=(1, 2))).run(0, pool, table, {})
    assert table.used_tokens == 0 and table.free_pages == table.num_pages
