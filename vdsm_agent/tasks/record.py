"""The task record: one dataclass used in memory, in the store and on the API."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import orjson

from vdsm_agent.common import clock
from vdsm_agent.security import redact
from vdsm_agent.tasks.states import State


def empty_progress() -> dict[str, Any]:
    return {"percent": None, "done": 0, "total": None, "rate": None, "eta": None}


@dataclasses.dataclass
class TaskRecord:
    id: str
    kind: str
    params: dict[str, Any]
    request_hash: str
    state: State
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    deadline: float | None = None
    heartbeat_at: float | None = None
    progress: dict[str, Any] = dataclasses.field(default_factory=empty_progress)
    result: Any = None
    error: dict[str, Any] | None = None
    # Tuples, not lists: the collector stops tracking a tuple of strings (or of
    # dicts of plain values) after one pass, and an unfinished task's record is
    # kept for as long as it waits (see ``runtime.Active``).
    warnings: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    output_size: int = 0
    output_start: int = 0
    pid: int | None = None
    pid_create_time: float | None = None
    stop: dict[str, Any] | None = None
    resets: tuple[dict[str, Any], ...] = ()
    # The agent version that launched the task's process (None: an agent before
    # 0.1.0's store migration 4). After an upgrade, a task launched by the
    # previous version still runs its code: the re-attach line says so.
    launched_by: str | None = None
    # What the task works through outside the agent, as its process reports it
    # while it runs (a Gluster task's ID: {"glusterTaskID": ...}); None: nothing.
    external: dict[str, Any] | None = None

    def to_api(self) -> dict[str, Any]:
        """The ``Task`` object of the API schema."""
        return {
            "id": self.id,
            "kind": self.kind,
            "params": redact.value(self.params),  # secrets never leave the store
            "state": str(self.state),
            "progress": dict(self.progress),
            "result": self.result,
            "error": self.error,
            "warnings": list(self.warnings),
            "resources": list(self.resources),
            "createdAt": clock.rfc3339(self.created_at),
            "startedAt": clock.rfc3339(self.started_at),
            "endedAt": clock.rfc3339(self.ended_at),
            "heartbeatAt": clock.rfc3339(self.heartbeat_at),
            "deadline": clock.rfc3339(self.deadline),
            "outputSize": self.output_size,
            "outputTruncatedBefore": self.output_start,
            "pid": self.pid,
            "stopRequested": _stop_for_api(self.stop),
            "resets": [_reset_for_api(reset) for reset in self.resets],
            "external": dict(self.external) if self.external else None,
        }


def _stop_for_api(stop: dict[str, Any] | None) -> dict[str, Any] | None:
    if stop is None:
        return None
    return {"reason": stop["reason"], "at": clock.rfc3339(stop["at"])}


def _reset_for_api(reset: dict[str, Any]) -> dict[str, Any]:
    return {**reset, "at": clock.rfc3339(reset["at"])}


def request_hash(kind: str, params: dict[str, Any], deadline: float | None) -> str:
    """Identity of a submit: the same kind, params (defaults filled) and deadline."""
    canonical = orjson.dumps({"kind": kind, "params": params, "deadline": deadline},
                             option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(TaskRecord))
JSON_FIELDS = ("params", "progress", "result", "error", "warnings", "resources", "stop",
               "resets", "external")


def to_row(record: TaskRecord) -> dict[str, Any]:
    """Column values for the store."""
    # Not dataclasses.asdict: it deep-copies every field, and the JSON fields are
    # encoded right away anyway (a quarter of the DB thread's time per insert).
    row = {name: getattr(record, name) for name in _FIELD_NAMES}
    for name in JSON_FIELDS:
        row[name] = orjson.dumps(row[name]).decode()
    row["state"] = str(record.state)
    return row


def from_row(row: dict[str, Any]) -> TaskRecord:
    values = dict(row)
    for name in JSON_FIELDS:
        text = values.get(name)
        values[name] = orjson.loads(text) if text is not None else None
    values["state"] = State(values["state"])
    for name in ("warnings", "resources", "resets"):
        values[name] = tuple(values[name] or ())
    values["progress"] = values["progress"] or empty_progress()
    return TaskRecord(**values)
