"""espc: an elastic sequence-parallelism compiler for long-context LLM serving.

    import espc
    spec = espc.load_spec("specs/tiny-cpu.toml")   # or a .esp DSL file
    print(spec.model.kv_bytes_per_token, spec.cluster.num_devices)
    policy = espc.compile("specs/tiny-cpu.toml", "build/tiny")   # also writes the artifact
    print(policy)                                                 # strategy, reason, policy tables
    with espc.Engine.from_artifact("build/tiny") as engine:       # worker processes serve it
        print(engine.generate("Hello", espc.SamplingParams(max_new_tokens=8))[0].text)
"""

from __future__ import annotations

import os

from espc._version import __version__
from espc.frontend.errors import SpecError
from espc.frontend.loader import load_spec, parse_spec
from espc.frontend.spec import Spec
from espc.planner.compile.policy import Policy


def compile(  # noqa: A001 — `espc.compile` is the public name (see DESIGN.md)
    spec: Spec | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    search_seconds: float = 20.0,
    requests: int = 300,
    seed: int | None = None,
    calibration: str | os.PathLike | None = None,
    runnable: bool | None = None,
    workers: int | None = None,
) -> Policy:
    """`espc compile` as a function: the Policy for a Spec (or a spec file), and with
    `output` the verified artifact directory too. `calibration`: a file `espc profile` wrote
    for this spec's model and cluster; the cost model uses its fits. `runnable`: hold the
    candidates to what the runtime serves (`--runnable`) or not (`--simulation-only`); None:
    when the spec's devices are CPUs. `workers`: processes simulating at once, forked from
    this one (`--workers`; None: every core; the policy is the same for any count) — a
    service whose other threads hold locks a fork could catch may pass 1. Raises SpecError for a bad spec file,
    espc.planner.sim.calibration.CalibrationError for a bad or mismatched calibration file,
    espc.planner.compile.ilp.InfeasibleSLO when the SLOs cannot be met and
    espc.planner.compile.feasibility.NothingFeasible when no candidate is left."""
    # The planner pulls in cvxpy and numpy: imported here so that `import espc` stays light.
    from pathlib import Path

    from espc.planner.compile.artifact import spec_hash, write_artifact
    from espc.planner.compile.compiler import CompileOptions, compile_spec
    from espc.planner.sim.calibration import load_calibration

    spec_path = None
    if not isinstance(spec, Spec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    calibrated = load_calibration(Path(calibration), spec) if calibration is not None else None
    options = CompileOptions(
        search_seconds=search_seconds, trial_requests=requests, seed=seed, runnable=runnable, workers=workers
    )
    result = compile_spec(
        spec, spec_hash(spec), spec_path.parent if spec_path else None, options, cost=calibrated.cost if calibrated else None
    )
    if output is not None:
        write_artifact(Path(output), spec, result, spec_path, options=options, calibration=calibrated)
    return result.policy


def __getattr__(name: str):
    # The runtime imports torch: loaded on first use, so `import espc` stays light.
    if name == "Engine":
        from espc.runtime.engine import Engine

        return Engine
    if name == "SamplingParams":
        from espc.runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'espc' has no attribute {name!r}")


__all__ = [
    "Engine", "Policy", "SamplingParams", "Spec", "SpecError", "__version__", "compile", "load_spec", "parse_spec",
]
