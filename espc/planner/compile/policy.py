"""Policy IR: what `espc compile` decides, in plain JSON-serialisable dataclasses.

A Policy names the strategy compile chose (and why, with every strategy's predicted
goodput), the cost-model parameters it was compiled with and, for the elastic strategy,
the `ElasticPolicy` the per-iteration scheduler follows:

- per prompt-length bucket: the most instances one prefill batch may span (its DoP cap),
  the token budget of a batch whose longest prompt falls in the bucket, and the most
  instances that the bucket's prefills may hold at once (so long prompts cannot take every
  instance away from short ones — the elastic form of best-static's length routing) and,
  optionally, the instances its requests prefill and decode on (an instance class: the
  elastic form of best-static's partition, so that a long-prompt class keeps instances
  no short request's KV occupies);
- `instance_weight`: what holding an instance costs the batching DP, in requests' worth
  of waiting (the busier the cluster is expected to be, the more an instance is worth);
- decode scale-up: an instance takes new decode tokens until it holds
  `decode_instance_tokens`; then a request's next tokens go to another instance
  (multi-master decoding; no KV moves);
- admission: each admitted request reserves `reserve_output_tokens` of future KV;
- migration hysteresis: a request is migrated at most once per `cooldown_iterations`, and
  only when the move takes less than `migration_max_stall_s` (it pauses the request);
- the fairness bound: a request queued longer than `starvation_bound_s` is not bypassed.

Serialisation is JSON only (`to_json` / `from_json`); the artifact directory around it
(manifest, lock file, report) is `espc.planner.compile.artifact`.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from espc.planner.sim.metrics import GOODPUT_LABELS, METRICS

POLICY_SCHEMA_VERSION = 4
# The share of the TPOT bound a decode step leaves for prefills that pause it: the MILP
# picks decode thresholds and the scheduler spreads long requests' KV by it.
DECODE_STALL_SHARE = 0.3


class PolicyError(ValueError):
    """A policy that is inconsistent, or JSON that is not a policy of this schema."""


@dataclass(frozen=True)
class LengthBucket:
    """Prompts of [low, high) tokens: `share` of the workload's requests."""

    low: int
    high: int
    share: float
    prefill_dop: int
    batch_tokens: int
    max_instances: int
    # False: best effort — the compiler expects these requests to miss their SLOs (they fit
    # in the attainment's slack) and caps them so that they cannot crowd the others out.
    within_slo: bool = True
    # The instances this bucket's requests prefill and keep KV on (its instance class);
    # None: any instance. The scheduler refuses a request its class cannot hold.
    instances: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.instances is not None:  # JSON gives a list
            object.__setattr__(self, "instances", tuple(self.instances))

    def __str__(self) -> str:
        return (
            f"[{self.low:,}, {self.high:,}) share {self.share:.1%}: dop ≤ {self.prefill_dop}, "
            + ("one prompt per batch" if self.batch_tokens == 1 else f"batch ≤ {self.batch_tokens:,} tokens")
            + f", ≤ {self.max_instances} instances at once"
            + ("" if self.instances is None else f" of instances {format_instances(self.instances)}")
            + ("" if self.within_slo else ", best effort")
        )


def format_instances(instances: tuple[int, ...]) -> str:
    """Instance numbers as ranges: (0, 1, 2, 5) → "0–2, 5"."""
    runs: list[list[int]] = []
    for instance in instances:
        if runs and runs[-1][1] == instance - 1:
            runs[-1][1] = instance
        else:
            runs.append([instance, instance])
    return ", ".join(str(first) if first == last else f"{first}–{last}" for first, last in runs)


@dataclass(frozen=True)
class ElasticPolicy:
    tp: int
    buckets: tuple[LengthBucket, ...]
    instance_weight: float
    decode_instance_tokens: int
    reserve_output_tokens: int
    scale_up: bool
    migration: bool
    cooldown_iterations: int
    migration_max_stall_s: float
    starvation_bound_s: float
    if TYPE_CHECKING:
        # The buckets' lows, for `bucket`: set by __post_init__, and no field at run time
        # (so not in __init__, ==, repr or the JSON).
        _lows: list[int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(self.buckets))
        object.__setattr__(self, "_lows", [bucket.low for bucket in self.buckets])

    def bucket(self, prompt_len: int) -> LengthBucket:
        """The bucket of a prompt length (the last one for longer prompts)."""
        index = bisect.bisect_right(self._lows, prompt_len) - 1
        return self.buckets[max(index, 0)]

    def rigid(self) -> ElasticPolicy:
        """ESP's ablation (`elastic-rigid`): the same policy with elasticity's choices
        removed — every prompt prefills on the fewest instances its KV needs (DoP 1 when it
        fits one), no decode scale-up, no migration; the same buckets, caps, classes,
        admission and fairness bound. What elastic earns over it is what ESP earns."""
        return dataclasses.replace(
            self,
            buckets=tuple(dataclasses.replace(bucket, prefill_dop=1) for bucket in self.buckets),
            scale_up=False,
            migration=False,
        )

    def is_rigid(self) -> bool:
        return not self.scale_up and not self.migration and all(bucket.prefill_dop == 1 for bucket in self.buckets)

    def instance_classes(self) -> tuple[tuple[int, ...], ...]:
        """The buckets' distinct instance sets, in bucket order; () when every bucket may use
        any instance."""
        return tuple(dict.fromkeys(bucket.instances for bucket in self.buckets if bucket.instances is not None))

    def verify(self, instances: int | None = None) -> None:
        problems = []
        if not self.buckets:
            problems.append("no length buckets")
        if self.buckets and self.buckets[0].low != 0:
            problems.append(f"the first bucket starts at {self.buckets[0].low}, not 0")
        for before, after in zip(self.buckets, self.buckets[1:]):
            if before.high != after.low:
                problems.append(f"buckets [{before.low}, {before.high}) and [{after.low}, {after.high}) do not meet")
        for bucket in self.buckets:
            if bucket.prefill_dop < 1 or (instances is not None and bucket.prefill_dop > instances):
                problems.append(f"bucket [{bucket.low}, {bucket.high}): dop {bucket.prefill_dop} outside 1..{instances}")
            if bucket.max_instances < bucket.prefill_dop:
                problems.append(f"bucket [{bucket.low}, {bucket.high}): max_instances {bucket.max_instances} < dop {bucket.prefill_dop}")
            if bucket.batch_tokens < 1:
                problems.append(f"bucket [{bucket.low}, {bucket.high}): batch_tokens {bucket.batch_tokens} < 1")
            problems += _instance_problems(bucket, instances)
        classes = self.instance_classes()
        if classes and any(bucket.instances is None for bucket in self.buckets):
            problems.append("some buckets name their instances and others do not: name them in every bucket or in none")
        for index, first in enumerate(classes):
            for second in classes[index + 1:]:
                if set(first) & set(second):
                    problems.append(
                        f"instances {format_instances(first)} and {format_instances(second)} overlap: "
                        "buckets share their instances entirely or not at all"
                    )
        if self.tp < 1 or self.instance_weight < 0 or self.decode_instance_tokens < 1 or self.reserve_output_tokens < 0:
            problems.append("tp, instance_weight, decode_instance_tokens or reserve_output_tokens out of range")
        if problems:
            raise PolicyError("invalid elastic policy: " + "; ".join(problems))

    def __str__(self) -> str:
        lines = [f"elastic policy (tp={self.tp})"]
        lines += [f"  bucket {bucket}" for bucket in self.buckets]
        lines.append(f"  instance weight {self.instance_weight:g} requests")
        lines.append(
            f"  decode: scale-up {'on' if self.scale_up else 'off'} past {self.decode_instance_tokens:,} tokens per instance"
        )
        lines.append(f"  admission: reserve {self.reserve_output_tokens:,} output tokens per request")
        lines.append(
            f"  migration {'on' if self.migration else 'off'}: cooldown {self.cooldown_iterations} iterations, "
            f"stall ≤ {self.migration_max_stall_s * 1e3:g} ms"
        )
        lines.append(f"  starvation bound {self.starvation_bound_s:g} s")
        return "\n".join(lines)


def _instance_problems(bucket: LengthBucket, instances: int | None) -> list[str]:
    if bucket.instances is None:
        return []
    where = f"bucket [{bucket.low}, {bucket.high})"
    members = bucket.instances
    if not members or list(members) != sorted(set(members)):
        return [f"{where}: instances {list(members)} are not a non-empty increasing list"]
    problems = []
    if members[0] < 0:
        problems.append(f"{where}: negative instance {members[0]}")
    if instances is not None and members[-1] >= instances:
        problems.append(f"{where}: instances {format_instances(members)} outside 0..{instances - 1}")
    if bucket.max_instances > len(members):
        problems.append(f"{where}: max_instances {bucket.max_instances} > its {len(members)} instances")
    return problems


@dataclass(frozen=True)
class SolverStats:
    solver: str
    status: str
    objective: float | None
    gap: float | None
    seconds: float
    variables: int
    constraints: int


@dataclass(frozen=True)
class StrategyPrediction:
    """A strategy's simulated goodput (req/s; the policy's `goodput_metric`) on the spec's
    workload, best configuration."""

    strategy: str
    configuration: str
    goodput_rps: float
    configurations_searched: int


@dataclass(frozen=True)
class SkippedCandidate:
    """A configuration compile left out, and why (espc.planner.compile.feasibility): the
    cluster cannot form it or hold its KV, its tp is not the spec's or not calibrated, the
    runtime cannot serve it, or (elastic) the MILP finds its SLOs infeasible."""

    strategy: str
    configuration: str
    reason: str


@dataclass(frozen=True)
class Policy:
    schema_version: int
    espc_version: str
    spec_hash: str
    strategy: str
    configuration: str
    reason: str
    cost_parameters: Mapping[str, Any]
    elastic: ElasticPolicy | None
    solver: SolverStats | None
    predictions: tuple[StrategyPrediction, ...]
    milp_predicted_rps: float | None
    compile_seconds: float
    # What the predictions measure and compile maximised: "p90" (P90 goodput) or
    # "per-class" (every prompt-length class meets the attainment target).
    goodput_metric: str = "p90"
    # Whether compile held its candidates to the runtime's limits (`espc run` serves the
    # choice) or compiled for simulation only.
    runnable: bool = True
    # The configurations compile left out, with the reason.
    skipped: tuple[SkippedCandidate, ...] = ()
    # Prefix caching as compile priced it (espc.planner.sim.reuse), as shares of the workload
    # sample's prompt tokens: those repeating an earlier request's blocks (the upper bound of
    # any cache's hit rate) and those the MILP priced as hits at the elastic policy's tp.
    # None: caching is off (both), or no MILP was solved (the hit share).
    prefix_reusable_share: float | None = None
    prefix_hit_share: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "predictions", tuple(self.predictions))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    def verify(self, instances: int | None = None) -> None:
        if self.schema_version != POLICY_SCHEMA_VERSION:
            raise PolicyError(f"policy schema version {self.schema_version}; this espc reads version {POLICY_SCHEMA_VERSION}")
        if self.strategy == "elastic" and self.elastic is None:
            raise PolicyError("strategy is elastic but the policy has no elastic section")
        if self.elastic is not None:
            self.elastic.verify(instances)
        if self.goodput_metric not in METRICS:
            raise PolicyError(f"goodput metric {self.goodput_metric!r} is none of {', '.join(METRICS)}")

    def prediction(self, strategy: str) -> StrategyPrediction | None:
        return next((p for p in self.predictions if p.strategy == strategy), None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        """The inverse of to_json; PolicyError names what is missing or malformed."""
        if not isinstance(data, Mapping):
            raise PolicyError("policy.json does not hold a JSON object")
        version = data.get("schema_version")
        if version != POLICY_SCHEMA_VERSION:
            raise PolicyError(
                f"policy.json has schema version {version!r}; this espc reads version {POLICY_SCHEMA_VERSION} — recompile the spec"
            )
        try:
            elastic = data["elastic"]
            solver = data["solver"]
            policy = cls(
                **{
                    **data,
                    "elastic": None if elastic is None else ElasticPolicy(
                        **{**elastic, "buckets": tuple(LengthBucket(**b) for b in elastic["buckets"])}
                    ),
                    "solver": None if solver is None else SolverStats(**solver),
                    "predictions": tuple(StrategyPrediction(**p) for p in data["predictions"]),
                    "skipped": tuple(SkippedCandidate(**s) for s in data["skipped"]),
                }
            )
        except (KeyError, TypeError) as error:
            raise PolicyError(f"policy.json is malformed: {error}") from None
        policy.verify()
        return policy

    def __str__(self) -> str:
        lines = [
            f"policy (schema {self.schema_version}, espc {self.espc_version}, spec {self.spec_hash[:12]})",
            f"strategy {self.strategy} ({self.configuration}): {self.reason}",
            f"predicted {GOODPUT_LABELS[self.goodput_metric]}:",
        ]
        for prediction in sorted(self.predictions, key=lambda p: -p.goodput_rps):
            lines.append(f"  {prediction.strategy:14s} {prediction.goodput_rps:10.4g} req/s  {prediction.configuration}")
        for skipped in self.skipped:
            lines.append(f"  {skipped.strategy:14s} {'skipped':>16s}  {skipped.configuration}: {skipped.reason}")
        if not self.runnable:
            lines.append("compiled for simulation only: the runtime's limits were not applied")
        if self.elastic is not None:
            lines.append(str(self.elastic))
        if self.solver is not None:
            s = self.solver
            lines.append(f"solver {s.solver}: {s.status}, objective {s.objective}, gap {s.gap}, {s.seconds:.2f} s")
        return "\n".join(lines)
