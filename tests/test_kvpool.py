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
    """Random allocate / release sequences; the model is {request: {position: slot}} in
    allocation order, so `resident` must match it exactly, order included, and a token's slot
    never moves while it is held."""

    @initialize(capacity=st.integers(0, 80), page_size=st.sampled_from([1, 3, 4, 16]), max_requests=st.integers(1, 4))
    def setup(self, capacity: int, page_size: int, max_requests: int) -> None:
        self.table = PagedKVTable(capacity, page_size, max_requests)
        self.model: dict[int, dict[int, int]] = {}

    def _snapshot(self) -> tuple:
        t = self.table
        return str(t), t.used_tokens, t.free_pages, {r: tuple(x.tolist() for x in t.resident(r)) for r in range(5)}

    def _allocate(self, request: int, positions: torch.Tensor) -> None:
        t, held = self.table, self.model.get(request, {})
        if any(p in held for p in positions.tolist()):
            before = self._snapshot()
            with pytest.raises(ValueError, match=f"request {request}: positions .* already allocated"):
                t.allocate(request, positions)
            assert self._snapshot() == before
            return
        n = len(positions)
        spare = len(t.pages(request)) * t.page_size - len(held)
        full = n > 0 and (
            (request not in self.model and len(self.model) >= t.max_requests)
            or t.used_tokens + n > t.capacity_tokens
            or math.ceil(max(n - spare, 0) / t.page_size) > t.free_pages
        )
        if full:
            before = self._snapshot()
            with pytest.raises(KVPoolFull, match=f"request {request}: "):
                t.allocate(request, positions)
            assert self._snapshot() == before
            return
        slots = t.allocate(request, positions)
        assert slots.dtype == torch.int64 and len(slots) == n
        if n:
            self.model.setdefault(request, {}).update(zip(positions.tolist(), slots.tolist()))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 40))
    def allocate_range(self, request: int, start: int, length: int) -> None:
        self._allocate(request, _arange(start, start + length))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 60), d=st.integers(2, 4))
    def allocate_striped(self, request: int, start: int, length: int, d: int) -> None:
        self._allocate(request, _arange(start, start + length, d))

    @rule(request=REQUESTS)
    def allocate_decode_token(self, request: int) -> None:
        held = self.model.get(request, {})
        self._allocate(request, _arange(max(held, default=-1) + 1, max(held, default=-1) + 2))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 50))
    def release_span(self, request: int, start: int, length: int) -> None:
        self.table.release(request, TokenRange(start, start + length))
        held = self.model.get(request, {})
        for position in [p for p in held if start <= p < start + length]:
            del held[position]
        if not held:
            self.model.pop(request, None)

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
        for request in range(5):
            positions, slots = t.resident(request)
            assert list(zip(positions.tolist(), slots.tolist())) == list(self.model.get(request, {}).items())
        slots = [s for held in self.model.values() for s in held.values()]
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


def test_fragmentation_can_run_out_of_pages_before_tokens():
    # Request 2 keeps one token in each of its 4 pages; the 12 free tokens need 3 pages, 2 are left.
    table = PagedKVTable(capacity_tokens=16, page_size=4, max_requests=2)
    table.allocate(2, _arange(0, 16))
    for start in (1, 5, 9, 13):
        table.release(2, TokenRange(start, start + 3))
    before = str(table)
    full = r"request 1: 9 tokens need 3 new pages of 4 beyond its 0 spare slots, 2 of 6 pages free"
    with pytest.raises(KVPoolFull, match=full):
        table.allocate(1, _arange(0, 9))
    assert str(table) == before
    assert len(table.allocate(2, _arange(16, 28))) == 12  # its own spare slots still serve request 2


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
