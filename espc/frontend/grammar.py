"""The grammar of the spec DSL (spec.lark) and the parsers built on it.

Besides whole `.esp` files, the same grammar reads the shorthands both syntaxes share:
calls such as `zipf(1.0, 10, 200K)` and latency bounds such as `max(25x prefill, 15s) at p90`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import lark

from espc.frontend.errors import Diagnostic, SpecError


@functools.cache
def parser() -> lark.Lark:
    grammar = resources.files("espc.frontend").joinpath("spec.lark").read_text()
    return lark.Lark(
        grammar,
        parser="lalr",
        start=["start", "call_text", "bound_text"],
        propagate_positions=True,
        maybe_placeholders=False,
    )


def number_or_text(token: str) -> object:
    """`8` -> 8, `0.5` -> 0.5, `80GiB` -> "80GiB" (units are parsed by the spec models)."""
    for convert in (int, float):
        try:
            return convert(token.replace("_", ""))
        except ValueError:
            pass
    return token


def syntax_error(error: lark.exceptions.LarkError, filename: str, what: str) -> SpecError:
    """Turn lark's exception into a located diagnostic; `what` names the text ("the spec")."""
    if isinstance(error, lark.UnexpectedInput):
        line, column = error.line, error.column
        if isinstance(error, lark.UnexpectedToken) and error.token.type == "$END":
            message = f"{what} ends too early"
        elif isinstance(error, lark.UnexpectedToken):
            message = f"unexpected {str(error.token)!r}"
        elif isinstance(error, lark.UnexpectedCharacters):
            message = f"unexpected character {error.char!r}"
        else:
            message = f"{what} ends too early"
        expected = sorted(_describe(name) for name in getattr(error, "expected", ()) or getattr(error, "allowed", ()))
        hint = f"expected {', '.join(expected)}" if expected else None
        return SpecError([Diagnostic(filename, max(line, 1), max(column, 1), "syntax", message, hint)])
    return SpecError([Diagnostic(filename, 1, 1, "syntax", str(error))])


_TERMINAL_NAMES = {
    "NAME": "a name",
    "QUANTITY": "a number",
    "STRING": "a string",
    "_NL": "a new line",
    "SEMICOLON": "';'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COMMA": "','",
    "EQUAL": "'='",
    "$END": "the end of the text",
}


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[terminal]
    # Keywords and operators (`x`, `<=`, `prefill`): lark names some of them `__ANON_n`.
    pattern = next((t.pattern for t in parser().terminals if t.name == terminal), None)
    return repr(pattern.value) if pattern is not None and pattern.type == "str" else repr(terminal.lower())


@dataclass(frozen=True)
class Call:
    """`zipf(1.0, 10, max=200K)` as written: the name and its arguments."""

    name: str
    positional: tuple[object, ...]
    keyword: dict[str, object]


@dataclass(frozen=True)
class Bound:
    """A latency bound: `max(prefill_multiple x prefill, limit) at p<percentile>`."""

    limit: object
    prefill_multiple: object | None
    percentile: str | None


class ShorthandError(ValueError):
    """A shorthand string (`zipf(...)`, `max(25x prefill, 15s) at p90`) that does not parse."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _parse_fragment(text: str, start: str, what: str) -> lark.Tree:
    try:
        return parser().parse(text, start=start)
    except lark.exceptions.LarkError as error:
        diagnostic = syntax_error(error, "", "it").diagnostics[0]
        raise ShorthandError(
            f"cannot read {text!r} as {what}: {diagnostic.message} at column {diagnostic.column}", diagnostic.hint
        ) from None


def parse_call(text: str) -> Call:
    """Read `name` or `name(arg, ..., key=value)`; arguments are numbers or unit strings."""
    tree = _parse_fragment(text.strip(), "call_text", "a call such as zipf(1.0, 10, 200K)").children[0]
    if tree.data == "name":
        return Call(str(tree.children[0]), (), {})
    if tree.data != "call":
        raise ShorthandError(f"cannot read {text!r} as a call such as zipf(1.0, 10, 200K)")
    positional: list[object] = []
    keyword: dict[str, object] = {}
    for arg in tree.children[1:]:
        value_tree = arg.children[-1]
        if value_tree.data == "call":
            raise ShorthandError(f"calls cannot be nested: {text!r}")
        value = number_or_text(str(value_tree.children[0]))
        if arg.data == "keyword":
            name = str(arg.children[0])
            if name in keyword:
                raise ShorthandError(f"argument {name!r} is given twice in {text!r}")
            keyword[name] = value
        elif keyword:
            raise ShorthandError(f"positional argument after a keyword argument in {text!r}")
        else:
            positional.append(value)
    return Call(str(tree.children[0]), tuple(positional), keyword)


def parse_bound(text: str) -> Bound:
    """Read a latency bound such as `50ms at p90` or `<= max(25x prefill, 15s) at p90`."""
    tree = _parse_fragment(text.strip(), "bound_text", "a latency bound such as max(25x prefill, 15s) at p90")
    limit_tree = tree.children[0]
    numbers = [str(token) for token in limit_tree.children]
    if limit_tree.data == "floored_limit_swapped":
        numbers.reverse()
    if limit_tree.data == "fixed_limit":
        limit, multiple = numbers[0], None
    elif limit_tree.data == "scaled_limit":
        limit, multiple = "0s", numbers[0]
    else:
        multiple, limit = numbers
    if multiple is not None:
        if not multiple.endswith("x"):
            raise ShorthandError(f"write the prefill multiple as {multiple.rstrip('x')}x, e.g. 25x prefill, in {text!r}")
        multiple = multiple[:-1]
    percentile = str(tree.children[1]) if len(tree.children) > 1 else None
    return Bound(number_or_text(limit), None if multiple is None else number_or_text(multiple), percentile)
