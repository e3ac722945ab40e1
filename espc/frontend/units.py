"""Quantities with units: sizes, bandwidths, durations, FLOP rates and token counts.

Every quantity in a spec can be written with a unit (`80GiB`, `400GB/s`, `200Gb/s`,
`50ms`, `312TFLOP/s`, `128Ki` tokens) or as a plain number in the base unit (bytes,
bytes/s, seconds, FLOP/s, tokens). Decimal prefixes (K, M, G, T) mean powers of 1000 and
binary prefixes (Ki, Mi, Gi, Ti) powers of 1024 for every kind, tokens included, so that
`128Ki` is Llama's 131072-token context and `200K` is LoongServe's 200,000-token Zipf bound.

Parsing is exact (decimal arithmetic) and `format_quantity` picks the shortest spelling
that parses back to the very same number, so a spec survives any number of round trips.
"""

from __future__ import annotations

import difflib
import enum
import re
from decimal import Decimal, InvalidOperation

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class UnitError(ValueError):
    """A quantity that cannot be parsed; `hint` suggests the intended spelling."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Kind(enum.Enum):
    """The kinds of quantity a spec field can hold; value = (noun, base unit, integral)."""

    BYTES = ("size", "B", True)
    BANDWIDTH = ("bandwidth", "B/s", False)
    DURATION = ("duration", "s", False)
    FLOP_RATE = ("FLOP rate", "FLOP/s", False)
    TOKENS = ("token count", "", True)

    @property
    def noun(self) -> str:
        return self.value[0]

    @property
    def integral(self) -> bool:
        return self.value[2]


def _size_units() -> dict[str, int]:
    units = {f"{p}B": f for p, f in _DECIMAL.items()}
    units.update({f"{p}B": f for p, f in _BINARY.items()})
    return units


def _bandwidth_units() -> dict[str, Decimal]:
    units: dict[str, Decimal] = {}
    for prefix, factor in (_DECIMAL | _BINARY).items():
        units[f"{prefix}B/s"] = Decimal(factor)
        units[f"{prefix}b/s"] = Decimal(factor) / 8  # network links are quoted in bits
    units["Gbps"] = Decimal(10**9) / 8
    return units


_UNITS: dict[Kind, dict[str, Decimal]] = {
    Kind.BYTES: {k: Decimal(v) for k, v in _size_units().items()},
    Kind.BANDWIDTH: _bandwidth_units(),
    Kind.DURATION: {
        "ns": Decimal("1e-9"),
        "us": Decimal("1e-6"),
        "ms": Decimal("1e-3"),
        "s": Decimal(1),
        "min": Decimal(60),
        "h": Decimal(3600),
    },
    Kind.FLOP_RATE: {f"{p}FLOP/s": Decimal(f) for p, f in _DECIMAL.items()}
    | {f"{p}FLOPS": Decimal(f) for p, f in _DECIMAL.items() if p},
    Kind.TOKENS: {p: Decimal(f) for p, f in (_DECIMAL | _BINARY).items()},
}

# The spellings `format_quantity` may choose from, preferred first on equal length.
_CANONICAL: dict[Kind, tuple[str, ...]] = {
    Kind.BYTES: ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB", "B"),
    Kind.BANDWIDTH: ("TB/s", "GB/s", "MB/s", "KB/s", "Gb/s", "B/s"),
    Kind.DURATION: ("h", "min", "s", "ms", "us", "ns"),
    Kind.FLOP_RATE: ("PFLOP/s", "TFLOP/s", "GFLOP/s", "MFLOP/s", "FLOP/s"),
    Kind.TOKENS: ("Mi", "Ki", "M", "K", ""),
}

# Far beyond any real cluster (an exabyte, 10^18 tokens or FLOP/s), yet exact in a float.
_LARGEST = Decimal(10) ** 24

_QUANTITY = re.compile(r"^\s*([+-]?(?:\d[\d_]*)?(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(\S*)\s*$")


def parse_quantity(value: object, kind: Kind) -> int | float:
    """Parse `value` (a number in the base unit, or a string with a unit) into the base unit."""
    if isinstance(value, bool):
        raise UnitError(f"expected a {kind.noun}, got a boolean")
    if isinstance(value, (int, float)):
        number, unit = Decimal(repr(value)) if isinstance(value, float) else Decimal(value), ""
        base_factor = Decimal(1)
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match or not match.group(1) or match.group(1) in "+-.":
            raise UnitError(
                f"cannot read {value!r} as a {kind.noun}",
                hint=f"write a number followed by a unit, e.g. {example(kind)}",
            )
        try:
            number = Decimal(match.group(1).replace("_", ""))
        except InvalidOperation:
            raise UnitError(f"cannot read {value!r} as a {kind.noun}") from None
        unit = match.group(2)
        units = _UNITS[kind]
        if unit and unit not in units:
            raise UnitError(
                f"unknown {kind.noun} unit {unit!r} in {value!r}",
                hint=_unit_hint(unit, kind),
            )
        base_factor = units[unit] if unit else Decimal(1)
    else:
        raise UnitError(f"expected a {kind.noun}, got {type(value).__name__}")
    if not number.is_finite():
        raise UnitError(f"{kind.noun} must be finite, got {value!r}")
    if number < 0:
        raise UnitError(f"{kind.noun} must not be negative, got {value!r}")
    result = number * base_factor
    if result > _LARGEST:
        raise UnitError(f"{kind.noun} {value!r} is out of range")
    if kind.integral:
        if result != result.to_integral_value():
            raise UnitError(f"{value!r} is not a whole number of {kind.value[1] or 'tokens'}")
        return int(result)
    return float(result)


def _unit_hint(unit: str, kind: Kind) -> str:
    units = list(_UNITS[kind])
    close = [u for u in units if u.lower() == unit.lower()]
    close = close or difflib.get_close_matches(unit, units, n=1, cutoff=0.5)
    spellings = ", ".join(u for u in _CANONICAL[kind] if u)
    if close:
        return f"did you mean {close[0]!r}? ({kind.noun} units: {spellings})"
    return f"{kind.noun} units: {spellings}"


def example(kind: Kind) -> str:
    return {
        Kind.BYTES: "80GiB",
        Kind.BANDWIDTH: "400GB/s or 200Gb/s",
        Kind.DURATION: "50ms",
        Kind.FLOP_RATE: "312TFLOP/s",
        Kind.TOKENS: "4096, 128Ki or 1M",
    }[kind]


def format_quantity(value: int | float, kind: Kind) -> str | int | float:
    """The shortest unit spelling of `value` that parses back to exactly `value`.

    Token counts below 100,000 stay plain integers (`max_context = 4096` reads better than
    `4Ki`); larger ones take a unit when it is exact (`128Ki`, `200K`, `1Mi`).
    """
    if kind is Kind.TOKENS and value < 100_000:
        return int(value)
    if value == 0:
        return f"0{kind.value[1]}"
    exact = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    candidates = []
    for unit in _CANONICAL[kind]:
        number = exact / _UNITS[kind][unit]
        if len(number.normalize().as_tuple().digits) > 6:
            continue
        text = f"{format(number.normalize(), 'f')}{unit}"
        if parse_quantity(text, kind) == value:
            candidates.append(text)
    if not candidates:
        return value
    # Shortest first, where a decimal point counts one and a half characters: `200ms` over
    # `0.2s` and `200K` over `0.2M`, but `1.5s` over `1500ms`. Ties go to the preferred unit.
    best = min(candidates, key=lambda text: len(text) + 1.5 * ("." in text))
    if kind is Kind.TOKENS and best.isdigit():
        return int(best)
    return best


def json_schema(kind: Kind) -> dict:
    """JSON Schema for a quantity field: a number in the base unit or a string with a unit."""
    number = {"type": "integer" if kind.integral else "number", "minimum": 0}
    units = ", ".join(u for u in _CANONICAL[kind] if u)
    text = {"type": "string", "description": f"{kind.noun} with a unit ({units}), e.g. {example(kind)}"}
    return {"anyOf": [number, text]}


def describe(value: float, kind: Kind) -> str:
    """An approximate, readable spelling for messages (`13.5GiB`, `1.2TB/s`, `98ms`)."""
    if kind is Kind.TOKENS:
        return f"{int(value):,}"
    steps: tuple[tuple[float, str], ...]
    if kind is Kind.DURATION:
        steps = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"))
    elif kind is Kind.BYTES:
        steps = tuple((float(1 << shift), unit) for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")))
    else:
        base = kind.value[1]
        steps = tuple((10.0**power, f"{prefix}{base}") for prefix, power in (("T", 12), ("G", 9), ("M", 6), ("K", 3), ("", 0)))
    factor, unit = next(((f, u) for f, u in steps if value >= f), steps[-1])
    return f"{value / factor:.3g}{unit}"
