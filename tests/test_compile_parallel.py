"""Compile on several cores: `fork_map` is `map` on forked workers (order, errors, no
nesting), and a compile's policy and trials do not depend on how many workers ran it."""

import dataclasses
import math
import multiprocessing
import os

import pytest
from small_specs import small_spec_text

from espc import load_spec
from espc.planner.compile import parallel
from espc.planner.compile.artifact import spec_hash
from espc.planner.compile.compiler import CompileOptions, compile_spec
from espc.planner.compile.parallel import fork_map

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform cannot fork")


def _cube_after_spinning(n: int) -> int:
    sum(range(n * 2_000))  # items of different cost: the workers take them unevenly
    return n**3


@needs_fork
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_fork_map_is_map_in_order_on_any_number_of_workers(workers):
    items = [7, 0, 300, 1, 45, 2, 150, 3, 3, 90, 11]
    assert fork_map(_cube_after_spinning, items, workers) == [n**3 for n in items]
    assert fork_map(_cube_after_spinning, [], workers) == []


@needs_fork
def test_a_workers_exception_is_raised_with_its_traceback():
    parent = os.getpid()
    child_ran = multiprocessing.get_context("fork").Event()

    def fail_in_a_child(_: int) -> None:
        if os.getpid() == parent:
            child_ran.wait()  # so that the child takes an item, however slowly it starts
        else:
            child_ran.set()
            raise ValueError("not in the parent")

    with pytest.raises(RuntimeError, match="(?s)compile worker failed.*not in the parent"):
        fork_map(fail_in_a_child, range(4), 2)
    assert not parallel._mapping  # a failed map leaves later maps parallel
    with pytest.raises(ZeroDivisionError):  # raised here: as it is
        fork_map(lambda n: 1 // n, [0] * 50, 2)


@needs_fork
def test_a_map_inside_a_map_runs_where_it_is_called():
    """Nested maps would fork more processes than cores: the inner one stays sequential."""

    def inner_map_pids(_: int) -> tuple[int, set[int]]:
        return os.getpid(), set(fork_map(lambda _: os.getpid(), range(4), 2))

    for outer, inner in fork_map(inner_map_pids, range(6), 2):
        assert inner == {outer}
    assert set(fork_map(lambda _: os.getpid(), range(1), 2)) == {os.getpid()}


@needs_fork
def test_a_compile_decides_the_same_on_one_and_two_workers(tmp_path):
    """Screens, search trials, the ablation and the baselines run in parallel on two
    workers; the search runs to convergence (no deadline), so nothing but the worker count
    differs, and the policy and every trial must be the same."""
    path = tmp_path / "tiny.toml"
    path.write_text(small_spec_text(strategy="auto"))
    spec = load_spec(path)
    results = [
        compile_spec(spec, spec_hash(spec), tmp_path, CompileOptions(search_seconds=math.inf, trial_requests=40, workers=w))
        for w in (1, 2)
    ]
    policies = [
        dataclasses.replace(
            result.policy, compile_seconds=0.0, solver=dataclasses.replace(result.policy.solver, seconds=0.0)
        )
        for result in results
    ]
    assert policies[0] == policies[1]
    assert results[0].trials == results[1].trials
    assert any(trial.stage == "search" for trial in results[0].trials)
    assert len(policies[0].predictions) > 1  # the baselines were measured too
