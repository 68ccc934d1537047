"""The API schema: one machine-readable description of every verb.

``agent.json`` (and later ``engine.json``) list each verb's params as JSON
Schema, its result schema, the errors it may return, a description and
examples. The agent loads it at start-up and validates every request's params
with a compiled validator before any handler runs. ``rpc_schema.openrpc``
turns it into the OpenRPC document served by ``rpc.discover`` and
``rpc_schema.docs`` into the human reference in ``docs/``.

Two rules beyond JSON Schema apply to every validator compiled here
(``compile_validator``; the task kinds' params use it too):

* ``"integer"`` means a JSON integer: ``5.0`` is refused ("must be
  integer"), although JSON Schema since draft 06 counts a float without a
  fractional part as an integer. Counts, offsets and sizes are used as Python
  ints (slicing, ``seek``, ``range``), where a float fails late, as an
  internal error;
* params may nest at most ``MAX_PARAMS_DEPTH`` objects and arrays deep
  (``rule: "maxDepth"``): everything that copies, redacts or stores params
  can then never recurse without bound.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, cast

import fastjsonschema
from fastjsonschema.draft04 import CodeGeneratorDraft04
from fastjsonschema.draft2019 import CodeGeneratorDraft2019
from fastjsonschema.ref_resolver import RefResolver

from rpc_schema import words

# Roles a verb may require, weakest first ("none": public, like GET /health).
ROLES = ("none", "read", "operate", "admin")

# How deep params may nest (the params object itself is level 1). The deepest
# verb params today are 4 levels; the limit leaves room and keeps every
# recursive copy, redaction or JSON encoding of params far from Python's
# recursion limit and orjson's 255 levels.
MAX_PARAMS_DEPTH = 32


class ParamsInvalid(Exception):
    """Params rejected by a verb's schema: which field, which rule, in words."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.message = message


@dataclasses.dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    description: str
    params: dict[str, Any]
    result: dict[str, Any]
    errors: tuple[str, ...]
    examples: tuple[dict[str, Any], ...]
    components: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
    # The role a caller needs (agent.json gives one for every verb; None: not
    # declared, which the agent's dispatcher treats as "admin").
    role: str | None = None
    # Stronger roles for some params: ({"param": "params.force", "equals": true,
    # "role": "admin", "description": ...}, ...).
    role_when: tuple[dict[str, Any], ...] = ()

    @functools.cached_property
    def check(self) -> Callable[[Any], Any]:
        """The compiled params validator (compiled on first use: the CLI needs one verb).

        Components ride along so that params may ``$ref`` "#/components/schemas/...".
        """
        return compile_validator({**self.params, "components": self.components})

    def validate_params(self, params: Mapping[str, Any]) -> None:
        if params and nested_too_deep(params, MAX_PARAMS_DEPTH):
            raise ParamsInvalid(
                "params", "maxDepth",
                f"params nest more than {MAX_PARAMS_DEPTH} objects and arrays deep")
        try:
            self.check(params)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise _explain(exc) from None


class _StrictIntegers(CodeGeneratorDraft2019):
    """fastjsonschema's default draft (2019-09), but with draft 04's type check:
    ``"integer"`` is a Python int (never a bool, never a float such as 5.0)."""

    def generate_type(self) -> None:
        CodeGeneratorDraft04.generate_type(self)  # type: ignore[no-untyped-call]


def compile_validator(definition: dict[str, Any]) -> Callable[[Any], Any]:
    """A validator for ``definition`` as ``fastjsonschema.compile`` makes one
    (defaults filled in, JsonSchemaValueException on invalid data), except
    that integers are strict (see the module docstring)."""
    resolver = RefResolver.from_schema(definition, handlers={}, store={})
    generator = _StrictIntegers(definition, resolver=resolver)  # type: ignore[no-untyped-call]
    state = generator.global_state
    exec(generator.func_code, state)  # what fastjsonschema.compile does with its code
    return cast(Callable[[Any], Any], state[resolver.get_scope_name()])


def nested_too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests dicts and lists more than ``limit`` deep; iterative
    (a recursive walk is what deep params must not reach)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if type(item) is dict else item:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def _explain(exc: fastjsonschema.JsonSchemaValueException) -> ParamsInvalid:
    # fastjsonschema names the root "data"; callers know it as "params".
    name = str(exc.name or "data")
    field = "params" + name[len("data"):] if name.startswith("data") else name
    return ParamsInvalid(field, str(exc.rule or "schema"), violation(exc, field))


def violation(exc: fastjsonschema.JsonSchemaValueException, field: str) -> str:
    """The sentence for a schema violation, naming ``field`` as the caller knows it:
    a pattern or format in words with an example (``rpc_schema.words``), else
    fastjsonschema's own sentence. The one place both the verbs' params and the
    task kinds' params are put into words."""
    said = words.explain(str(exc.rule or ""), exc.rule_definition)
    if said is not None:
        return f"{field} {said}"
    name = str(exc.name or "data")
    return str(exc.message).replace(name, field, 1)


@dataclasses.dataclass(frozen=True)
class ApiSchema:
    info: dict[str, Any]
    errors: dict[str, dict[str, Any]]
    components: dict[str, Any]
    verbs: dict[str, Verb]
    document: dict[str, Any]  # the file as loaded, for generators
    # Errors any verb may answer (access and limits), beside its own "errors".
    common_errors: tuple[str, ...] = ()
    # Failure names: what a task's error (a job step's lastError, for the engine)
    # may carry beside the errors ({name: {"description"}}; ``errors.Failure``).
    failures: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    failures_description: str = ""

    def verb(self, name: str) -> Verb | None:
        return self.verbs.get(name)

    def compile(self) -> ApiSchema:
        """Compile every verb's validator now (the agent does this at start-up)."""
        for verb in self.verbs.values():
            _ = verb.check
        return self


def load(name: str = "agent") -> ApiSchema:
    """Load and compile ``rpc_schema/<name>.json``."""
    text = resources.files(__package__).joinpath(f"{name}.json").read_text("utf-8")
    return from_document(json.loads(text))


def _check_roles(verb_name: str, spec: dict[str, Any]) -> None:
    role = spec.get("role")
    if role is not None and role not in ROLES:
        raise ValueError(f"{verb_name}: role {role!r} is not one of {', '.join(ROLES)}")
    for rule in spec.get("roleWhen", ()):
        if rule.get("role") not in ROLES or not str(rule.get("param", "")).strip():
            raise ValueError(f"{verb_name}: roleWhen needs a param path and a role "
                             f"({', '.join(ROLES)}): {rule!r}")


def from_document(document: dict[str, Any]) -> ApiSchema:
    errors = document["errors"]
    failures = document.get("failures", {})
    clashes = set(failures.get("names", {})) & set(errors)
    if clashes:
        raise ValueError(f"failures: names that are errors too {sorted(clashes)}")
    common = tuple(document.get("commonErrors", ()))
    unknown_common = set(common) - set(errors)
    if unknown_common:
        raise ValueError(f"commonErrors: undeclared errors {sorted(unknown_common)}")
    verbs: dict[str, Verb] = {}
    for verb_name, spec in document["methods"].items():
        unknown = set(spec.get("errors", ())) - set(errors)
        if unknown:
            raise ValueError(f"{verb_name}: undeclared errors {sorted(unknown)}")
        _check_roles(verb_name, spec)
        verbs[verb_name] = Verb(
            name=verb_name,
            summary=spec["summary"],
            description=spec.get("description", ""),
            params=spec["params"],
            result=spec["result"],
            errors=tuple(spec.get("errors", ())),
            examples=tuple(spec.get("examples", ())),
            components=document.get("components", {}),
            role=spec.get("role"),
            role_when=tuple(spec.get("roleWhen", ())),
        )
    return ApiSchema(
        info=document["info"],
        errors=errors,
        components=document.get("components", {}),
        verbs=verbs,
        document=document,
        common_errors=common,
        failures=failures.get("names", {}),
        failures_description=failures.get("description", ""),
    )
