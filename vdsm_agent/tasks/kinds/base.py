"""What a task kind is: a plugin class, run in two places.

In the agent (short calls, in a worker thread): ``check_params`` (the kind's
JSON Schema, defaults filled), ``validate`` (semantic and safety checks, path
confinement), ``resources`` (what it locks) and ``verify`` (for
``resetTaskState(done)``).

In the task's child process: an instance is made with the params and a
``TaskContext``, then ``pre`` -> ``perform`` -> ``post``; ``cleanup`` undoes a
partial result after a failure or a cancel. The work reports progress through
the context and calls ``ctx.check_cancel()`` where stopping is safe.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import fastjsonschema
import orjson

import rpc_schema
from vdsm_agent import errors


@dataclasses.dataclass(frozen=True)
class KindEnv:
    """What a kind may know about the agent's configuration."""

    allowed_roots: tuple[str, ...] = ()
    io_rate_limit: int = 0  # bytes per second for data-moving kinds; 0 = unlimited
    # The task being run or verified (set in the child and for verify; None
    # in submit-time checks): lets a kind keep notes for verify (kinds/notes.py).
    task_id: str | None = None
    task_dir: str | None = None


class TaskFailure(Exception):
    """Raised by the work to fail the task with a named error of the catalogue
    (``errors.Failure``; an error class of ``errors`` may be raised as well)."""

    def __init__(self, failure: errors.Failure, detail: str, **data: Any) -> None:
        super().__init__(detail)
        self.name = failure.value
        self.detail = detail
        self.data = data

    def to_error(self) -> dict[str, Any]:
        return {"name": self.name, "detail": self.detail, **self.data}


class Canceled(Exception):
    """Raised by ``TaskContext.check_cancel`` once a cancel was requested."""


@dataclasses.dataclass(frozen=True)
class Verification:
    """A kind's verdict on whether the work of a task is complete."""

    complete: bool
    detail: str
    result: dict[str, Any] | None = None


class TaskContext(Protocol):
    """The child's services to the work (implemented in ``tasks.child``)."""

    env: KindEnv

    def progress(self, done: int, total: int | None) -> None: ...
    def heartbeat(self) -> None: ...
    def print(self, line: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def warn(self, message: str) -> None: ...
    def check_cancel(self) -> None: ...
    @property
    def cancel_requested(self) -> bool: ...
    def sleep(self, seconds: float) -> None: ...
    def throttle(self, nbytes: int) -> None: ...
    def report_external(self, **values: Any) -> None: ...


def _caller_name(name: str | None) -> str:
    # fastjsonschema calls the validated value "data"; the caller knows it as
    # the "params" member of startTask's params.
    name = name or "data"
    return "params.params" + name[len("data"):] if name.startswith("data") else name


def _copy(params: dict[str, Any]) -> Any:
    """A deep copy for the validator to fill defaults into. Params come from
    JSON, and a JSON round trip copies them at a fifth of ``copy.deepcopy``'s
    cost; anything else (an in-process caller's tuple keys) is deep-copied."""
    try:
        return orjson.loads(orjson.dumps(params))
    except TypeError:
        return copy.deepcopy(params)


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """The offending field as the caller sees it: ``params.params.<field>``."""
    base = _caller_name(exc.name)
    value = exc.value if isinstance(exc.value, dict) else {}
    if exc.rule == "required" and isinstance(exc.rule_definition, list):
        missing = [name for name in exc.rule_definition if name not in value]
        if missing:
            return f"{base}.{missing[0]}"
    if exc.rule == "additionalProperties" and isinstance(exc.definition, dict):
        known = set(exc.definition.get("properties", {}))
        extra = sorted(set(value) - known)
        if extra:
            return f"{base}.{extra[0]}"
    return base


# Compiled params validators, one per kind class (compiling costs milliseconds).
# Compiled as the verbs' are: "integer" is strict (5.0 is InvalidParams, not a
# float reaching the work, where it failed as InternalError).
_VALIDATORS: dict[type[TaskKind], Callable[[Any], Any]] = {}


def _validator(kind: type[TaskKind]) -> Callable[[Any], Any]:
    check = _VALIDATORS.get(kind)
    if check is None:
        check = _VALIDATORS[kind] = rpc_schema.compile_validator(kind.params_schema)
    return check


class TaskKind(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    params_schema: ClassVar[dict[str, Any]]
    result_schema: ClassVar[dict[str, Any]]
    destructive: ClassVar[bool] = False
    # What progress's done/total count: "bytes" (the bytes-processed metric adds
    # them up, docs/metrics.md), else "percent" or the kind's own unit.
    progress_unit: ClassVar[str] = "percent"
    # Test-only kinds are registered only when the enable_test_kinds setting is on.
    test_only: ClassVar[bool] = False
    # Whether validate()/resources() look at the filesystem or devices: the agent
    # then runs them on a worker thread, since a stat can hang (NFS). A kind that
    # only inspects its params sets False and is checked on the event loop.
    checks_filesystem: ClassVar[bool] = True
    # Whether the task only reads what it locks (checksum): its resources are then
    # held shared, so tasks that share run together while an exclusive holder (a
    # wipe, a copy onto it) conflicts with them (tasks/table.py).
    shares_resources: ClassVar[bool] = False
    # How the params name what ``resources()`` returns: {param: resource class}
    # (``tasks/resource_names``), published in getTaskKinds (resourceParams) so that
    # the engine locks a task's resources before its host is called. It must give
    # exactly what ``resources()`` does (tests/test_resource_params.py).
    resource_params: ClassVar[Mapping[str, str]] = {}

    # -- agent side (classmethods: no instance, no process) ------------------------

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Params checked against the kind's schema, with defaults filled in."""
        try:
            checked = _validator(cls)(_copy(params))
        except fastjsonschema.JsonSchemaValueException as exc:
            message = rpc_schema.violation(exc, _caller_name(exc.name))
            raise errors.InvalidParams(message, field=_field_of(exc),
                                       rule=exc.rule or "schema") from None
        assert isinstance(checked, dict)
        return checked

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        """Semantic and safety checks beyond the schema; raise ``errors.*``."""
        return None  # optional hook: nothing to do by default

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        """Names of what the task locks while unfinished (exclusively, or shared when
        ``shares_resources``)."""
        return []

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        """Whether the work is in fact complete (``resetTaskState`` to done)."""
        return Verification(False, f"task kind {cls.name} cannot verify its work")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "destructive": cls.destructive,
            "paramsSchema": cls.params_schema,
            "resultSchema": cls.result_schema,
            "sharesResources": cls.shares_resources,
            "resourceParams": dict(cls.resource_params),
        }

    # -- child side ------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        self.params = params
        self.ctx = ctx

    def pre(self) -> None:
        """Prepare (open, re-check); runs after the framework re-validated the params."""
        return None  # optional hook: nothing to do by default

    @abc.abstractmethod
    def perform(self) -> dict[str, Any]:
        """The work itself; returns the result."""

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        """Finish after a successful ``perform`` (flush, sync, ...)."""
        return result

    def cleanup(self) -> None:
        """Undo or release a partial result after a failure or a cancel, including
        a ``pre`` that failed half-way (so it must cope with what ``pre`` did not do)."""
        return None  # optional hook: nothing to do by default
