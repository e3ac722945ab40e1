"""The spec verbs: check, fmt and schema. They read and write specs only (no planner)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from espc.cli.common import SpecFile, load_spec_file
from espc.frontend import units
from espc.frontend.spec import Spec
from espc.frontend.writer import to_dsl, to_toml

app = typer.Typer()


def _summary(path: Path, spec: Spec) -> list[str]:
    model, cluster = spec.model, spec.cluster
    describe = units.describe
    tp = f"tp {cluster.tp} -> {cluster.num_devices // cluster.tp} elastic instances" if cluster.tp else "tp chosen by compile"
    return [
        f"{path}: valid",
        f"model {model.name}: {model.num_parameters:,} parameters "
        f"({describe(model.weight_bytes, units.Kind.BYTES)} {model.dtype}), "
        f"KV {describe(model.kv_bytes_per_token, units.Kind.BYTES)}/token, max context {model.max_context:,}",
        f"cluster: {cluster.num_devices} {cluster.device_kind} devices on {len(cluster.nodes)} node(s), {tp}",
    ]


@app.command()
def check(
    spec_file: SpecFile,
    as_json: Annotated[bool, typer.Option("--json", help="print the normalised spec as JSON")] = False,
) -> None:
    """Validate a spec and print it normalised: every field, presets and defaults filled in."""
    spec = load_spec_file(spec_file)
    if as_json:
        typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
        return
    typer.echo("".join(f"# {line}\n" for line in _summary(spec_file, spec)) + to_toml(spec, full=True), nl=False)


class Syntax(str, Enum):
    toml = "toml"
    dsl = "dsl"


@app.command()
def fmt(
    spec_file: SpecFile,
    to: Annotated[Syntax, typer.Option("--to", help="the syntax to write")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    full: Annotated[bool, typer.Option("--full", help="write every field, not only what differs from defaults")] = False,
) -> None:
    """Convert a spec between TOML and the DSL (`.esp`)."""
    spec = load_spec_file(spec_file)
    text = to_toml(spec, full) if to is Syntax.toml else to_dsl(spec, full)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
) -> None:
    """Print the JSON Schema of a spec (for editors and validators)."""
    text = json.dumps(Spec.model_json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
