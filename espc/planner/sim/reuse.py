"""How much of a workload's prompts a prefix cache could serve: the compiler's estimate.

The simulator measures prefix caching exactly (espc.planner.sim.prefix_cache inside a
ClusterState); the policy MILP, a fluid model, needs a number per request before any
policy exists. `prefix_hits` replays a request sample in arrival order through an index of
chained block keys (`prefix_cache.chain` over `Request.prefix_hashes`, blocks of
PREFIX_BLOCK_TOKENS) and counts, per request, the leading prompt tokens whose blocks an
earlier request left behind: block-aligned and fewer than `prompt_len` (the last prompt
token is always computed, as `PrefixCache.match` does).

A request leaves the blocks its KV holds once it finished (its prompt's named blocks that
prompt + output fill, as `ClusterState` keeps them). With no capacity the index never
forgets: `reusable_prefix`, the *upper bound* of any cache's hits. With a capacity in
tokens it forgets least-recently-used blocks past it (a block's descendants before the
block: a lookup or insert touches the deepest block first), which estimates what a cache
of the cluster's KV keeps. Both ignore timing (a request may arrive before the one it
repeats has finished), placement and the KV running requests hold, so both overestimate
what the simulator measures; the first is a bound, the second an estimate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from espc.planner.sim.prefix_cache import chain
from espc.planner.sim.workload import PREFIX_BLOCK_TOKENS, Request


def prefix_hits(
    requests: Sequence[Request], capacity_tokens: int | None = None, block_tokens: int = PREFIX_BLOCK_TOKENS,
) -> list[int]:
    """Per request, in the order given: the leading prompt tokens a prefix cache of
    `capacity_tokens` (None: unbounded) would serve, replaying `requests` in arrival order
    (see the module docstring)."""
    if capacity_tokens is not None and capacity_tokens < 0:
        raise ValueError(f"a prefix cache's capacity must be ≥ 0 tokens, got {capacity_tokens}")
    limit = None if capacity_tokens is None else capacity_tokens // block_tokens
    cache: OrderedDict[int, None] = OrderedDict()  # chained block key -> None, least recently used first
    hits = [0] * len(requests)
    for index in sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i)):
        request = requests[index]
        keys = chain(request.prefix_hashes)
        usable = min(len(keys), (request.prompt_len - 1) // block_tokens)
        blocks = 0
        while blocks < usable and keys[blocks] in cache:
            blocks += 1
        hits[index] = blocks * block_tokens
        held = keys[:min(len(keys), (request.prompt_len + request.output_len - 1) // block_tokens)]
        for key in reversed(held):  # deepest first: the first block ends most recent, evicted last
            cache[key] = None
            cache.move_to_end(key)
        if limit is not None:
            while len(cache) > limit:
                cache.popitem(last=False)
    return hits


def reusable_prefix(requests: Sequence[Request], block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """Per request: the leading prompt tokens that repeat an earlier request's blocks — the
    upper bound of its prefix-cache hit (nothing evicted, every earlier request finished)."""
    return prefix_hits(requests, None, block_tokens)


def prompt_share(tokens: Sequence[int], requests: Sequence[Request]) -> float:
    """`tokens` per request (as `prefix_hits` gives them) as a share of the prompt tokens."""
    prompts = sum(request.prompt_len for request in requests)
    return sum(tokens) / prompts if prompts else 0.0
