"""Retention: finished tasks are deleted after a while, and beyond a count.

Done and canceled tasks go ``retention_done`` after they end, failed and
interrupted ones ``retention_failed`` after (kept longer, for debugging);
beyond ``max_finished_tasks`` the oldest go first, shortest retention first.
Unfinished tasks are never counted or removed. A sweep runs when a task
becomes final (at most once per ``RETENTION_GAP``) and at least every
quarter of the shortest retention (at most every minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from typing import TYPE_CHECKING

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.tasks import repository
from vdsm_agent.tasks.runtime import wait_event
from vdsm_agent.tasks.states import State

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

RETENTION_GAP = 1.0  # at most one retention sweep per second, however busy


class Retention:
    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.wake = asyncio.Event()  # a task became final: sweep soon

    def interval(self) -> float:
        shortest = min(self.config.retention_done, self.config.retention_failed)
        return min(max(shortest / 4, RETENTION_GAP), 60.0)

    async def loop(self) -> None:
        while True:
            await wait_event(self.wake, self.interval())
            self.wake.clear()
            with contextlib.suppress(errors.StorageFull):  # next time, then
                await self.sweep()
            await asyncio.sleep(RETENTION_GAP)

    async def sweep(self) -> int:
        """Delete final tasks past retention or over the count cap; how many."""
        keep = {State.DONE: self.config.retention_done,
                State.CANCELED: self.config.retention_done,
                State.FAILED: self.config.retention_failed,
                State.INTERRUPTED: self.config.retention_failed}
        store = self.manager.store
        doomed = await store.run(repository.expired, clock.now(), keep,
                                 self.config.max_finished_tasks)
        if not doomed:
            return 0
        count = await store.run(repository.delete_many, doomed)
        self.manager.changes.bump()
        await asyncio.to_thread(self._remove_dirs, doomed)
        log.info("tasks: retention removed %d finished tasks", count)
        return count

    def _remove_dirs(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            shutil.rmtree(self.manager.task_files(task_id).dir, ignore_errors=True)
