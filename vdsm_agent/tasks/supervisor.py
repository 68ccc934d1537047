"""Task processes: start the queued tasks, watch their processes, stop them, see them end.

* **Scheduling**: queued tasks start in submission order while a run slot
  is free (``max_running_tasks``) and the state disk has room (checked every
  ``SPACE_CHECK_INTERVAL``; a full disk holds the queue until it has room).
* **Launch**: the task's spec and the room for its outcome are written, the
  task becomes ``initializing``, and its process is forked by the zygote (or
  spawned when there is none); its PID and start time are stored so that a
  restarted agent re-attaches.
* **Watching**: a pidfd per process, read by the event loop: its exit is
  seen at once, whoever reaps it.
* **Stopping**: SIGTERM to the process group, SIGKILL after
  ``cancel_grace`` (a reset kills at once).
* **The end**: the process's outcome file, its exit and the stop request make
  the final record (``outcome.concluded``); when the state disk is full it is
  stored as soon as there is room (``END_RETRY_DELAYS``).

Every state change goes through the task manager (``TaskManager._commit``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.system.space import is_no_space
from vdsm_agent.tasks import files, outcome, process
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.runtime import Active, read_final, write_spec
from vdsm_agent.tasks.states import State
from vdsm_agent.tasks.zygote import ZygoteGone, ZygoteKeeper

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

SPACE_CHECK_INTERVAL = 1.0  # seconds between looks at the state directory's room
# Waits between tries to store a final state while the state disk is full: the
# first try again is at once (the failed one gave the space reserve back).
END_RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)
# Resources the manager adds itself; the child checks only the kind's own ones.
DERIVED_RESOURCES = ("connection:",)


class Supervisor:
    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.table = manager.table
        self.wake = asyncio.Event()  # the scheduler looks at the queue again
        self.zygotes = ZygoteKeeper(manager.state_dir)
        self._loop = asyncio.get_running_loop()

    # -- scheduling ------------------------------------------------------------------------

    async def scheduler_loop(self) -> None:
        table, space = self.table, self.manager.store.space
        while True:
            await self.wake.wait()
            self.wake.clear()
            # While the state directory is full, queued tasks wait (space_loop
            # wakes this loop when it has room again).
            while (table.queue and not self.manager.closing.is_set() and not space.full
                   and table.slots_used() < self.config.max_running_tasks):
                active = table.active.get(table.queue.popleft())
                if active is None or active.record.state is not State.ACCEPTED:
                    continue
                try:
                    await self.launch(active)
                except errors.StorageFull:
                    if active.record.state is State.ACCEPTED:
                        table.queue.appendleft(active.id)  # first in line again

    async def space_loop(self) -> None:
        """Look at the state directory's room every second: the store and the
        tasks' writes say when it is full, this says when it has room again
        (then the queued tasks start), or that it is about to be full."""
        space = self.manager.store.space
        while True:
            await asyncio.sleep(SPACE_CHECK_INTERVAL)
            was_full = space.full
            if not await asyncio.to_thread(space.check) and was_full:
                self.wake.set()

    # -- launch ----------------------------------------------------------------------------

    async def launch(self, active: Active) -> None:
        manager = self.manager
        async with active.lock:
            record = active.record
            if record.state is not State.ACCEPTED:
                return
            if record.deadline is not None and record.deadline <= clock.now():
                await manager.end_unstarted(active, State.FAILED,
                                            outcome.deadline_error(record.deadline))
                return
            try:
                await asyncio.to_thread(self._write_spec, active.task_files, self._spec(record))
            except OSError as exc:
                await manager.end_unstarted(active, State.FAILED, errors.Failure.SPAWN_FAILED.error(
                    f"cannot write the task spec: {exc}"))
                return
            await manager.move(active, State.INITIALIZING, started_at=clock.now())
            try:
                identity, pidfd, forked = await self._start_process(active)
            except OSError as exc:
                await manager.end_unstarted(active, State.FAILED, errors.Failure.SPAWN_FAILED.error(
                    f"cannot start the task process: {exc}"))
                return
            await manager.record_identity(active, identity)
            active.zygote_child = forked
            self.watch(active, pidfd, own_child=True)
        log.info("task %s: started pid %s", record.id, identity.pid)

    def _spec(self, record: TaskRecord) -> dict[str, Any]:
        env = self.manager.env
        return {
            "taskID": record.id,
            "kind": record.kind,
            "params": record.params,
            # The kind's own resources (the child re-checks them); the derived
            # ones are held by this manager only.
            "resources": [r for r in record.resources if not r.startswith(DERIVED_RESOURCES)],
            "derivedResources": [r for r in record.resources if r.startswith(DERIVED_RESOURCES)],
            "allowedRoots": list(env.allowed_roots),
            "ioRateLimit": env.io_rate_limit,
            "nice": self.config.task_nice,
            "ioniceClass": self.config.task_ionice_class,
            "heartbeatInterval": self.config.heartbeat_interval,
            "outputMaxBytes": self.config.output_max_bytes,
        }

    def _write_spec(self, task_files: files.TaskFiles, spec: dict[str, Any]) -> None:
        """Blocking: the task's directory, spec and outcome room (StorageFull when
        the state disk has no room for them: the task stays queued)."""
        try:
            write_spec(task_files, spec)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self.manager.store.space.note_full(f"a task's spec: {exc}")
            raise errors.StorageFull(f"cannot write {task_files.spec}: {exc}",
                                     stateDir=str(self.manager.state_dir)) from exc

    async def _start_process(self, active: Active) -> tuple[process.Identity, int, bool]:
        """Fork the task process from the zygote, or spawn it: its identity, a
        pidfd, and whether the zygote forked it."""
        zygote = await self.zygotes.ready()
        if zygote is not None:
            try:
                pid, create_time, pidfd = await zygote.spawn(active.task_files.dir)
            except ZygoteGone:
                pass  # it said why in the log; spawn this one and the next
            else:
                return process.Identity(pid, create_time), pidfd, True
        identity, pidfd = await asyncio.to_thread(process.spawn, active.task_files)
        return identity, pidfd, False

    # -- watching and stopping ---------------------------------------------------------------

    def watch(self, active: Active, pidfd: int, own_child: bool) -> None:
        active.pidfd = pidfd
        active.own_child = own_child
        self.table.launched_now(active)
        active.last_beat = time.monotonic()
        self._loop.add_reader(pidfd, self._on_exit, active)

    def unwatch(self, active: Active) -> None:
        if active.kill_timer is not None:
            active.kill_timer.cancel()
            active.kill_timer = None
        if active.pidfd is not None:
            self._loop.remove_reader(active.pidfd)
            os.close(active.pidfd)
            active.pidfd = None

    def _on_exit(self, active: Active) -> None:
        """The pidfd became readable: the task process has exited."""
        if active.pidfd is not None:
            self._loop.remove_reader(active.pidfd)
        self.manager.background.start(self.finalize(active))

    def deliver_stop(self, active: Active) -> bool:
        """Signal the process for the pending stop request; whether a signal was sent."""
        stop = active.record.stop
        if stop is None or active.pidfd is None:
            return False  # nothing to do yet: launch delivers after spawning
        pid = active.record.pid
        assert pid is not None
        if stop["reason"] == "reset":
            return process.signal_group(pid, active.pidfd, signal.SIGKILL)
        sent = process.signal_group(pid, active.pidfd, signal.SIGTERM)
        if active.kill_timer is None:
            grace_left = stop["at"] + self.config.cancel_grace - clock.now()
            active.kill_timer = self._loop.call_later(max(grace_left, 0.0), self._kill, active)
        return sent

    def _kill(self, active: Active) -> None:
        active.kill_timer = None
        pid = active.record.pid
        if active.pidfd is not None and pid is not None and process.signal_group(
                pid, active.pidfd, signal.SIGKILL):
            log.warning("task %s: pid %s still running %ss after SIGTERM; sent SIGKILL",
                        active.id, pid, self.config.cancel_grace)

    # -- the end of a process ----------------------------------------------------------------

    async def finalize(self, active: Active) -> None:
        """The process is gone: apply its recorded outcome (or say why there is none)."""
        if active.finalizing:
            return
        active.finalizing = True
        exit_status = await self._release_process(active)
        final = await asyncio.to_thread(read_final, active.task_files)
        async with active.lock:
            record = outcome.concluded(active.record, final, exit_status)
        if (record.error or {}).get("name") == errors.StorageFull.name:
            await asyncio.to_thread(self.manager.store.space.note_full,
                                    f"task {record.id} ended on it")
        if not await self.manager.record_end(active, record):
            # Not at start-up's pace: the agent serves meanwhile.
            self.manager.background.start(self._record_end_later(active, record))

    async def _record_end_later(self, active: Active, record: TaskRecord) -> None:
        """Try to store the final record again until there is room (a task must
        not stay unfinished for good because its end came while the disk was full)."""
        tries = 0
        while True:
            await asyncio.sleep(END_RETRY_DELAYS[min(tries, len(END_RETRY_DELAYS) - 1)])
            tries += 1
            if await self.manager.record_end(active, record):
                log.info("task %s: its end (%s) is recorded", record.id, record.state)
                return

    async def _release_process(self, active: Active) -> int | None:
        """Close the pidfd; for our own child, kill leftover helpers and reap it (the
        zygote does both for those it forked, and tells their status)."""
        if active.kill_timer is not None:
            active.kill_timer.cancel()
            active.kill_timer = None
        pidfd, active.pidfd = active.pidfd, None
        if pidfd is None:
            return None
        if active.zygote_child:
            os.close(pidfd)
            pid = active.record.pid
            return await self.zygotes.exit_status(pid) if pid is not None else None
        try:
            if active.own_child and active.record.pid is not None:
                process.kill_stragglers(active.record.pid)
                return process.reap(pidfd)
            return None
        finally:
            os.close(pidfd)
