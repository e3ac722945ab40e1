"""Compile emits only what runs: on random small CPU specs and every strategy a spec can ask
for, compile either chooses something that the Engine then serves — a short workload, every
KV slot freed afterwards — or fails because nothing can run, and then the Engine refuses
every candidate compile left out. The Engine is the independent judge: it builds the
scheduler and lowers its plans itself.

Kept small (few examples, 2–4 gloo workers, a handful of requests, tests/small_specs.py's
slowed CPU so that goodput trials stay at a few dozen requests)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_specs import small_spec_text

from espc.frontend.loader import parse_spec
from espc.planner.compile.artifact import spec_hash, write_artifact
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.feasibility import NothingFeasible
from espc.runtime.driver import EngineError
from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams
from tests.kv_checks import assert_only_cache_holds_kv

STRATEGIES = ("auto", "elastic", "static-sp", "static-tp", "chunked", "disaggregated")
PROMPTS = [list(range(3, 3 + n)) for n in (5, 19, 60)]
KV_CAPACITY = 2048


@dataclasses.dataclass(frozen=True)
class SmallSpec:
    heads: int
    kv_heads: int
    devices: int
    tp: int | None  # None: compile chooses
    strategy: str

    def toml(self) -> str:
        return small_spec_text(self.heads, self.kv_heads, self.devices, self.tp, self.strategy)


@st.composite
def small_specs(draw) -> SmallSpec:
    heads = draw(st.sampled_from([4, 6]))
    kv_heads = draw(st.sampled_from([2, heads]))
    devices = draw(st.sampled_from([2, 4]))
    tp = draw(st.sampled_from([None, 1, 2]))  # 2 divides every head count and node here
    return SmallSpec(heads, kv_heads, devices, tp, draw(st.sampled_from(STRATEGIES)))


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small=small_specs())
def test_whatever_compile_chooses_runs_and_frees_its_kv(small: SmallSpec):
    spec = parse_spec(small.toml(), f"{small}")
    with tempfile.TemporaryDirectory() as directory:
        try:
            result = compile_spec(spec, spec_hash(spec), None, CompileOptions(search_seconds=0, trial_requests=30))
        except NothingFeasible as nothing:
            # Nothing was left: the Engine refuses every candidate compile left out.
            assert nothing.skipped
            for skipped in nothing.skipped:
                configuration = None if skipped.configuration == "every configuration" else skipped.configuration
                with pytest.raises((EngineError, ValueError)):
                    Engine(spec, strategy=skipped.strategy, configuration=configuration, kv_capacity=KV_CAPACITY)
            return
        policy = result.policy
        assert policy.runnable  # a CPU spec compiles to run by default
        if small.tp is not None:  # a pinned tp binds every strategy compile compared
            assert all(p.configuration.startswith(f"tp={small.tp}") for p in policy.predictions)
        out = Path(directory) / "artifact"
        write_artifact(out, spec, result, plots=False)
        with Engine.from_artifact(out, kv_capacity=KV_CAPACITY) as engine:
            completions = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3))
            assert [c.finish_reason for c in completions] == ["length"] * len(PROMPTS), [c.error for c in completions]
            engine.check_kv()
            assert_only_cache_holds_kv(engine.stats())
