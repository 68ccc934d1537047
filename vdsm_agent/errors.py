"""The names callers see: one error class per documented error name, and the
catalogue of task failure names.

Every class carries a stable ``code`` and ``name``; both are listed in
``rpc_schema/agent.json`` (a test keeps the two in step). Handlers raise these;
``vdsm_agent.server.jsonrpc`` is the one place that turns them into JSON-RPC
errors, and every error object the agent and the engine send is built by
``RpcError.to_error`` (``to_body`` for the plain HTTP routes). Protocol
faults use the standard negative codes; application errors use stable positive
codes grouped by subsystem (1xx connections, 2xx tasks, 3xx devices and paths,
4xx limits and access, 5xx the engine).

``Failure`` names what a task's ``error`` (and an engine job step's
``lastError``) carries when it is not one of these classes (listed under
``failures`` in the schema, kept in step by the same test).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

# JSON-RPC 2.0 standard codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class RpcError(Exception):
    """Base of every error a caller may see; never raised itself."""

    code: ClassVar[int]
    name: ClassVar[str]
    message: ClassVar[str]

    def __init__(self, detail: str = "", **data: Any) -> None:
        super().__init__(detail or self.message)
        self.detail = detail
        self.data = data

    def to_data(self) -> dict[str, Any]:
        """``{"name", ...data, "detail"}``: the JSON-RPC ``error.data``, and a
        task's ``error`` when its work met this error."""
        data: dict[str, Any] = {"name": self.name, **self.data}
        if self.detail:
            data["detail"] = self.detail
        return data

    def to_error(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this exception."""
        return {"code": self.code, "message": self.message, "data": self.to_data()}

    def to_body(self) -> dict[str, Any]:
        """The JSON body of a plain HTTP answer (the routes beside ``/jsonrpc``):
        ``{"error": {code, message, name, ...data}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.to_data()}}


def refused_request(error: RpcError) -> dict[str, Any]:
    """The JSON-RPC ``error`` member of a request refused before its calls are
    read (a body too large or too slow, a batch too long): -32600 "Invalid
    request", with ``error``'s name and data (e.g. ``LimitExceeded``)."""
    return {"code": INVALID_REQUEST, "message": "Invalid request", "data": error.to_data()}


class InvalidParams(RpcError):
    """Params that pass the schema but not a semantic check (or fail the schema)."""

    code = INVALID_PARAMS
    name = "InvalidParams"
    message = "Invalid params"


class InternalError(RpcError):
    """Anything unexpected: never its text, a correlation ID that is in the log
    (``correlationId``); in a task's error, the work's unexpected exception."""

    code = INTERNAL_ERROR
    name = "InternalError"
    message = "Internal error"


class AgentError(RpcError):
    """Base of the application errors (positive codes)."""


# -- storage connections (1xx) ------------------------------------------------


class InvalidUri(AgentError):
    code = 100
    name = "InvalidUri"
    message = "The URI does not parse or has invalid parts"


class UnsupportedScheme(AgentError):
    code = 101
    name = "UnsupportedScheme"
    message = "This host does not serve this URI scheme"


class ConnectionIdInUse(AgentError):
    code = 102
    name = "ConnectionIdInUse"
    message = "The connection ID is registered for a different URI"


class ConnectionNotFound(AgentError):
    code = 103
    name = "ConnectionNotFound"
    message = "Unknown connection ID"


# -- tasks (2xx) ----------------------------------------------------------------


class TaskNotFound(AgentError):
    code = 200
    name = "TaskNotFound"
    message = "Unknown task ID"


class TaskIdConflict(AgentError):
    code = 201
    name = "TaskIdConflict"
    message = "A task with this ID exists with a different request"


class TaskActive(AgentError):
    code = 202
    name = "TaskActive"
    message = "The task has not finished"


class TaskNotActive(AgentError):
    code = 203
    name = "TaskNotActive"
    message = "The task has already finished"


class ResourceBusy(AgentError):
    code = 204
    name = "ResourceBusy"
    message = "Another active task holds the resource"


class QueueFull(AgentError):
    code = 205
    name = "QueueFull"
    message = "The task queue is at its configured limit"


class InvalidStateTransition(AgentError):
    code = 206
    name = "InvalidStateTransition"
    message = "The task cannot move to that state from its current one"


class UnknownTaskKind(AgentError):
    code = 207
    name = "UnknownTaskKind"
    message = "No task kind has this name"


class StorageFull(AgentError):
    """The state directory's filesystem has no room (ENOSPC, EDQUOT, sqlite's
    "database or disk is full"): nothing was changed (docs/tasks.md)."""

    code = 208
    name = "StorageFull"
    message = "The agent's state directory is full"


# -- devices and paths (3xx) --------------------------------------------------------


class DeviceNotFound(AgentError):
    code = 300
    name = "DeviceNotFound"
    message = "The device does not exist"


class DeviceInUse(AgentError):
    code = 301
    name = "DeviceInUse"
    message = "The device is in use"


class PathNotAllowed(AgentError):
    code = 302
    name = "PathNotAllowed"
    # Not only "outside the allowed roots": also a symlink, '..', another mount, a
    # hard link, or a device path that is no block device; the detail says which.
    message = "The path may not be used"


class PreconditionFailed(AgentError):
    code = 303
    name = "PreconditionFailed"
    message = "The target changed since the caller last saw it"


class GlusterCommandFailed(AgentError):
    """The gluster CLI refused the operation (data.opErrstr) or glusterd does not
    answer (data.reason "unavailable"): vdsm_agent/system/gluster.py."""

    code = 310
    name = "GlusterCommandFailed"
    message = "The gluster command failed"


class GlusterTaskNotComplete(AgentError):
    code = 311
    name = "GlusterTaskNotComplete"
    message = "The Gluster task has not completed"


# -- limits (4xx) ---------------------------------------------------------------------


class LimitExceeded(AgentError):
    code = 400
    name = "LimitExceeded"
    message = "A configured request limit was exceeded"


class Forbidden(AgentError):
    """A call beyond the caller's role (vdsm_agent.security; docs/security.md)."""

    code = 401
    name = "Forbidden"
    message = "The caller's role does not allow this call"


def all_errors() -> list[type[RpcError]]:
    """Every concrete error class, in declaration order."""
    found: list[type[RpcError]] = []
    pending: list[type[RpcError]] = [RpcError]
    while pending:
        cls = pending.pop(0)
        for sub in cls.__subclasses__():
            pending.append(sub)
            if "code" in sub.__dict__:
                found.append(sub)
    return found


# -- engine (5xx): listed in rpc_schema/engine.json -------------------------------------


class HostNotFound(AgentError):
    code = 500
    name = "HostNotFound"
    message = "No host has this name"


class HostExists(AgentError):
    code = 501
    name = "HostExists"
    message = "A host with this name is already registered"


class JobNotFound(AgentError):
    code = 502
    name = "JobNotFound"
    message = "Unknown job ID"


class HostUnreachable(AgentError):
    code = 503
    name = "HostUnreachable"
    message = "The host's agent does not answer and the engine has no record to answer from"


# -- task failures: a task's error, an engine job step's lastError ----------------------


class Failure(enum.StrEnum):
    """The names of a task's ``error`` (``{"name", "detail", ...}``) that are not
    the error classes above, which a task's work may also meet (PathNotAllowed,
    DeviceInUse, StorageFull, ...). Listed with their meaning under ``failures``
    in ``rpc_schema/agent.json``; those only the engine gives (a job step's
    ``lastError``) in ``engine.json``."""

    # the task runner (vdsm_agent/tasks)
    CANCELED = "Canceled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INTERRUPTED = "Interrupted"
    RESET_BY_ADMINISTRATOR = "ResetByAdministrator"
    SPAWN_FAILED = "SpawnFailed"
    RESOURCE_CHANGED = "ResourceChanged"
    # the task kinds' work (vdsm_agent/tasks/kinds)
    TOOL_FAILED = "ToolFailed"
    INVALID_ARGUMENT = "InvalidArgument"
    VERIFY_FAILED = "VerifyFailed"
    DIRTY_LOG = "DirtyLog"
    DISCARD_NOT_SUPPORTED = "DiscardNotSupported"
    RANGE_BEYOND_END = "RangeBeyondEnd"
    SHORT_READ = "ShortRead"
    DESTINATION_REPLACED = "DestinationReplaced"
    TEST_FAILURE = "TestFailure"
    GLUSTER_TASK_FAILED = "GlusterTaskFailed"
    GLUSTER_TASK_LOST = "GlusterTaskLost"
    # the engine: a job step's lastError (vdsm_agent/engine)
    HOST_REMOVED = "HostRemoved"
    TASK_GONE = "TaskGone"

    def error(self, detail: str, **data: Any) -> dict[str, Any]:
        """The ``error`` object: ``{"name", "detail", **data}``."""
        return {"name": self.value, "detail": detail, **data}
