"""Start-up: take over the unfinished tasks of the store.

Task processes outlive the agent. At start-up every unfinished task is
tracked again: a queued one keeps its place; one that had a process is
re-attached to it by its identity (PID and start time, from the store, its
status file or, failing both, the process whose working directory is the
task's), or, when the process is gone, concluded from what it left behind
(``Supervisor.finalize``). A stop that was requested is delivered again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from vdsm_agent.tasks import files, process, repository
from vdsm_agent.tasks.runtime import Active, merge_progress
from vdsm_agent.tasks.states import RUNNING_SLOT

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)


async def reconcile(manager: TaskManager) -> None:
    """Take over the unfinished tasks of the store after a (re)start."""
    began = time.monotonic()
    records = await manager.store.run(repository.load_unfinished)
    for record in records:
        manager.table.adopt(record)
    counts: collections.Counter[str] = collections.Counter()
    for active in list(manager.table.active.values()):
        if active.record.state in RUNNING_SLOT:
            counts[await _reattach(manager, active)] += 1
    log.info("tasks at start-up: %d unfinished (%d queued); %s; reconciled in %.1f ms",
             len(records), len(manager.table.queue), dict(counts) or "none running",
             (time.monotonic() - began) * 1000)


async def _reattach(manager: TaskManager, active: Active) -> str:
    """Follow a task's process again, or conclude it; what happened, in a word."""
    supervisor = manager.supervisor
    record = active.record
    identity, status = await asyncio.to_thread(_find_identity, active)
    pidfd = await asyncio.to_thread(process.attach, identity) if identity else None
    if pidfd is None:
        await supervisor.finalize(active)
        return "concluded"
    # The store has the progress of the task's last state change, its status
    # file what it reported last: show that from the first answer on, not
    # after the first monitor round (progress never goes backwards).
    if status is not None and identity is not None and status.get("pid") == identity.pid:
        record.progress = merge_progress(record.progress, status.get("progress"))
    if identity is not None and record.pid != identity.pid:
        async with active.lock:
            await manager.record_identity(active, identity)
    supervisor.watch(active, pidfd, own_child=False)
    log.info("task %s: re-attached to pid %s (%s; launched by %s)", record.id,
             active.record.pid, record.state,
             f"vdsm-agent {record.launched_by}" if record.launched_by else "an earlier agent")
    if active.record.stop is not None:
        supervisor.deliver_stop(active)
    return "re-attached"


def _find_identity(active: Active) -> tuple[process.Identity | None, dict[str, Any] | None]:
    """Blocking: the process recorded for the task (from the store, its status
    file or ps), and its last status."""
    record = active.record
    found = files.read_json(active.task_files.status)
    status = found if isinstance(found, dict) else None
    if record.pid is not None and record.pid_create_time is not None:
        return process.Identity(record.pid, record.pid_create_time), status
    if status is not None and status.get("pid"):
        return process.Identity(int(status["pid"]), float(status["createTime"])), status
    return process.find_by_task_dir(active.task_files.dir), status
