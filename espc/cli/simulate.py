"""simulate and compare: replay the workload in the discrete-event simulator, one strategy or
several side by side. This module imports the evaluation (strategy elastic solves the MILP)
and so cvxpy: main.py loads it only for these verbs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from espc.cli.common import ArtifactOrSpec, Target, fail, load_target, native_stdout_to_stderr
from espc.frontend.errors import SpecError
from espc.planner.compile.compiler import goodput_metric
from espc.planner.compile.evaluation import (
    DEFAULT_WINDOW_S,
    ELASTIC_STRATEGIES,
    Evaluator,
    compare_strategies,
    override_workload,
)
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.compile.report import plot_results, render_comparison
from espc.planner.sim.costmodel import CostModel
from espc.planner.sim.metrics import METRICS
from espc.planner.sim.strategies import BASELINES
from espc.planner.sim.workload import TraceError

app = typer.Typer()

_STRATEGIES = (*ELASTIC_STRATEGIES, *BASELINES)
_SIMULATE_HELP = {
    "rate": typer.Option(help="arrival rate (req/s) instead of the workload's own"),
    "goodput": typer.Option("--goodput", help="find the goodput (see --metric) by bisection over the rate instead"),
    "metric": typer.Option(
        help="with --goodput: p90 (attainment over all requests) or per-class (in every prompt-length class); "
        "default: the compiled policy's, else the spec's (auto: per-class when a prompt needs several instances)"
    ),
    "requests": typer.Option(help="number of requests (caps a trace)"),
    "seed": typer.Option(help="first workload seed (default: the spec's)"),
    "seeds": typer.Option(help="repeat over this many seeds and report mean ± spread"),
    "workload": typer.Option(help="replace the prompt lengths, e.g. leval or 'zipf(1.2, 10, 200K)'"),
    "trace": typer.Option(help="replay an Azure CSV or Mooncake JSONL trace instead"),
    "as_json": typer.Option("--json", help="print the results as JSON"),
    "plot": typer.Option(help="write latency CDFs and instance timelines (PNG) here"),
    "window": typer.Option(help="with --goodput: each trial spans at least this many seconds of arrivals"),
}


@app.command()
def simulate(
    target: ArtifactOrSpec,
    strategy: Annotated[
        str | None, typer.Option(help=f"one of {', '.join(_STRATEGIES)} (default: the compiled or the spec's)")
    ] = None,
    rate: Annotated[float | None, _SIMULATE_HELP["rate"]] = None,
    goodput: Annotated[bool, _SIMULATE_HELP["goodput"]] = False,
    requests: Annotated[int | None, _SIMULATE_HELP["requests"]] = None,
    seed: Annotated[int | None, _SIMULATE_HELP["seed"]] = None,
    seeds: Annotated[int, _SIMULATE_HELP["seeds"]] = 1,
    workload: Annotated[str | None, _SIMULATE_HELP["workload"]] = None,
    trace: Annotated[Path | None, _SIMULATE_HELP["trace"]] = None,
    as_json: Annotated[bool, _SIMULATE_HELP["as_json"]] = False,
    plot: Annotated[Path | None, _SIMULATE_HELP["plot"]] = None,
    window: Annotated[float, _SIMULATE_HELP["window"]] = DEFAULT_WINDOW_S,
    metric: Annotated[str | None, _SIMULATE_HELP["metric"]] = None,
) -> None:
    """Replay the workload in the discrete-event simulator: latencies, SLO attainment, goodput.

    On an artifact directory the compiled spec and policy are used (strategy elastic: the
    compiled elastic policy); on a spec file, strategy elastic solves the policy MILP first."""
    loaded = load_target(target)
    chosen = strategy or (loaded.policy.strategy if loaded.policy else loaded.spec.policy.strategy)
    _compare(loaded, [chosen], rate, goodput, requests, seed, seeds, workload, trace, as_json, plot, window, metric)


@app.command()
def compare(
    target: ArtifactOrSpec,
    strategies: Annotated[
        str | None,
        typer.Option(
            help=f"comma-separated strategies (default: {','.join(BASELINES)}; on an artifact elastic and "
            "elastic-rigid, its ablation without ESP's choices, too)"
        ),
    ] = None,
    rate: Annotated[float | None, _SIMULATE_HELP["rate"]] = None,
    goodput: Annotated[bool, _SIMULATE_HELP["goodput"]] = False,
    requests: Annotated[int | None, _SIMULATE_HELP["requests"]] = None,
    seed: Annotated[int | None, _SIMULATE_HELP["seed"]] = None,
    seeds: Annotated[int, _SIMULATE_HELP["seeds"]] = 1,
    workload: Annotated[str | None, _SIMULATE_HELP["workload"]] = None,
    trace: Annotated[Path | None, _SIMULATE_HELP["trace"]] = None,
    as_json: Annotated[bool, _SIMULATE_HELP["as_json"]] = False,
    plot: Annotated[Path | None, _SIMULATE_HELP["plot"]] = None,
    window: Annotated[float, _SIMULATE_HELP["window"]] = DEFAULT_WINDOW_S,
    metric: Annotated[str | None, _SIMULATE_HELP["metric"]] = None,
) -> None:
    """Simulate several strategies on the same workload and print them side by side."""
    loaded = load_target(target)
    if strategies is None:
        names = list(_STRATEGIES if loaded.policy is not None and loaded.policy.elastic is not None else BASELINES)
    else:
        names = [name.strip() for name in strategies.split(",") if name.strip()]
    _compare(loaded, names, rate, goodput, requests, seed, seeds, workload, trace, as_json, plot, window, metric)


def _compare(
    target: Target, strategies: list[str], rate: float | None, goodput: bool, requests: int | None,
    seed: int | None, seeds: int, workload: str | None, trace: Path | None, as_json: bool, plot: Path | None,
    window: float, metric: str | None,
) -> None:
    path, spec = target.path, target.spec
    for name in strategies:
        if name == "auto":
            fail(
                f"strategy 'auto' is decided by `espc compile`: compile the spec (espc compile SPEC -o DIR) and "
                f"simulate DIR, or choose one of {', '.join(_STRATEGIES)}"
            )
        if name not in _STRATEGIES:
            fail(f"unknown strategy {name!r}; choose from {', '.join(_STRATEGIES)}")
    if rate is not None and goodput:
        fail("give --rate or --goodput, not both")
    if metric is not None and metric not in METRICS:
        fail(f"unknown goodput metric {metric!r}; choose from {', '.join(METRICS)}")
    if seeds < 1 or (requests is not None and requests < 1) or (rate is not None and rate <= 0) or window <= 0:
        fail("--seeds and --requests must be at least 1, --rate and --window positive")
    printer = _progress_printer()
    try:
        spec = override_workload(spec, workload, trace)
        evaluator = Evaluator(
            spec, base_dir=target.base_dir, requests=requests, window_s=window,
            elastic=target.policy.elastic if target.policy is not None else None,
            # The compiled cost model: a calibrated artifact is simulated with its measured times.
            cost=CostModel.from_dict(target.policy.cost_parameters) if target.policy is not None else None,
        )
        if metric is None:
            metric = target.policy.goodput_metric if target.policy is not None else goodput_metric(spec, evaluator)
        evaluator.metric = metric
        first_seed = spec.workload.seed if seed is None else seed
        with native_stdout_to_stderr():  # strategy elastic on a spec file solves the MILP
            report = compare_strategies(
                evaluator, strategies, range(first_seed, first_seed + seeds), rate, goodput, timeline=plot is not None,
                on_progress=printer,
            )
    except SpecError as error:
        printer(None)
        fail(str(error))
    except InfeasibleSLO as error:
        printer(None)
        fail(f"{path}: strategy elastic: the SLOs cannot be met: {error}")
    except (TraceError, ValueError) as error:
        printer(None)
        fail(f"{path}: {error}")
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        # Tables are wide: give pipes and files room instead of rich's 80 columns.
        render_comparison(report, Console(width=None if sys.stdout.isatty() else 160))
    if plot is not None:
        for written in plot_results([run.result for run in report.first_runs()], plot):
            typer.echo(f"wrote {written}", err=True)


def _progress_printer():
    """A transient status line on stderr for long searches (nothing when not a terminal)."""
    console = Console(stderr=True)
    status = console.status("")
    if console.is_terminal:
        status.start()

    def update(message: str | None) -> None:
        if message is None:
            status.stop()
        else:
            status.update(message)

    return update
