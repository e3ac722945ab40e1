"""The compiler's estimate of prefix reuse (espc.planner.sim.reuse): hand-made streams with
known answers, and the unbounded replay against the simulator's own prefix cache."""

from pathlib import Path

import pytest

from espc import load_spec
from espc.planner.sim.prefix_cache import PrefixCache, chain
from espc.planner.sim.reuse import prefix_hits, prompt_share, reusable_prefix
from espc.planner.sim.workload import PREFIX_BLOCK_TOKENS, Request, generate

B = PREFIX_BLOCK_TOKENS
PREFIX_SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu-prefix.toml"


def request(id: int, arrival_s: float, ids: tuple[int, ...], prompt_len: int | None = None, output_len: int = 1) -> Request:
    return Request(id, arrival_s, prompt_len if prompt_len is not None else len(ids) * B, output_len, ids)


def test_a_prompt_reuses_the_leading_blocks_an_earlier_one_named():
    stream = [
        request(0, 0.0, (1, 2, 3), 3 * B - 100),  # its last block is partial
        request(1, 1.0, (1, 2, 9), 3 * B),
        request(2, 2.0, (7, 2, 3), 3 * B),  # ids 2 and 3 repeat, but after another first block
        request(3, 3.0, (1, 2), 2 * B),  # the last prompt token is always computed: one block
        request(4, 4.0, (), 700),  # names no blocks
    ]
    assert reusable_prefix(stream) == [0, 2 * B, 0, B, 0]
    assert prompt_share(reusable_prefix(stream), stream) == pytest.approx(3 * B / sum(r.prompt_len for r in stream))


def test_requests_are_replayed_in_arrival_order():
    first, second = request(0, 5.0, (1, 2, 3), output_len=1), request(1, 1.0, (1, 2, 4), output_len=1)
    assert reusable_prefix([first, second]) == [2 * B, 0]


def test_only_the_blocks_a_finished_request_fills_are_left_behind():
    """A prompt's partial last block stays unshared until its output fills it (as the
    simulator keeps a finished request's full blocks only)."""
    partial = request(0, 0.0, (1, 2), B + 10, output_len=1)
    filled = request(0, 0.0, (1, 2), B + 10, output_len=B)
    later = request(1, 1.0, (1, 2, 3))
    assert reusable_prefix([partial, later]) == [0, B]
    assert reusable_prefix([filled, later]) == [0, 2 * B]


@pytest.mark.parametrize("capacity, expected", [(None, 2 * B), (3 * B, 2 * B), (2 * B, B), (B, B), (0, 0)])
def test_a_bounded_cache_forgets_the_least_recently_used_blocks_deepest_first(capacity, expected):
    """Request 0 leaves the chained blocks (1), (1,2), (1,2,3); request 1 reads (1) and
    leaves (1,5). With room for k blocks the least recently used go, deepest first (a chain's
    first block is touched last), so request 2, (1,2,9), finds (1,2) with room for three,
    only (1) with room for two or one, nothing with none."""
    stream = [request(0, 0.0, (1, 2, 3)), request(1, 1.0, (1, 5), output_len=1), request(2, 2.0, (1, 2, 9))]
    hits = prefix_hits(stream, capacity)
    assert hits == [0, 0 if capacity == 0 else B, expected]


def test_a_capacity_below_zero_is_refused():
    with pytest.raises(ValueError, match="capacity must be ≥ 0 tokens, got -1"):
        prefix_hits([], -1)


def test_the_unbounded_replay_matches_the_simulators_prefix_cache():
    """The upper bound equals what espc.planner.sim.prefix_cache.PrefixCache serves when no
    entry is ever evicted and every earlier request finished before the next arrives: each
    request matches, then is kept from the tokens it borrowed (ClusterState._keep's rule)."""
    spec = load_spec(PREFIX_SPEC)
    stream = generate(spec.workload, requests=200)
    cache = PrefixCache(B, max_entries=len(stream))
    served = []
    for r in sorted(stream, key=lambda r: r.arrival_s):
        keys = chain(r.prefix_hashes)
        match = cache.match(keys, r.prompt_len)
        start = match.tokens if match else 0
        served.append(start)
        blocks = min(len(keys), (r.prompt_len + r.output_len - 1) // B)
        if blocks * B > start:
            cache.insert(r.id, keys[:blocks], start, match.source if match else None)
    by_arrival = sorted(range(len(stream)), key=lambda i: stream[i].arrival_s)
    assert [reusable_prefix(stream)[i] for i in by_arrival] == served
    # The spec's structure: every prompt opens with one of two 3-block system prompts, so all
    # requests but the first of each reuse 1,536 tokens.
    assert sorted(set(served)) == [0, 3 * B] and served.count(0) == 2
