"""The espc spec DSL: `.esp` text -> the same raw dictionary (and source positions) as TOML.

The grammar (spec.lark) only knows statements, values, calls and latency bounds; this
module gives statements their meaning. Most statements are `field value` or
`section { ... }`; the sugar is

- `model PRESET { ... }` and `policy STRATEGY { ... }`: the argument names the preset / strategy;
- in `cluster`: `gpu DEVICE x COUNT [as NAME] [{ device overrides }]` and `cpu x COUNT`,
  one line per node;
- in `slo`: `ttft <= max(25x prefill, 15s) at p90`;
- calls (`zipf(1.0, 10, 200K)`, `poisson(2.5)`) and bounds are passed on as their source
  text, which the spec models parse exactly as they parse the same strings from TOML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import lark

from espc.frontend.errors import Diagnostic, FieldPath, Positions, SpecError, format_path
from espc.frontend.grammar import number_or_text, parser, syntax_error
from espc.frontend.spec import Spec

# Section arguments: `model llama3-8b { }` sets model.preset, `policy elastic { }` the strategy.
_SECTION_ARGUMENT = {"model": "preset", "policy": "strategy"}
_DEVICE_KINDS = {"gpu": "cuda", "cpu": "cpu"}
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class _Arg:
    value: object
    line: int
    column: int


@dataclass(frozen=True)
class _Stmt:
    key: str
    line: int
    column: int
    args: tuple[_Arg, ...]
    block: tuple[_Stmt, ...] | None


class _Reader:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.positions: Positions = {}

    def error(self, line: int, column: int, path: FieldPath, message: str, hint: str | None = None) -> SpecError:
        return SpecError([Diagnostic(self.filename, line, column, format_path(path) or "spec", message, hint)])

    # -- parse tree -> statements -------------------------------------------------------

    def statements(self, tree: lark.Tree) -> tuple[_Stmt, ...]:
        return tuple(self.statement(child) for child in tree.children if isinstance(child, lark.Tree))

    def statement(self, tree: lark.Tree) -> _Stmt:
        key_token = cast(lark.Token, tree.children[0])  # both `stmt` rules of spec.lark start with a NAME
        args: list[_Arg] = []
        block = None
        for child in tree.children[1:]:
            if child.data == "block":
                block = self.statements(child)
            elif child.data == "bound":
                args.append(_Arg(self.source(child), child.meta.line, child.meta.column))
            else:
                args.append(self.argument(child))
        # The lexer gives every token it reads from the text its position.
        assert key_token.line is not None and key_token.column is not None
        return _Stmt(str(key_token), key_token.line, key_token.column, tuple(args), block)

    def argument(self, tree: lark.Tree) -> _Arg:
        line, column = tree.meta.line, tree.meta.column
        token = str(tree.children[0])
        if tree.data == "call":
            value: object = self.source(tree)
        elif tree.data == "quantity":
            value = number_or_text(token)
        elif tree.data == "name":
            value = _BOOLEANS.get(token, token)
        else:
            try:
                value = json.loads(token)
            except json.JSONDecodeError as error:
                diagnostic = Diagnostic(
                    self.filename, line, column + error.pos, "syntax", f"bad string {token}: {error.msg.lower()}",
                    hint='escapes are \\" \\\\ \\n \\t \\uXXXX',
                )
                raise SpecError([diagnostic]) from None
        return _Arg(value, line, column)

    def source(self, tree: lark.Tree) -> str:
        return self.text[tree.meta.start_pos : tree.meta.end_pos]

    # -- statements -> raw spec dictionary ------------------------------------------------

    def spec(self, stmts: tuple[_Stmt, ...]) -> dict:
        raw: dict = {}
        for stmt in stmts:
            path = (stmt.key,)
            self.claim(raw, stmt, path)
            if stmt.block is None:
                raw[stmt.key] = self.single_value(stmt, path)
                continue
            section = self.block(stmt.block, path)
            # An unknown section keeps its arguments out of the way, so that the error
            # is "unknown field" with a suggestion rather than one about the argument.
            if stmt.args and stmt.key in Spec.model_fields:
                field = _SECTION_ARGUMENT.get(stmt.key)
                extra = stmt.args[0] if field is None else stmt.args[1] if len(stmt.args) > 1 else None
                if extra is not None:
                    raise self.error(
                        extra.line, extra.column, path, f"unexpected argument {extra.value!r} before the block",
                        hint="only `model PRESET { ... }` and `policy STRATEGY { ... }` take one",
                    )
                # A section without a field takes no argument: its first one was `extra` above.
                assert field is not None
                argument = stmt.args[0]
                if field in section:
                    line, column = self.positions[path + (field,)]
                    raise self.error(
                        line, column, path + (field,),
                        f"{field} is given twice (first at line {argument.line}, column {argument.column})",
                    )
                section = {field: argument.value, **section}
                self.positions[path + (field,)] = (argument.line, argument.column)
            raw[stmt.key] = section
        return raw

    def claim(self, table: dict, stmt: _Stmt, path: FieldPath) -> None:
        if stmt.key in table:
            line, column = self.positions[path]
            raise self.error(
                stmt.line, stmt.column, path, f"{stmt.key} is given twice (first at line {line}, column {column})"
            )
        self.positions[path] = (stmt.line, stmt.column)

    def single_value(self, stmt: _Stmt, path: FieldPath) -> object:
        if len(stmt.args) != 1:
            what = "a value" if not stmt.args else f"one value, got {len(stmt.args)}"
            raise self.error(stmt.line, stmt.column, path, f"{stmt.key} takes {what}")
        return stmt.args[0].value

    def block(self, stmts: tuple[_Stmt, ...], path: FieldPath) -> dict:
        table: dict = {}
        nodes: list[dict] = []
        for stmt in stmts:
            if path == ("cluster",) and stmt.key in _DEVICE_KINDS:
                nodes.append(self.node(stmt, path + ("nodes", len(nodes))))
                continue
            stmt_path = path + (stmt.key,)
            self.claim(table, stmt, stmt_path)
            if stmt.block is not None:
                if stmt.args:
                    raise self.error(stmt.line, stmt.column, stmt_path, f"{stmt.key} takes a value or a block, not both")
                table[stmt.key] = self.block(stmt.block, stmt_path)
            else:
                table[stmt.key] = self.single_value(stmt, stmt_path)
        if nodes:
            if "nodes" in table:
                line, column = self.positions[path + ("nodes",)]
                raise self.error(line, column, path + ("nodes",), "nodes are given both as `gpu ... x N` lines and as a field")
            table["nodes"] = nodes
        return table

    def node(self, stmt: _Stmt, path: FieldPath) -> dict:
        """`gpu A800-80G x 8 [as node0] [{ memory 40GiB }]` -> one node of 8 A800s."""
        usage = f"write `{stmt.key} DEVICE x COUNT [as NAME]`" + (", or `cpu x COUNT`" if stmt.key == "cpu" else "")
        values = [arg.value for arg in stmt.args]
        if "x" not in values:
            raise self.error(stmt.line, stmt.column, path, f"a {stmt.key} node needs a device count", hint=usage)
        times = values.index("x")
        if times > 1 or times + 1 >= len(values):
            raise self.error(stmt.line, stmt.column, path, f"cannot read this {stmt.key} node", hint=usage)
        device: dict = {"kind": _DEVICE_KINDS[stmt.key]}
        device_arg: _Arg | _Stmt  # what the device's position points at
        if times == 1:
            device["name"] = values[0]
            device_arg = stmt.args[0]
        elif stmt.key == "cpu":
            device["name"] = "cpu"
            device_arg = stmt
        else:
            raise self.error(stmt.line, stmt.column, path, "a gpu node needs a device name", hint=usage)
        self.positions[path] = (stmt.line, stmt.column)
        self.positions[path + ("device",)] = (device_arg.line, device_arg.column)
        self.positions[path + ("device", "kind")] = (stmt.line, stmt.column)
        count = stmt.args[times + 1]
        node: dict = {"devices": count.value}
        self.positions[path + ("devices",)] = (count.line, count.column)
        rest = stmt.args[times + 2 :]
        if rest:
            if len(rest) != 2 or rest[0].value != "as":
                raise self.error(rest[0].line, rest[0].column, path, f"unexpected {rest[0].value!r}", hint=usage)
            node["name"] = rest[1].value
            self.positions[path + ("name",)] = (rest[1].line, rest[1].column)
        if stmt.block is not None:
            overrides = self.block(stmt.block, path + ("device",))
            for field in ("name", "kind"):
                if field in overrides:
                    line, column = self.positions[path + ("device", field)]
                    raise self.error(line, column, path + ("device", field), f"the node line already sets the device {field}")
            device.update(overrides)
        node["device"] = device
        return node


def read_dsl(text: str, filename: str) -> tuple[dict, Positions]:
    """Parse DSL text into the raw spec dictionary and the position of every field."""
    try:
        tree = parser().parse(text, start="start")
    except lark.exceptions.LarkError as error:
        raise syntax_error(error, filename, "the spec") from None
    reader = _Reader(text, filename)
    raw = reader.spec(reader.statements(tree))
    return raw, reader.positions


