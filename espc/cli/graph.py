"""graph: lower a representative iteration plan and show the per-rank FX graphs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from espc.cli.common import ArtifactOrSpec, fail, load_target

app = typer.Typer()


class Phase(str, Enum):
    prefill = "prefill"
    decode = "decode"


class GraphFormat(str, Enum):
    table = "table"
    code = "code"
    dot = "dot"
    svg = "svg"


@app.command()
def graph(
    target: ArtifactOrSpec,
    phase: Annotated[Phase, typer.Option(help="which iteration to lower")] = Phase.prefill,
    dop: Annotated[int, typer.Option(help="instances in the batch")] = 2,
    rank: Annotated[int | None, typer.Option(help="show one rank only")] = None,
    format_: Annotated[GraphFormat, typer.Option("--format", help="output format")] = GraphFormat.table,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    dump_ir: Annotated[Path | None, typer.Option("--dump-ir", help="also write every pass's graphs into this directory")] = None,
) -> None:
    """Lower a representative iteration plan and show the per-rank FX graphs."""
    spec = load_target(target).spec
    from espc.backend.dump import GraphvizMissing, render_graph  # torch loads only for this verb

    try:
        text = render_graph(spec, phase.value, dop, rank, format_.value, dump_ir)
    except (ValueError, NotImplementedError, GraphvizMissing) as error:
        fail(f"espc graph: {error}")
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
