"""TOML text -> the raw spec dictionary and the source position of every key.

`tomllib` parses; it reports no positions, so a small scanner walks the (already valid)
text once more and records where each key, table header and array element starts. That is
what lets a validation error say `spec.toml:12:5: cluster.nodes[0].devices: ...`.
"""

from __future__ import annotations

import re
import tomllib

from espc.frontend.errors import Diagnostic, FieldPath, Positions, SpecError

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\n#]*")


def read_toml(text: str, filename: str) -> tuple[dict, Positions]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError([_syntax_diagnostic(str(error), text, filename)]) from None
    return raw, _Locator(text).positions()


def _syntax_diagnostic(message: str, text: str, filename: str) -> Diagnostic:
    """tomllib's message, reworded where it names the wrong place or an internal form."""
    match = _TOML_POSITION.search(message)
    line, column = (int(match.group(1)), int(match.group(2))) if match else (1, 1)
    message = _TOML_POSITION.sub("", message)
    source = text.splitlines()[line - 1] if 0 < line <= len(text.splitlines()) else ""
    statement = source.split("#")[0].strip()
    hint: str | None = None
    if message.startswith("Cannot overwrite a value") or message.startswith("Cannot declare"):
        # tomllib points past the duplicate; point at it and name it as written.
        column = len(source) - len(source.lstrip()) + 1
        what = statement if statement.startswith("[") else statement.split("=")[0].strip()
        message = f"{what} is given twice"
    elif message == "Illegal character '\\n'" and statement.count('"') % 2:
        message = "the string is not closed before the end of the line"
        hint = 'end it with " on the same line, or use """ for a multi-line string'
    return Diagnostic(filename, line, column, "syntax", message[:1].lower() + message[1:], hint)


class _Locator:
    """Records the position of every key path in valid TOML text."""

    def __init__(self, text: str):
        self.text = text
        self.index = 0
        self.found: Positions = {}
        self.array_tables: dict[FieldPath, int] = {}  # `[[a.b]]` path -> index of its last element

    def positions(self) -> Positions:
        table: FieldPath = ()
        while True:
            self.skip(newlines=True)
            if self.index >= len(self.text):
                return self.found
            where = self.where()
            if self.text.startswith("[[", self.index):
                self.index += 2
                keys = self.key()
                array = self.resolve(keys[:-1]) + (keys[-1],)
                self.array_tables[array] = self.array_tables.get(array, -1) + 1
                table = array + (self.array_tables[array],)
                self.found.setdefault(array, where)
                self.found[table] = where
                self.index += 2  # "]]"
            elif self.text[self.index] == "[":
                self.index += 1
                table = self.resolve(self.key())
                self.found[table] = where
                self.index += 1  # "]"
            else:
                self.key_value(table)

    def resolve(self, keys: FieldPath) -> FieldPath:
        """A header's keys with the current index of every array of tables on the way."""
        path: FieldPath = ()
        for key in keys:
            path += (key,)
            if path in self.array_tables:
                path += (self.array_tables[path],)
        return path

    def where(self) -> tuple[int, int]:
        line = self.text.count("\n", 0, self.index) + 1
        column = self.index - (self.text.rfind("\n", 0, self.index) + 1) + 1
        return line, column

    def skip(self, newlines: bool) -> None:
        blanks = " \t\r\n" if newlines else " \t"
        while self.index < len(self.text):
            char = self.text[self.index]
            if char in blanks:
                self.index += 1
            elif char == "#":
                end = self.text.find("\n", self.index)
                self.index = len(self.text) if end < 0 else end
            else:
                return

    def key(self) -> FieldPath:
        keys: list[str] = []
        while True:
            self.skip(newlines=False)
            if self.text[self.index] in "\"'":
                start = self.index
                self.string()
                keys.append(tomllib.loads(f"k = {self.text[start:self.index]}")["k"])
            else:
                match = _BARE_KEY.match(self.text, self.index)
                assert match is not None  # the key scan only stops on a key's first character
                keys.append(match.group(0))
                self.index = match.end()
            self.skip(newlines=False)
            if self.text[self.index] != ".":
                return tuple(keys)
            self.index += 1

    def key_value(self, table: FieldPath) -> None:
        where = self.where()
        path = table + self.key()
        self.found[path] = where
        self.index += 1  # "="
        self.value(path)

    def value(self, path: FieldPath) -> None:
        self.skip(newlines=False)
        char = self.text[self.index]
        if char == "{":
            self.index += 1
            while True:
                self.skip(newlines=False)
                if self.text[self.index] == "}":
                    self.index += 1
                    return
                self.key_value(path)
                self.skip(newlines=False)
                if self.text[self.index] == ",":
                    self.index += 1
        elif char == "[":
            self.index += 1
            element = 0
            while True:
                self.skip(newlines=True)
                if self.text[self.index] == "]":
                    self.index += 1
                    return
                self.found[path + (element,)] = self.where()
                self.value(path + (element,))
                element += 1
                self.skip(newlines=True)
                if self.text[self.index] == ",":
                    self.index += 1
        elif char in "\"'":
            self.string()
        else:
            scalar = _SCALAR.match(self.text, self.index)
            assert scalar is not None  # the pattern matches the empty string
            self.index = scalar.end()

    def string(self) -> None:
        quote = self.text[self.index]
        delimiter = quote * 3 if self.text.startswith(quote * 3, self.index) else quote
        self.index += len(delimiter)
        while not self.text.startswith(delimiter, self.index):
            # Basic strings escape with a backslash; literal strings have no escapes.
            self.index += 2 if quote == '"' and self.text[self.index] == "\\" else 1
        self.index += len(delimiter)
        # A multi-line string may end with up to two more quotes: `""""a"""""`.
        while len(delimiter) == 3 and self.index < len(self.text) and self.text[self.index] == quote:
            self.index += 1
