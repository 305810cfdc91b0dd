"""Derive an OpenAI strict structured-output schema from a contract JSON Schema.

Strict mode accepts a subset of JSON Schema: every object closes (`additionalProperties:
false`) and lists every property in `required`; optional properties become nullable instead.
Keywords outside the safe subset (lengths, numeric bounds, defaults, `$schema`, ...) are
dropped here: they stay in the contract, and the runtime still validates the result there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_KEEP = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "description",
    }
)


def to_strict(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A strict copy of `schema`; the input is not modified."""
    converted: dict[str, Any] = _convert(schema)
    return converted


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key in ("properties", "$defs"):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = _convert(value)
        else:
            out[key] = value
    if out.get("type") == "object" or "properties" in out:
        properties: dict[str, Any] = out.setdefault("properties", {})
        originally_required = set(node.get("required", ()))
        for name, sub in properties.items():
            if name not in originally_required:
                properties[name] = _nullable(sub)
        out["required"] = list(properties)
        out["additionalProperties"] = False
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str) and kind != "null" and "enum" not in schema:
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list) and "null" not in kind and "enum" not in schema:
        return {**schema, "type": [*kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}
