"""Spec -> TOML or DSL text. `espc fmt` converts between the two; `espc check` prints the
normalised spec (every field, presets expanded) as TOML.

Both writers work from one document: the Spec dumped with units and shorthands
(`80GiB`, `zipf(alpha=1.0, min=10, max=200K)`), in compact form keeping only what differs
from the presets and defaults the reader would fill in again.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from espc.frontend.grammar import ShorthandError, parse_call
from espc.frontend.presets import DEVICE_PRESETS
from espc.frontend.spec import _RUNTIME_DEFAULTS, DeviceSpec, ModelSpec, Spec

Document = dict[str, Any]


def _field_defaults(model: type[BaseModel]) -> dict[str, Any]:
    return {name: field.default for name, field in model.model_fields.items() if not field.is_required()}


def _section(model: BaseModel, baseline: dict[str, Any], full: bool) -> Document:
    """The fields of `model` as written (units, shorthands), without those equal to `baseline`."""
    written = model.model_dump(mode="json", exclude_none=True)
    return {
        name: written[name]
        for name in type(model).model_fields
        if getattr(model, name) is not None and (full or name not in baseline or baseline[name] != getattr(model, name))
    }


def _model_section(model: ModelSpec, full: bool) -> Document:
    baseline = _field_defaults(ModelSpec)
    if model.preset is not None:
        preset = ModelSpec.model_validate({"preset": model.preset})
        baseline = {name: getattr(preset, name) for name in ModelSpec.model_fields if name != "preset"}
    return _section(model, baseline, full)


def _device(device: DeviceSpec, full: bool) -> str | Document:
    if device.name not in DEVICE_PRESETS:
        return _section(device, {}, full=True)
    preset = DeviceSpec.model_validate(device.name)
    if device == preset and not full:
        return device.name
    return {"name": device.name, **_section(device, dict(preset), full)}


def document(spec: Spec, full: bool = False) -> Document:
    """The spec as nested plain values; `full` keeps every field, presets expanded."""
    cluster = _section(spec.cluster, _field_defaults(type(spec.cluster)), full)
    cluster["nodes"] = [
        {
            **({"name": node.name} if full or node.name != f"node{index}" else {}),
            "device": _device(node.device, full),
            "devices": node.devices,
        }
        for index, node in enumerate(spec.cluster.nodes)
    ]
    runtime_baseline = _field_defaults(type(spec.runtime)) | _RUNTIME_DEFAULTS[spec.cluster.device_kind]
    workload = _section(spec.workload, _field_defaults(type(spec.workload)), full)
    if "prefix" in workload:  # a table of its own: compact like a section
        workload["prefix"] = _section(spec.workload.prefix, _field_defaults(type(spec.workload.prefix)), full)
    sections = {
        "model": _model_section(spec.model, full),
        "cluster": cluster,
        "slo": _section(spec.slo, _field_defaults(type(spec.slo)), full),
        "workload": workload,
        "policy": _section(spec.policy, _field_defaults(type(spec.policy)), full),
        "runtime": _section(spec.runtime, runtime_baseline, full),
        "serving": _section(spec.serving, _field_defaults(type(spec.serving)), full),
    }
    return {name: section for name, section in sections.items() if section or name in ("model", "cluster")}


# ------------------------------------------------------------------------------------ TOML

_TOML_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _TOML_BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_table(lines: list[str], name: str, table: Document) -> None:
    lines.append(f"[{name}]")
    arrays = {key: value for key, value in table.items() if isinstance(value, list)}
    lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in table.items() if key not in arrays)
    for key, elements in arrays.items():
        for element in elements:
            lines.append("")
            lines.append(f"[[{name}.{_toml_key(key)}]]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in element.items())


def to_toml(spec: Spec, full: bool = False) -> str:
    lines: list[str] = []
    for name, table in document(spec, full).items():
        if lines:
            lines.append("")
        _toml_table(lines, name, table)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- DSL

_DSL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_.\-]*)?$")
_DSL_QUANTITY = re.compile(r"^[0-9][0-9_]*(\.[0-9]+)?([eE][+-]?[0-9]+)?[A-Za-z%/]+$")
_DSL_KEYWORDS = {"x", "as", "at", "max", "prefill"}
_INDENT = "    "


def _dsl_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and value not in _DSL_KEYWORDS and (_DSL_NAME.match(value) or _DSL_QUANTITY.match(value)):
        return value
    if isinstance(value, str) and _reads_as_call(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _reads_as_call(text: str) -> bool:
    """Shorthands (`poisson(rate=2.0)`) stay bare: the reader returns a call's own text."""
    try:
        parse_call(text)
    except ShorthandError:
        return False
    return "(" in text and text == text.strip()


def _dsl_block(lines: list[str], table: Document, depth: int) -> None:
    indent = _INDENT * depth
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key} {{")
            _dsl_block(lines, value, depth + 1)
            lines.append(f"{indent}}}")
        else:
            lines.append(f"{indent}{key} {_dsl_value(value)}")


def _dsl_node(node: Document, kind: str) -> tuple[str, Document]:
    device = node["device"]
    name = device if isinstance(device, str) else device["name"]
    overrides = {} if isinstance(device, str) else {k: v for k, v in device.items() if k not in ("name", "kind")}
    keyword = "gpu" if kind == "cuda" else "cpu"
    head = f"{keyword} x {node['devices']}" if name == "cpu" else f"{keyword} {_dsl_value(name)} x {node['devices']}"
    if "name" in node:
        head += f" as {_dsl_value(node['name'])}"
    return head, overrides


def to_dsl(spec: Spec, full: bool = False) -> str:
    doc = document(spec, full)
    lines: list[str] = []
    for section, table in doc.items():
        table = dict(table)
        argument = table.pop({"model": "preset", "policy": "strategy"}.get(section, ""), None)
        if lines:
            lines.append("")
        lines.append(f"{section} {_dsl_value(argument)} {{" if argument is not None else f"{section} {{")
        if section == "cluster":
            nodes = table.pop("nodes")
            _dsl_block(lines, table, 1)
            for node in nodes:
                head, overrides = _dsl_node(node, spec.cluster.device_kind)
                if overrides:
                    lines.append(f"{_INDENT}{head} {{")
                    _dsl_block(lines, overrides, 2)
                    lines.append(f"{_INDENT}}}")
                else:
                    lines.append(f"{_INDENT}{head}")
        elif section == "slo":
            for key, value in table.items():
                bound = f"<= {value}" if key in ("ttft", "tpot") else _dsl_value(value)
                lines.append(f"{_INDENT}{key} {bound}")
        else:
            _dsl_block(lines, table, 1)
        lines.append("}")
    return "\n".join(lines) + "\n"
