"""Rendering: results as JSON or a table, error answers as one line.

Table view (``--table``), from the shape of the result:

* a list of objects: one row per object;
* an object with exactly one member that is a list of objects (getDeviceList
  -> ``{"devices": [...]}``): one row per item; the other members are printed
  after the table, on stderr, so that stdout stays a clean table;
* an object whose members are all objects (a mapping by ID): one row per
  member, its name in a first column ``key``;
* any other object: two columns, ``field`` and ``value``;
* a list of scalars: one column ``value``.

Columns are the rows' keys in first-seen order (for no rows, the properties
the result schema declares for an item), or ``--columns``. Nested values are
compact JSON, ``null`` is ``-``, and cells wider than ``--max-width`` are cut
with ``...``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from vdsm_agent.client.schema import JsonSchema, SchemaView

# JSON-RPC 2.0 standard error codes -> names, for answers without data.name.
STANDARD_ERRORS = {
    -32700: "ParseError",
    -32600: "InvalidRequest",
    -32601: "MethodNotFound",
    -32602: "InvalidParams",
    -32603: "InternalError",
}


def to_json(value: Any, compact: bool = False) -> str:
    if compact:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]
    rest: dict[str, Any]  # members of the result not shown in the table


def tabulate(result: Any, result_schema: JsonSchema, view: SchemaView) -> Table | None:
    """The table for a result (see the module docstring), or None for a scalar."""
    if isinstance(result, list):
        item_schema = view.array_items(result_schema) or {}
        if all(isinstance(item, dict) for item in result):
            return _rows_table(result, item_schema, view, {})
        return Table(["value"], [{"value": item} for item in result], {})
    if not isinstance(result, dict):
        return None
    members = view.properties(result_schema)
    lists = [name for name, value in result.items()
             if _list_of_objects(value, members.get(name, {}), view)]
    if len(lists) == 1:
        member = lists[0]
        item_schema = view.array_items(members.get(member, {})) or {}
        rest = {name: value for name, value in result.items() if name != member}
        return _rows_table(result[member], item_schema, view, rest)
    if result and all(isinstance(value, dict) for value in result.values()):
        rows = [{"key": key, **value} for key, value in result.items()]
        return Table(_columns(rows), rows, {})
    rows = [{"field": key, "value": value} for key, value in result.items()]
    return Table(["field", "value"], rows, {})


def _list_of_objects(value: Any, schema: JsonSchema, view: SchemaView) -> bool:
    """A non-empty list of objects, or an empty list declared as one."""
    if not isinstance(value, list):
        return False
    if value:
        return all(isinstance(item, dict) for item in value)
    items = view.array_items(schema)
    return items is not None and "object" in view.types(items)


def _rows_table(rows: list[dict[str, Any]], item_schema: JsonSchema, view: SchemaView,
                rest: dict[str, Any]) -> Table:
    columns = _columns(rows) or list(view.properties(item_schema))
    return Table(columns, rows, rest)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = to_json(value, compact=True)
    if 0 < max_width < len(text):
        text = text[: max(max_width - 3, 1)] + "..."
    return text


def render_table(table: Table, columns: list[str] | None, max_width: int) -> str:
    """The table as text: a header row, then one line per row, columns aligned."""
    names = columns or table.columns
    if not names:
        return ""
    grid = [[cell(row.get(name), max_width) if name in row else "" for name in names]
             for row in table.rows]
    widths = [max([len(name), *(len(line[i]) for line in grid)]) for i, name in enumerate(names)]
    numeric = [
        bool(table.rows) and all(
            isinstance(row.get(name), int | float) and not isinstance(row.get(name), bool)
            for row in table.rows if row.get(name) is not None)
        and any(row.get(name) is not None for row in table.rows)
        for name in names
    ]

    def line(cells: list[str]) -> str:
        parts = [text.rjust(width) if right else text.ljust(width)
                 for text, width, right in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(names), *(line(cells) for cells in grid)])


def error_name(error: Mapping[str, Any], names_by_code: Mapping[int, str]) -> str:
    data = error.get("data")
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return str(data["name"])
    code = error.get("code")
    if isinstance(code, int):
        return STANDARD_ERRORS.get(code) or names_by_code.get(code, "Error")
    return "Error"


def error_line(error: Mapping[str, Any], names_by_code: Mapping[int, str]) -> str:
    """``error CODE NAME: message (detail)``."""
    code = error.get("code")
    message = error.get("message") or ""
    data = error.get("data")
    detail = ""
    if isinstance(data, dict):
        if data.get("detail"):
            detail = str(data["detail"])
        else:  # e.g. the correlation ID of an internal error
            others = {key: value for key, value in data.items() if key != "name"}
            detail = ", ".join(f"{key}={cell(value, 0)}" for key, value in others.items())
    elif data is not None:
        detail = data if isinstance(data, str) else to_json(data, compact=True)
    text = f"error {code} {error_name(error, names_by_code)}: {message}"
    return f"{text} ({detail})" if detail else text
