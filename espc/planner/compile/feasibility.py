"""What compile may choose, in one place: the runtime's limits, a pinned tp and the calibration.

`runtime_limit(strategy, tp)` says why the runtime (espc.backend's lowering, espc.runtime's
workers) cannot serve a strategy on instances of `tp` devices today, or None. The compiler
leaves such candidates out when it compiles for the runtime, and `espc.runtime.engine`'s
`build_scheduler` refuses them with the same reason — one table, so that what compile
emits and what the engine serves cannot drift apart. When the backend lowers something new,
its entry goes from here and nothing else changes.

`Limits` adds what the spec and the cost model bind: a spec that pins `cluster.tp` binds
every strategy to it (baselines included), an instance whose memory the weights fill holds
no KV (a tp too small for the model), and a calibrated cost model prices only the tps
`espc profile` measured — compile never ranks a candidate priced by measurements against
one priced by the analytic model's guesses, so it leaves the uncalibrated ones out.

Whether compile targets the runtime (`CompileOptions.runnable`, `espc compile --runnable /
--simulation-only`): by default it does when the spec's devices are CPUs — the runtime
serves those on any machine (gloo worker processes), and `espc run` is their next step —
and it does not for accelerator specs, which describe clusters studied in simulation
(LoongServe's 8 × A800) as well as ones to serve: `--runnable` holds them to the runtime's
limits too. Every candidate left out is listed with its reason in report.md and
`espc inspect`; compile fails only when nothing is left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from espc.frontend.spec import Spec
from espc.frontend.units import Kind, describe
from espc.planner.compile.policy import SkippedCandidate
from espc.planner.sim.costmodel import CostModel

# Every tp the spec allows runs: the backend shards an instance's model over its tp ranks
# (espc/backend/tensor_parallel.py), so tp is no runtime limit.
# Strategies the runtime does not serve at all yet, and why.
UNSERVED_STRATEGIES: dict[str, str] = {}


# How every runtime_limit reason starts: NothingFeasible tells by it whether compiling for
# simulation only would leave something.
_RUNTIME = "the runtime "


def runtime_limit(strategy: str, tp: int) -> str | None:
    """Why the runtime cannot serve `strategy` on instances of `tp` devices, or None."""
    if strategy in UNSERVED_STRATEGIES:
        return f"{_RUNTIME}does not serve {strategy}: {UNSERVED_STRATEGIES[strategy]}"
    return None


def runs_by_default(spec: Spec) -> bool:
    """Whether compile targets the runtime when not told (see the module docstring)."""
    return spec.cluster.device_kind == "cpu"


class NothingFeasible(ValueError):
    """Compile left out every candidate; the message lists each with its reason."""

    def __init__(self, skipped: Sequence[SkippedCandidate]):
        self.skipped = tuple(skipped)
        reasons = "; ".join(f"{s.strategy} ({s.configuration}): {s.reason}" for s in self.skipped)
        super().__init__(f"no candidate can be compiled: {reasons or 'none was generated'}")

    @property
    def runtime_bound(self) -> bool:
        """Whether the runtime's limits left something out (compiling for simulation only
        would keep it)."""
        return any(s.reason.startswith(_RUNTIME) for s in self.skipped)


@dataclass(frozen=True)
class Limits:
    """What binds a compile's candidates (see the module docstring)."""

    pinned_tp: int | None  # the spec's cluster.tp
    calibrated_tps: frozenset[int] | None  # the tps the cost model's fits were measured at; None: analytic
    runnable: bool  # hold candidates to the runtime's limits
    # tp -> why an instance of that tp holds no KV beside the model's weights
    no_kv: Mapping[int, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, spec: Spec, cost: CostModel, runnable: bool | None = None) -> Limits:
        """The limits of compiling `spec` with `cost`; `runnable` None: `runs_by_default`."""
        fitted = {tp for _, tp in cost.prefill_fits} | {tp for _, tp in cost.decode_fits}
        no_kv = {}
        for tp in [spec.cluster.tp] if spec.cluster.tp else cost.tp_choices():
            if cost.kv_capacity_tokens(tp) == 0:
                memory, weights = cost.instance_memory(tp), spec.model.weight_bytes
                no_kv[tp] = (
                    f"an instance of tp = {tp} may use {describe(memory, Kind.BYTES)} (memory_fraction × device memory "
                    f"× tp), and the weights take {describe(weights, Kind.BYTES)}: no KV fits"
                )
        return cls(
            spec.cluster.tp, frozenset(fitted) if fitted else None, runs_by_default(spec) if runnable is None else runnable,
            no_kv,
        )

    def reason(self, strategy: str, tp: int) -> str | None:
        """Why compile leaves `strategy` on instances of `tp` devices out, or None."""
        if self.pinned_tp is not None and tp != self.pinned_tp:
            return f"the spec pins tp = {self.pinned_tp} (cluster.tp); this configuration has tp = {tp}"
        if tp in self.no_kv:
            return self.no_kv[tp]
        if self.calibrated_tps is not None and tp not in self.calibrated_tps:
            measured = ", ".join(map(str, sorted(self.calibrated_tps)))
            return (
                f"tp = {tp} is not calibrated (the calibration measured tp {measured}): its goodput would be the "
                "analytic model's guess beside measured ones"
            )
        if self.runnable:
            return runtime_limit(strategy, tp)
        return None
