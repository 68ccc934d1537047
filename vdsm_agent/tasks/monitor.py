"""The heartbeat monitor: what running tasks report, and their deadlines.

Every round (half the heartbeat interval, between 0.05 and 0.25 s) reads the
status file and output extent of every watched task in one worker-thread
call, then, on the loop: output growth wakes the output followers; a new
heartbeat merges the reported progress (it never goes backwards), keeps what the
process reports it goes through outside the agent (``external``) and moves
``initializing`` to ``running``, or ``stale`` back to ``running``; no
heartbeat for ``stale_after`` makes a running task ``stale``. Tasks past
their deadline are stopped (a queued one fails at once).

A round costs what runs, not what is queued: only the task table's
``launched`` and ``with_deadline`` tasks are looked at.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.tasks import outcome
from vdsm_agent.tasks.runtime import Active, Snapshot, merge_progress, read_snapshots
from vdsm_agent.tasks.states import FINAL, State

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.table = manager.table

    def interval(self) -> float:
        # At most a quarter second: progress is written that often (child.PROGRESS_INTERVAL)
        # and should reach getTask within half a second.
        return min(max(self.config.heartbeat_interval / 2, 0.05), 0.25)

    async def loop(self) -> None:
        interval = self.interval()
        while True:
            await asyncio.sleep(interval)
            watched = [a for a in self.table.launched.values() if a.pidfd is not None]
            if watched:
                snapshots = await asyncio.to_thread(read_snapshots,
                                                    [a.task_files for a in watched])
                for active, snapshot in zip(watched, snapshots, strict=True):
                    await self._observe(active, snapshot)
            await self._enforce_deadlines()

    async def _observe(self, active: Active, snapshot: Snapshot) -> None:
        record = active.record
        if active.finalizing or record.state in FINAL:
            return
        extent = snapshot.extent
        if (extent.end, extent.start) != (record.output_size, record.output_start):
            record.output_size, record.output_start = extent.end, extent.start
            self.manager.changes.bump()  # listTasks shows the record
            active.output_pulse.fire()
        status = snapshot.status
        beat = progressed = False
        if status is not None and status.get("pid") == record.pid:
            seq = int(status.get("seq") or 0)
            if seq != active.last_seq:
                # The first status seen (e.g. just after a restart) is a baseline,
                # not proof that a stale task came back to life.
                beat = active.last_seq != -1
                active.last_seq = seq
                active.last_beat = time.monotonic()
                record.heartbeat_at = status.get("heartbeatAt")
                self.manager.changes.bump()
                progress = merge_progress(record.progress, status.get("progress"))
                if progress != record.progress:
                    record.progress = progress
                    progressed = True
            external = status.get("external")
            if isinstance(external, dict) and external != record.external:
                await self._record_external(active, external)
            if record.state is State.INITIALIZING and status.get("phase") in ("running",
                                                                             "finished"):
                await self.manager.observed(active, State.RUNNING)
        if record.state is State.STALE and beat:
            log.info("task %s: heartbeat resumed", record.id)
            await self.manager.observed(active, State.RUNNING)
        elif (record.state is State.RUNNING
              and time.monotonic() - active.last_beat > self.config.stale_after):
            log.warning("task %s: no heartbeat for %.1fs (pid %s)", record.id,
                        time.monotonic() - active.last_beat, record.pid)
            await self.manager.observed(active, State.STALE)
        # After the moves this status caused (initializing or stale -> running): a
        # progress update is news of a running task, and a move carries it already.
        if progressed:
            self.manager.emit_progress(record)

    async def _record_external(self, active: Active, external: dict[str, Any]) -> None:
        """Keep what the task's process reported it goes through outside the agent (a
        Gluster task's ID) in its record, persisted like any change of it (the state
        unchanged); while the state disk is full it is tried again next round."""
        async with active.lock:
            record = active.record
            if active.finalizing or record.state in FINAL:
                return
            try:
                await self.manager.move(active, record.state,
                                        external={**(record.external or {}), **external})
            except errors.StorageFull:
                log.debug("task %s: cannot record %s yet: the state directory is full",
                          active.id, external)
                return
        log.info("task %s: external %s", active.id, external)

    async def _enforce_deadlines(self) -> None:
        now = clock.now()
        for active in list(self.table.with_deadline.values()):
            record = active.record
            if record.deadline is None or record.deadline > now or active.finalizing:
                continue
            try:
                await self._enforce_deadline(active, now)
            except errors.StorageFull:
                continue  # tried again at the next round

    async def _enforce_deadline(self, active: Active, now: float) -> None:
        manager = self.manager
        record = active.record
        async with active.lock:
            if active.record.state is State.ACCEPTED:
                await manager.end_unstarted(active, State.FAILED,
                                            outcome.deadline_error(record.deadline))
                log.warning("task %s: deadline passed while queued", record.id)
                return
            if active.record.stop is not None or active.record.state in FINAL:
                return
            await manager.request_stop(active, {"reason": "deadline", "at": now})
        log.warning("task %s: deadline passed; stopping it", record.id)
        manager.supervisor.deliver_stop(active)
