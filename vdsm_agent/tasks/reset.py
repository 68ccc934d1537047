"""resetTaskState: the administrator's way out of a task stuck unfinished.

A task that is not final may be reset to ``failed`` (``ResetByAdministrator``)
or, when its kind verifies that the work is complete, to ``done`` (with the
kind's result). A queued task ends at once; one with a process has it killed
(SIGKILL to its group) and ends when the process is gone, so that nothing
still writes after the reset. The legal moves are ``states.RESET_TRANSITIONS``;
the reset entry (who asked, why, what was killed) stays in ``Task.resets``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.tasks import process, states
from vdsm_agent.tasks.kinds import KINDS
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.runtime import Active, wait_event
from vdsm_agent.tasks.states import FINAL, State

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

RESET_KILL_WAIT = 10.0  # seconds to wait for a SIGKILLed process before giving up


async def reset(manager: TaskManager, task_id: str, state_name: str,
                reason: str) -> dict[str, Any]:
    """The ``resetTaskState`` answer for the canonical ``task_id``."""
    record = await manager.record(task_id)
    target = states.parse(state_name)
    active = manager.table.active.get(task_id)
    if target is None or active is None or target not in states.RESET_TRANSITIONS[record.state]:
        raise errors.InvalidStateTransition(
            f"cannot reset a task in state {record.state} to {state_name}",
            taskID=task_id, state=str(record.state), requested=state_name,
            allowed=sorted(states.RESET_TRANSITIONS[record.state]))
    manager.check_end_recorded(active)
    result = await _verify(manager, record, target)
    entry = {"at": clock.now(), "from": str(record.state), "to": str(target),
             "reason": reason, "killedPid": None}
    killed = await _apply(manager, active, target, result, entry)
    final = await manager.record(task_id)
    log.warning("task %s: state reset %s -> %s by request, reason: %s%s", task_id,
                entry["from"], final.state, reason,
                f" (killed pid {record.pid})" if killed else "")
    return {"task": final.to_api(), "killed": killed,
            "killedPid": final.resets[-1].get("killedPid") if final.resets else None}


async def _verify(manager: TaskManager, record: TaskRecord, target: State) -> Any:
    """For a reset to done: the kind's verdict on the work (its result)."""
    if target is not State.DONE:
        return None
    kind = KINDS.get(record.kind)
    if kind is None:
        raise errors.InvalidStateTransition(f"unknown kind {record.kind}", taskID=record.id)
    # The kind may read the notes its child left in the task directory.
    env = dataclasses.replace(manager.env, task_id=record.id,
                              task_dir=str(manager.task_files(record.id).dir))
    verdict = await asyncio.to_thread(kind.verify, record.params, env)
    if not verdict.complete:
        raise errors.InvalidStateTransition(
            f"cannot reset to done: {verdict.detail}", taskID=record.id,
            state=str(record.state), requested="done")
    return verdict.result


async def _apply(manager: TaskManager, active: Active, target: State, result: Any,
                 entry: dict[str, Any]) -> bool:
    """Reset a task; whether its process had to be killed first."""
    async with active.lock:
        if active.record.state in FINAL:
            raise errors.InvalidStateTransition(
                f"the task ended meanwhile as {active.record.state}", taskID=active.id,
                state=str(active.record.state), requested=entry["to"])
        manager.check_end_recorded(active)
        if active.record.state is State.ACCEPTED:
            await manager.end_unstarted(
                active, target, result=result, reset_entry=entry,
                error=None if target is State.DONE
                else errors.Failure.RESET_BY_ADMINISTRATOR.error(entry["reason"]))
            return False
        stop = {"reason": "reset", "at": clock.now(), "to": str(target), "result": result,
                "entry": entry, "killed": False}
        if active.pidfd is not None and not process.exited(active.pidfd):
            stop["killed"] = True
        await manager.request_stop(active, stop)
    manager.supervisor.deliver_stop(active)
    if not await wait_event(active.finished, RESET_KILL_WAIT):
        raise errors.InvalidStateTransition(
            f"the task process {active.record.pid} did not exit within "
            f"{RESET_KILL_WAIT:g}s of SIGKILL (uninterruptible I/O?); the reset "
            "will apply when it exits", taskID=active.id, pid=active.record.pid)
    return bool(stop["killed"])
