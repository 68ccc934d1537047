"""Generate the human API reference (docs/api.md) from the schema.

Run ``python -m rpc_schema.docs [agent] > docs/api.md``; a test fails when the
committed file differs from what this prints.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import rpc_schema
from rpc_schema import ApiSchema, Verb


def _type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "enum" in schema:
        return " \\| ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " \\| ".join(kind)
    if kind == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    rules = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
                "pattern", "format", "default"):
        if key in schema:
            rules.append(f"{key} `{json.dumps(schema[key])}`")
    return ", ".join(rules)


def _params_table(verb: Verb) -> list[str]:
    properties = verb.params.get("properties", {})
    if not properties:
        return ["No parameters.", ""]
    required = set(verb.params.get("required", ()))
    lines = ["| param | type | required | constraints | description |",
             "| --- | --- | --- | --- | --- |"]
    for name, schema in properties.items():
        lines.append(
            f"| `{name}` | {_type_of(schema)} | {'yes' if name in required else 'no'} | "
            f"{_constraints(schema)} | {schema.get('description', '')} |")
    return [*lines, ""]


def _verb_section(schema: ApiSchema, verb: Verb) -> list[str]:
    lines = [f"### `{verb.name}`", "", verb.summary, ""]
    if verb.description:
        lines += [verb.description, ""]
    if verb.role is not None:
        lines += [f"**Role**: `{verb.role}`" + "".join(
            f"; `{rule['role']}` when `{rule['param']}` is `{json.dumps(rule.get('equals', True))}`"
            + (f" ({rule['description']})" if rule.get("description") else "")
            for rule in verb.role_when), ""]
    lines += ["**Params**", "", *_params_table(verb)]
    lines += ["**Result**", "", "```json", json.dumps(verb.result, indent=2), "```", ""]
    if verb.errors:
        lines += ["**Errors**: " + ", ".join(
            f"`{name}` ({schema.errors[name]['code']})" for name in verb.errors), ""]
    for example in verb.examples:
        request = {"jsonrpc": "2.0", "method": verb.name, "params": example["params"], "id": 1}
        lines += [f"Example ({example['name']}):", "", "```json", json.dumps(request),
                  json.dumps({"jsonrpc": "2.0", "result": example["result"], "id": 1}),
                  "```", ""]
    return lines


def _access_lines(schema: ApiSchema) -> list[str]:
    """Who may call what: the role of every verb (docs/security.md explains roles)."""
    if not any(verb.role for verb in schema.verbs.values()):
        return []
    lines = ["## Roles", "",
             "Each verb needs a role (`none` < `read` < `operate` < `admin`; `none` is",
             "public; docs/security.md says who has which). A call beyond the caller's "
             "role answers `Forbidden`."]
    if schema.common_errors:
        lines.append("Any verb may also answer " + ", ".join(
            f"`{name}` ({schema.errors[name]['code']})" for name in schema.common_errors)
            + ".")
    lines += ["", "| verb | role |", "| --- | --- |"]
    for name, verb in schema.verbs.items():
        extra = "".join(f"; {rule['role']} when `{rule['param']}` is "
                        f"`{json.dumps(rule.get('equals', True))}`" for rule in verb.role_when)
        lines.append(f"| `{name}` | {verb.role or 'admin (not declared)'}{extra} |")
    return [*lines, ""]


def _failure_lines(schema: ApiSchema) -> list[str]:
    """The failure names (``errors.Failure``) this API's objects may carry."""
    if not schema.failures:
        return []
    lines = ["## Failures", "", schema.failures_description, "",
             "| name | meaning |", "| --- | --- |"]
    lines += [f"| `{name}` | {spec['description']} |" for name, spec in schema.failures.items()]
    return [*lines, ""]


def render(schema: ApiSchema) -> str:
    info = schema.info
    lines = [
        f"# {info['title']} API reference (version {info['version']})",
        "",
        "<!-- Generated from rpc_schema by `python -m rpc_schema.docs`; do not edit. -->",
        "",
        info.get("description", ""),
        "",
        "Requests are JSON-RPC 2.0 with params by name. Params are validated against",
        "the schema before a handler runs; a violation is -32602 with `error.data`",
        "`{name: \"InvalidParams\", field, rule, detail}`. Application errors carry",
        "`error.data.name`.",
        "",
        *_access_lines(schema),
        "## Verbs",
        "",
    ]
    lines += [f"- [`{name}`](#{name.lower().replace('.', '')}) — {verb.summary}"
              for name, verb in schema.verbs.items()]
    lines.append("")
    for verb in schema.verbs.values():
        lines += _verb_section(schema, verb)
    lines += ["## Errors", "",
              "Protocol errors: -32700 parse error, -32600 invalid request, -32601 method",
              "not found, -32602 invalid params, -32603 internal error (with",
              "`data.correlationId`, also in the agent's log).",
              "",
              "| code | name | meaning |", "| --- | --- | --- |"]
    for name, spec in schema.errors.items():
        lines.append(f"| {spec['code']} | `{name}` | {spec['description']} |")
    lines += ["", *_failure_lines(schema), "## Schemas", ""]
    for name, component in schema.components.get("schemas", {}).items():
        lines += [f"### `{name}`", "", "```json", json.dumps(component, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(rpc_schema.load(sys.argv[1] if len(sys.argv) > 1 else "agent")), end="")
