"""``name=value`` and ``name:=JSON`` words -> a verb's params, by its schema.

Rules (docs/cli.md, "Parameters"):

* ``name=value`` converts ``value`` by the schema type of ``name``: a string
  as is; an integer or number parsed; a boolean from ``true``/``false``;
  ``null`` where the type allows null; an array or object parsed as JSON when
  the value starts with ``[`` or ``{``. For an array param a value that is not
  a JSON array is one item (converted by the item type), and repeating the
  name appends: ``paths=/dev/a paths=/dev/b``.
* ``name:=JSON`` takes the value as raw JSON, whatever the schema says.
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
    """Builds one verb's params from command-line words."""

    def __init__(self, verb: Verb, view: SchemaView) -> None:
        self.verb = verb
        self.view = view
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
            node = self._node(name)
            if raw:
                value, is_item = self._json(text, name), False
            else:
                value, is_item = self.convert(node, text, name)
            self._add(params, name, node, value, is_item)
        missing = [name for name in self.required if name not in params]
        if missing and complete:
            raise UsageError(
                f"{self.verb.name}: missing required param{'s' if len(missing) > 1 else ''} "
                + ", ".join(missing))
        return params

    def _node(self, name: str) -> JsonSchema:
        if name in self.properties:
            return self.view.resolve(self.properties[name])
        if self.open:
            return self.view.resolve(self.extra_schema)
        valid = list(self.properties)
        if not valid:
            raise UsageError(f"{self.verb.name} takes no params (got {name!r})")
        hint = close_matches(name, valid)
        raise UsageError(
            f"{self.verb.name} has no param {name!r}"
            + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
            + f"; valid params: {', '.join(valid)}")

    def _add(self, params: dict[str, Any], name: str, node: JsonSchema, value: Any,
             is_item: bool) -> None:
        if name not in params:
            params[name] = [value] if is_item else value
            return
        current = params[name]
        if "array" in self.view.types(node) and isinstance(current, list):
            if is_item:
                params[name] = [*current, value]
                return
            if isinstance(value, list):
                params[name] = current + value
                return
        raise UsageError(f"param {name!r} given more than once")

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
