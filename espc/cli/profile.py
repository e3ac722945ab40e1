"""profile: measure the spec's devices and fit the cost model that compile can use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from espc.cli.common import SpecFile, fail, load_spec_file

app = typer.Typer()


@app.command()
def profile(
    spec_file: SpecFile,
    output: Annotated[Path, typer.Option("-o", "--output", help="calibration file to write")] = Path("calibration.json"),
    quick: Annotated[bool, typer.Option("--quick", help="a small grid that takes seconds (tests, CI); not for planning")] = False,
    repeats: Annotated[int, typer.Option(help="timed runs per grid point after a warm-up; the median counts")] = 3,
) -> None:
    """Measure prefill, decode and KV migration on the spec's devices and fit the cost model.

    Prints measured vs fitted time per grid point and writes the calibration file that
    `espc compile --calibration FILE` reads."""
    spec = load_spec_file(spec_file)
    if repeats < 1:
        fail(f"--repeats must be at least 1, got {repeats}")
    if output.is_dir() or not output.parent.is_dir():
        fail(f"{output}: cannot write the calibration file there (a directory, or its directory does not exist)")
    from rich.progress import Progress

    from espc.backend.harness import HarnessError  # torch loads only for this verb
    from espc.planner.sim.calibration import format_calibration, write_calibration
    from espc.runtime.profile import Grid
    from espc.runtime.profile import profile as measure

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("starting the workers", total=None)
        try:
            calibration = measure(
                spec, grid=Grid.quick(spec) if quick else None, repeats=repeats,
                on_progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what),
            )
        except (HarnessError, ValueError) as error:  # a ProfileError, or a fit the measurements cannot determine
            fail(f"{spec_file}: espc profile: {error}")
    try:
        write_calibration(output, calibration)
    except OSError as error:
        fail(f"{output}: cannot write the calibration file: {error.strerror or error}")
    typer.echo(format_calibration(calibration))
    typer.echo(f"wrote {output}; next: espc compile {spec_file} --calibration {output} -o DIR")
