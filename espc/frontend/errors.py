"""Located spec errors: every problem is reported as `FILE:LINE:COL: field.path: message`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

# A field path as pydantic reports it: keys and list indices from the spec root.
FieldPath = tuple[str | int, ...]
# Where each field path starts in the source text: (line, column), both from 1.
Positions = dict[FieldPath, tuple[int, int]]


def format_path(path: FieldPath) -> str:
    """`("cluster", "nodes", 0, "devices")` -> `cluster.nodes[0].devices`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


@dataclass(frozen=True)
class Diagnostic:
    """One problem; `line` and `column` are None for a file that could not be read at all."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        text = f"{where}: {self.path}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class SpecError(Exception):
    """One or more problems in a spec file; the frontend raises nothing else for bad input."""

    def __init__(self, diagnostics: list[Diagnostic]):
        assert diagnostics, "a SpecError needs at least one diagnostic"
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[Diagnostic]]]:
        # Pickled (across a process pool) from its diagnostics, not from the message text.
        return SpecError, (self.diagnostics,)


class RuleViolation(ValueError):
    """Raised by spec validators for a rule that spans fields.

    `path` is relative to the model that raises it, so the error lands on the field that
    has to change (`cluster.tp`) rather than on the whole section.
    """

    def __init__(self, path: FieldPath, message: str, hint: str | None = None):
        super().__init__(message)
        self.path = path
        self.hint = hint


def suggest(name: str, choices: Iterable[str]) -> str:
    """A hint for a misspelt name: the closest known one, and all of them."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    known = ", ".join(choices)
    return f"did you mean {close[0]!r}? (known: {known})" if close else f"known: {known}"
