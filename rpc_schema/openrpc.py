"""Generate the OpenRPC 1.x document (served by ``rpc.discover``).

Each method declares its own errors plus the schema's ``commonErrors`` (any
verb may answer them: Forbidden, LimitExceeded), and carries two
specification extensions: ``x-role``, the role a caller needs, and
``x-role-when``, stronger roles for some param values (docs/security.md).
"""

from __future__ import annotations

from typing import Any

from rpc_schema import ApiSchema, Verb

OPENRPC_VERSION = "1.3.2"


def _content_descriptors(verb: Verb) -> list[dict[str, Any]]:
    required = set(verb.params.get("required", ()))
    descriptors = []
    for name, schema in verb.params.get("properties", {}).items():
        descriptor: dict[str, Any] = {
            "name": name,
            "required": name in required,
            "schema": schema,
        }
        if "description" in schema:
            descriptor["description"] = schema["description"]
        descriptors.append(descriptor)
    return descriptors


def _examples(verb: Verb) -> list[dict[str, Any]]:
    pairings = []
    for example in verb.examples:
        pairings.append({
            "name": example["name"],
            "params": [{"name": k, "value": v} for k, v in example["params"].items()],
            "result": {"name": "result", "value": example["result"]},
        })
    return pairings


def _method(schema: ApiSchema, verb: Verb) -> dict[str, Any]:
    method: dict[str, Any] = {
        "name": verb.name,
        "summary": verb.summary,
        "paramStructure": "by-name",
        "params": _content_descriptors(verb),
        "result": {"name": "result", "schema": verb.result},
        "errors": [
            {"code": schema.errors[name]["code"], "message": name,
             "data": {"name": name}}
            for name in dict.fromkeys((*verb.errors, *schema.common_errors))
        ],
    }
    if verb.role is not None:
        method["x-role"] = verb.role
    if verb.role_when:
        method["x-role-when"] = [dict(rule) for rule in verb.role_when]
    if verb.description:
        method["description"] = verb.description
    if verb.examples:
        method["examples"] = _examples(verb)
    return method


def document(schema: ApiSchema, server_url: str | None = None) -> dict[str, Any]:
    """The OpenRPC document; ``rpc.*`` verbs are the discovery mechanism itself."""
    doc: dict[str, Any] = {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": schema.info["title"],
            "version": schema.info["version"],
            "description": schema.info.get("description", ""),
        },
        "methods": [
            _method(schema, verb)
            for name, verb in schema.verbs.items()
            if not name.startswith("rpc.")
        ],
        "components": {
            "schemas": schema.components.get("schemas", {}),
            "errors": {
                name: {"code": spec["code"], "message": name, "data": {"name": name}}
                for name, spec in schema.errors.items()
            },
        },
    }
    if server_url:
        doc["servers"] = [{"name": "agent", "url": server_url}]
    return doc
