"""Read what the client needs out of JSON Schema nodes: types, items, words.

The verbs' params and results in ``rpc_schema`` are JSON Schema; nodes may be
``$ref`` pointers into the schema document (``#/components/schemas/Device``),
unions (``"type": ["string", "null"]``, ``anyOf``/``oneOf``), enums or
constants. This module resolves those so that the parameter parser and the
table view can ask simple questions: which JSON types may this value have,
what are an array's items, which properties does an object declare.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

JsonSchema = Mapping[str, Any]

# The JSON type of a Python value decoded from JSON; bool before int.
_PY_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
    (list, "array"), (dict, "object"), (type(None), "null"),
)

_EMPTY: JsonSchema = {}


def json_type(value: Any) -> str:
    for py_type, name in _PY_TYPES:
        if isinstance(value, py_type):
            return name
    return "unknown"


class SchemaView:
    """Questions about schema nodes, with ``$ref`` resolved against ``document``."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def resolve(self, node: Any) -> JsonSchema:
        """The node with local ``$ref`` pointers followed; {} for anything unusable."""
        seen: set[str] = set()
        while isinstance(node, Mapping) and isinstance(node.get("$ref"), str):
            ref: str = node["$ref"]
            if ref in seen or not ref.startswith("#/"):
                return _EMPTY
            seen.add(ref)
            target: Any = self.document
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, Mapping) else None
            node = target
        return node if isinstance(node, Mapping) else _EMPTY

    def types(self, node: Any) -> frozenset[str]:
        """The JSON types a value may have; empty when the schema does not say."""
        node = self.resolve(node)
        declared = node.get("type")
        if isinstance(declared, str):
            found = {declared}
        elif isinstance(declared, list):
            found = {item for item in declared if isinstance(item, str)}
        elif "enum" in node and isinstance(node["enum"], list):
            found = {json_type(item) for item in node["enum"]}
        elif "const" in node:
            found = {json_type(node["const"])}
        else:
            found = set()
            for key in ("anyOf", "oneOf"):
                for member in node.get(key, ()):
                    member_types = self.types(member)
                    if not member_types:  # one open member: anything goes
                        return frozenset()
                    found |= member_types
        return frozenset(found)

    def array_items(self, node: Any) -> JsonSchema | None:
        """The item schema of an array node (or of its array member), if any."""
        node = self.resolve(node)
        if "items" in node or "array" in self.types(node):
            items = node.get("items", _EMPTY)
            return self.resolve(items) if isinstance(items, Mapping) else _EMPTY
        for key in ("anyOf", "oneOf"):
            for member in node.get(key, ()):
                found = self.array_items(member)
                if found is not None:
                    return found
        return None

    def properties(self, node: Any) -> dict[str, JsonSchema]:
        """An object node's declared properties, in schema order."""
        props = self.resolve(node).get("properties", _EMPTY)
        return dict(props) if isinstance(props, Mapping) else {}

    def describe(self, node: Any) -> str:
        """A short human description of a node's type: 'array of string', ..."""
        node = self.resolve(node)
        types = self.types(node)
        if not types:
            words = "any JSON"
        elif types == {"array"}:
            items = self.array_items(node)
            words = f"array of {self.describe(items)}" if items else "array"
        else:
            known = [name for name in _TYPE_ORDER if name in types]
            words = "|".join(known + sorted(types - set(known)))
        extras: list[str] = []
        enum = node.get("enum")
        if isinstance(enum, list):
            extras.append("one of " + ", ".join(_plain(item) for item in enum))
        for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                          ("maximum", "<="), ("exclusiveMaximum", "<")):
            if isinstance(node.get(key), int | float) and not isinstance(node[key], bool):
                extras.append(f"{word} {node[key]}")
        if "default" in node:
            extras.append(f"default {_plain(node['default'])}")
        return f"{words} ({'; '.join(extras)})" if extras else words


_TYPE_ORDER = ("string", "integer", "number", "boolean", "array", "object", "null")


def _plain(value: Any) -> str:
    """A value as a user types it: strings bare, the rest as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
