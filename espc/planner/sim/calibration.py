"""Calibration files: what `espc profile` measured on a spec's devices and the cost model it fitted.

    {"kind": "espc-calibration", "schema": 1, "espc_version": "…",
     "conditions": {"attention": "torch", "dtype": "float32", "threads": 1, "world": 4,
                    "cores": 2, "dispatch_s": {"prefill": {"1": s, "2": s, …}, "decode": {"1": s, …}},
                    "contention": {"prefill": {"1": [1, f, …], …}, "decode": {…}}, "admission_s": s},
     "cost_model": CostModel.to_dict() (the model and cluster it was measured on, the fits),
     "measurements": [{"phase": "prefill", "dop": 2, "lengths": [256, 256], "samples": [s, …]}, …]}

A measurement's `lengths` are the new tokens per request (prefill), the cached context per
request (decode), or the tokens moved (migration, between instances 0 and 1). `fit` turns
measurements into a calibrated CostModel: prefill and decode fits per dop
(`CostModel.calibrate`), the latency and bandwidth of a migration, and the conditions'
contention factors (a batch's slowdown per dop with 0, 1, … other instances busy:
`CostModel.contention_factor`). `load_calibration`
refuses a file measured for another model or cluster than the spec's (the cluster's device
kind fixes the attention kernel), naming every field that differs. No torch here: `espc compile --calibration` reads these
files without loading it; the measuring is `espc.runtime.profile`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from espc._version import __version__
from espc.frontend.spec import Spec
from espc.planner.sim.costmodel import CostModel, fit_relative

CALIBRATION_KIND = "espc-calibration"
CALIBRATION_SCHEMA = 1
PHASES = ("prefill", "decode", "migration")


class CalibrationError(ValueError):
    """A calibration file that is unreadable, malformed or measured for another spec."""


@dataclass(frozen=True)
class Measurement:
    """One grid point: the seconds of each timed repeat of the same iteration shape."""

    phase: str  # prefill | decode | migration
    dop: int  # instances of the batch; 2 (source and destination) for a migration
    lengths: tuple[int, ...]
    samples: tuple[float, ...]

    @property
    def seconds(self) -> float:
        """The median repeat: robust to a repeat slowed by another process."""
        return statistics.median(self.samples)

    def predicted(self, cost: CostModel) -> float:
        if self.phase == "prefill":
            return cost.prefill_time(self.lengths, self.dop, 1)
        if self.phase == "decode":
            return cost.decode_time(self.lengths, self.dop, 1)
        return cost.migration_time(self.lengths[0], src=0, dst=1, tp=1)

    def label(self) -> str:
        """The shape, e.g. `4×256` (prefill), `B=4 ctx=512` (decode), `512 tokens` (migration)."""
        if self.phase == "migration":
            return f"{self.lengths[0]} tokens"
        if self.phase == "decode":
            return f"B={len(self.lengths)} ctx={round(sum(self.lengths) / len(self.lengths))}"
        if len(set(self.lengths)) == 1:
            return f"{len(self.lengths)}×{self.lengths[0]}"
        return "+".join(map(str, self.lengths))


@dataclass(frozen=True)
class Calibration:
    """A calibrated cost model, the measurements it was fitted on and how they were taken."""

    cost: CostModel
    measurements: tuple[Measurement, ...]
    conditions: Mapping[str, Any]  # attention kernel, dtype, torch threads per worker, world size
    source: str | None = None  # the file it was loaded from ...
    sha256: str | None = None  # ... and the sha256 of its bytes

    def dispatch_s(self, phase: str, dop: int) -> float:
        """The runtime's own time per iteration of `phase` at `dop` (driver, queues),
        measured through the engine; 0 for migrations, which ride along a batch's iteration."""
        return dispatch_seconds(self.conditions, phase, dop)

    def errors(self) -> list[tuple[Measurement, float, float]]:
        """(measurement, predicted seconds, relative error) for every grid point, against
        what a runtime iteration of it lasts: the workers' time plus the dispatch time."""
        rows = []
        for measurement in self.measurements:
            predicted = measurement.predicted(self.cost)
            lasts = iteration_seconds(measurement, self.conditions)
            rows.append((measurement, predicted, (predicted - lasts) / lasts))
        return rows


def fit(spec: Spec, measurements: Sequence[Measurement], conditions: Mapping[str, Any]) -> Calibration:
    """The spec's cost model calibrated on `measurements` (see the module docstring)."""
    cost = CostModel.from_spec(spec)
    # The runtime's time per iteration beyond the workers': what an iteration lasts is both.
    prefill = [(m.dop, 1, m.lengths, iteration_seconds(m, conditions)) for m in measurements if m.phase == "prefill"]
    decode = [
        (m.dop, 1, len(m.lengths), sum(m.lengths), iteration_seconds(m, conditions))
        for m in measurements if m.phase == "decode"
    ]
    migrations = [m for m in measurements if m.phase == "migration"]
    parameters = cost.parameters
    if migrations:
        latency_s, bandwidth = _fit_migration(migrations, cost.instance_kv_bytes_per_token(1))
        parameters = dataclasses.replace(parameters, migration_latency_s=latency_s, migration_bandwidth=bandwidth)
    # phase -> dop -> slowdown with 0, 1, … other instances busy (dops are strings once in JSON)
    contention = {
        (phase, int(dop)): factors for phase, by_dop in conditions.get("contention", {}).items() for dop, factors in by_dop.items()
    }
    calibrated = cost.calibrate(
        prefill=prefill, decode=decode, parameters=parameters, contention=contention,
        admission_s=float(conditions.get("admission_s", 0.0)),
    )
    return Calibration(calibrated, tuple(measurements), dict(conditions))


# The engine runs an iteration faster than the profile's harness times it at some dops
# (dispatch < 0), but a grid point counts for at least this share of its measured time: a
# dispatch fitted on the engine's short shapes must not erase a long shape's work.
MIN_ITERATION_SHARE = 0.5


def iteration_seconds(measurement: Measurement, conditions: Mapping[str, Any]) -> float:
    """What a runtime iteration of the grid point lasts: the workers' time plus the
    dispatch time (negative where the engine is faster than the harness), at least
    MIN_ITERATION_SHARE of the workers' time."""
    dispatch = dispatch_seconds(conditions, measurement.phase, measurement.dop)
    return max(measurement.seconds + dispatch, MIN_ITERATION_SHARE * measurement.seconds)


def dispatch_seconds(conditions: Mapping[str, Any], phase: str, dop: int) -> float:
    """`conditions["dispatch_s"][phase]`: seconds per dop (keys are strings once written to
    JSON), or one number for every dop (files profiled before dispatch was measured per
    dop); 0 when not measured or for a dop it was not measured at."""
    measured = conditions.get("dispatch_s", {}).get(phase, 0.0)
    if isinstance(measured, Mapping):
        return float(measured.get(dop, measured.get(str(dop), 0.0)))
    return float(measured)


def _fit_migration(migrations: Sequence[Measurement], bytes_per_token: int) -> tuple[float, float | None]:
    """(latency s, bytes/s) of seconds = latency + bytes / bandwidth, by relative least
    squares with non-negative coefficients. When the sizes measured are all latency (a busy
    or small machine: the best slope is 0), they say nothing of the bandwidth: it is left
    None (the link's, as without a calibration) — noise must not fail `espc profile`."""
    sizes = np.array([m.lengths[0] * bytes_per_token for m in migrations], dtype=float)
    seconds = np.array([m.seconds for m in migrations])
    if len(set(sizes)) < 2:
        raise ValueError(f"migration: sizes {sorted(set(sizes))} bytes do not determine latency and bandwidth; measure two sizes or more")
    (latency_s, seconds_per_byte), _ = fit_relative(np.column_stack([np.ones(len(sizes)), sizes]), seconds)
    if seconds_per_byte <= 0:
        return float(latency_s), None
    return float(latency_s), float(1 / seconds_per_byte)


# --------------------------------------------------------------------------- files


def write_calibration(path: str | Path, calibration: Calibration) -> None:
    data = {
        "kind": CALIBRATION_KIND,
        "schema": CALIBRATION_SCHEMA,
        "espc_version": __version__,
        "conditions": dict(calibration.conditions),
        "cost_model": calibration.cost.to_dict(),
        "measurements": [
            {"phase": m.phase, "dop": m.dop, "lengths": list(m.lengths), "samples": list(m.samples)}
            for m in calibration.measurements
        ],
    }
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def load_calibration(path: str | Path, spec: Spec) -> Calibration:
    """The calibration in `path` with its cost model for `spec` (its memory fraction);
    CalibrationError when the file is unreadable, malformed or measured for another spec."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CalibrationError(f"{path}: cannot read the calibration file: {error.strerror or error}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CalibrationError(f"{path}: not a calibration file (invalid JSON: {error})") from None
    if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
        raise CalibrationError(f"{path}: not a calibration file (no \"kind\": \"{CALIBRATION_KIND}\"); write one with `espc profile SPEC -o FILE`")
    if data.get("schema") != CALIBRATION_SCHEMA:
        raise CalibrationError(
            f"{path}: calibration schema {data.get('schema')!r}; this espc reads schema {CALIBRATION_SCHEMA} — profile again"
        )
    try:
        measured = data["cost_model"]
        differences = _differences("model", measured["model"], spec.model.model_dump(mode="json"))
        differences += _differences("cluster", measured["cluster"], spec.cluster.model_dump(mode="json"))
        if differences:
            shown = "; ".join(differences)
            raise CalibrationError(f"{path}: measured for another spec — {shown}; profile this spec with `espc profile`")
        stored = CostModel.from_dict(measured)
        cost = CostModel(
            spec.model, spec.cluster, spec.runtime.memory_fraction, stored.parameters, stored.prefill_fits, stored.decode_fits,
            stored.contention, stored.admission_s,
        )
        measurements = tuple(_measurement(row) for row in data["measurements"])
        conditions = dict(data["conditions"])
    except CalibrationError:
        raise
    except (KeyError, TypeError, ValueError) as error:  # ValueError covers pydantic's ValidationError
        raise CalibrationError(f"{path}: malformed calibration file: {type(error).__name__}: {error}") from None
    return Calibration(cost, measurements, conditions, str(path.resolve()), hashlib.sha256(raw).hexdigest())


def _measurement(row: Mapping[str, Any]) -> Measurement:
    if row["phase"] not in PHASES:
        raise ValueError(f"measurement phase {row['phase']!r} is not one of {', '.join(PHASES)}")
    samples = tuple(float(s) for s in row["samples"])
    if not samples or min(samples) <= 0:
        raise ValueError(f"measurement {row['phase']} dop {row['dop']}: samples {list(samples)} must be > 0 seconds")
    return Measurement(row["phase"], int(row["dop"]), tuple(int(n) for n in row["lengths"]), samples)


def _differences(where: str, measured: Any, wanted: Any) -> list[str]:
    """`where.field: measured X, the spec has Y` for every field that differs."""
    if isinstance(measured, Mapping) and isinstance(wanted, Mapping):
        return [
            line
            for key in sorted(set(measured) | set(wanted), key=str)
            for line in _differences(f"{where}.{key}", measured.get(key), wanted.get(key))
        ]
    if isinstance(measured, list) and isinstance(wanted, list) and len(measured) == len(wanted):
        return [line for index, pair in enumerate(zip(measured, wanted)) for line in _differences(f"{where}[{index}]", *pair)]
    return [] if measured == wanted else [f"{where}: measured {measured!r}, the spec has {wanted!r}"]


# --------------------------------------------------------------------------- report


def format_calibration(calibration: Calibration) -> str:
    """The measured vs fitted table, one line per grid point, then the fitted cost model's
    fits and migration parameters."""
    lines = [f"{'phase':<10} {'dop':>3} {'shape':<18} {'measured':>11} {'fitted':>11} {'error':>8}"]
    rows = calibration.errors()
    for measurement, predicted, error in rows:
        lasts = iteration_seconds(measurement, calibration.conditions)
        lines.append(
            f"{measurement.phase:<10} {measurement.dop:>3} {measurement.label():<18} "
            f"{lasts * 1e3:>8.2f} ms {predicted * 1e3:>8.2f} ms {error:>+8.1%}"
        )
    if "dispatch_s" in calibration.conditions:
        dops = sorted({m.dop for m in calibration.measurements if m.phase != "migration"})
        lines.append(
            "measured = workers' time + the runtime's dispatch per iteration, by dop: " + "; ".join(
                f"{phase} " + ", ".join(f"{calibration.dispatch_s(phase, dop) * 1e3:.2f}" for dop in dops) + " ms"
                for phase in ("prefill", "decode")
            )
        )
    errors = [abs(error) for _, _, error in rows]
    if errors:
        lines.append(f"{len(errors)} grid points: mean |error| {np.mean(errors):.1%}, max {max(errors):.1%}")
    cost = calibration.cost
    for phase, fits in (("prefill", cost.prefill_fits), ("decode", cost.decode_fits)):
        for (dop, _), fitted in fits.items():
            lines.append(
                f"{phase} dop {dop}: α {fitted.alpha_s * 1e3:.4g} ms, β {fitted.beta_s * 1e3:.4g} ms, "
                f"γ {fitted.gamma_s * 1e3:.4g} ms ({'dense' if fitted.dense else 'per request'}, {fitted.rows} rows)"
            )
    if cost.admission_s:
        lines.append(f"admission: {cost.admission_s * 1e3:.2f} ms from a request's arrival to its first batch")
    for (phase, dop), factors in cost.contention.items():
        lines.append(f"{phase} dop {dop} with 0, 1, … other instances busy: " + ", ".join(f"{f:.2f}×" for f in factors))
    p = cost.parameters
    if p.migration_bandwidth is not None:
        lines.append(f"migration: latency {p.migration_latency_s * 1e3:.3f} ms, bandwidth {p.migration_bandwidth / 1e9:.3g} GB/s")
    return "\n".join(lines)

