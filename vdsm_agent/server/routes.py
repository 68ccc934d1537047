"""What dispatch knows of each verb, worked out once when the dispatcher is made.

A ``Route`` holds a verb's schema, its wrapped handler, the role it needs
(``"role"`` in the schema; stronger for some params: ``"roleWhen"``, as
``Elevation``s), whether its calls are audited (a declared role of operate
or admin), and its ``Binding``: which params the handler takes, read from its
signature once, so that the hot path checks a call's params with two set
operations instead of jsonrpcserver's per-request ``inspect.signature(...).bind``
(about half the cost of a ``ping``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rpc_schema import Verb
from vdsm_agent.security.roles import Role, parse_role

Handler = Callable[..., Awaitable[Any]]

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclasses.dataclass(frozen=True, slots=True)
class Binding:
    """Which params a handler binds, read once from its signature.

    The handler takes the context as its first positional argument and the
    params by name. ``accepted`` is None when it also takes ``**kwargs``; then
    only ``clashes`` (the context parameter's name) cannot be given.
    """

    required: frozenset[str]
    accepted: frozenset[str] | None
    clashes: frozenset[str]

    def binds(self, params: Mapping[str, Any]) -> bool:
        keys = params.keys()
        if not self.required <= keys:
            return False
        if self.accepted is None:
            return keys.isdisjoint(self.clashes)
        return keys <= self.accepted


def binding_of(method: Handler) -> Binding | None:
    """The handler's binding, or None when only inspect's bind can say (rare shapes)."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None  # cannot take the context positionally: the library says why
    context, *rest = parameters
    required: set[str] = set()
    accepted: set[str] | None = set()
    for parameter in rest:
        if parameter.kind in _KEYWORD_KINDS:
            if parameter.default is inspect.Parameter.empty:
                required.add(parameter.name)
            if accepted is not None:
                accepted.add(parameter.name)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            accepted = None
        else:
            return None  # positional-only or *args after the context
    clashes = frozenset(() if context.kind is inspect.Parameter.POSITIONAL_ONLY
                        else (context.name,))
    return Binding(frozenset(required), None if accepted is None else frozenset(accepted),
                    clashes)


_MISSING = object()


@dataclasses.dataclass(frozen=True, slots=True)
class Elevation:
    """A param value that needs a stronger role than the verb's (schema ``roleWhen``)."""

    path: tuple[str, ...]  # "params.force" -> ("params", "force")
    equals: Any
    role: Role

    def applies(self, params: Mapping[str, Any]) -> bool:
        value: Any = params
        for key in self.path:
            if type(value) is not dict:
                return False
            value = value.get(key, _MISSING)
        return value is not _MISSING and value == self.equals and type(value) is type(
            self.equals)


def elevations_of(verb: Verb) -> tuple[Elevation, ...]:
    return tuple(Elevation(tuple(str(rule["param"]).split(".")), rule.get("equals", True),
                            parse_role(rule["role"]))
                 for rule in verb.role_when)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Everything dispatch needs for one verb, looked up once per request."""

    verb: Verb
    method: Handler  # wrapped by translate_errors
    binding: Binding | None
    # The role a caller needs; a verb without one in the schema needs admin.
    role: Role = Role.ADMIN
    elevations: tuple[Elevation, ...] = ()
    # A mutating verb (declared role operate or admin): its calls go to the audit log.
    audited: bool = False

    def required(self, params: Mapping[str, Any]) -> Role:
        needed = self.role
        for elevation in self.elevations:
            if elevation.role > needed and elevation.applies(params):
                needed = elevation.role
        return needed

    @classmethod
    def of(cls, verb: Verb, method: Handler) -> Route:
        role = parse_role(verb.role) if verb.role is not None else Role.ADMIN
        return cls(verb, method, binding_of(method), role, elevations_of(verb),
                   audited=verb.role is not None and role >= Role.OPERATE)
