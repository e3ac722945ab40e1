"""The `espc` command. Thin: every verb parses its arguments and calls the library.

This module holds the app, --version and the table of verbs; each verb lives in a module of
espc.cli that is imported only when the verb is looked up (to run it, or for `espc --help`),
because compile and simulate take option defaults from the planner, which loads cvxpy:
`espc --version` and `espc check` stay light."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

import espc

# verb -> its module in espc.cli, in the order `espc --help` lists them
_VERBS = {
    "check": "check",
    "fmt": "check",
    "schema": "check",
    "compile": "compile",
    "inspect": "compile",
    "simulate": "simulate",
    "compare": "simulate",
    "graph": "graph",
    "run": "run",
    "profile": "profile",
    "serve": "serve",
    "bench": "bench",
}


@functools.cache
def _verb_group(module: str) -> TyperGroup:
    return typer.main.get_group(importlib.import_module(f"espc.cli.{module}").app)


# Values are click commands of the click that typer uses: Any, since newer typers vendor it privately (typer._click).
class _Verbs(Mapping[str, Any]):
    """The group's commands: the names come from _VERBS, a command is built from its module
    on first access. A mapping rather than overriding get_command alone, because typer also
    reads the names from it to suggest a verb for a typo."""

    def __getitem__(self, name: str) -> Any:
        return _verb_group(_VERBS[name]).commands[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_VERBS)

    def __len__(self) -> int:
        return len(_VERBS)


class _LazyGroup(TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _Verbs()  # type: ignore[assignment]  # read-only: verbs register in their modules


app = typer.Typer(
    name="espc",
    cls=_LazyGroup,
    help="Elastic sequence-parallelism compiler for long-context LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"espc {espc.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = None,
) -> None:
    """Elastic sequence-parallelism compiler for long-context LLM serving."""


def main() -> None:
    app(prog_name="espc")
