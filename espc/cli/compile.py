"""compile (spec -> verified artifact directory) and inspect (show a compiled policy). This
module imports the MILP compiler and so cvxpy: main.py loads it only for these verbs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from espc.cli.common import ArtifactDir, SpecFile, fail, load_artifact, load_spec_file, native_stdout_to_stderr
from espc.frontend.errors import SpecError
from espc.planner.compile.artifact import POLICY_FILE, ArtifactError, plot_policy, render_ir, spec_hash, write_artifact
from espc.planner.compile.compiler import TRIAL_REQUESTS, CompileOptions, compile_spec
from espc.planner.compile.feasibility import NothingFeasible
from espc.planner.compile.ilp import InfeasibleSLO
from espc.planner.compile.policy import PolicyError
from espc.planner.compile.report import render_policy
from espc.planner.sim.workload import TraceError

app = typer.Typer()


@app.command(name="compile")
def compile_(
    spec_file: SpecFile,
    output: Annotated[Path, typer.Option("-o", "--output", help="artifact directory to write")],
    search_seconds: Annotated[
        float, typer.Option(help="time budget of the local search around the MILP and static-seed policies (0: no search, no seeds)")
    ] = CompileOptions.search_seconds,
    requests: Annotated[int, typer.Option(help="requests per simulated trial (at least)")] = TRIAL_REQUESTS,
    seed: Annotated[int | None, typer.Option(help="workload seed of the trials (default: the spec's)")] = None,
    calibration: Annotated[Path | None, typer.Option(help="cost-model calibration from `espc profile`")] = None,
    dump_ir: Annotated[bool, typer.Option("--dump-ir", help="print every stage's output: MILP solutions, trials, the policy")] = False,
    runnable: Annotated[
        bool | None,
        typer.Option(
            "--runnable/--simulation-only",
            help="hold every candidate to what the runtime serves (espc.planner.compile.feasibility), or lift those limits to "
            "study the spec in simulation (default: --runnable for CPU specs, --simulation-only for accelerator specs)",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="processes simulating independent candidates at once; the policy is the same for any count "
                     "(default: every core this process may use)", show_default=False),
    ] = None,
) -> None:
    """Solve the MILP for an elastic scaling policy, verify it in simulation and write an artifact directory."""
    spec = load_spec_file(spec_file)
    calibrated = None
    if calibration is not None:
        from espc.planner.sim.calibration import CalibrationError, load_calibration

        try:
            calibrated = load_calibration(calibration, spec)
        except CalibrationError as error:
            fail(str(error))
    if search_seconds < 0 or requests < 1 or (workers is not None and workers < 1):
        fail("--search-seconds must be at least 0, --requests at least 1 and --workers at least 1")
    if output.exists() and not output.is_dir():
        fail(f"{output}: exists and is not a directory")
    options = CompileOptions(search_seconds, requests, seed, runnable, workers)
    progress = _StageProgress()
    try:
        with native_stdout_to_stderr():
            result = compile_spec(
                spec, spec_hash(spec), spec_file.parent, options, cost=calibrated.cost if calibrated else None,
                on_progress=progress,
            )
        progress("write", f"writing {output}")
        written = write_artifact(output, spec, result, spec_file, options=options, calibration=calibrated)
    except InfeasibleSLO as error:
        progress.close()
        fail(f"{spec_file}: the SLOs cannot be met: {error}")
    except NothingFeasible as error:
        progress.close()
        hint = "; `--simulation-only` lifts the runtime's limits (for `espc simulate` and `espc compare`)" if error.runtime_bound else ""
        fail(f"{spec_file}: {error}{hint}")
    except SpecError as error:
        progress.close()
        fail(str(error))
    except (TraceError, ArtifactError, PolicyError, OSError, ValueError) as error:
        progress.close()
        fail(f"{spec_file}: {error}")
    progress.close()
    if dump_ir:
        typer.echo(render_ir(result))
    typer.echo(str(result.policy))
    typer.echo(f"wrote {output}/: {', '.join(path.name for path in written)}")
    typer.echo(f"next: espc inspect {output}; espc compare {output}")


class _StageProgress:
    """Compile progress on stderr: on a terminal a spinner with the current step and one
    line per finished stage with its time; otherwise one plain line per stage."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal
        self.status = self.console.status("")
        self.stage: str | None = None
        self.part: str | None = None
        self.stage_started = self.started = time.perf_counter()
        self.steps = 0
        if self.live:
            self.status.start()

    def __call__(self, stage: str, message: str) -> None:
        if stage != self.stage:
            self._finish()
            self.stage, self.stage_started, self.steps, self.part = stage, time.perf_counter(), 0, None
        # a plain line per stage, and per baseline in "strategies" (their messages start "name: ")
        part = message.split(":", 1)[0] if stage == "strategies" else ""
        if not self.live and part != self.part:
            self.console.print(f"espc compile: {stage}: {message}", markup=False)
        self.part = part
        self.steps += 1
        if self.live:
            self.status.update(f"[bold]{stage}[/bold] {escape(message)}")

    def _finish(self) -> None:
        if self.stage is not None and self.live:
            elapsed = time.perf_counter() - self.stage_started
            steps = f" ({self.steps} steps)" if self.steps > 1 else ""
            self.console.print(f"[green]✓[/green] {self.stage:<10} {elapsed:7.1f} s{escape(steps)}")

    def close(self) -> None:
        self._finish()
        self.stage = None
        if self.live:
            self.status.stop()
            self.console.print(f"  {'total':<10} {time.perf_counter() - self.started:7.1f} s")


@app.command()
def inspect(
    artifact: ArtifactDir,
    plot: Annotated[bool, typer.Option("--plot", help="write the policy plots (PNG) into DIR and print their paths")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print policy.json")] = False,
) -> None:
    """Show a compiled policy: DoP per length bucket, budgets, thresholds, predicted goodput."""
    loaded = load_artifact(artifact)
    if as_json:
        typer.echo((artifact / POLICY_FILE).read_text(encoding="utf-8"), nl=False)
    else:
        render_policy(loaded, Console(width=None if sys.stdout.isatty() else 160))
    if plot:
        paths = loaded.plots()
        if len(paths) < (2 if loaded.policy.elastic else 1):
            # compiled without plots: draw them (they are not in the manifest, so not verified)
            paths = plot_policy(loaded.policy, artifact)
        for path in paths:
            typer.echo(f"plot {path}", err=True)
        if sys.stdout.isatty() and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            for path in paths:
                typer.launch(str(path))
