"""Shared, reference-counted KV views in the paged slot table (`PagedKVTable.share`, prefix
caching): a stateful property test against a plain-Python model of owners, views and the pool
tensor's contents, direct tests of every error, and a lowered continued prefill that reads its
prefix through another request's slots and matches the float64 model."""

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

NUM_REQUESTS = 6
REQUESTS = st.integers(0, NUM_REQUESTS - 1)
POSITIONS = 64


def _arange(start: int, end: int, step: int = 1) -> torch.Tensor:
    return torch.arange(start, end, step, dtype=torch.int64)


def _ranges(positions) -> tuple[TokenRange, ...]:
    """Merged ranges of a set of positions, computed independently of the table's helper."""
    ranges: list[TokenRange] = []
    for p in sorted(positions):
        if ranges and ranges[-1].end == p:
            ranges[-1] = TokenRange(ranges[-1].start, p + 1)
        else:
            ranges.append(TokenRange(p, p + 1))
    return tuple(ranges)


class SharingMachine(RuleBasedStateMachine):
    """Random allocations, shares (chains included) and releases against a plain model:
    `own` is {request: [positions in allocation order]}, `views` {request: {position: owner}},
    `pool` {slot: (owner, position)} what the pool tensor holds — written by allocations and
    moved by compaction the way the graph applies it. A share must view exactly the tokens
    its source has in the span (its own and the views it holds), each at its owner's slot;
    releasing own tokens of a request someone views must raise and change nothing."""

    @initialize(capacity=st.integers(0, 64), page_size=st.sampled_from([1, 4, 16]), max_requests=st.integers(1, 6))
    def setup(self, capacity: int, page_size: int, max_requests: int) -> None:
        self.table = PagedKVTable(capacity, page_size, max_requests)
        self.own: dict[int, list[int]] = {}
        self.views: dict[int, dict[int, int]] = {}
        self.pool: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ the model's answers

    def _borrowers(self, owner: int) -> tuple[int, ...]:
        return tuple(sorted(r for r, viewed in self.views.items() if owner in viewed.values()))

    def _holds(self, request: int) -> set[int]:
        return set(self.own.get(request, [])) | set(self.views.get(request, {}))

    def _snapshot(self) -> tuple:
        t = self.table
        resident = {r: tuple(x.tolist() for x in t.resident(r)) for r in range(NUM_REQUESTS)}
        borrowers = {r: t.borrowers(r) for r in range(NUM_REQUESTS)}
        return str(t), t.used_tokens, sorted(t._free_pages), resident, t.shared(), borrowers, dict(t._moves)

    def _unchanged(self, error: type[Exception], match: str, action) -> None:
        before = self._snapshot()
        with pytest.raises(error, match=match):
            action()
        assert self._snapshot() == before

    def _apply_moves(self) -> None:
        sources, destinations = self.table.take_moves()
        moved = {d: self.pool.get(s) for s, d in zip(sources.tolist(), destinations.tolist())}
        self.pool.update(moved)

    # ------------------------------------------------------------------ actions with checks

    def _allocate(self, request: int, positions: torch.Tensor) -> None:
        t, values = self.table, positions.tolist()
        if set(values) & set(self.own.get(request, [])):
            self._unchanged(ValueError, f"request {request}: positions .* already allocated", lambda: t.allocate(request, positions))
            return
        if set(values) & set(self.views.get(request, {})):
            self._unchanged(ValueError, f"request {request}: positions .* are views of shared KV", lambda: t.allocate(request, positions))
            return
        n = len(values)
        full = n > 0 and (
            (request not in self.own and len(self.own) >= t.max_requests) or t.used_tokens + n > t.capacity_tokens
        )
        if full:
            self._unchanged(KVPoolFull, f"request {request}: ", lambda: t.allocate(request, positions))
            return
        slots = t.allocate(request, positions)
        if n:
            self.own.setdefault(request, []).extend(values)
            self.pool.update((slot, (request, p)) for slot, p in zip(slots.tolist(), values))

    def _share(self, request: int, source: int, span: TokenRange) -> None:
        t = self.table
        if request == source:
            self._unchanged(ValueError, f"request {request}: cannot share .* of itself", lambda: t.share(request, source, span))
            return
        if any(span.start <= p < span.end for p in self._holds(request)):
            self._unchanged(
                ValueError, f"request {request}: cannot view .* of request {source}: it already holds",
                lambda: t.share(request, source, span),
            )
            return
        expected = {p: owner for p, owner in self.views.get(source, {}).items() if span.start <= p < span.end}
        expected.update((p, source) for p in self.own.get(source, []) if span.start <= p < span.end)
        assert t.share(request, source, span) == len(expected)
        if expected:
            self.views.setdefault(request, {}).update(expected)

    def _release(self, request: int, span: TokenRange | None) -> None:
        t = self.table
        inside = (lambda p: True) if span is None else (lambda p: span.start <= p < span.end)
        borrowers = self._borrowers(request)
        if borrowers and any(inside(p) for p in self.own.get(request, [])):
            self._unchanged(
                RuntimeError, rf"request {request}: cannot release .* while requests \[{', '.join(map(str, borrowers))}\]",
                lambda: t.release(request, span),
            )
            return
        t.release(request, span)
        own = [p for p in self.own.pop(request, []) if not inside(p)]
        views = {p: owner for p, owner in self.views.pop(request, {}).items() if not inside(p)}
        if own:
            self.own[request] = own
        if views:
            self.views[request] = views
        self._apply_moves()

    def _release_everything(self) -> None:
        """Borrowers before their owners; a cycle of borrowers (possible on disjoint spans) is
        broken by dropping one request's views alone, position by position."""
        while self.own or self.views:
            free = [r for r in sorted(self.own.keys() | self.views.keys()) if not self._borrowers(r)]
            if free:
                self._release(free[0], None)
                continue
            request = min(self.views)
            for p in sorted(self.views[request]):
                self._release(request, TokenRange(p, p + 1))
        t = self.table
        assert t.used_tokens == 0 and t.free_pages == t.num_pages
        assert t.requests() == () and t.shared() == {} and all(not t.borrowers(r) for r in range(NUM_REQUESTS))
        t.verify()

    # ------------------------------------------------------------------ rules

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 30), step=st.integers(1, 3))
    def allocate(self, request: int, start: int, length: int, step: int) -> None:
        self._allocate(request, _arange(start, start + length, step))

    @rule(request=REQUESTS)
    def allocate_decode_token(self, request: int) -> None:
        last = max(self._holds(request), default=-1)
        self._allocate(request, _arange(last + 1, last + 2))

    @rule(request=REQUESTS, source=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 40))
    def share(self, request: int, source: int, start: int, length: int) -> None:
        self._share(request, source, TokenRange(start, start + length))

    @rule(
        chain=st.permutations(range(NUM_REQUESTS)).map(lambda p: p[:3]),
        owned=st.integers(1, 24), borrowed=st.integers(1, 24), more=st.integers(1, 8), viewed=st.integers(1, 40),
    )
    def share_chain(self, chain: tuple[int, ...], owned: int, borrowed: int, more: int, viewed: int) -> None:
        """A owns [0, owned); B views a prefix of it and owns the tokens after that; C views a
        span of B covering both, which names A's slots and B's."""
        a, b, c = chain
        self._allocate(a, _arange(0, owned))
        self._share(b, a, TokenRange(0, borrowed))
        self._allocate(b, _arange(borrowed, borrowed + more))
        self._share(c, b, TokenRange(0, viewed))

    @rule(request=REQUESTS, start=st.integers(0, POSITIONS), length=st.integers(0, 40))
    def release_span(self, request: int, start: int, length: int) -> None:
        self._release(request, TokenRange(start, start + length))

    @rule(request=REQUESTS)
    def release_all(self, request: int) -> None:
        self._release(request, None)

    @precondition(lambda self: any(self._borrowers(r) for r in self.own))
    @rule(pick=st.integers(0, NUM_REQUESTS), start=st.integers(0, POSITIONS), length=st.integers(0, 40))
    def release_a_lender(self, pick: int, start: int, length: int) -> None:
        """An owner others view: refused whenever the release reaches one of its tokens."""
        lenders = [r for r in sorted(self.own) if self._borrowers(r)]
        self._release(lenders[pick % len(lenders)], TokenRange(start, start + length) if length else None)

    @rule()
    def release_everything(self) -> None:
        self._release_everything()

    @rule(
        steps=st.lists(
            st.tuples(st.sampled_from(["allocate", "share", "release"]), REQUESTS, REQUESTS, st.integers(0, POSITIONS),
                      st.integers(0, 30)),
            max_size=6,
        )
    )
    def transaction_rolled_back(self, steps: list[tuple[str, int, int, int, int]]) -> None:
        """A plan's bookkeeping that fails part-way leaves the table exactly as it was, shares
        and releases of views included."""
        t = self.table
        before = self._snapshot()

        class Abort(Exception):
            pass

        with pytest.raises((Abort, KVPoolFull)):
            with t.transaction():
                for action, request, other, start, length in steps:
                    span = TokenRange(start, start + length)
                    try:
                        if action == "allocate":
                            held = set(t.resident(request)[0].tolist())
                            positions = [p for p in range(start, start + length) if p not in held]
                            t.allocate(request, torch.tensor(positions, dtype=torch.int64))
                        elif action == "share":
                            t.share(request, other, span)
                        else:
                            t.release(request, span if length else None)
                            t.take_moves()
                    except KVPoolFull:
                        raise
                    except (ValueError, RuntimeError):
                        pass  # refused, table unchanged (checked by the rules above): the plan goes on
                raise Abort
        assert self._snapshot() == before
        t.verify()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def matches_model(self) -> None:
        t = self.table
        t.verify()
        own_slots = []
        for request in range(NUM_REQUESTS):
            own, views = self.own.get(request, []), self.views.get(request, {})
            positions, slots = (x.tolist() for x in t.resident(request))
            assert positions == sorted(views) + own  # the views (the prefix) first
            for p, slot in zip(positions[:len(views)], slots[:len(views)]):
                owner = views[p]
                owner_positions, owner_slots = (x.tolist() for x in t.resident(owner))
                assert dict(zip(owner_positions, owner_slots))[p] == slot  # the owner's slot, no copy
                assert self.pool[slot] == (owner, p)
            own_slots += slots[len(views):]
            assert all(self.pool.get(s) == (request, p) for s, p in zip(slots[len(views):], own))
            assert len(t.pages(request)) == math.ceil(len(own) / t.page_size)
            assert t.borrowers(request) == self._borrowers(request)
        assert len(set(own_slots)) == len(own_slots) and all(0 <= s < t.num_slots for s in own_slots)
        assert t.used_tokens == len(own_slots) == sum(map(len, self.own.values())) <= t.capacity_tokens
        assert t.free_tokens == t.capacity_tokens - t.used_tokens
        assert t.requests() == tuple(sorted(self.own))
        assert t.held() == {r: _ranges(own) for r, own in sorted(self.own.items())}
        assert t.shared() == {r: _ranges(views) for r, views in sorted(self.views.items())}

    def teardown(self) -> None:
        if hasattr(self, "table"):
            self._release_everything()


TestSharingMachine = SharingMachine.TestCase
TestSharingMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def _chain() -> PagedKVTable:
    """Request 1 owns [0, 20); 2 views [0, 16) of it and owns [16, 24); 3 views [0, 24) of 2."""
    table = PagedKVTable(capacity_tokens=64, page_size=4, max_requests=3)
    table.allocate(1, _arange(0, 20))
    assert table.share(2, 1, TokenRange(0, 16)) == 16
    table.allocate(2, _arange(16, 24))
    assert table.share(3, 2, TokenRange(0, 24)) == 24
    return table


def test_a_chain_views_the_owners_slots():
    table = _chain()
    a_positions, a_slots = table.resident(1)
    b_positions, b_slots = table.resident(2)
    c_positions, c_slots = table.resident(3)
    assert b_positions.tolist() == list(range(24)) and b_slots[:16].tolist() == a_slots[:16].tolist()
    assert c_positions.tolist() == list(range(24)) and c_slots.tolist() == b_slots.tolist()
    assert table.borrowers(1) == (2, 3) and table.borrowers(2) == (3,) and table.borrowers(3) == ()
    assert table.used_tokens == 28 and table.requests() == (1, 2)  # views cost nothing; 3 owns nothing
    assert table.held() == {1: (TokenRange(0, 20),), 2: (TokenRange(16, 24),)}
    assert table.shared() == {2: (TokenRange(0, 16),), 3: (TokenRange(0, 24),)}
    assert str(table) == (
        "PagedKVTable 28/64 tokens, 7/19 pages of 4, 2/3 requests, 40 tokens viewed\n"
        "  req 1: 20 tokens [0, 20) pages [0, 1, 2, 3, 4]; viewed by [2, 3]\n"
        "  req 2: 8 tokens [16, 24) pages [5, 6]; views [0, 16) of req 1; viewed by [3]\n"
        "  req 3: views [0, 16) of req 1, [16, 24) of req 2"
    )
    table.verify()
    table.release(3, TokenRange(16, 24))  # 3 no longer views 2: 2's reference falls
    assert table.borrowers(2) == () and table.borrowers(1) == (2, 3)
    table.release(2, TokenRange(20, 24))  # nobody views 2 now: its own tokens may go (and compact)
    table.take_moves()
    table.release(3)
    table.release(2)
    table.release(1)
    assert table.used_tokens == 0 and table.free_pages == table.num_pages and table.shared() == {}
    table.verify()


def test_a_borrower_writes_its_own_pages_and_counts_against_the_limit_only_then():
    table = PagedKVTable(capacity_tokens=8, page_size=4, max_requests=1)
    table.allocate(1, _arange(0, 8))
    assert table.free_tokens == 0
    assert table.share(2, 1, TokenRange(0, 4)) == 4  # no capacity, no request slot needed
    assert table.requests() == (1,)
    with pytest.raises(KVPoolFull, match="request 2: cannot become resident for 1 tokens, 1 of 1 requests already are"):
        table.allocate(2, _arange(4, 5))  # its first own token: a page of its own, checked as for any request
    assert table.share(9, 5, TokenRange(0, 4)) == 0 and table.shared() == {2: (TokenRange(0, 4),)}  # nothing held
    table.verify()


def test_share_errors():
    table = _chain()
    with pytest.raises(ValueError, match=r"request 2: cannot share \[0, 4\) of itself"):
        table.share(2, 2, TokenRange(0, 4))
    with pytest.raises(ValueError, match=r"request 2: cannot view \[14, 30\) of request 1: it already holds positions \[14, 15, 16, 17, 18, 19, 20, 21\] there"):
        table.share(2, 1, TokenRange(14, 30))
    with pytest.raises(ValueError, match=r"request 3: cannot view \[23, 26\) of request 1: it already holds positions \[23\] there"):
        table.share(3, 1, TokenRange(23, 26))
    table.allocate(4, _arange(0, 8))
    table.release(4, TokenRange(1, 6))  # 0 in one page, 6 and 7 in the other: 0 moves over
    with pytest.raises(RuntimeError, match=r"request 5: sharing \[0, 8\) of request 4 while 1 compaction moves are pending"):
        table.share(5, 4, TokenRange(0, 8))
    table.take_moves()
    assert table.share(5, 4, TokenRange(0, 8)) == 3
    table.verify()


def test_allocating_a_viewed_position_is_refused():
    table = _chain()
    with pytest.raises(ValueError, match=r"request 3: positions \[20, 23\] are views of shared KV on this table \(owners \[2\]\); a request writes only its own pages"):
        table.allocate(3, torch.tensor([24, 20, 23]))
    with pytest.raises(ValueError, match=r"request 2: positions \[3\] are views of shared KV on this table \(owners \[1\]\)"):
        table.allocate(2, torch.tensor([3]))
    assert table.allocate(3, _arange(24, 25)).tolist() == [28]  # past the views: a fresh page of its own
    table.verify()


def test_releasing_an_owner_with_borrowers_raises_and_changes_nothing():
    table = _chain()
    before = (str(table), [x.tolist() for x in table.resident(3)])
    with pytest.raises(RuntimeError, match=r"request 1: cannot release 20 of its 20 tokens \[0, 20\) while requests \[2, 3\] view its slots: they would read freed or moved slots; release the borrowers first"):
        table.release(1)
    with pytest.raises(RuntimeError, match=r"request 1: cannot release 2 of its 20 tokens \[18, 20\) while requests \[2, 3\]"):
        table.release(1, TokenRange(18, 40))  # tokens nobody views: compaction would still move the viewed ones
    with pytest.raises(RuntimeError, match=r"request 2: cannot release 8 of its 8 tokens \[16, 24\) while requests \[3\]"):
        table.release(2)  # its views would go, but its own tokens are viewed by 3
    assert (str(table), [x.tolist() for x in table.resident(3)]) == before
    table.release(1, TokenRange(30, 40))  # none of its tokens: nothing to refuse
    table.release(2, TokenRange(0, 4))  # views only: 2 still views 1 (on [4, 16))
    assert table.borrowers(1) == (2, 3) and table.shared()[2] == (TokenRange(4, 16),)
    table.verify()


def test_a_transaction_rolls_shares_and_view_releases_back():
    table = _chain()
    before = (str(table), table.shared(), table.borrowers(1), table.borrowers(2))
    with pytest.raises(KVPoolFull):
        with table.transaction():
            table.release(3)  # 1 and 2 lose borrower 3
            table.release(2, TokenRange(0, 8))
            assert table.share(4, 2, TokenRange(0, 24)) == 16
            table.allocate(5, _arange(0, 100))
    assert (str(table), table.shared(), table.borrowers(1), table.borrowers(2)) == before
    table.verify()


def test_verify_finds_dangling_views_and_wrong_counts():
    table = _chain()
    table._views[3].slots[0] = 99  # corrupt: a slot request 1 does not hold at position 0
    with pytest.raises(AssertionError, match=r"request 3: the view of position 0 at slot 99 dangles: owner 1 holds that position at slot 0"):
        table.verify()
    table = _chain()
    table._borrowers[1].discard(3)
    with pytest.raises(AssertionError, match=r"borrowers \{1: \[2\], 2: \[3\]\} != the distinct requests viewing each owner \{1: \[2, 3\], 2: \[3\]\}"):
        table.verify()


def test_a_continued_prefill_and_decode_read_a_shared_prefix():
    """Request 2's prompt starts with request 1's first 32 tokens: it views their slots and
    prefills only its own tail from 32 (the chunked continuation), then both decode. Logits
    match the float64 model on each full sequence, so the lowering read the shared prefix
    through `resident` exactly as if request 2 owned it."""
    spec = ModelSpec(preset="tiny")
    model, reference = build_model(spec), build_model(spec, dtype=torch.float64)
    lowering = Lowering(model)
    table = PagedKVTable(capacity_tokens=128, page_size=16, max_requests=2)
    pool = pool_tensor(spec, table.num_slots, torch.float32)
    first = torch.arange(3, 40)
    second = torch.cat((first[:32], torch.tensor([5, 9, 2, 7, 1])))
    sequences = {1: first, 2: second}

    def check(logits, requests):
        for request in requests:
            torch.testing.assert_close(logits[request].double(), reference(sequences[request])[-1], **TOLERANCES[torch.float32])

    with torch.inference_mode():
        prefill = IterationPlan(0, (PrefillBatch((0,), (PrefillItem(1, 0, 37, even_retention(0, 37, (0,))),)),))
        check(lowering.lower(prefill).run(0, pool, table, {1: first}), [1])
        assert table.share(2, 1, TokenRange(0, 32)) == 32
        continued = IterationPlan(1, (PrefillBatch((0,), (PrefillItem(2, 32, 37, even_retention(32, 37, (0,))),)),))
        check(lowering.lower(continued).run(0, pool, table, {2: second[32:]}), [2])
        assert table.used_tokens == 37 + 5 and table.held()[2] == (TokenRange(32, 37),)
        decode = IterationPlan(2, (DecodeBatch((0,), (DecodeItem(1, 0, ((0, 37),)), DecodeItem(2, 0, ((0, 37),)))),))
        new = {1: torch.tensor([11]), 2: torch.tensor([12])}
        logits = lowering.lower(decode).run(0, pool, table, new)
        sequences = {r: torch.cat((s, new[r])) for r, s in sequences.items()}
        check(logits, [1, 2])
        with pytest.raises(RuntimeError, match=r"request 1: cannot release 38 of its 38 tokens \[0, 38\) while requests \[2\]"):
            lowering.lower(IterationPlan(3, (), frees=(1, 2))).run(0, pool, table, {})
        lowering.lower(IterationPlan(3, (), frees=(2, 1))).run(0, pool, table, {})  # the borrower first
    assert table.used_tokens == 0 and table.free_pages == table.num_pages and table.shared() == {}
