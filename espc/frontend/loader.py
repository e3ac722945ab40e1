"""Read a spec file (TOML or DSL) into a validated Spec, or raise a located SpecError."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from espc.frontend.dsl import read_dsl
from espc.frontend.errors import Diagnostic, FieldPath, Positions, RuleViolation, SpecError, format_path, suggest
from espc.frontend.spec import Spec
from espc.frontend.toml_reader import read_toml

Syntax = Literal["toml", "dsl"]
SUFFIXES: dict[str, Syntax] = {".toml": "toml", ".esp": "dsl"}


def syntax_of(path: Path) -> Syntax:
    try:
        return SUFFIXES[path.suffix]
    except KeyError:
        what = f"the suffix {path.suffix!r}" if path.suffix else "a file name without a suffix"
        raise SpecError(
            [Diagnostic(str(path), None, None, "spec", f"cannot tell the spec syntax from {what}; name it .toml or .esp")]
        ) from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise SpecError([Diagnostic(str(path), None, None, "spec", f"cannot read the file: {reason}")]) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a `.toml` or `.esp` spec file."""
    path = Path(path)
    return parse_spec(read_text(path), str(path), syntax_of(path))


def parse_spec(text: str, filename: str = "<spec>", syntax: Syntax = "toml") -> Spec:
    raw, positions = read_raw(text, filename, syntax)
    return validate_spec(raw, positions, filename)


def read_raw(text: str, filename: str, syntax: Syntax) -> tuple[dict, Positions]:
    reader = read_toml if syntax == "toml" else read_dsl
    return reader(text, filename)


def validate_spec(raw: dict, positions: Positions, filename: str) -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as error:
        diagnostics = [_diagnostic(details, positions, filename) for details in error.errors(include_url=False)]
        diagnostics.sort(key=lambda d: (d.line or 0, d.column or 0))
        raise SpecError(list(dict.fromkeys(diagnostics))) from None


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field annotation can hold (through Annotated, unions, tuples)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _model_classes(argument)]


def _tag_of(model: type[BaseModel], part: str) -> bool:
    """Whether `part` is the discriminator value of `model` (pydantic puts it in error locations)."""
    first = next(iter(model.model_fields.values()))
    return typing.get_origin(first.annotation) is Literal and part in typing.get_args(first.annotation)


def _clean_location(location: tuple) -> tuple[FieldPath, list[type[BaseModel]]]:
    """Drop union tags from a pydantic location; also return the models owning its last key."""
    path: list[str | int] = []
    models: list[type[BaseModel]] = [Spec]
    owners: list[type[BaseModel]] = []
    for part in location:
        if isinstance(part, int):
            path.append(part)
            continue
        tagged = [model for model in models if part not in model.model_fields and _tag_of(model, part)]
        if tagged:
            models = tagged
            continue
        owners = models
        path.append(part)
        models = [nested for model in models if part in model.model_fields for nested in _model_classes(model.model_fields[part].annotation)]
    return tuple(path), owners


def _position(path: FieldPath, positions: Positions) -> tuple[int, int]:
    for end in range(len(path), 0, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return 1, 1


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _diagnostic(details: ErrorDetails, positions: Positions, filename: str) -> Diagnostic:
    path, owners = _clean_location(details["loc"])
    kind = details["type"]
    cause = details.get("ctx", {}).get("error")
    hint = getattr(cause, "hint", None)
    if isinstance(cause, RuleViolation):
        path += cause.path
        message = str(cause)
    elif isinstance(cause, Exception):
        message = str(cause)
    elif kind == "extra_forbidden":
        message = f"unknown field {path[-1]!r}"
        known = sorted({name for model in owners for name in model.model_fields})
        hint = suggest(str(path[-1]), known) if known else None
    elif kind == "missing":
        message = f"missing required field {path[-1]!r}" if path else "missing"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"expected a table of fields (a {{ ... }} block in the DSL), got {_shown(details['input'])}"
    elif kind == "union_tag_invalid":
        context = details["ctx"]
        message = f"unknown {context['discriminator'].strip(chr(39))} {context['tag']!r}"
        hint = f"known: {context['expected_tags'].replace(chr(39), '')}"
    else:
        message = details["msg"][:1].lower() + details["msg"][1:]
        if ", got " not in message:
            message += f", got {_shown(details['input'])}"
    line, column = _position(path, positions)
    return Diagnostic(filename, line, column, format_path(path) or "spec", message, hint)
