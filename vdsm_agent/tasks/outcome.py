"""How a task ended: its final record, from what its process left behind.

A task process records its own outcome (``outcome.json``: done, failed or
canceled, with a result or an error). The agent decides the final record
from that, the stop it asked for (cancel, deadline, reset) and how the
process exited; ``concluded`` is that decision, a pure function. Its error
names are the catalogue's (``errors.Failure``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.tasks import files, process
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.runtime import FinalFiles, completed_progress, merge_progress
from vdsm_agent.tasks.states import State

Failure = errors.Failure


def deadline_error(deadline: float | None) -> dict[str, Any]:
    return Failure.DEADLINE_EXCEEDED.error(
        f"the deadline {clock.rfc3339(deadline)} passed before the task ended")


def _external(reported: Any, known: dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(reported, dict) and reported:
        return {**(known or {}), **reported}
    return known


def concluded(record: TaskRecord, final: FinalFiles, exit_status: int | None) -> TaskRecord:
    """The final record from the outcome file, the stop request and the exit."""
    outcome = final.outcome or {}
    stop = record.stop or {}
    reason = stop.get("reason")
    progress = merge_progress(record.progress, outcome.get("progress")
                              or (final.status or {}).get("progress"))
    changes: dict[str, Any] = {
        "ended_at": outcome.get("endedAt") or clock.now(),
        "warnings": tuple(outcome.get("warnings") or ()),
        "output_size": final.extent.end,
        "output_start": final.extent.start,
        "heartbeat_at": (final.status or {}).get("heartbeatAt", record.heartbeat_at),
        # Reported while it ran; a task that ended before the monitor read it has
        # it in its outcome.
        "external": _external(outcome.get("external"), record.external),
    }
    if reason == "reset":
        target = State(stop["to"])
        entry = {**stop["entry"], "killedPid": record.pid if stop.get("killed") else None}
        changes["resets"] = (*record.resets, entry)
        changes["result"] = stop.get("result") if target is State.DONE else None
        changes["error"] = None if target is State.DONE else (
            Failure.RESET_BY_ADMINISTRATOR.error(stop["entry"]["reason"]))
    elif outcome.get("state") in ("done", "failed", "canceled"):
        target = State(outcome["state"])
        changes["result"] = outcome.get("result")
        changes["error"] = outcome.get("error")
        if reason == "deadline" and target is State.CANCELED:
            target, changes["error"] = State.FAILED, deadline_error(record.deadline)
    elif reason == "cancel":
        target = State.CANCELED
        how = process.describe_exit(exit_status)
        changes["error"] = Failure.CANCELED.error(f"stopped on request ({how})")
    elif reason == "deadline":
        target, changes["error"] = State.FAILED, deadline_error(record.deadline)
    elif exit_status == files.EXIT_STORAGE_FULL:
        target, changes["error"] = State.FAILED, errors.StorageFull(
            "the task process could not record its outcome: the state directory is full"
        ).to_data()
    else:
        target = State.INTERRUPTED
        changes["error"] = Failure.INTERRUPTED.error(
            "the task process ended without recording an outcome "
            f"({process.describe_exit(exit_status)})")
    if target is State.DONE:
        progress = completed_progress(progress)
    return dataclasses.replace(record, state=target, progress=progress, **changes)
