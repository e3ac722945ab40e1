"""The prefix cache of a ClusterState: finished requests kept for their KV, found by block keys.

Real long-context traffic repeats itself (multi-turn chats resend the conversation, agents
and RAG share long system prompts), so a finished request's KV is worth keeping. The cache
keeps it in place — on whichever instances hold it, spread by an elastic prefill or moved by
migrations — under the finished request's own id: a cache *entry*. Nothing is copied.

Keys. A request's prompt is cut into blocks of `block_tokens`; block j's key chains the
id of the block with the key of block j − 1 (vLLM's hash chain), so equal keys mean equal
tokens in blocks 0..j. The simulator's ids are the workload's `Request.prefix_hashes`
(Mooncake's 512-token block ids); the runtime's are hashes of the token ids themselves, and
it adds the blocks a request generates, so a conversation's next turn finds its replies too.

Entries form a tree. A request that borrowed [0, P) from entry E and computed the rest
becomes, when it finishes, an entry whose own KV is [P, tokens) and whose parent is E:
reading [0, tokens) of it reads E's blocks through it. An entry is found by its full blocks only;
the KV past its last full block (fewer than `block_tokens` tokens) stays with it, unread.

Pins and eviction. An entry is *pinned* while a running request borrows from it or from any
entry below it (the request reads every block on the way up). Unpinned entries are cached
memory the scheduler may treat as free: `ClusterState.free` does, and `ClusterState.start`
evicts least-recently-used unpinned entries (a whole subtree at a time: children borrow
their parent's blocks) from each instance that needs the room its plan takes. A pinned entry
is never evicted, so a running request never loses KV it reads. `max_entries` bounds the
entries (a page table holds each one's partly filled last page; see
`espc.backend.kvpool`): past it the least-recently-used unpinned subtree goes.

Matching reads at most `prompt_len − 1` tokens: the last prompt token is always computed,
because its logits give the first output token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from espc.planner.plan import RequestId


def chain(block_ids: Iterable[int], previous: int = 0) -> list[int]:
    """Chained keys of consecutive blocks: key j identifies blocks 0..j (after `previous`)."""
    keys = []
    for block in block_ids:
        previous = hash((previous, block))
        keys.append(previous)
    return keys


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached prefix of a prompt: [0, tokens) of entry `source`."""

    source: RequestId
    tokens: int


@dataclass(eq=False)
class CacheEntry:
    """A finished request kept for its KV. `keys`: its blocks' chained keys (borrowed ones
    included), `start`: where its own KV begins (the tokens it borrowed from `parent`)."""

    id: RequestId
    keys: tuple[int, ...]
    start: int
    parent: RequestId | None
    last_used: int
    pins: int = 0  # running requests reading it (directly or through an entry below it)
    children: set[RequestId] = field(default_factory=set)


class PrefixCache:
    """The index: chained block key -> the entries holding that block."""

    def __init__(self, block_tokens: int, max_entries: int):
        if block_tokens < 1 or max_entries < 1:
            raise ValueError(f"a prefix cache needs block_tokens ≥ 1 and max_entries ≥ 1, got {block_tokens}, {max_entries}")
        self.block_tokens = block_tokens
        self.max_entries = max_entries
        self.entries: dict[RequestId, CacheEntry] = {}
        self._index: dict[int, dict[RequestId, None]] = {}  # ordered sets: oldest entry first
        self._clock = 0
        # Counters for reports and metrics: prompt tokens looked up and found, blocks evicted.
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    def tokens(self, entry: RequestId) -> int:
        return len(self.entries[entry].keys) * self.block_tokens

    def match(self, keys: Sequence[int], prompt_len: int) -> PrefixMatch | None:
        """The longest cached prefix of a prompt with these block keys (block-aligned, fewer
        than `prompt_len` tokens), from the most recently used entry holding it."""
        usable = min(len(keys), (prompt_len - 1) // self.block_tokens)
        blocks = 0
        while blocks < usable and keys[blocks] in self._index:
            blocks += 1
        if not blocks:
            return None
        holders = self._index[keys[blocks - 1]]
        source = max(holders, key=lambda entry: (self.entries[entry].last_used, entry))
        return PrefixMatch(source, blocks * self.block_tokens)

    def insert(self, entry: RequestId, keys: Sequence[int], start: int, parent: RequestId | None) -> CacheEntry:
        """Keep a finished request: its KV [0, len(keys) × block_tokens), its own from `start`."""
        if entry in self.entries:
            raise ValueError(f"request {entry} is cached already")
        if parent is not None and start > self.tokens(parent):
            raise ValueError(f"request {entry} starts its own KV at {start}, past the {self.tokens(parent)} tokens of {parent}")
        self._clock += 1
        cached = CacheEntry(entry, tuple(keys), start, parent, self._clock)
        self.entries[entry] = cached
        if parent is not None:
            self.entries[parent].children.add(entry)
        for key in cached.keys[start // self.block_tokens:]:
            self._index.setdefault(key, {})[entry] = None
        return cached

    def remove(self, entry: RequestId) -> None:
        """Forget an entry with no children and no pins (its KV is being freed)."""
        cached = self.entries[entry]
        if cached.children or cached.pins:
            raise ValueError(f"cached request {entry} is still read (children {sorted(cached.children)}, pins {cached.pins})")
        for key in cached.keys[cached.start // self.block_tokens:]:
            holders = self._index[key]
            del holders[entry]
            if not holders:
                del self._index[key]
        if cached.parent is not None:
            self.entries[cached.parent].children.discard(entry)
        self.evicted_blocks += len(cached.keys) - cached.start // self.block_tokens
        del self.entries[entry]

    def lineage(self, entry: RequestId | None) -> Iterator[CacheEntry]:
        """The entry and its ancestors, nearest first."""
        while entry is not None:
            cached = self.entries[entry]
            yield cached
            entry = cached.parent

    def touch(self, entry: RequestId) -> None:
        self._clock += 1
        for cached in self.lineage(entry):
            cached.last_used = self._clock

    def subtree(self, entry: RequestId) -> list[RequestId]:
        """The entry and everything below it, leaves first (the order to evict them)."""
        order: list[RequestId] = []

        def visit(node: RequestId) -> None:
            for child in sorted(self.entries[node].children):
                visit(child)
            order.append(node)

        visit(entry)
        return order

    def lru_unpinned(self) -> list[RequestId]:
        """Unpinned entries, least recently used first (ties: oldest id)."""
        return sorted((e.id for e in self.entries.values() if not e.pins), key=lambda e: (self.entries[e].last_used, e))

    def verify(self) -> None:
        """Children and parents agree; every own block is indexed; no entry is its own ancestor."""
        for cached in self.entries.values():
            seen = set()
            for ancestor in self.lineage(cached.id):
                if ancestor.id in seen:
                    raise AssertionError(f"cached request {cached.id} is its own ancestor")
                seen.add(ancestor.id)
            if cached.parent is not None and cached.id not in self.entries[cached.parent].children:
                raise AssertionError(f"cached request {cached.id} is missing from its parent's children")
            for key in cached.keys[cached.start // self.block_tokens:]:
                if cached.id not in self._index.get(key, {}):
                    raise AssertionError(f"a block of cached request {cached.id} is not indexed")
