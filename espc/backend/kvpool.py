"""One rank's KV pool: the tensor [layers, 2, slots, kv_heads, head_dim] the graphs read and
write (`pool_tensor`), and the table of which slot holds which token (`PagedKVTable`, the
backend's `SlotTable`: `espc.backend.lower`). The runtime splits the two — each worker holds
its tensor, the driver one table per worker — and the gloo harness keeps both in each rank;
both apply a plan to a table the same way, through `Program.inputs`.

A table answers `allocate` when a plan's inputs are computed, `share` when a plan's prefix
hits apply, and `release` on finish, preemption, cancel, migration and cache eviction. Slots
are handed out in pages of `page_size`: each resident request owns a list of pages (its page
table) and fills slots only inside them, so the pool never interleaves two requests inside
one page. Tokens are still tracked one by one, because elastic sequence parallelism keeps
arbitrary subsets of a request on a rank (a striped every-d-th share of a prefill, a
migrated span).

Sizing: `capacity_tokens` bounds the tokens held; the pool has one extra page per request on
top of ceil(capacity / page_size), which covers the partly filled last page of each of the
`max_requests` resident requests.

No fragmentation: every request keeps fewer than `page_size` spare slots (free slots inside
its own pages). An allocation fills its spare slots first and then takes fresh pages, which
keeps that true; a release of a span out of the middle of its pages (a migration's source
gives up the range it sent: striped prefill slots spread any range over every page) would
not, so the release *compacts* the request: it keeps the ceil(held / page_size) pages with
the most used slots, moves the tokens of the others into the kept pages' holes and returns
the emptied pages. A request holding n tokens thus owns exactly ceil(n / page_size) pages,
and the pages of all of them fit the pool whenever their tokens fit the capacity:
sum ceil(n_r / page_size) <= ceil(capacity / page_size) + max_requests. So an allocation
that fits the free tokens (and the request limit) always gets its slots (the property test
in tests/test_kvpool.py); `KVPoolFull` means tokens or the request limit, never pages.

Compaction moves KV inside the pool: `take_moves` hands out the (source, destination) slot
pairs of the releases since the last call, composed so that they apply all at once, reads
before writes (`kv_pack` then `kv_unpack`). `Program.inputs` takes them after the releases
of a plan and the graph applies them last, after everything of the iteration has read or
written the pool; no slot is allocated while moves are pending.

`transaction()` applies a plan's bookkeeping all or nothing: the driver computes every rank's
inputs inside one, and an exception (a `KVPoolFull`) rolls each table back to where it was
(shares and releases of views included).

Shared prefixes (prefix caching): `share(request, source, span)` gives `request` read-only
*views* of the tokens `source` has on this table inside `span` — the same slots, no copy. A
view names the slot's *owner*, the request whose pages hold it: `source` for its own tokens,
and for the views `source` holds itself (a cached entry borrowing its prefix from its parent
entry) their owner, so views never chain. Each owner counts its *borrowers*, the distinct
requests holding at least one view of its slots (one reference per borrower however many
tokens): `borrowers(owner)`. `resident(request)` returns the views first (the prefix, sorted
by position), then the request's own tokens in allocation order; the lowering reads a
request's context through it (decode, continued prefill, migration packing) and never needs
to know which is which. `held()` lists own tokens only, `shared()` the views.

An owner with borrowers cannot release any of its tokens (it raises, table unchanged): a
full release would free slots its borrowers read, and a partial one would compact it, moving
slots under their views. The planner never does it — a cache entry is evicted only once
nobody references it — so the error means planner and table disagree. A borrower's views
go away with its own release (any span); views own no pages, so dropping them compacts
nothing. A borrower's new tokens always go to its own pages (`allocate` refuses a position
it views), so a write never reaches a shared page: the prefix hit ends at a block boundary,
the borrower's first token past it gets a fresh slot in its own pages, and copy-on-write at
the divergence point happens for free.

Views consume no capacity: `used_tokens`, `free_tokens` and the pages count own tokens only.
Nor do they make a request resident: `max_requests` bounds the requests that own tokens
(`requests()`), the ones that need the extra partly filled page of the sizing above, so a
request holding only views still fits the sizing, and `share` never raises `KVPoolFull`. A
borrower becomes resident with its first own token, when `allocate` checks the limit as for
any request.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from espc.frontend.spec import ModelSpec
from espc.planner.plan import RequestId, TokenRange

_LONG = torch.int64
_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def pool_tensor(
    spec: ModelSpec, slots: int, dtype: torch.dtype, device: torch.device | str = "cpu", kv_heads: int | None = None
) -> torch.Tensor:
    """The pool of one rank, not zeroed: every read goes through slots a table handed out,
    which a graph wrote first, so untouched pages of a large CPU pool cost no memory.
    `kv_heads`: the KV heads the rank holds (its TP shard's); default all of the model's.

    Indexed [layers, 2, slots, kv_heads, head_dim] (`espc.backend.ops`), laid out head-major
    in memory ([layers, 2, kv_heads, slots, head_dim], a transposed view): a run of slots is
    then, per head, one contiguous block, as attention reads it: the torch reference's
    fused kernel attends over 8K keys of a 4-head, 64-dim layer in 1.9 ms so, 2.5 ms with
    the heads interleaved. Every op indexes the pool by slot, whatever its layout."""
    heads = spec.kv_heads if kv_heads is None else kv_heads
    return torch.empty((spec.layers, 2, heads, slots, spec.head_dim), dtype=dtype, device=device).transpose(2, 3)


class KVPoolFull(RuntimeError):
    """An allocation does not fit; the table is unchanged. `request`: whose allocation it was."""

    def __init__(self, request: RequestId, message: str) -> None:
        super().__init__(message)
        self.request = request


class _Resident:
    """One request's own tokens on the table. `positions` (in allocation order) and `slots`
    (the slot of each) are the first `held` entries of buffers that grow by doubling, so a
    decode step's append costs O(new tokens), not a copy of the context. An append writes
    only past `held`, and everything else replaces the buffers, so a tensor once returned
    (to a graph's inputs, or kept by a transaction to restore) never changes."""

    def __init__(self, pages: list[int], positions: torch.Tensor, members: set[int], slots: torch.Tensor, spare: torch.Tensor):
        self.pages = pages  # the page table, in acquisition order
        self.members = members  # the positions: a membership test per decode step stays O(1)
        self.spare = spare  # sorted free slots inside its own pages, refilled first
        self.positions, self.slots = positions, slots

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:self.held]

    @positions.setter
    def positions(self, positions: torch.Tensor) -> None:
        self._positions, self.held = positions, len(positions)

    @property
    def slots(self) -> torch.Tensor:
        return self._slots[:self.held]

    @slots.setter
    def slots(self, slots: torch.Tensor) -> None:
        self._slots = slots

    def append(self, positions: torch.Tensor, slots: torch.Tensor) -> None:
        n, end = self.held, self.held + len(positions)
        if end > min(len(self._positions), len(self._slots)):
            capacity = max(2 * end, 64)
            self._positions = torch.cat((self._positions[:n], torch.empty(capacity - n, dtype=_LONG)))
            self._slots = torch.cat((self._slots[:n], torch.empty(capacity - n, dtype=_LONG)))
        self._positions[n:end] = positions
        self._slots[n:end] = slots
        self.held = end


@dataclass(frozen=True)
class _Views:
    """A request's read-only views of other requests' slots; replaced, never changed in
    place, so a transaction restores one by keeping the old object."""

    positions: torch.Tensor  # sorted
    slots: torch.Tensor  # the slot of each position, in its owner's pages
    owners: torch.Tensor  # the request whose pages hold each slot
    members: frozenset[int]  # the positions: an allocation's overlap test stays O(new tokens)


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=_LONG)


def _ranges(positions: torch.Tensor) -> tuple[TokenRange, ...]:
    """Sorted, merged ranges covering a set of distinct positions."""
    if not len(positions):
        return ()
    ordered = positions.sort().values
    breaks = (torch.nonzero(ordered.diff() != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, len(ordered)]
    values = ordered.tolist()
    return tuple(TokenRange(values[s], values[e - 1] + 1) for s, e in zip(starts, ends))


def _format(ranges: tuple[TokenRange, ...]) -> str:
    return " ".join(str(r) for r in ranges)


class PagedKVTable:
    """Who holds which slots of one rank's KV pool (a `espc.backend.lower.SlotTable`)."""

    def __init__(self, capacity_tokens: int, page_size: int, max_requests: int):
        if capacity_tokens < 0 or page_size < 1 or max_requests < 1:
            raise ValueError(
                f"KV table needs capacity_tokens >= 0, page_size >= 1 and max_requests >= 1; got "
                f"capacity_tokens={capacity_tokens}, page_size={page_size}, max_requests={max_requests}"
            )
        self.capacity_tokens = capacity_tokens
        self.page_size = page_size
        self.max_requests = max_requests
        self.num_pages = math.ceil(capacity_tokens / page_size) + max_requests
        self._free_pages = list(range(self.num_pages))  # a heap: the lowest page goes out first
        self._residents: dict[RequestId, _Resident] = {}
        self._views: dict[RequestId, _Views] = {}
        self._borrowers: dict[RequestId, set[RequestId]] = {}  # owner -> requests viewing its slots (none: absent)
        self._used = 0
        self._moves: dict[int, int] = {}  # compaction moves not yet taken: destination -> source slot
        # In a transaction: each touched request's state before it (None: not resident), and
        # the pages taken from (+1) and returned to (-1) the free heap since it began.
        self._touched: dict[RequestId, tuple | None] | None = None
        self._touched_views: dict[RequestId, _Views | None] = {}  # likewise, each touched request's views
        self._page_moves: Counter[int] = Counter()

    # ------------------------------------------------------------------------ SlotTable

    def resident(self, request: RequestId) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, slots) of the request's tokens on this table: its views first (the
        shared prefix, sorted by position), then its own tokens in allocation order."""
        entry, views = self._residents.get(request), self._views.get(request)
        if views is None:
            return (entry.positions, entry.slots) if entry else (_empty(), _empty())
        if entry is None:
            return views.positions, views.slots
        return torch.cat((views.positions, entry.positions)), torch.cat((views.slots, entry.slots))

    def allocate(self, request: RequestId, positions: torch.Tensor) -> torch.Tensor:
        """One slot per position, in the same order: the request's free slots in its own pages
        first (lowest first), then fresh pages. Raises `KVPoolFull` (table unchanged) when the
        tokens or the request count run out; pages cannot (see the module docstring)."""
        if self._moves:
            raise RuntimeError(
                f"request {request}: allocating while {len(self._moves)} compaction moves are pending would "
                "hand out a slot they still read; take_moves() first"
            )
        entry, views = self._residents.get(request), self._views.get(request)
        positions, values = self._checked(request, positions, entry.members if entry else set())
        if views is not None and not views.members.isdisjoint(values):
            viewed = sorted(views.members.intersection(values))
            raise ValueError(
                f"request {request}: positions {viewed[:8]} are views of shared KV on this table (owners "
                f"{self._owners_of(views, viewed)}); a request writes only its own pages"
            )
        n = len(positions)
        if n == 0:  # a rank that keeps nothing of a batch does not become resident
            return _empty()
        if entry is None and len(self._residents) >= self.max_requests:
            raise KVPoolFull(request, (
                f"request {request}: cannot become resident for {n} tokens, "
                f"{len(self._residents)} of {self.max_requests} requests already are"
            ))
        if self._used + n > self.capacity_tokens:
            raise KVPoolFull(request, (
                f"request {request}: {n} tokens do not fit, {self.free_tokens} of "
                f"{self.capacity_tokens} tokens free"
            ))
        spare = entry.spare if entry else _empty()
        new_pages = math.ceil(max(n - len(spare), 0) / self.page_size)
        # Every request owns ceil(held / page_size) pages, so tokens that fit find their pages.
        assert new_pages <= len(self._free_pages), f"request {request}: {new_pages} pages needed, {self}"
        self._touch(request)
        pages = [self._take_page() for _ in range(new_pages)]
        candidates = torch.cat((spare, self._page_slots(pages)))
        slots, spare = candidates[:n], candidates[n:]
        if entry is None:
            self._residents[request] = _Resident(pages, positions, set(values), slots, spare)
        else:
            entry.pages.extend(pages)
            entry.append(positions, slots)
            entry.members.update(values)
            entry.spare = spare
        self._used += n
        return slots

    def release(self, request: RequestId, span: TokenRange | None = None) -> None:
        """Drop the request's tokens and views in `span` (all when None). Holding none of
        them is fine: a plan frees a request on every rank, also those that hold nothing of it.
        Raises RuntimeError (table unchanged) when that would drop own tokens of a request
        other requests view (`share`)."""
        entry, views = self._residents.get(request), self._views.get(request)
        borrowers = self._borrowers.get(request)
        if entry is not None and borrowers:
            dropped = entry.positions if span is None else entry.positions[
                (entry.positions >= span.start) & (entry.positions < span.end)
            ]
            if len(dropped):
                raise RuntimeError(
                    f"request {request}: cannot release {len(dropped)} of its {len(entry.positions)} tokens "
                    f"{_format(_ranges(dropped))} while requests {sorted(borrowers)} view its slots: they would "
                    "read freed or moved slots; release the borrowers first"
                )
        if views is not None:
            self._drop_views(request, views, span)
        if entry is None:
            return
        self._touch(request)
        if span is not None:
            drop = (entry.positions >= span.start) & (entry.positions < span.end)
            if not drop.all():
                self._drop(entry, drop)
                return
        self._used -= len(entry.positions)
        for page in entry.pages:
            self._return_page(page)
        del self._residents[request]

    def take_moves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, destinations): the compaction moves of the releases since the last call,
        to apply at once, reading every source before writing any destination
        (`pool[:, :, destinations] = pool[:, :, sources]`). Empty when nothing moved."""
        moves, self._moves = self._moves, {}
        if not moves:
            return _empty(), _empty()
        return torch.tensor(list(moves.values()), dtype=_LONG), torch.tensor(list(moves), dtype=_LONG)

    def share(self, request: RequestId, source: RequestId, span: TokenRange) -> int:
        """Give `request` read-only views of the tokens `source` has on this table at positions
        inside `span`, its own and those it views itself: the same slots, no copy. Each slot's
        owner gets `request` as a borrower. Returns the number of tokens viewed (0: this table
        holds none of the span, nothing changes). Raises ValueError when `request` is `source`
        or already holds (or views) a position inside `span`, RuntimeError while compaction
        moves are pending (the slots would not hold their tokens yet); the table is unchanged."""
        if self._moves:
            raise RuntimeError(
                f"request {request}: sharing {span} of request {source} while {len(self._moves)} compaction moves "
                "are pending would view slots not yet filled; take_moves() first"
            )
        if request == source:
            raise ValueError(f"request {request}: cannot share {span} of itself")
        held = self.resident(request)[0]
        overlap = held[(held >= span.start) & (held < span.end)]
        if len(overlap):
            raise ValueError(
                f"request {request}: cannot view {span} of request {source}: it already holds positions "
                f"{sorted(overlap.tolist())[:8]} there"
            )
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        theirs, entry = self._views.get(source), self._residents.get(source)
        if theirs is not None:
            inside = (theirs.positions >= span.start) & (theirs.positions < span.end)
            parts.append((theirs.positions[inside], theirs.slots[inside], theirs.owners[inside]))
        if entry is not None:
            inside = (entry.positions >= span.start) & (entry.positions < span.end)
            positions = entry.positions[inside]
            parts.append((positions, entry.slots[inside], torch.full_like(positions, source)))
        n = sum(len(positions) for positions, _, _ in parts)
        if n == 0:
            return 0
        self._touch_views(request)
        mine = self._views.get(request)
        if mine is not None:
            parts.append((mine.positions, mine.slots, mine.owners))
        positions, slots, owners = (torch.cat(column) for column in zip(*parts))
        order = positions.argsort()
        positions = positions[order]
        self._views[request] = _Views(positions, slots[order], owners[order], frozenset(positions.tolist()))
        for owner in set(owners.tolist()):
            self._borrowers.setdefault(owner, set()).add(request)
        return n

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: an exception inside restores the table as it was on entry (the
        tokens held, slots, pages, pending moves), then propagates."""
        if self._touched is not None:
            raise RuntimeError("PagedKVTable.transaction() does not nest")
        used, moves = self._used, dict(self._moves)
        touched: dict[RequestId, tuple | None] = {}
        self._touched = touched
        self._page_moves.clear()
        try:
            yield
        except BaseException:
            for request, before in touched.items():
                if before is None:
                    self._residents.pop(request, None)
                    continue
                entry, pages, num_pages, positions, slots, spare = before
                entry.pages = pages[:num_pages]  # an allocation extends the list in place
                entry.positions, entry.slots, entry.spare = positions, slots, spare
                entry.members = set(positions.tolist())
                self._residents[request] = entry
            # Rebuilt only on a rollback: a copy of the heap per plan would cost O(pages).
            taken = [page for page, net in self._page_moves.items() if net > 0]
            returned = {page for page, net in self._page_moves.items() if net < 0}
            self._free_pages = [page for page in self._free_pages if page not in returned] + taken
            heapq.heapify(self._free_pages)
            for request, views in self._touched_views.items():
                if views is None:
                    self._views.pop(request, None)
                else:
                    self._views[request] = views
            if self._touched_views:
                self._borrowers = self._counted_borrowers()
            self._used, self._moves = used, moves
            raise
        finally:
            self._touched = None
            self._touched_views.clear()

    # ------------------------------------------------------------------------ accounting

    @property
    def num_slots(self) -> int:
        """Slots of the pool tensor this table manages."""
        return self.num_pages * self.page_size

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self._used

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def holds(self, request: RequestId) -> bool:
        """Whether the request owns or views any slot of this table."""
        return request in self._residents or request in self._views

    def requests(self) -> tuple[RequestId, ...]:
        """The resident requests (each owns at least one token; views alone do not count), sorted."""
        return tuple(sorted(self._residents))

    def pages(self, request: RequestId) -> tuple[int, ...]:
        """The request's page table, in acquisition order (empty when not resident)."""
        entry = self._residents.get(request)
        return tuple(entry.pages) if entry else ()

    def held(self) -> dict[RequestId, tuple[TokenRange, ...]]:
        """Each resident request's own positions as sorted, merged ranges (views: `shared`)."""
        return {request: _ranges(self._residents[request].positions) for request in self.requests()}

    def shared(self) -> dict[RequestId, tuple[TokenRange, ...]]:
        """Each request holding views: the positions it views, as sorted, merged ranges."""
        return {request: _ranges(self._views[request].positions) for request in sorted(self._views)}

    def borrowers(self, owner: RequestId) -> tuple[RequestId, ...]:
        """The requests viewing some of `owner`'s slots, sorted: its reference count is their
        number, and it cannot release a token while there is one."""
        return tuple(sorted(self._borrowers.get(owner, ())))

    def verify(self) -> None:
        """Check the table's invariants; raises AssertionError listing every violation."""
        problems: list[str] = []
        free = list(self._free_pages)
        if len(set(free)) != len(free):
            problems.append(f"free page list has duplicates: {sorted(free)}")
        owner: dict[int, RequestId | None] = dict.fromkeys(free)  # None: the free list
        all_slots = []
        for request, entry in sorted(self._residents.items()):
            for page in entry.pages:
                if page in owner:
                    holder = "the free list" if owner[page] is None else f"request {owner[page]}"
                    problems.append(f"page {page} of request {request} is also owned by {holder}")
                owner[page] = request
            n = len(entry.positions)
            if n == 0:
                problems.append(f"request {request} is resident with no tokens")
            if len(entry.slots) != n:
                problems.append(f"request {request}: {n} positions but {len(entry.slots)} slots")
            if len(entry.positions.unique()) != n or entry.members != set(entry.positions.tolist()):
                problems.append(f"request {request} holds a position twice or its position set is stale")
            mine = torch.cat((entry.slots, entry.spare))
            outside = mine[~torch.isin(mine // self.page_size, torch.tensor(entry.pages, dtype=_LONG))]
            if len(outside):
                problems.append(f"request {request}: slots {outside.tolist()[:8]} lie outside its pages {entry.pages}")
            if len(entry.slots) + len(entry.spare) != len(entry.pages) * self.page_size:
                problems.append(
                    f"request {request}: {len(entry.slots)} used + {len(entry.spare)} spare slots "
                    f"!= {len(entry.pages)} pages x {self.page_size}"
                )
            if not torch.equal(entry.spare, entry.spare.sort().values):
                problems.append(f"request {request}: spare slots are not sorted")
            if len(entry.spare) >= self.page_size:
                problems.append(
                    f"request {request} keeps {len(entry.spare)} spare slots, a page's worth or more: "
                    f"{len(entry.pages)} pages for {n} tokens (compaction keeps ceil({n} / {self.page_size}))"
                )
            all_slots += [entry.slots, entry.spare]
        missing, beyond = set(range(self.num_pages)) - set(owner), set(owner) - set(range(self.num_pages))
        if missing or beyond:
            problems.append(f"pages {sorted(missing)[:8]} are neither free nor owned, pages {sorted(beyond)[:8]} beyond the pool")
        slots = torch.cat(all_slots) if all_slots else _empty()
        if len(slots.unique()) != len(slots):
            problems.append("a slot is given out twice")
        used = sum(len(entry.positions) for entry in self._residents.values())
        if used != self._used:
            problems.append(f"used count {self._used} != {used} tokens held")
        if used > self.capacity_tokens:
            problems.append(f"{used} tokens held exceed the capacity {self.capacity_tokens}")
        if len(self._residents) > self.max_requests:
            problems.append(f"{len(self._residents)} resident requests exceed max_requests {self.max_requests}")
        problems += self._view_problems()
        if problems:
            raise AssertionError("KV table invalid:\n  " + "\n  ".join(problems))

    def __str__(self) -> str:
        lines = [
            f"PagedKVTable {self.used_tokens}/{self.capacity_tokens} tokens, {self.used_pages}/"
            f"{self.num_pages} pages of {self.page_size}, {len(self._residents)}/{self.max_requests} requests"
        ]
        if self._views:
            lines[0] += f", {sum(len(views.positions) for views in self._views.values())} tokens viewed"
        for request in sorted(self._residents.keys() | self._views.keys()):
            parts = []
            entry, views = self._residents.get(request), self._views.get(request)
            if entry is not None:
                parts.append(f"{len(entry.positions)} tokens {_format(_ranges(entry.positions))} pages {entry.pages}")
            if views is not None:
                parts.append("views " + ", ".join(
                    f"{_format(_ranges(views.positions[views.owners == owner]))} of req {owner}"
                    for owner in sorted(set(views.owners.tolist()))
                ))
            if request in self._borrowers:
                parts.append(f"viewed by {sorted(self._borrowers[request])}")
            lines.append(f"  req {request}: " + "; ".join(parts))
        return "\n".join(lines)

    # ------------------------------------------------------------------------ helpers

    @staticmethod
    def _checked(request: RequestId, positions: torch.Tensor, held: set[int]) -> tuple[torch.Tensor, list[int]]:
        """New, distinct, non-negative positions as a 1-D int64 tensor and as a list."""
        positions = torch.as_tensor(positions)
        if positions.dim() != 1 or positions.dtype not in _INTEGER:
            raise ValueError(
                f"request {request}: positions must be a 1-D integer tensor, got "
                f"{positions.dtype} of shape {tuple(positions.shape)}"
            )
        positions = positions.to(_LONG, copy=True)  # ours to keep, whatever the caller does with theirs
        values = positions.tolist()
        if values and min(values) < 0:
            raise ValueError(f"request {request}: negative positions {sorted(p for p in values if p < 0)[:8]}")
        if len(set(values)) != len(values):
            twice = sorted(p for p, count in Counter(values).items() if count > 1)
            raise ValueError(f"request {request}: positions {twice[:8]} given twice")
        if not held.isdisjoint(values):
            raise ValueError(
                f"request {request}: positions {sorted(held.intersection(values))[:8]} are already allocated on this table"
            )
        return positions, values

    def _drop_views(self, request: RequestId, views: _Views, span: TokenRange | None) -> None:
        """Drop the request's views in `span` (all when None); an owner it no longer views
        loses it as a borrower. Views own no pages: nothing to compact."""
        keep = torch.zeros_like(views.positions, dtype=torch.bool) if span is None else (
            (views.positions < span.start) | (views.positions >= span.end)
        )
        if keep.all():
            return
        self._touch_views(request)
        if keep.any():
            positions = views.positions[keep]
            kept = _Views(positions, views.slots[keep], views.owners[keep], frozenset(positions.tolist()))
            self._views[request] = kept
            remaining = set(kept.owners.tolist())
        else:
            del self._views[request]
            remaining = set()
        for owner in set(views.owners.tolist()) - remaining:
            borrowers = self._borrowers[owner]
            borrowers.discard(request)
            if not borrowers:
                del self._borrowers[owner]

    def _touch_views(self, request: RequestId) -> None:
        """In a transaction, remember the request's views before their first change."""
        if self._touched is not None and request not in self._touched_views:
            self._touched_views[request] = self._views.get(request)

    def _counted_borrowers(self) -> dict[RequestId, set[RequestId]]:
        """Each owner's borrowers, counted from the views (a rollback's rebuild; `verify`)."""
        borrowers: dict[RequestId, set[RequestId]] = {}
        for request, views in self._views.items():
            for owner in set(views.owners.tolist()):
                borrowers.setdefault(owner, set()).add(request)
        return borrowers

    @staticmethod
    def _owners_of(views: _Views, positions: list[int]) -> list[RequestId]:
        return sorted(set(views.owners[torch.isin(views.positions, torch.tensor(positions, dtype=_LONG))].tolist()))

    def _view_problems(self) -> list[str]:
        """`verify`'s checks of the views: each names a slot its owner still holds at the same
        position (and no pending move touches), none overlaps the request's own tokens, and the
        reference counts are the distinct borrowers."""
        problems = []
        owned: dict[RequestId, dict[int, int]] = {}  # owner -> {position: slot}, built on demand
        pending = torch.tensor([*self._moves, *self._moves.values()], dtype=_LONG)
        for request, views in sorted(self._views.items()):
            n = len(views.positions)
            if n == 0 or len(views.slots) != n or len(views.owners) != n:
                problems.append(
                    f"request {request}: views with {n} positions, {len(views.slots)} slots, {len(views.owners)} owners"
                )
                continue
            if not bool((views.positions.diff() > 0).all()) or views.members != set(views.positions.tolist()):
                problems.append(f"request {request}: viewed positions are not sorted and distinct, or their set is stale")
            entry = self._residents.get(request)
            if entry is not None and not entry.members.isdisjoint(views.members):
                both = sorted(entry.members & views.members)
                problems.append(f"request {request}: positions {both[:8]} are both its own and viewed")
            dangling = []
            for position, slot, owner in zip(views.positions.tolist(), views.slots.tolist(), views.owners.tolist()):
                if owner not in owned:
                    holder = self._residents.get(owner)
                    owned[owner] = dict(zip(holder.positions.tolist(), holder.slots.tolist())) if holder else {}
                if owned[owner].get(position) != slot:
                    dangling.append(
                        f"the view of position {position} at slot {slot} dangles: owner {owner} holds that "
                        f"position at slot {owned[owner].get(position)}"
                    )
            if dangling:
                problems.append(f"request {request}: " + "; ".join(dangling[:4]) + f" ({len(dangling)} views dangle)")
            moving = views.slots[torch.isin(views.slots, pending)]
            if len(moving):
                problems.append(f"request {request}: viewed slots {moving.tolist()[:8]} have compaction moves pending")
        counted = self._counted_borrowers()
        if counted != self._borrowers:
            problems.append(
                f"borrowers {dict(sorted((o, sorted(b)) for o, b in self._borrowers.items()))} != the distinct "
                f"requests viewing each owner {dict(sorted((o, sorted(b)) for o, b in counted.items()))}"
            )
        return problems

    def _take_page(self) -> int:
        page = heapq.heappop(self._free_pages)
        if self._touched is not None:
            self._page_moves[page] += 1
        return page

    def _return_page(self, page: int) -> None:
        heapq.heappush(self._free_pages, page)
        if self._touched is not None:
            self._page_moves[page] -= 1

    def _touch(self, request: RequestId) -> None:
        """In a transaction, remember the request's state before its first change."""
        if self._touched is None or request in self._touched:
            return
        entry = self._residents.get(request)
        self._touched[request] = None if entry is None else (
            entry, entry.pages, len(entry.pages), entry.positions, entry.slots, entry.spare
        )

    def _drop(self, entry: _Resident, drop: torch.Tensor) -> None:
        """Release some (not all) of a request's tokens, then compact it: keep the
        ceil(held / page_size) pages with the most used slots (the earlier in its page table
        on a tie), move the tokens of the others into their holes, and return the rest."""
        dropped = int(drop.sum())
        if dropped == 0:
            return
        self._used -= dropped
        spare = torch.cat((entry.spare, entry.slots[drop])).sort().values
        entry.members.difference_update(entry.positions[drop].tolist())
        entry.positions, slots = entry.positions[~drop], entry.slots[~drop]
        if len(spare) >= self.page_size:
            keep_count = math.ceil(len(slots) / self.page_size)
            used = Counter((slots // self.page_size).tolist())
            ranked = sorted(range(len(entry.pages)), key=lambda i: (-used[entry.pages[i]], i))
            kept = sorted(ranked[:keep_count])
            vacated = torch.tensor([entry.pages[i] for i in ranked[keep_count:]], dtype=_LONG)
            moving = torch.isin(slots // self.page_size, vacated)
            holes = spare[~torch.isin(spare // self.page_size, vacated)]
            sources, destinations = slots[moving], holes[:int(moving.sum())]
            slots = slots.clone()
            slots[moving] = destinations
            for source, destination in zip(sources.tolist(), destinations.tolist()):
                # Composed: a token moved twice before the pool applies them moves once.
                self._moves[destination] = self._moves.pop(source, source)
            spare = holes[len(destinations):]
            entry.pages = [entry.pages[i] for i in kept]
            for page in vacated.tolist():
                self._return_page(page)
        entry.slots, entry.spare = slots, spare

    def _page_slots(self, pages: list[int]) -> torch.Tensor:
        if not pages:
            return _empty()
        return (torch.tensor(pages, dtype=_LONG)[:, None] * self.page_size + torch.arange(self.page_size)).flatten()
