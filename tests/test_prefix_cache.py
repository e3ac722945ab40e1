"""The prefix cache: its index, the ClusterState that applies it, and the schedulers on it.

The index (`espc.planner.sim.prefix_cache.PrefixCache`) is checked on hand-built entries;
the ClusterState on hand-built plans whose token counts are worked out in the comments; and
the static, chunked and elastic schedulers on random shared-prefix workloads through the
simulator with every plan verified, against invariants recomputed from the requests
themselves (what each pool owns, what the cache may evict, who pins what) and the rule
every continued prefill obeys (its ring holds every instance its prefix lives on).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from espc.backend.kvpool import PagedKVTable
from espc.planner.compile.scheduler import ElasticScheduler
from espc.planner.plan import IterationPlan, PrefillBatch, PrefillItem, PrefixHit, Retention, TokenRange
from espc.planner.sim.cluster_state import ClusterState, RequestState
from espc.planner.sim.prefix_cache import PrefixCache, PrefixMatch, chain
from espc.planner.sim.simulator import simulate
from espc.planner.sim.strategies import ChunkedScheduler, Deployment, Scheduler, StaticScheduler
from espc.planner.sim.workload import PREFIX_BLOCK_TOKENS, Request
from espc.runtime.driver import table_mismatch
from tests.test_scheduler import INSTANCES, cost, milp_policy, policies, prefill_s, spec

BLOCK = PREFIX_BLOCK_TOKENS
TABLE_PAGE = 64  # the mirrored page tables' page size: blocks span several pages


# ------------------------------------------------------------------------------ the index


def test_chained_keys_name_a_block_and_everything_before_it():
    keys = chain([1, 2, 3])
    assert chain([1, 2]) == keys[:2]  # a prefix's keys are the prefix of the keys
    assert chain([9, 2, 3])[1:] != keys[1:]  # equal blocks after different ones differ
    assert chain([3], previous=keys[1]) == keys[2:]  # continuing a chain (the runtime's output blocks)


def cache_with(*entries: tuple[int, list[int], int, int | None], max_entries: int = 16) -> PrefixCache:
    cache = PrefixCache(BLOCK, max_entries)
    for entry, blocks, start, parent in entries:
        cache.insert(entry, chain(blocks), start, parent)
    return cache


def test_match_is_the_longest_cached_prefix_and_leaves_the_last_prompt_token():
    cache = cache_with((7, [1, 2, 3], 0, None))
    assert cache.match(chain([1, 2, 9]), 10 * BLOCK) == PrefixMatch(7, 2 * BLOCK)
    assert cache.match(chain([1, 2, 3, 4]), 10 * BLOCK) == PrefixMatch(7, 3 * BLOCK)
    assert cache.match(chain([2, 2, 3]), 10 * BLOCK) is None  # the first block differs
    # The last prompt token is always computed: a prompt of exactly 3 blocks reads 2 of them.
    assert cache.match(chain([1, 2, 3]), 3 * BLOCK) == PrefixMatch(7, 2 * BLOCK)
    assert cache.match(chain([1, 2, 3]), 3 * BLOCK + 1) == PrefixMatch(7, 3 * BLOCK)
    assert cache.match(chain([1]), BLOCK) is None


def test_match_reads_the_most_recently_used_holder():
    cache = cache_with((1, [5, 6], 0, None), (2, [5, 6], 0, None))
    assert cache.match(chain([5, 6, 7]), 10 * BLOCK) == PrefixMatch(2, 2 * BLOCK)
    cache.touch(1)
    assert cache.match(chain([5, 6, 7]), 10 * BLOCK) == PrefixMatch(1, 2 * BLOCK)


def test_entries_form_a_tree_and_removal_goes_leaves_first():
    # Entry 2 read blocks [1, 2] from entry 1 and computed blocks [3, 4] itself.
    cache = cache_with((1, [1, 2], 0, None), (2, [1, 2, 3, 4], 2 * BLOCK, 1))
    assert cache.match(chain([1, 2, 3, 4, 5]), 10 * BLOCK) == PrefixMatch(2, 4 * BLOCK)
    assert cache.match(chain([1, 2, 8]), 10 * BLOCK) == PrefixMatch(1, 2 * BLOCK)  # only 1 indexes [1, 2]
    assert [entry.id for entry in cache.lineage(2)] == [2, 1]
    assert cache.subtree(1) == [2, 1]
    cache.verify()
    with pytest.raises(ValueError, match="still read"):
        cache.remove(1)  # entry 2 reads its blocks
    cache.entries[2].pins = 1
    with pytest.raises(ValueError, match="still read"):
        cache.remove(2)  # a running request reads it
    cache.entries[2].pins = 0
    cache.remove(2)
    cache.remove(1)
    assert cache.evicted_blocks == 4  # own blocks: 2 of each
    assert cache.match(chain([1, 2, 3]), 10 * BLOCK) is None
    with pytest.raises(ValueError, match="cached already"):
        cache_with((1, [1], 0, None), (1, [1], 0, None))
    with pytest.raises(ValueError, match="past the"):
        cache_with((1, [1], 0, None), (2, [1, 2, 3], 2 * BLOCK, 1))  # starts past its parent's one block


def test_lru_lists_unpinned_entries_oldest_first():
    cache = cache_with((1, [1], 0, None), (2, [2], 0, None), (3, [3], 0, None))
    cache.touch(1)
    cache.entries[3].pins = 1
    assert cache.lru_unpinned() == [2, 1]


# ------------------------------------------------------------------ ClusterState with a cache


def cached_state(capacity: int = 4096, instances: int = 2, max_entries: int = 16) -> ClusterState:
    return ClusterState([capacity] * instances, check=True, prefix=PrefixCache(BLOCK, max_entries))


def prefill(state: ClusterState, request: Request, start: int, kept: dict[int, tuple[int, int]], hit: int | None = None) -> IterationPlan:
    """Arrive (if new), prefill [start, prompt) retained as `kept`, reading `hit`'s [0, start); run it to completion."""
    if request.id not in state.requests:
        state.arrive(request)
    retention = tuple(Retention(instance, TokenRange(*span)) for instance, span in kept.items())
    item = PrefillItem(request.id, start, request.prompt_len, retention)
    hits = (PrefixHit(request.id, hit, start),) if hit is not None else ()
    applied = state.start(IterationPlan(state.iteration, (PrefillBatch(tuple(sorted(kept)), (item,)),), hits=hits))
    for batch in applied.batches:
        state.complete(batch)
    return applied


def owners(state: ClusterState) -> list[RequestState]:
    assert state.prefix is not None
    return [*state.running.values(), *(state.requests[entry] for entry in state.prefix.entries)]


def assert_accounted(state: ClusterState) -> None:
    """Every pool's tokens recomputed from the requests: used + cached is what running
    requests and cache entries own there, cached is what unpinned entries own, and every
    entry is pinned once per running request reading it (through its descendants too)."""
    prefix = state.prefix
    assert prefix is not None
    for instance in range(state.num_instances):
        owned = sum(owner.owned_on(instance) for owner in owners(state))
        assert state.used[instance] + state.cached[instance] == owned, (instance, state.used, state.cached, owned)
        unpinned = sum(state.requests[e].owned_on(instance) for e, entry in prefix.entries.items() if not entry.pins)
        assert state.cached[instance] == unpinned, (instance, state.cached, unpinned)
        assert 0 <= state.used[instance] and state.used[instance] + state.cached[instance] <= state.capacity[instance]
    readers = Counter(
        entry.id for request in state.running.values() if request.source is not None for entry in prefix.lineage(request.source)
    )
    assert {e: entry.pins for e, entry in prefix.entries.items() if entry.pins} == dict(readers)
    prefix.verify()


def test_a_finished_request_is_kept_with_its_full_blocks_where_its_kv_is():
    state = cached_state()
    prefill(state, Request(0, 0.0, 1300, 1, (1, 2, 3)), 0, {0: (0, 1300)})
    # 1,300 tokens hold 2 full blocks: [0, 1024) is found by the index; the 276-token tail
    # stays with the entry, unread (releasing it would compact the page table).
    assert state.prefix is not None and list(state.prefix.entries) == [0]
    assert state.prefix.tokens(0) == 1024
    assert (state.used, state.cached) == ([0, 0], [1300, 0])
    assert state.take_evictions() == []
    assert state.free(0) == 4096  # cached memory nobody reads counts as free
    assert_accounted(state)


def test_a_hit_reads_views_that_pin_the_entry_instead_of_taking_room():
    state = cached_state()
    prefill(state, Request(0, 0.0, 1300, 1, (1, 2, 3)), 0, {0: (0, 1300)})
    reader = state.arrive(Request(1, 0.0, 1500, 2, (1, 2, 7)))
    match = state.prefix_match(reader)
    assert match == PrefixMatch(0, 1024)
    assert state.hit_holders(match) == {0: 1024}
    assert state.pinned_by(match) == {0: 1300}
    assert state.pinned_by(match, covered={0}) == {}  # another hit of the plan pins it already
    prefill(state, Request(1, 0.0, 1500, 2, (1, 2, 7)), 1024, {0: (1024, 1500)}, hit=0)
    # The reader holds [0, 1500) on instance 0 but owns only its 476 computed tokens; the
    # pinned entry's 1,300 move from cached to used (no longer evictable).
    assert (reader.kv_len, reader.owned_on(0), reader.cached_tokens) == (1500, 476, 1024)
    assert (state.used, state.cached) == ([1300 + 476, 0], [0, 0])
    assert state.prefix is not None and state.prefix.entries[0].pins == 1
    assert (state.prefix.queried_tokens, state.prefix.hit_tokens) == (1300 + 1500, 1024)
    assert_accounted(state)
    # Decoding on, the reader's shard on instance 0 includes its views (what attention reads).
    assert reader.shards() == ((0, 1500),)


def test_a_reader_without_a_full_block_of_its_own_is_freed_and_unpins():
    state = cached_state()
    prefill(state, Request(0, 0.0, 1300, 1, (1, 2, 3)), 0, {0: (0, 1300)})
    prefill(state, Request(1, 0.0, 1500, 1, (1, 2, 7)), 1024, {0: (1024, 1500)}, hit=0)
    # 1,500 tokens: 2 full blocks, both borrowed — nothing of its own to keep.
    assert state.prefix is not None and list(state.prefix.entries) == [0]
    assert (state.used, state.cached) == ([0, 0], [1300, 0])
    assert state.prefix.entries[0].pins == 0
    assert_accounted(state)


def tree_state() -> ClusterState:
    """Entry 0: [0, 1300) on instance 0; entry 2, its child: [1024, 2100) over instances 0 and 1."""
    state = cached_state()
    prefill(state, Request(0, 0.0, 1300, 1, (1, 2, 3)), 0, {0: (0, 1300)})
    prefill(state, Request(2, 0.0, 2100, 1, (1, 2, 3, 4, 5)), 1024, {0: (1024, 1600), 1: (1600, 2100)}, hit=0)
    return state


def test_a_reader_that_computed_full_blocks_becomes_a_child_entry():
    state = tree_state()
    assert state.prefix is not None
    entry = state.prefix.entries[2]
    assert (entry.parent, entry.start, len(entry.keys)) == (0, 1024, 4)
    # Its own KV [1024, 2100): 576 on instance 0, 500 on 1 (its tail past block 4 included).
    assert state.requests[2].kv == {0: [[0, 1600]], 1: [[1600, 2100]]}
    assert state.requests[2].borrowed == {0: [[0, 1024]]}
    assert (state.used, state.cached) == ([0, 0], [1300 + 576, 500])
    reader = state.arrive(Request(3, 0.0, 3000, 1, (1, 2, 3, 4, 9)))
    match = state.prefix_match(reader)
    assert match == PrefixMatch(2, 2048)
    assert state.hit_holders(match) == {0: 1600, 1: 448}
    assert state.pinned_by(match) == {0: 1300 + 576, 1: 500}  # the child and the parent it reads through
    assert_accounted(state)


def test_eviction_takes_the_least_recently_used_subtree_where_room_is_needed():
    state = tree_state()
    # A 3,000-token prompt on instance 0 (capacity 4,096) needs 780 of the 1,876 cached there:
    # the least recently used entry is 0 (entry 2 was inserted after 0's last hit), and 2
    # reads through it, so both go, children first.
    plan = IterationPlan(state.iteration, (PrefillBatch((0,), (PrefillItem(9, 0, 3000, (Retention(0, TokenRange(0, 3000)),)),)),))
    state.arrive(Request(9, 0.0, 3000, 1))
    applied = state.start(plan)
    assert applied.evictions == (2, 0)
    assert state.take_evictions() == [2, 0]
    assert state.prefix is not None and not state.prefix.entries
    assert (state.used, state.cached) == ([3000, 0], [0, 0])
    assert state.prefix.evicted_blocks == 4
    assert_accounted(state)


def test_a_pinned_entry_is_never_evicted():
    state = cached_state(capacity=3000)
    prefill(state, Request(0, 0.0, 1300, 1, (1, 2, 3)), 0, {0: (0, 1300)})  # entry 0: 1,300 on 0
    prefill(state, Request(1, 0.0, 1100, 1, (4, 5, 6)), 0, {0: (0, 1100)})  # entry 1: 1,100 on 0
    prefill(state, Request(2, 0.0, 1200, 50, (1, 2, 7)), 1024, {0: (1024, 1200)}, hit=0)  # decoding: pins 0
    assert state.prefix is not None and state.prefix.entries[0].pins == 1
    state.prefix.touch(1)  # entry 0 is now the least recently used
    # 1,500 more tokens on instance 0 (used 1,300 + 176, cached 1,100 of capacity 3,000) need 1,076:
    # only entry 1 may go, although entry 0 is older.
    state.arrive(Request(3, 0.0, 1500, 1))
    plan = IterationPlan(state.iteration, (PrefillBatch((0,), (PrefillItem(3, 0, 1500, (Retention(0, TokenRange(0, 1500)),)),)),))
    assert state.with_evictions(plan).evictions == (1,)
    state.start(plan)
    assert list(state.prefix.entries) == [0]
    assert_accounted(state)


def test_max_entries_evicts_the_least_recently_used_entry():
    state = cached_state(max_entries=2)
    for index in range(3):
        prefill(state, Request(index, 0.0, 600, 1, (10 * index + 1, 10 * index + 2)), 0, {index % 2: (0, 600)})
    assert state.prefix is not None and list(state.prefix.entries) == [1, 2]
    assert state.take_evictions() == [0]
    assert_accounted(state)


def test_retiring_an_instance_evicts_the_entries_holding_kv_on_it():
    state = tree_state()
    state.retire(1)  # entry 2 holds [1600, 2100) there; entry 0, its parent, stays
    assert state.prefix is not None and list(state.prefix.entries) == [0]
    assert (state.used, state.cached, state.capacity[1]) == ([0, 0], [1300, 0], 0)
    assert_accounted(state)


# --------------------------------------------------------- schedulers on shared-prefix work


class Checked(Scheduler):
    """A scheduler whose every decision is preceded by the accounting invariants, and whose
    every hit is checked: block-aligned, shorter than the prompt, read where the prefix
    lives (the ring holds every holder: a continued prefill attends to it in place)."""

    def __init__(self, inner: Scheduler):
        super().__init__(inner.deployment)
        self.inner = inner
        self.name = inner.name
        self.state: ClusterState | None = None
        self.hits = 0

    def admit(self, state: ClusterState, request: RequestState) -> str | None:
        return self.inner.admit(state, request)

    def schedule(self, state: ClusterState) -> IterationPlan | None:
        self.state = state
        assert_accounted(state)
        plan = self.inner.schedule(state)
        if plan is not None:
            rings = {item.request_id: batch.instances for batch in plan.batches for item in batch.items}
            for hit in plan.hits:
                request = state.requests[hit.request_id]
                assert hit.tokens % BLOCK == 0 and 0 < hit.tokens < request.pending_target, hit
                holders = state.hit_holders(PrefixMatch(hit.source, hit.tokens))
                assert set(holders) <= set(rings[hit.request_id]), (hit, holders, rings[hit.request_id])
            self.hits += len(plan.hits)
        return plan

    def batch_seconds(self, batch):
        return self.inner.batch_seconds(batch)

    def migration_seconds(self, migration):
        return self.inner.migration_seconds(migration)


@st.composite
def prefix_workloads(draw) -> tuple[Request, ...]:
    """Up to 24 requests in a burst: each starts with one of a few system prompts of 1 to 3
    blocks, or continues an earlier request's prompt (a conversation's next turn), then
    adds 0 to 2 blocks of its own and a partial block."""
    systems = [tuple(range(100 * g, 100 * g + draw(st.integers(1, 3)))) for g in range(draw(st.integers(1, 3)))]
    span = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5]))
    count = draw(st.integers(1, 24))
    requests: list[Request] = []
    for index in range(count):
        if requests and draw(st.booleans()):
            earlier = requests[draw(st.integers(0, len(requests) - 1))]
            head = earlier.prefix_hashes[:earlier.prompt_len // BLOCK]
        else:
            head = systems[draw(st.integers(0, len(systems) - 1))]
        hashes = head + tuple(10_000 + 10 * index + j for j in range(draw(st.integers(0, 2))))
        prompt = BLOCK * len(hashes) + draw(st.integers(1, BLOCK - 1))
        arrival = round(draw(st.floats(0, 1)) * span, 6)
        requests.append(Request(index, max(arrival, requests[-1].arrival_s if requests else 0.0), prompt, draw(st.integers(1, 24)), hashes))
    return tuple(requests)


@st.composite
def schedulers(draw, capacity: int) -> Scheduler:
    deployment = Deployment(1, (capacity,) * INSTANCES, cost())
    kind = draw(st.sampled_from(["static", "chunked", "elastic"]))
    if kind == "static":
        return StaticScheduler(deployment, draw(st.sampled_from([(1, 1, 1, 1), (2, 2), (4,), (2, 1, 1)])))
    if kind == "chunked":
        return ChunkedScheduler(deployment, draw(st.sampled_from([64, 512, 2048])))
    policy = draw(st.one_of(policies(capacity), st.just(None))) or milp_policy()
    note(f"{policy!r}")
    return ElasticScheduler(deployment, policy, spec().slo, prefill_s())


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schedulers_keep_the_cache_accounted_and_leak_nothing(data):
    capacity = data.draw(st.integers(1200, 6000))
    requests = data.draw(prefix_workloads())
    checked = Checked(data.draw(schedulers(capacity)))
    result = simulate(checked, requests, check=True, prefix_caching=True)
    event(f"{type(checked.inner).__name__}: {'hits' if checked.hits else 'no hit'}")
    state = checked.state
    assert state is not None and state.prefix is not None
    assert_accounted(state)
    assert not state.running and not state.waiting, [r.id for r in (*state.running.values(), *state.waiting.values())]
    for record in result.records:
        assert record.completed or "KV slots" in (record.rejected or ""), record
    assert result.prefix_hit_tokens == state.prefix.hit_tokens <= result.prefix_queried_tokens
    # The cache is all that holds KV at the end; taking every instance out of service
    # evicts it and leaves nothing behind.
    for instance in range(state.num_instances):
        state.retire(instance)
    assert not state.prefix.entries
    assert state.used == [0] * INSTANCES and state.cached == [0] * INSTANCES


@pytest.mark.parametrize("kind", ["static", "chunked", "elastic"])
def test_the_schedulers_read_cached_prefixes(kind):
    """A shared 3-block system prompt and spread arrivals: every scheduler serves part of
    the prompts from the cache (and is checked as above while doing it)."""
    requests = tuple(
        Request(index, 0.02 * index, 3 * BLOCK + 100 + 7 * index, 4, (1, 2, 3, 1000 + index)) for index in range(12)
    )
    deployment = Deployment(1, (8000,) * INSTANCES, cost())
    inner: Scheduler = {
        "static": lambda: StaticScheduler(deployment, (1, 1, 2)),
        "chunked": lambda: ChunkedScheduler(deployment, 512),
        "elastic": lambda: ElasticScheduler(deployment, milp_policy(), spec().slo, prefill_s()),
    }[kind]()
    checked = Checked(inner)
    result = simulate(checked, requests, check=True, prefix_caching=True)
    assert all(record.completed for record in result.records)
    # Every entry holds the 3 shared blocks (and its own 4th is never asked for again).
    assert checked.hits > 0 and result.prefix_hit_tokens == checked.hits * 3 * BLOCK


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_caching_changes_nothing_without_prefix_hashes(data):
    """Regression guard: a workload that names no blocks runs the same with the cache on."""
    capacity = data.draw(st.integers(1200, 6000))
    requests = tuple(
        Request(r.id, r.arrival_s, r.prompt_len, r.output_len) for r in data.draw(prefix_workloads())
    )
    make = data.draw(schedulers(capacity))
    off = simulate(make, requests, check=True)
    fresh = {
        StaticScheduler: lambda: StaticScheduler(make.deployment, tuple(len(g) for g in make.groups)),
        ChunkedScheduler: lambda: ChunkedScheduler(make.deployment, make.chunk_tokens),
        ElasticScheduler: lambda: ElasticScheduler(make.deployment, make.policy, make.slo, make.prefill_s),
    }[type(make)]()
    on = simulate(fresh, requests, check=True, prefix_caching=True)
    assert on.records == off.records
    assert (on.iterations, on.instance_busy_s, on.migrated_tokens) == (off.iterations, off.instance_busy_s, off.migrated_tokens)
    assert on.prefix_hit_tokens == 0
    assert on.prefix_queried_tokens >= sum(record.prompt_len for record in on.records if record.completed)


def test_the_runtime_runs_the_elastic_scheduler_s_hits_on_a_spread_prefix():
    """End to end on the tiny CPU spec: with 40 KV slots per instance, an 83-token prompt's
    KV spreads over three instances; sent again, it reads its 5 cached blocks (80 tokens,
    on at least two instances) where they live — the backend refuses a ring without every
    holder — and gives the float64 reference's tokens and logits."""
    import torch

    from espc import load_spec
    from espc.model.llama import build_model
    from espc.planner.compile.policy import ElasticPolicy, LengthBucket
    from espc.planner.sim.costmodel import CostModel
    from espc.planner.sim.metrics import isolated_prefill
    from espc.runtime.engine import Engine
    from tests.conftest import TINY_SPEC
    from tests.test_engine import assert_matches_reference
    from tests.test_prefix_caching import BLOCK as RUNTIME_BLOCK
    from tests.test_prefix_caching import LONG, generate

    tiny = load_spec(TINY_SPEC)
    tiny_cost = CostModel.from_spec(tiny)
    capacity = 40
    policy = ElasticPolicy(1, (LengthBucket(0, 100_000, 1.0, 1, 4096, INSTANCES),), 0.0, capacity, 0, False, False, 0, 0.0, 30.0)
    elastic = ElasticScheduler(Deployment.build(tiny_cost, 1, capacity), policy, tiny.slo, isolated_prefill(tiny_cost))
    with Engine(tiny, scheduler=elastic, kv_capacity=capacity) as engine:
        first = generate(engine, [LONG])
        again = generate(engine, [LONG])
        engine.check_kv()
        stats = engine.stats()
    assert_matches_reference(build_model(tiny.model, dtype=torch.float64), [LONG, LONG], first + again)
    assert [first[0].cached_tokens, again[0].cached_tokens] == [0, 5 * RUNTIME_BLOCK]
    assert stats["prefix_cache"]["hit_tokens"] == 5 * RUNTIME_BLOCK


# ------------------------------------------------------- the index and the page tables together


def mirrored_run(scheduler: Scheduler, requests: Sequence[Request], max_entries: int) -> tuple[ClusterState, list[PagedKVTable]]:
    """Serve `requests` with every plan completed at once, applying each step to per-instance
    page tables exactly as the runtime driver does (evictions release, hits share views
    before anything allocates, frees release, prefills and decodes and migrations allocate,
    a migration's source releases when it lands, a finished request is released unless the
    cache kept it), and hold tables and state to the same owners and views after every step."""
    capacity = scheduler.deployment.capacity
    state = ClusterState(capacity, check=True, prefix=PrefixCache(BLOCK, max_entries))
    tables = [PagedKVTable(cap, TABLE_PAGE, len(requests) + max_entries) for cap in capacity]
    arrivals = list(requests)
    while arrivals or state.waiting or state.running:
        if arrivals:
            arrived = state.arrive(arrivals.pop(0))
            if scheduler.admit(state, arrived) is not None:
                state.reject(arrived, "refused")
        plan = scheduler.schedule(state)
        if plan is None:
            assert arrivals or not (state.waiting or state.running), "nothing runs and nothing can"
            continue
        plan = state.with_evictions(plan)
        with ExitStack() as transactions:
            for table in tables:
                transactions.enter_context(table.transaction())
                for entry in plan.evictions:
                    table.release(entry)
                for hit in plan.hits:
                    table.share(hit.request_id, hit.source, TokenRange(0, hit.tokens))
                for request in plan.frees:
                    table.release(request)
            for batch in plan.batches:
                for item in batch.items:
                    if isinstance(item, PrefillItem):
                        for kept in item.retention:
                            tables[kept.instance].allocate(item.request_id, torch.arange(kept.range.start, kept.range.end))
                    else:
                        position = state.requests[item.request_id].kv_len
                        tables[item.master].allocate(item.request_id, torch.tensor([position]))
            for migration in plan.migrations:
                tables[migration.dst].allocate(migration.request_id, torch.arange(migration.range.start, migration.range.end))
        state.start(plan)
        ended = [done for batch in plan.batches for done in state.complete(batch)]
        for migration in plan.migrations:
            state.complete_migration(migration)
            tables[migration.src].release(migration.request_id, migration.range)
            tables[migration.src].take_moves()  # the graph moves them; no slot is viewed while they are pending
        for done in ended:
            if done.id not in state.prefix.entries:
                for table in tables:
                    table.release(done.id)
        for entry in state.take_evictions():
            for table in tables:
                table.release(entry)
        for rank, table in enumerate(tables):
            assert table_mismatch(state, rank, table) is None, table_mismatch(state, rank, table)
    return state, tables


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_page_tables_follow_the_cache_with_no_leak_and_no_read_after_eviction(data):
    """The index and the pool together: refcounted views stay exactly where the state says,
    a table refuses to free an owner that is still viewed (so nothing reads an evicted
    prefix), and once every instance is retired the tables hold nothing."""
    capacity = data.draw(st.integers(1200, 6000))
    requests = data.draw(prefix_workloads())
    scheduler = data.draw(schedulers(capacity))
    state, tables = mirrored_run(scheduler, requests, max_entries=data.draw(st.integers(1, 8)))
    event(f"{type(scheduler).__name__}: {'hits' if state.prefix.hit_tokens else 'no hit'}")
    for instance in range(state.num_instances):
        state.retire(instance)
        for entry in state.take_evictions():
            for table in tables:
                table.release(entry)
    assert [table.used_tokens for table in tables] == [0] * INSTANCES
    assert not any(table.shared() for table in tables) and not any(table.requests() for table in tables)
