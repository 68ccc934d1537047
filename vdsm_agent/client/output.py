"""Rendering: results as JSON or a table, error answers as one line.

Table view (``--table``, ``--columns``), from the shape of the result:

* a list of objects: one row per object;
* an object with exactly one member that is a list of objects and no member
  that is an object (getDeviceList -> ``{"devices": [...]}``, listTasks ->
  ``{"tasks": [...], "nextPageToken": null}``): one row per item; the other
  members are printed after the table, on stderr, so that stdout stays a
  clean table;
* an object whose members are all objects (a mapping by ID): one row per
  member, its name in a first column ``key``;
* any other object (one task, one job, getCapabilities): a key/value table,
  nested objects flattened into dotted keys (``progress.percent``);
* a list of scalars: one column ``value``.

Columns are ``--columns`` (dotted paths reach into objects:
``progress.percent``), else the verb's default columns (the program's
``columns``, chosen to fit 80 columns), else the rows' keys in first-seen
order (for no rows, the properties the result schema declares for an item).

Cells: sizes, rates, durations and timestamps in human units (``--raw``:
exact), ``null`` as ``-``, lists of scalars joined by ", ", other nested
values as compact JSON, cut to ``--max-width``. On a terminal the table is
fitted to its width (identifier columns are cut last) and states are
coloured; ``NO_COLOR`` turns colours off. rich draws the table, and is
imported only here, only when a table is drawn: the client's start-up stays
that of the standard library.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vdsm_agent.client.schema import JsonSchema, SchemaView
from vdsm_agent.client.units import humanize

# JSON-RPC 2.0 standard error codes -> names, for answers without data.name.
STANDARD_ERRORS = {
    -32700: "ParseError",
    -32600: "InvalidRequest",
    -32601: "MethodNotFound",
    -32602: "InvalidParams",
    -32603: "InternalError",
}

# How deep the key/value view flattens nested objects (task.detail.progress.done).
FLATTEN_DEPTH = 4
# Columns cut last when a table is fitted to the terminal: what a person copies.
_KEEP_WHOLE = re.compile(r"^(id|key|name|path|host|.*ID)$")
STATE_STYLES = {
    "done": "green", "up": "green", "connected": "green", "ok": "green",
    "failed": "red", "interrupted": "red", "non-responsive": "red",
    "disconnected": "red", "partial": "red", "unreachable": "red",
    "running": "yellow", "accepted": "yellow", "initializing": "yellow",
    "pending": "yellow", "connecting": "yellow", "degraded": "yellow",
    "canceled": "magenta", "stale": "magenta", "unknown": "magenta",
    "maintenance": "magenta",
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
    key_value: bool = False  # rows are {"field": dotted key, "value": ...}
    kind: str | None = None  # a key/value table's task kind (for its progress units)


@dataclasses.dataclass(frozen=True)
class Style:
    """How to draw: ``width`` None for no limit (not a terminal); ``max_width``
    cuts cells (0: never)."""

    width: int | None = None
    color: bool = False
    raw: bool = False
    max_width: int = 40


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
    objects = [name for name, value in result.items() if isinstance(value, dict)]
    if len(lists) == 1 and not objects:
        member = lists[0]
        item_schema = view.array_items(members.get(member, {})) or {}
        rest = {name: value for name, value in result.items() if name != member}
        return _rows_table(result[member], item_schema, view, rest)
    # A mapping by ID: every member an object, and no declared member names
    # (the schema gives additionalProperties), or several members when it says nothing.
    if result and len(objects) == len(result) and (not members or len(result) > 1):
        rows = [{"key": key, **value} for key, value in result.items()]
        return Table(_columns(rows), rows, {})
    rows = [{"field": key, "value": value} for key, value in flatten(result)]
    return Table(["field", "value"], rows, {}, key_value=True, kind=task_kind(result))


def task_kind(result: Mapping[str, Any]) -> str | None:
    """The kind of a task (or of an engine's ``{"task": ...}``), if it is one."""
    for node in (result, result.get("task")):
        if isinstance(node, dict) and isinstance(node.get("kind"), str):
            return str(node["kind"])
    return None


def flatten(value: Mapping[str, Any], prefix: str = "",
            depth: int = FLATTEN_DEPTH) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs; objects (and lists of objects) below ``depth``
    levels stay whole."""
    pairs: list[tuple[str, Any]] = []
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, dict) and item and depth > 1:
            pairs += flatten(item, path + ".", depth - 1)
        elif (isinstance(item, list) and item and depth > 1
              and all(isinstance(element, dict) for element in item)):
            for index, element in enumerate(item):
                pairs += flatten(element, f"{path}.{index}.", depth - 1)
        else:
            pairs.append((path, item))
    return pairs


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


MISSING = object()


def lookup(row: Mapping[str, Any], path: str) -> Any:
    """``row["progress"]["percent"]`` for ``progress.percent``; MISSING if absent.
    A key that itself has dots (a flattened key) is found whole first."""
    if path in row:
        return row[path]
    node: Any = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def has_column(rows: Sequence[Mapping[str, Any]], path: str) -> bool:
    return any(lookup(row, path) is not MISSING for row in rows)


def cell(value: Any, max_width: int = 0, path: str = "", raw: bool = True,
         kind: str | None = None) -> str:
    """One value as text: human units unless ``raw``; cut to ``max_width`` (0: never)."""
    text = None if raw else humanize(path, value, kind)
    if text is not None:
        pass
    elif value is None or value is MISSING:
        text = "-" if value is None else ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    elif isinstance(value, int | float):
        text = str(value)
    elif (not raw and isinstance(value, list)
          and all(isinstance(item, str | int | float) for item in value)):
        text = ", ".join(str(item) for item in value) if value else "-"
    else:
        text = to_json(value, compact=True)
    if 0 < max_width < len(text):
        text = text[: max(max_width - 3, 1)] + "..."
    return text


def headers(names: Sequence[str]) -> list[str]:
    """Column titles: a dotted path's last part, unless two columns would share it."""
    leaves = [name.rsplit(".", 1)[-1] for name in names]
    return [leaf if leaves.count(leaf) == 1 else name for name, leaf in zip(names, leaves,
                                                                           strict=True)]


def _is_numeric(table: Table, name: str) -> bool:
    values = [lookup(row, name) for row in table.rows]
    values = [value for value in values if value is not None and value is not MISSING]
    return bool(values) and all(isinstance(value, int | float) and not isinstance(value, bool)
                                for value in values)


def fit_widths(natural: list[int], names: Sequence[str], width: int) -> list[int]:
    """Column widths within ``width`` (2 spaces between columns): the widest
    cuttable column gives way first; identifier columns (id, name, path...)
    only when nothing else is left to cut."""
    widths = list(natural)
    budget = width - 2 * (len(widths) - 1)
    cuttable = [i for i, name in enumerate(names) if not _KEEP_WHOLE.match(name)]
    for group in (cuttable, list(range(len(widths)))):
        while sum(widths) > budget:
            candidates = [i for i in group if widths[i] > 4]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def render_table(table: Table, columns: list[str] | None, style: Style | int = Style()) -> str:
    """The table as text. ``style`` may be a plain ``max_width`` (raw cells, no limit)."""
    if isinstance(style, int):
        style = Style(max_width=style, raw=True)
    if table.key_value:
        return _render_key_value(table, style)
    names = columns or table.columns
    if not names:
        return ""
    grid = []
    for row in table.rows:
        kind = row.get("kind") if isinstance(row.get("kind"), str) else None
        grid.append([cell(lookup(row, name), style.max_width, name, style.raw, kind)
                     for name in names])
    titles = headers(names)
    natural = [max([len(title), *(len(line[i]) for line in grid)])
               for i, title in enumerate(titles)]
    widths = natural if style.width is None else fit_widths(natural, names, style.width)
    numeric = [_is_numeric(table, name) for name in names]
    return _draw(titles, grid, widths, numeric, names, style)


def _draw(titles: list[str], grid: list[list[str]], widths: list[int], numeric: list[bool],
          names: Sequence[str], style: Style) -> str:
    from rich.table import Table as RichTable
    from rich.text import Text

    table = RichTable(box=None, pad_edge=False, show_edge=False, padding=(0, 1),
                      header_style="bold" if style.color else "", collapse_padding=False)
    for title, width, right in zip(titles, widths, numeric, strict=True):
        table.add_column(title, width=width, no_wrap=True, overflow="ellipsis",
                         justify="right" if right else "left")
    for line in grid:
        table.add_row(*(Text(text, style=_cell_style(name, text, style))
                        for name, text in zip(names, line, strict=True)))
    return _print(table, style)


def _cell_style(name: str, text: str, style: Style) -> str:
    if not style.color:
        return ""
    if name.rsplit(".", 1)[-1] in ("state", "status", "lastKnownState"):
        return STATE_STYLES.get(text, "")
    return ""


def _render_key_value(table: Table, style: Style) -> str:
    from rich.table import Table as RichTable
    from rich.text import Text

    pairs = [(str(row["field"]), row["value"]) for row in table.rows]
    kind = table.kind
    grid = RichTable.grid(padding=(0, 2))
    key_width = max((len(key) for key, _ in pairs), default=0)
    grid.add_column(no_wrap=True, width=key_width, style="bold" if style.color else "")
    grid.add_column(overflow="fold")
    for key, value in pairs:
        text = cell(value, 0, key, style.raw, kind)
        grid.add_row(key, Text(text, style=_cell_style(key, text, style)))
    return _print(grid, style)


def _print(renderable: Any, style: Style) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=style.width or 100_000, force_terminal=style.color,
                      color_system="standard" if style.color else None,
                      no_color=not style.color, highlight=False, emoji=False,
                      soft_wrap=False, legacy_windows=False)
    console.print(renderable)
    lines = buffer.getvalue().rstrip("\n").split("\n")
    return "\n".join(line.rstrip() for line in lines)


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
