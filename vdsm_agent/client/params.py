"""``name=value`` and ``name:=JSON`` words -> a verb's params, by its schema.

Rules (docs/cli.md, "Parameters"):

* ``name=value`` converts ``value`` by the schema type of ``name``: a string
  as is; an integer or number parsed; a boolean from ``true``/``false``;
  ``null`` where the type allows null; an array or object parsed as JSON when
  the value starts with ``[`` or ``{``. For an array param a value that is not
  a JSON array is one item (converted by the item type), and repeating the
  name appends: ``paths=/dev/a paths=/dev/b``.
* ``name:=JSON`` takes the value as raw JSON, whatever the schema says.
* A name may reach into an object param: ``filter.state=running``, or just
  ``state=running`` when exactly one object param (listTasks' ``filter``)
  declares a field ``state``. Repeating it for a string-or-array field builds
  a list (``state=running state=failed``).
* Field names inside an object param are checked against its schema when
  the schema closes it (``additionalProperties: false``), with "did you
  mean"; startTask's ``params`` is checked against the kind's own schema.
* Names the verb does not declare and missing required names are usage errors,
  raised before anything is sent. Everything else (patterns, ranges, enums,
  item types) is left to the agent, which validates params against the same
  schema and answers -32602 naming the field.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

from rpc_schema import Verb
from vdsm_agent.client.schema import JsonSchema, SchemaView, json_type


class UsageError(Exception):
    """Bad command-line arguments: exit code 2, nothing was sent."""


_MISSING = object()


def split_word(word: str) -> tuple[str, str, bool]:
    """``name=value`` -> (name, value, False); ``name:=json`` -> (name, json, True)."""
    eq = word.find("=")
    raw = eq > 0 and word[eq - 1] == ":"
    name = word[: eq - 1] if raw else word[:eq]
    if eq <= 0 or not name:
        raise UsageError(f"expected name=value or name:=JSON, got {word!r}")
    return name, word[eq + 1:], raw


def close_matches(word: str, choices: list[str]) -> list[str]:
    """Choices that look like ``word``: same prefix (any case) or a close spelling."""
    lowered = word.lower()
    prefixed = [choice for choice in choices
                if choice.lower().startswith(lowered) or lowered.startswith(choice.lower())]
    similar = difflib.get_close_matches(word, choices, n=5, cutoff=0.6)
    folded = {choice.lower(): choice for choice in choices}
    similar += [folded[match] for match in difflib.get_close_matches(
        lowered, list(folded), n=5, cutoff=0.6)]
    return list(dict.fromkeys(prefixed + similar))[:5]


class ParamParser:
    """Builds one verb's params from command-line words.

    Besides ``name=value``, a word may reach into an object param: with a
    dotted name (``filter.state=running``, ``params.source=/a``), or by the
    name of a field that exactly one object param declares (``state=running``
    for listTasks' ``filter``). ``nested`` gives the schema of an object param
    that the verb's schema leaves open (startTask's ``params``: the kind's
    schema from getTaskKinds), as ``{param: (label, schema)}``: its field names
    are then checked, with "did you mean", like the verb's own params."""

    def __init__(self, verb: Verb, view: SchemaView,
                 nested: dict[str, tuple[str, JsonSchema]] | None = None) -> None:
        self.verb = verb
        self.view = view
        self.nested = dict(nested or {})
        params = view.resolve(verb.params)
        self.properties = view.properties(params)
        required = params.get("required", [])
        self.required = [name for name in required if isinstance(name, str)]
        extra = params.get("additionalProperties")
        # Only an explicit "additionalProperties" (true or a schema) opens the
        # verb to undeclared names: a typo should fail here, not on the agent.
        self.open = extra is True or isinstance(extra, dict)
        self.extra_schema: JsonSchema = extra if isinstance(extra, dict) else {}

    def parse(self, words: list[str], complete: bool = True) -> dict[str, Any]:
        """The params; ``complete``: all required names must be there."""
        params: dict[str, Any] = {}
        for word in words:
            name, text, raw = split_word(word)
            path = self._path(name)
            container = params
            for part in path[:-1]:
                current = container.setdefault(part, {})
                if not isinstance(current, dict):
                    raise UsageError(f"param {part!r} given more than once")
                container = current
            node = self._node(path)
            if raw:
                value, is_item = self._json(text, name), False
            else:
                value, is_item = self.convert(node, text, name)
            self._add(container, path[-1], node, value, is_item, name)
        for name, value in params.items():
            if isinstance(value, dict):
                self._check_fields(name, value)
        missing = [name for name in self.required if name not in params]
        if missing and complete:
            raise UsageError(
                f"{self.verb.name}: missing required param{'s' if len(missing) > 1 else ''} "
                + ", ".join(missing))
        return params

    # -- names ---------------------------------------------------------------

    def _path(self, name: str) -> list[str]:
        """The param (and fields inside it) a word's name sets."""
        if name in self.properties:
            return [name]
        if "." in name and not self.open:
            parts = name.split(".")
            if all(parts) and parts[0] in self.properties:
                return parts
        if self.open:
            return [name]
        owners = [param for param in self.properties if name in self._fields(param)]
        if len(owners) == 1:
            return [owners[0], name]
        valid = list(self.properties)
        if not valid:
            raise UsageError(f"{self.verb.name} takes no params (got {name!r})")
        head = name.split(".")[0]
        hint = close_matches(head, valid + [field for param in valid
                                            for field in self._fields(param)])
        raise UsageError(
            f"{self.verb.name} has no param {head!r}"
            + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
            + f"; valid params: {', '.join(valid)}")

    def _object_schema(self, param: str) -> tuple[str, JsonSchema]:
        """(label, schema) of an object param: the nested one if given."""
        if param in self.nested:
            return self.nested[param]
        return f"{self.verb.name} {param}", self.view.resolve(self.properties.get(param, {}))

    def _fields(self, param: str) -> dict[str, JsonSchema]:
        _, schema = self._object_schema(param)
        found = self.view.properties(schema)
        for key in ("oneOf", "anyOf"):  # an object member of a union
            for member in schema.get(key, ()):
                found.update(self.view.properties(member))
        return found

    def _closed(self, schema: JsonSchema) -> bool:
        return schema.get("additionalProperties") is False

    def _node(self, path: list[str]) -> JsonSchema:
        if len(path) == 1:
            name = path[0]
            if name in self.properties:
                return self.view.resolve(self.properties[name])
            return self.view.resolve(self.extra_schema)
        label, schema = self._object_schema(path[0])
        for part in path[1:]:
            fields = self.view.properties(schema)
            if part in fields:
                schema = self.view.resolve(fields[part])
            elif self._closed(schema):
                raise UsageError(self._no_field(label, part, list(fields)))
            else:
                extra = schema.get("additionalProperties")
                schema = self.view.resolve(extra) if isinstance(extra, dict) else {}
            label = f"{label}.{part}"
        return schema

    def _check_fields(self, param: str, value: dict[str, Any]) -> None:
        """Field names of an object param, against its schema when it is closed."""
        label, schema = self._object_schema(param)
        if not self._closed(schema):
            return
        fields = list(self.view.properties(schema))
        for name in value:
            if name not in fields:
                raise UsageError(self._no_field(label, name, fields))

    @staticmethod
    def _no_field(label: str, name: str, fields: list[str]) -> str:
        hint = close_matches(name, fields)
        return (f"{label} has no field {name!r}"
                + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
                + (f"; valid fields: {', '.join(fields)}" if fields else ""))

    # -- values --------------------------------------------------------------

    def _add(self, params: dict[str, Any], name: str, node: JsonSchema, value: Any,
             is_item: bool, label: str) -> None:
        if name not in params:
            params[name] = [value] if is_item else value
            return
        current = params[name]
        types = self.view.types(node)
        # A string-or-array param (state=running state=failed) builds a list too.
        scalar_too = bool(types - {"array", "null"}) and not isinstance(value, list | dict)
        if "array" in types:
            if isinstance(current, list):
                if is_item or scalar_too:
                    params[name] = [*current, value]
                    return
                if isinstance(value, list):
                    params[name] = current + value
                    return
            elif scalar_too and not isinstance(current, dict):
                params[name] = [current, value]
                return
        raise UsageError(f"param {label!r} given more than once")

    def convert(self, node: JsonSchema, text: str, label: str) -> tuple[Any, bool]:
        """(value, is_item); is_item when ``text`` is one item of an array param."""
        types = self.view.types(node)
        if not types:  # the schema does not say: JSON if it parses, else a string
            try:
                return json.loads(text), False
            except ValueError:
                return text, False
        value = _scalar(types, text)
        if value is not _MISSING:
            return value, False
        start = text.lstrip()[:1]
        if (start == "[" and "array" in types) or (start == "{" and "object" in types):
            value = self._json(text, label)
            if json_type(value) in types:
                return value, False
            raise UsageError(f"{label}: expected {self.view.describe(node)}, got {text!r}")
        if "string" in types:
            return text, False
        items = self.view.array_items(node) if "array" in types else None
        if items is not None and "array" not in self.view.types(items):
            item, _ = self.convert(self.view.resolve(items), text, f"{label} item")
            return item, True
        raise UsageError(f"{label}: expected {self.view.describe(node)}, got {text!r}")

    @staticmethod
    def _json(text: str, label: str) -> Any:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{label}: not valid JSON ({exc}): {text!r}") from None


def _scalar(types: frozenset[str], text: str) -> Any:
    """``text`` as null, a boolean or a number when the types allow; else _MISSING."""
    if "null" in types and text == "null":
        return None
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "integer" in types or "number" in types:
        try:
            return int(text, 10)
        except ValueError:
            pass
    if "number" in types:
        try:
            number = float(text)
        except ValueError:
            return _MISSING
        if math.isfinite(number):
            return number
    return _MISSING
