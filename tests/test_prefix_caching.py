"""Prefix caching in the runtime: a request that reads a cached prefix gives the tokens and
fp32 logits of the float64 reference, wherever the prefix lives — spread over instances by
an elastic prefill, moved by a migration before its request finished, read by a request that
is itself migrated — and after evictions; the driver's tables and the scheduler's state
agree after every run (`check_kv`), and only cached prefixes hold KV once it is idle."""

from __future__ import annotations

import pytest
from kv_checks import assert_only_cache_holds_kv

from espc.planner.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    PrefillBatch,
    PrefillItem,
    PrefixHit,
    TokenRange,
    even_retention,
)
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.strategies import Deployment, Scheduler
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams
from tests.test_engine import KV_CAPACITY, NEW_TOKENS, assert_matches_reference

BLOCK = 16  # specs/tiny-cpu.toml's kv_block_size
LONG = [5 + (7 * i) % 90 for i in range(5 * BLOCK + 3)]  # 5 full blocks and 3 tokens
SHORT = [11 + (5 * i) % 80 for i in range(2 * BLOCK + 9)]


class CacheReadingScript(Scheduler):
    """Plans the shapes under test on four instances: every waiting request prefills on the
    whole ring, reading its cached prefix when one is resident (the ring holds every holder),
    and keeps its new KV on instances 0 and 1; a decoding request that reads views of a cached
    prefix on instance 0 has them copied to instance 3 after its second token (a migration
    of borrowed KV); one that owns tokens on instance 1 moves them to instance 2 after its
    third (so the cache keeps KV a migration moved). Decode: master 0, every holder a peer."""

    name = "cache-reading script"

    def __init__(self, deployment: Deployment):
        super().__init__(deployment)
        self.moved: set[tuple[int, int]] = set()

    def schedule(self, state):
        if state.idle != set(range(4)):
            return None
        waiting = list(state.waiting.values())
        if waiting:
            items, hits = [], []
            for request in waiting:
                match = state.prefix_match(request)
                start = match.tokens if match else 0
                if match:
                    hits.append(PrefixHit(request.id, match.source, start))
                target = request.pending_target
                items.append(PrefillItem(request.id, start, target, even_retention(start, target, (0, 1))))
            return IterationPlan(state.iteration, (PrefillBatch((0, 1, 2, 3), tuple(items)),), hits=tuple(hits))
        decoding = [s for s in state.running.values() if s.decoding and not s.busy]
        for request in decoding:
            if request.generated >= 2 and request.borrowed.get(0) and not request.tokens_on(3) and (request.id, 0) not in self.moved:
                self.moved.add((request.id, 0))
                start, end = request.borrowed[0][0]
                return IterationPlan(state.iteration, (), (Migration(request.id, 0, 3, TokenRange(start, end)),))
            owned = [r for r in request.kv.get(1, ()) if not request.borrowed.get(1)]
            if request.generated >= 3 and owned and not request.tokens_on(2) and (request.id, 1) not in self.moved:
                self.moved.add((request.id, 1))
                return IterationPlan(state.iteration, (), (Migration(request.id, 1, 2, TokenRange(*owned[0])),))
        if decoding:
            items = tuple(DecodeItem(s.id, 0, s.shards()) for s in decoding)
            instances = tuple(sorted({0} | {i for s in decoding for i, _ in s.shards()}))
            return IterationPlan(state.iteration, (DecodeBatch(instances, items),))
        return None


def script(spec, capacity: int = KV_CAPACITY) -> CacheReadingScript:
    return CacheReadingScript(Deployment.build(CostModel.from_spec(spec), 1, capacity))


def generate(engine: Engine, prompts: list[list[int]]):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, return_logits=True)
    return engine.generate(prompts, params, timeout=120)


def test_hits_on_spread_and_migrated_prefixes_give_the_reference_tokens_and_logits(spec, reference):
    first = [LONG, SHORT]
    # LONG again (hit on its 5 blocks: 80 tokens), a prompt diverging inside LONG's fifth
    # block (hit on 4 blocks), SHORT and more (hit on its 2 blocks), and a fresh prompt.
    second = [LONG, LONG[:4 * BLOCK + 7] + [1, 2, 3], SHORT + [4] * 20, [9] * 40]
    with Engine(spec, scheduler=script(spec), kv_capacity=KV_CAPACITY) as engine:
        before = generate(engine, first)
        engine.check_kv()
        after = generate(engine, second)
        engine.check_kv()
        stats = engine.stats()
        timeline = engine.result().timeline
    assert_matches_reference(reference, first, before)
    assert_matches_reference(reference, second, after)
    assert [c.cached_tokens for c in before] == [0, 0]
    assert [c.cached_tokens for c in after] == [5 * BLOCK, 4 * BLOCK, 2 * BLOCK, 0]
    assert after[0].token_ids == before[0].token_ids
    cache = stats["prefix_cache"]
    assert cache["hit_tokens"] == 11 * BLOCK and cache["queried_tokens"] == sum(map(len, first + second))
    assert_only_cache_holds_kv(stats)
    # The shapes promised: prefixes kept on 0 and 1, moved to 2 and 3 by migrations.
    assert stats["migrations"] >= 4 and any(b.phase == "decode" and len(b.instances) >= 3 for b in timeline)


def test_evicted_prefixes_are_recomputed_and_give_the_same_tokens(spec, reference):
    # Room for about two prompts' KV per instance pair: later prompts evict earlier entries.
    prompts = [[20 + (k * 13 + i) % 70 for i in range(3 * BLOCK + 5)] for k in range(6)]
    with Engine(spec, scheduler=script(spec, capacity=160), kv_capacity=160) as engine:
        first = [generate(engine, [prompt])[0] for prompt in prompts]
        engine.check_kv()
        again = [generate(engine, [prompt])[0] for prompt in prompts[:2]]
        engine.check_kv()
        stats = engine.stats()
    assert_matches_reference(reference, prompts, first)
    assert_matches_reference(reference, prompts[:2], again)
    assert [c.token_ids for c in again] == [c.token_ids for c in first[:2]]
    assert stats["prefix_cache"]["evicted_blocks"] > 0
    assert [c.cached_tokens for c in again] == [0, 0]  # the oldest entries went first (LRU)
    assert_only_cache_holds_kv(stats)


def test_prefix_caching_off_keeps_nothing(spec, reference):
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"prefix_caching": False})})
    with Engine(spec, scheduler=script(spec), kv_capacity=KV_CAPACITY) as engine:
        first = generate(engine, [LONG])
        again = generate(engine, [LONG])
        engine.check_kv()
        stats = engine.stats()
    assert_matches_reference(reference, [LONG, LONG], first + again)
    assert again[0].cached_tokens == 0 and stats["prefix_cache"] == {"enabled": False}
    assert stats["kv_used_tokens"] == [0, 0, 0, 0]


@pytest.mark.parametrize("strategy", ["static-sp"])
def test_a_static_replica_reads_its_own_cache(spec, reference, strategy):
    """vLLM-like automatic prefix caching in the baselines: the same prompt twice on one
    group of four (a prefix spread over all of them by the SP prefill) is read, not computed."""
    with Engine(spec, strategy=strategy, configuration="tp=1, groups=4", kv_capacity=KV_CAPACITY) as engine:
        first = generate(engine, [LONG])
        again = generate(engine, [LONG])
        engine.check_kv()
    assert_matches_reference(reference, [LONG, LONG], first + again)
    assert again[0].cached_tokens == 5 * BLOCK and again[0].token_ids == first[0].token_ids
