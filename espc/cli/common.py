"""What the verbs share: their argument types, failing with exit status 2, loading specs
and artifacts, and keeping native output off stdout. Light imports only: every verb loads
this module."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from espc.frontend.errors import SpecError
from espc.frontend.loader import load_spec
from espc.frontend.spec import Spec
from espc.planner.compile.artifact import MANIFEST_FILE, POLICY_FILE, Artifact, ArtifactError, open_artifact
from espc.planner.compile.policy import Policy

SpecFile = Annotated[Path, typer.Argument(help="a spec file: .toml or .esp (DSL)", show_default=False)]
ArtifactOrSpec = Annotated[Path, typer.Argument(help="a compiled artifact directory or a spec file", show_default=False)]
ArtifactDir = Annotated[Path, typer.Argument(help="an artifact directory written by `espc compile`", show_default=False)]


def fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(2)


def load_spec_file(path: Path) -> Spec:
    try:
        return load_spec(path)
    except SpecError as error:
        fail(str(error))


def load_artifact(directory: Path) -> Artifact:
    try:
        return open_artifact(directory)
    except ArtifactError as error:
        fail(str(error))


@dataclass(frozen=True)
class Target:
    """What simulate, compare and graph run on: a spec file or a verified artifact."""

    path: Path
    spec: Spec
    base_dir: Path  # relative paths in the spec (a trace) resolve here
    policy: Policy | None  # compiled, for an artifact directory


def load_target(target: Path) -> Target:
    if target.is_dir():
        loaded = load_artifact(target)
        return Target(target, loaded.spec, loaded.base_dir, loaded.policy)
    if target.name == MANIFEST_FILE or target.name == POLICY_FILE:
        fail(f"{target}: give the artifact directory ({target.parent}), not a file inside it")
    return Target(target, load_spec_file(target), target.parent, None)


@contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Native code (the HiGHS solver prints a banner) writes to file descriptor 1, around
    sys.stdout; while it runs, descriptor 1 points at stderr so that stdout holds only the
    command's output (tables, JSON, --dump-ir)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers still hold text meant for stderr
        except (OSError, AttributeError, TypeError):  # no C library to ask (Windows)
            pass
        os.dup2(saved, 1)
        os.close(saved)
