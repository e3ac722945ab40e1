"""IterationPlan: what every elastic instance does in one scheduling step, and its verifier.

The scheduler emits one plan per iteration; the backend lowers it to per-rank graphs. This
module is on that per-iteration hot path, so it is plain frozen dataclasses over tuples and
ints (no torch, no pydantic).

A plan runs batches concurrently on disjoint instance sets:

- prefill: an ordered ring of instances computes tokens [start, end) of each request
  (start > 0: chunked prefill, or a cached prefix already resident). While the ring runs,
  token j lives on ``instances[j % d]`` (striped layout). The ring carries every KV block past
  every instance, so after the iteration each instance writes into its pool exactly the token
  ranges its Retention names (proactive scale-down moves zero extra bytes). Retention ranges
  of a request partition [start, end).
- decode: each request has shards (instance -> context tokens already in that instance's
  pool) and one master. Peers compute partial attention over their shard (a 0-token shard
  contributes lse = -inf, o = 0); the master merges, appends this step's new token KV and
  runs the FFN.

Semantics of one iteration, as verify() checks them against a KVState snapshot taken before
the plan:

1. Frees apply first: a freed request's KV leaves every instance. Evictions drop cached
   prefixes (finished requests kept for their KV: `espc.planner.sim.prefix_cache`) the same
   way. Then each hit gives a request read-only views of a cached prefix [0, tokens) where
   it lives (no copy, no capacity: the cache entry still owns the slots); the request's
   prefill item starts at `tokens`, a continuation of that prefix.
2. Migrations stage their payload on the destination while the source still holds it; the
   source releases after the iteration. Capacity is therefore checked conservatively and
   never credits a source's release within the same iteration.
3. Decode shards describe the KV resident before the iteration (a migration moving those
   tokens does not change what this iteration's attention reads).
4. KV blocks circulating on a prefill ring are transient buffers, not pool slots.

Hence the peak pool occupancy of an instance, which must not exceed its capacity, is

    used_before - freed - evicted + migrated_in + prefill_retained + decode_masters

where `used_before` counts every token a pool owns (live requests and cached prefixes) and
never a view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

RequestId = int


@dataclass(frozen=True, slots=True, order=True)
class TokenRange:
    """Half-open range [start, end) of a request's global token positions."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid token range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True, slots=True)
class Retention:
    """After a prefill, `instance` keeps the KV of the tokens in `range` in its pool."""

    instance: int
    range: TokenRange

    def __str__(self) -> str:
        return f"{self.instance}:{self.range}"


@dataclass(frozen=True, slots=True)
class PrefillItem:
    """Compute tokens [start, end) of a request; `retention` says who keeps their KV."""

    request_id: RequestId
    start: int
    end: int
    retention: tuple[Retention, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention", tuple(self.retention))

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        kept = " ".join(map(str, self.retention)) or "nothing"
        return f"req {self.request_id} tokens [{self.start}, {self.end}) retain {kept}"


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """Requests prefilled together on an ordered ring of instances."""

    phase: ClassVar[str] = "prefill"
    instances: tuple[int, ...]
    items: tuple[PrefillItem, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "items", tuple(self.items))

    def owner(self, token: int) -> int:
        """The ring instance that holds global token `token` during the iteration."""
        return self.instances[token % len(self.instances)]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    def __str__(self) -> str:
        return f"prefill ring={list(self.instances)}"


@dataclass(frozen=True, slots=True)
class DecodeItem:
    """One decode step of a request.

    `shards` are (instance, context tokens) pairs; a Mapping is accepted and kept in its
    iteration order. An instance without a shard holds none of the request's context.
    """

    request_id: RequestId
    master: int
    shards: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.shards, tuple):  # a Mapping or a list of pairs
            pairs = self.shards.items() if isinstance(self.shards, Mapping) else self.shards
            object.__setattr__(self, "shards", tuple((int(i), int(n)) for i, n in pairs))

    @property
    def context_len(self) -> int:
        return sum(n for _, n in self.shards)

    def __str__(self) -> str:
        shards = " ".join(f"{i}:{n}" for i, n in self.shards) or "none"
        return f"req {self.request_id} master={self.master} shards {shards}"


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Requests decoded together; their shards and masters are spread over `instances`."""

    phase: ClassVar[str] = "decode"
    instances: tuple[int, ...]
    items: tuple[DecodeItem, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "items", tuple(self.items))

    @property
    def num_tokens(self) -> int:
        """New tokens produced: one per request."""
        return len(self.items)

    def __str__(self) -> str:
        return f"decode instances={list(self.instances)}"


Batch = PrefillBatch | DecodeBatch


@dataclass(frozen=True, slots=True)
class Migration:
    """Move the KV of `range` of a request from `src` to `dst`, packed in one buffer."""

    request_id: RequestId
    src: int
    dst: int
    range: TokenRange

    def __str__(self) -> str:
        return f"migrate req {self.request_id} {self.range} {self.src} -> {self.dst}"


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """`request_id` reads the KV of positions [0, tokens) of the cached request `source`
    wherever `source` holds it (its own tokens or its views of an older prefix)."""

    request_id: RequestId
    source: RequestId
    tokens: int

    def __str__(self) -> str:
        return f"hit req {self.request_id} reads [0, {self.tokens}) of cached req {self.source}"


@dataclass(frozen=True, slots=True)
class KVState:
    """Snapshot of the driver's global KV table before a plan.

    `capacity`: pool size of each instance, in tokens. `held`: (instance, request) -> the
    token ranges of that request in that instance's pool, views of a cached prefix included.
    `shared`: the subset of `held` that are views (they take no capacity). The constructor
    rejects a table the driver could never have (unknown instance, overlapping ranges,
    over capacity).
    """

    capacity: Mapping[int, int]
    held: Mapping[tuple[int, RequestId], tuple[TokenRange, ...]] = field(default_factory=dict)
    shared: Mapping[tuple[int, RequestId], tuple[TokenRange, ...]] = field(default_factory=dict)
    _used: dict[int, int] = field(init=False, repr=False, compare=False)
    _holders: dict[RequestId, dict[int, tuple[TokenRange, ...]]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        capacity = dict(self.capacity)
        held = {key: tuple(ranges) for key, ranges in self.held.items()}
        used = dict.fromkeys(capacity, 0)
        holders: dict[RequestId, dict[int, tuple[TokenRange, ...]]] = {}
        for instance, cap in capacity.items():
            if cap < 0:
                raise ValueError(f"instance {instance} has negative capacity {cap}")
        for (instance, request), ranges in held.items():
            if instance not in capacity:
                raise ValueError(f"request {request} is held on unknown instance {instance}")
            ordered = sorted(r for r in ranges if len(r))
            for before, after in zip(ordered, ordered[1:]):
                if after.start < before.end:
                    raise ValueError(
                        f"instance {instance} holds overlapping ranges {before} and {after} "
                        f"of request {request}"
                    )
            used[instance] += sum(map(len, ranges)) - sum(map(len, self.shared.get((instance, request), ())))
            holders.setdefault(request, {})[instance] = ranges
        for instance, tokens in used.items():
            if tokens > capacity[instance]:
                raise ValueError(
                    f"instance {instance} holds {tokens} tokens, over its capacity "
                    f"{capacity[instance]}"
                )
        object.__setattr__(self, "capacity", MappingProxyType(capacity))
        object.__setattr__(self, "held", MappingProxyType(held))
        object.__setattr__(self, "shared", MappingProxyType({key: tuple(r) for key, r in self.shared.items()}))
        object.__setattr__(self, "_used", used)
        object.__setattr__(self, "_holders", holders)

    def used(self, instance: int) -> int:
        return self._used[instance]

    def free(self, instance: int) -> int:
        return self.capacity[instance] - self._used[instance]

    def ranges(self, instance: int, request: RequestId) -> tuple[TokenRange, ...]:
        return self.held.get((instance, request), ())

    def tokens(self, instance: int, request: RequestId) -> int:
        return sum(map(len, self.ranges(instance, request)))

    def owned(self, instance: int, request: RequestId) -> int:
        """Tokens of `request` that take room on `instance` (held, less views)."""
        return self.tokens(instance, request) - sum(map(len, self.shared.get((instance, request), ())))

    def holders(self, request: RequestId) -> Mapping[int, tuple[TokenRange, ...]]:
        """Instances holding KV of `request`, with the ranges each holds."""
        return MappingProxyType(self._holders.get(request, {}))

    def __str__(self) -> str:
        by_instance: dict[int, list[str]] = {}
        for (instance, request), ranges in sorted(self.held.items()):
            by_instance.setdefault(instance, []).append(f"    req {request} {_ranges(ranges)}")
        lines = [
            f"kv: {_count(len(self.capacity), 'instance')}, "
            f"{_count(len(self._holders), 'request')}"
        ]
        for instance in sorted(self.capacity):
            used, cap = self._used[instance], self.capacity[instance]
            lines.append(f"  instance {instance}: {used}/{cap} used")
            lines.extend(by_instance.get(instance, ()))
        return "\n".join(lines)


class PlanError(ValueError):
    """An IterationPlan broke its invariants; `violations` lists every one found."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("\n".join(violations))
        self.violations = violations


@dataclass(frozen=True, slots=True)
class IterationPlan:
    """Everything the instances do in one scheduling step (see the module docstring)."""

    iteration: int
    batches: tuple[Batch, ...]
    migrations: tuple[Migration, ...] = ()
    frees: tuple[RequestId, ...] = ()
    hits: tuple[PrefixHit, ...] = ()
    evictions: tuple[RequestId, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "migrations", tuple(self.migrations))
        object.__setattr__(self, "frees", tuple(self.frees))
        object.__setattr__(self, "hits", tuple(self.hits))
        object.__setattr__(self, "evictions", tuple(self.evictions))

    def instances(self) -> tuple[int, ...]:
        """Instances running a batch, in batch order."""
        return tuple(i for batch in self.batches for i in batch.instances)

    def verify(self, kv: KVState | None = None) -> None:
        """Raise PlanError listing every violated invariant; with `kv`, also check the plan
        against the pool state it will run on (ownership, shard sizes, capacity): the state
        after the plan's evictions and hits, which `ClusterState.start` applies first."""
        violations = _structural_violations(self)
        if kv is not None:
            violations += _kv_violations(self, kv)
        if violations:
            raise PlanError(violations)

    def __str__(self) -> str:
        lines = [
            f"iteration {self.iteration}: {_count(len(self.batches), 'batch', 'batches')}, "
            f"{_count(len(self.migrations), 'migration')}, {_count(len(self.frees), 'free')}"
            + (f", {_count(len(self.hits), 'hit')}" if self.hits else "")
            + (f", {_count(len(self.evictions), 'eviction')}" if self.evictions else "")
        ]
        lines.extend(f"  evict cached req {request}" for request in self.evictions)
        lines.extend(f"  {hit}" for hit in self.hits)
        for index, batch in enumerate(self.batches):
            lines.append(f"  batch {index} {batch}")
            lines.extend(f"    {item}" for item in batch.items)
        lines.extend(f"  {migration}" for migration in self.migrations)
        lines.extend(f"  free req {request}" for request in self.frees)
        return "\n".join(lines)


def even_retention(start: int, end: int, instances: Iterable[int]) -> tuple[Retention, ...]:
    """Split [start, end) into contiguous, nearly equal ranges, one per instance in order
    (earlier instances get the remainder tokens). This is proactive scale-down: a prefill
    ring retains its KV on `instances`, any subset of the ring. Instances that would get no
    token are left out."""
    instances = tuple(instances)
    if not instances:
        raise ValueError("even_retention needs at least one instance")
    TokenRange(start, end)  # validates the bounds
    share, extra = divmod(end - start, len(instances))
    retention = []
    cursor = start
    for rank, instance in enumerate(instances):
        size = share + (rank < extra)
        if size:
            retention.append(Retention(instance, TokenRange(cursor, cursor + size)))
        cursor += size
    return tuple(retention)


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _ranges(ranges: Iterable[TokenRange]) -> str:
    return " ".join(map(str, ranges)) or "nothing"


def _merged(ranges: Iterable[TokenRange]) -> list[TokenRange]:
    """Union of `ranges` as sorted, disjoint, non-adjacent ranges."""
    merged: list[TokenRange] = []
    for r in sorted(r for r in ranges if len(r)):
        if merged and r.start <= merged[-1].end:
            merged[-1] = TokenRange(merged[-1].start, max(merged[-1].end, r.end))
        else:
            merged.append(r)
    return merged


def _structural_violations(plan: IterationPlan) -> list[str]:
    """Invariants that hold regardless of the pool state."""
    errors: list[str] = []
    batch_of_instance: dict[int, str] = {}
    batch_of_request: dict[RequestId, str] = {}
    for index, batch in enumerate(plan.batches):
        label = f"batch {index} ({batch.phase})"
        if not batch.instances:
            errors.append(f"{label} has no instances")
        if not batch.items:
            errors.append(f"{label} has no requests")
        members: set[int] = set()
        for instance in batch.instances:
            if instance in members:
                errors.append(f"instance {instance} appears twice in {label}")
            elif instance in batch_of_instance:
                first = batch_of_instance[instance]
                errors.append(f"instance {instance} is in {first} and {label}")
            else:
                batch_of_instance[instance] = label
            members.add(instance)
        for item in batch.items:
            request = item.request_id
            if request in batch_of_request:
                errors.append(f"request {request} is in {batch_of_request[request]} and {label}")
            else:
                batch_of_request[request] = label
            who = f"{label} request {request}"
            if isinstance(item, PrefillItem):
                errors += _retention_violations(who, batch.instances, members, item)
            else:
                errors += _decode_violations(who, batch.instances, members, item)

    migrated: set[RequestId] = set()
    for migration in plan.migrations:
        migrated.add(migration.request_id)
        if migration.src == migration.dst:
            errors.append(f"{migration}: source and destination are the same instance")
        if not len(migration.range):
            errors.append(f"{migration}: empty range")

    freed: set[RequestId] = set()
    for request in plan.frees:
        if request in freed:
            errors.append(f"request {request} is freed twice")
        freed.add(request)
        if request in batch_of_request:
            errors.append(f"request {request} is freed and also in {batch_of_request[request]}")
        if request in migrated:
            errors.append(f"request {request} is freed and also migrated")

    starts = {
        item.request_id: item.start for batch in plan.batches if isinstance(batch, PrefillBatch) for item in batch.items
    }
    hit: set[RequestId] = set()
    evicted = set(plan.evictions)
    if len(evicted) < len(plan.evictions):
        errors.append(f"a cached request is evicted twice: {sorted(plan.evictions)}")
    for entry in plan.hits:
        if entry.request_id in hit:
            errors.append(f"request {entry.request_id} has two prefix hits")
        hit.add(entry.request_id)
        if entry.tokens <= 0:
            errors.append(f"{entry}: a hit reads at least one token")
        if starts.get(entry.request_id) != entry.tokens:
            errors.append(
                f"{entry}: the request must be prefilled from token {entry.tokens} in this plan "
                f"(its prefill starts at {starts.get(entry.request_id, 'nothing: it is in no prefill batch')})"
            )
        if entry.source in evicted:
            errors.append(f"{entry}: its source is evicted by the same plan")
        if entry.request_id in freed:
            errors.append(f"{entry}: the request is also freed")
    return errors


def _retention_violations(
    who: str, ring: tuple[int, ...], members: set[int], item: PrefillItem
) -> list[str]:
    if item.start < 0 or item.end <= item.start:
        return [f"{who}: token range [{item.start}, {item.end}) is empty or negative"]
    errors = [
        f"{who}: retention {kept} is on instance {kept.instance}, not in the ring {list(ring)}"
        for kept in item.retention
        if kept.instance not in members
    ]
    # Sweep the ranges in order: any set that is not an exact partition of [start, end)
    # shows up as a range starting before the covered prefix ends (overlap), after it
    # (gap), or a covered prefix ending elsewhere than `end`.
    covered_to, last = item.start, None
    for kept in sorted((k for k in item.retention if len(k.range)), key=lambda k: k.range):
        if kept.range.start < covered_to:
            if last is None:
                errors.append(f"{who}: retention {kept} starts before the chunk start {item.start}")
            else:
                errors.append(f"{who}: retention {kept} overlaps {last}")
        elif kept.range.start > covered_to:
            errors.append(
                f"{who}: retention gap [{covered_to}, {kept.range.start}): no instance keeps it"
            )
        if kept.range.end > covered_to:
            covered_to, last = kept.range.end, kept
    if covered_to < item.end:
        errors.append(f"{who}: retention gap [{covered_to}, {item.end}): no instance keeps it")
    elif covered_to > item.end:
        errors.append(f"{who}: retention {last} runs past the chunk end {item.end}")
    return errors


def _decode_violations(
    who: str, instances: tuple[int, ...], members: set[int], item: DecodeItem
) -> list[str]:
    errors = []
    if item.master not in members:
        errors.append(f"{who}: master instance {item.master} is not in the batch {list(instances)}")
    sharded: set[int] = set()
    for instance, tokens in item.shards:
        if instance in sharded:
            errors.append(f"{who}: instance {instance} has two shards")
        sharded.add(instance)
        if instance not in members:
            errors.append(f"{who}: shard instance {instance} is not in the batch {list(instances)}")
        if tokens < 0:
            errors.append(f"{who}: shard on instance {instance} has {tokens} tokens")
    return errors


def _kv_violations(plan: IterationPlan, kv: KVState) -> list[str]:
    """Invariants relating the plan to the pool state it runs on."""
    return (
        _unknown_instance_violations(plan, kv)
        + _ownership_violations(plan, kv)
        + _capacity_violations(plan, kv)
    )


def _unknown_instance_violations(plan: IterationPlan, kv: KVState) -> list[str]:
    # Retention, shard and master instances outside their batch are structural violations
    # already, so batch instances and migration endpoints are all that is left to check.
    errors = [
        f"batch {index} ({batch.phase}): instance {i} does not exist "
        f"(not in the KV capacity table)"
        for index, batch in enumerate(plan.batches)
        for i in batch.instances
        if i not in kv.capacity
    ]
    errors += [
        f"{migration}: instance {i} does not exist (not in the KV capacity table)"
        for migration in plan.migrations
        for i in (migration.src, migration.dst)
        if i not in kv.capacity
    ]
    return errors


def _ownership_violations(plan: IterationPlan, kv: KVState) -> list[str]:
    """The plan reads, moves and frees exactly the KV the pool holds."""
    errors = [
        f"free of request {request}: no instance holds its KV"
        for request in dict.fromkeys(plan.frees)
        if not kv.holders(request)
    ]
    for migration in plan.migrations:
        request, span = migration.request_id, migration.range
        if migration.src in kv.capacity and not any(
            r.start <= span.start and span.end <= r.end
            for r in _merged(kv.ranges(migration.src, request))
        ):
            errors.append(
                f"{migration}: instance {migration.src} does not hold {span} of request "
                f"{request} (it holds {_ranges(kv.ranges(migration.src, request))})"
            )
        already = kv.ranges(migration.dst, request)
        if any(r.start < span.end and span.start < r.end for r in already):
            errors.append(f"{migration}: instance {migration.dst} already holds part of {span}")

    for index, batch in enumerate(plan.batches):
        for item in batch.items:
            request = item.request_id
            who = f"batch {index} ({batch.phase}) request {request}"
            holders = kv.holders(request)
            if isinstance(item, PrefillItem):
                resident = _merged(r for ranges in holders.values() for r in ranges)
                if item.start >= 0 and resident != _merged([TokenRange(0, item.start)]):
                    errors.append(
                        f"{who}: chunk [{item.start}, {item.end}) needs exactly [0, {item.start}) "
                        f"resident, the KV pool holds {_ranges(resident)}"
                    )
                continue
            sharded = {instance for instance, _ in item.shards}
            for instance, tokens in item.shards:
                if tokens != kv.tokens(instance, request):
                    errors.append(
                        f"{who}: shard on instance {instance} has {tokens} tokens but the "
                        f"instance holds {kv.tokens(instance, request)}"
                    )
            errors += [
                f"{who}: instance {instance} holds {kv.tokens(instance, request)} tokens "
                f"but has no shard"
                for instance in holders
                if instance not in sharded and kv.tokens(instance, request)
            ]
    return errors


def _capacity_violations(plan: IterationPlan, kv: KVState) -> list[str]:
    """Peak occupancy per instance, as defined in the module docstring, fits capacity."""
    freed = dict.fromkeys(kv.capacity, 0)
    for request in dict.fromkeys(plan.frees):
        for instance in kv.holders(request):
            freed[instance] += kv.owned(instance, request)
    migrated_in = dict.fromkeys(kv.capacity, 0)
    for migration in plan.migrations:
        if migration.dst in migrated_in:
            migrated_in[migration.dst] += len(migration.range)
    retained: dict[int, dict[RequestId, int]] = {instance: {} for instance in kv.capacity}
    masters: dict[int, list[RequestId]] = {instance: [] for instance in kv.capacity}
    for batch in plan.batches:
        for item in batch.items:
            if isinstance(item, DecodeItem):
                if item.master in masters:
                    masters[item.master].append(item.request_id)
                continue
            for kept in item.retention:
                if kept.instance in retained:
                    tokens = retained[kept.instance]
                    tokens[item.request_id] = tokens.get(item.request_id, 0) + len(kept.range)

    errors = []
    for instance, cap in kv.capacity.items():
        retains = sum(retained[instance].values())
        peak = (
            kv.used(instance) - freed[instance] + migrated_in[instance] + retains
            + len(masters[instance])
        )
        if peak <= cap:
            continue
        if masters[instance]:
            errors += [
                f"decode request {request}: master instance {instance} has no free slot "
                f"(capacity {cap}, peak {peak})"
                for request in masters[instance]
            ]
        else:
            errors.append(
                f"instance {instance} over capacity: peak {peak} > capacity {cap} "
                f"(held {kv.used(instance)}, freed {freed[instance]}, migrated in "
                f"{migrated_in[instance]}, prefill retains {retains} for requests "
                f"{sorted(retained[instance])})"
            )
    return errors
