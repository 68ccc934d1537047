"""The task manager: the verbs' front, and the one place a task's state changes.

All of it runs on the agent's event loop and never blocks it: sqlite goes
through ``Store.run`` (the one DB thread), file reads and process spawning go
to worker threads, and a task process's exit is learnt from a pidfd watched by
the loop. Each task runs in its own child process (``tasks.child``) that
records its own outcome, so the agent may restart at any time.

``TaskManager`` is a thin front over parts that each do one job:

* ``table``: the unfinished tasks in memory (what each holds, the queue);
* ``admission``: startTask's checks, reservation, group commit and retries;
* ``supervisor``: scheduling, launching, watching, stopping and ending
  task processes;
* ``monitor``: heartbeats, progress, output growth, deadlines;
* ``reset``, ``reconcile`` (start-up), ``retention``, ``listing`` (listTasks
  pages) and ``reading`` (task output).

Rules that hold everywhere:

* a state change is persisted before anything reports it (``_commit``, the
  one function that moves a task; the parts move tasks only through the
  methods of the "state changes" section below, which all go through it);
* the legal moves are those of ``states`` (the one transition table);
* a task's resources are held from acceptance until it is final;
* a task becomes final only once its process is gone.
"""

# Longer than 400 lines: the verbs' one front and the one place a task's state changes
# (_commit and the moves that go through it); every part it fronts is its own module.

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from vdsm_agent import __version__, errors
from vdsm_agent.common import clock
from vdsm_agent.common.changes import ChangeCounter
from vdsm_agent.common.supervision import Background
from vdsm_agent.settings import Config
from vdsm_agent.store import Store
from vdsm_agent.tasks import files, listing, process, reading, repository, states
from vdsm_agent.tasks.admission import Admission
from vdsm_agent.tasks.gluster_discovery import GlusterDiscovery
from vdsm_agent.tasks.kinds import KindEnv, TaskKind, enabled
from vdsm_agent.tasks.monitor import Monitor
from vdsm_agent.tasks.reconcile import reconcile
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.reset import reset
from vdsm_agent.tasks.retention import Retention
from vdsm_agent.tasks.runtime import Active, completed_progress
from vdsm_agent.tasks.states import FINAL, State
from vdsm_agent.tasks.supervisor import Supervisor
from vdsm_agent.tasks.table import TaskTable

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a loop that failed (a bug) starts again

Listener = Callable[[dict[str, Any]], None]
# Resolved paths a task uses -> more resources it must hold (the connections the
# paths are on: ``ConnectionManager.resources_for_paths``).
ResourceResolver = Callable[[list[str]], Awaitable[list[str]]]


def _canonical_id(task_id: str) -> str:
    try:
        return files.canonical_task_id(task_id)
    except ValueError:
        raise errors.TaskNotFound(f"no task {task_id!r}", taskID=task_id) from None


class TaskManager:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.state_dir = config.state_path
        self.kinds: dict[str, type[TaskKind]] = enabled(config.enable_test_kinds)
        self.env = KindEnv(tuple(config.allowed_roots), config.task_io_rate_limit)
        self.table = TaskTable(self.state_dir)
        self.background = Background("task manager", log)
        self.closing = asyncio.Event()
        # Set by the app once connections are managed (server/app.py); None: no
        # connection resources are added.
        self.resource_resolver: ResourceResolver | None = None
        self._listeners: list[Listener] = []
        self._progress_listeners: list[Listener] = []
        # listTasks' change token: bumped after every change a listing shows (the
        # store's rows, and the in-memory records of unfinished tasks).
        self.changes = ChangeCounter()
        self.admission = Admission(self)
        self.supervisor = Supervisor(self)
        self.monitor = Monitor(self)
        self.retention = Retention(self)

    # -- life cycle ------------------------------------------------------------------

    @classmethod
    async def start(cls, config: Config, store: Store) -> TaskManager:
        """Reconcile the unfinished tasks of the store, then start serving them."""
        manager = cls(config, store)
        if config.stale_after <= config.heartbeat_interval:
            log.warning("stale_after (%ss) should be well above heartbeat_interval (%ss)",
                        config.stale_after, config.heartbeat_interval)
        await asyncio.to_thread(files.tasks_root(manager.state_dir).mkdir,
                                mode=0o750, parents=True, exist_ok=True)
        await reconcile(manager)
        if config.task_zygote:
            manager.supervisor.zygotes.start()
        background, supervisor = manager.background, manager.supervisor
        background.loop(manager.monitor.loop, "monitor", RESTART_DELAY)
        background.loop(supervisor.scheduler_loop, "scheduler", RESTART_DELAY)
        background.loop(manager.retention.loop, "retention", RESTART_DELAY)
        background.loop(supervisor.space_loop, "disk room", RESTART_DELAY)
        background.loop(GlusterDiscovery(manager).loop, "gluster discovery", RESTART_DELAY)
        supervisor.wake.set()
        manager.retention.wake.set()
        return manager

    def begin_shutdown(self) -> None:
        """Stop long-polls and output streams so the server can stop promptly."""
        self.closing.set()
        for active in self.table.active.values():
            active.output_pulse.fire()

    async def close(self) -> None:
        """Stop watching. Task processes keep running; the next agent re-attaches."""
        self.begin_shutdown()
        await self.background.close()
        for active in self.table.active.values():
            self.supervisor.unwatch(active)
        await self.supervisor.zygotes.close()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener({taskID, kind, from, to, at, progress})`` after each persisted
        transition."""
        self._listeners.append(listener)

    def add_progress_listener(self, listener: Listener) -> None:
        """Call ``listener({taskID, kind, state, progress, at})`` when the monitor sees a
        task's progress change (not throttled: at most once per monitor round)."""
        self._progress_listeners.append(listener)

    async def holder_of(self, resource: str) -> str | None:
        """The unfinished task holding ``resource`` (accepted ones included), or None."""
        return self.table.holders.get(resource)

    def kind_names(self) -> list[str]:
        return sorted(self.kinds)

    def kinds_info(self) -> list[dict[str, Any]]:
        return [self.kinds[name].describe() for name in sorted(self.kinds)]

    # -- verbs -------------------------------------------------------------------------

    async def submit(self, kind_name: str, params: dict[str, Any], task_id: str | None = None,
                     deadline: str | None = None) -> dict[str, Any]:
        return await self.admission.submit(kind_name, params, task_id, deadline)

    async def get(self, task_id: str) -> dict[str, Any]:
        return (await self.record(_canonical_id(task_id))).to_api()

    async def list_tasks(self, where: dict[str, Any] | None, page_size: int,
                         page_token: str | None,
                         changed_since: str | None = None) -> dict[str, Any]:
        return await listing.list_page(self.store, self.table.active, where, page_size,
                                       page_token, self.changes, changed_since)

    async def read_output(self, task_id: str, offset: int, max_bytes: int,
                          encoding: str) -> dict[str, Any]:
        return await reading.read(self, _canonical_id(task_id), offset, max_bytes, encoding)

    def stream_output(self, task_id: str, offset: int, follow: bool) -> AsyncIterator[bytes]:
        """Output bytes from ``offset``; with ``follow``, until the task is final."""
        return reading.stream(self, task_id, offset, follow)

    async def exists(self, task_id: str) -> bool:
        try:
            await self.record(_canonical_id(task_id))
        except errors.TaskNotFound:
            return False
        return True

    async def cancel(self, task_id: str) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self.table.active.get(task_id)
        if active is None:
            record = await self.record(task_id)
            raise errors.TaskNotActive(f"task {task_id} is already {record.state}",
                                       taskID=task_id, state=str(record.state))
        async with active.lock:
            if active.record.state in FINAL:
                raise errors.TaskNotActive(f"task {task_id} is already {active.record.state}",
                                           taskID=task_id, state=str(active.record.state))
            self.check_end_recorded(active)
            if active.record.state is State.ACCEPTED:
                await self.end_unstarted(active, State.CANCELED, error=errors.Failure.CANCELED
                                         .error("canceled before it started"))
            elif not active.finalizing and active.record.stop is None:
                await self.request_stop(active, {"reason": "cancel", "at": clock.now()})
            else:
                log.info("task %s: cancel again: already stopping", task_id)
                return active.record.to_api()
        log.info("task %s: cancel requested", task_id)
        self.supervisor.deliver_stop(active)
        return active.record.to_api()

    async def delete(self, task_id: str) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self.table.active.get(task_id)
        if active is not None:
            raise errors.TaskActive(f"task {task_id} is {active.record.state}; cancel it first",
                                    taskID=task_id, state=str(active.record.state))
        if not await self.store.run(repository.delete, task_id):
            raise errors.TaskNotFound(f"no task {task_id}", taskID=task_id)
        self.changes.bump()
        await asyncio.to_thread(shutil.rmtree, self.task_files(task_id).dir, True)
        log.info("task %s: deleted", task_id)
        return {"taskID": task_id, "deleted": True}

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self.table.active.get(task_id)
        if active is not None:
            # One event per task, set on the final transition: any number of
            # waiters cost nothing while they wait.
            finished = asyncio.ensure_future(active.finished.wait())
            closing = asyncio.ensure_future(self.closing.wait())
            try:
                await asyncio.wait({finished, closing}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
                closing.cancel()
        return await self.get(task_id)

    async def reset(self, task_id: str, state_name: str, reason: str) -> dict[str, Any]:
        return await reset(self, _canonical_id(task_id), state_name, reason)

    async def sweep(self) -> int:
        """Delete final tasks past retention or over the count cap; how many."""
        return await self.retention.sweep()

    # -- state changes: every move of a task goes through _commit ----------------------------

    async def _commit(self, active: Active, record: TaskRecord, reset: bool = False) -> None:
        """Persist ``record`` (with its new state), then make it the truth in memory.

        Call with ``active.lock`` held. Final states are written with a full sync.
        """
        old = active.record
        if reset:
            states.check_reset(old.state, record.state)
        elif record.state is not old.state:
            states.check_transition(old.state, record.state)
        durable = record.state in FINAL
        if not await self.store.run(repository.update, old.id, old.state, record, durable):
            raise RuntimeError(f"task {old.id}: stored state is no longer {old.state}")
        active.record = record
        self.changes.bump()
        if record.state is not old.state:
            self.table.moved(old.state, record.state)
            log.info("task %s: %s -> %s", old.id, old.state, record.state)
            self._emit(old.state, record)

    async def move(self, active: Active, target: State, **changes: Any) -> None:
        """A life-cycle move decided by a part (lock held), e.g. to initializing."""
        await self._commit(active, dataclasses.replace(active.record, state=target, **changes))

    async def observed(self, active: Active, target: State) -> None:
        """A non-final life-cycle move the monitor observed (e.g. running -> stale);
        while the state disk is full it is seen again, and tried again, next round."""
        async with active.lock:
            if active.finalizing or not states.allowed(active.record.state, target):
                return
            try:
                await self.move(active, target)
            except errors.StorageFull:
                log.debug("task %s: cannot record %s yet: the state directory is full",
                          active.id, target)

    async def request_stop(self, active: Active, stop: dict[str, Any]) -> None:
        """Record a stop request (cancel, deadline, reset) before acting on it."""
        await self._commit(active, dataclasses.replace(active.record, stop=stop))

    async def end_unstarted(self, active: Active, target: State,
                            error: dict[str, Any] | None = None, result: Any = None,
                            reset_entry: dict[str, Any] | None = None) -> None:
        """End a task that has no process (accepted, or failed to spawn). Lock held."""
        record = active.record
        resets = (*record.resets, reset_entry) if reset_entry else record.resets
        progress = completed_progress(record.progress) if target is State.DONE else record.progress
        await self._commit(active, dataclasses.replace(
            record, state=target, ended_at=clock.now(), error=error, result=result,
            resets=resets, progress=progress), reset=reset_entry is not None)
        self._retire(active)

    async def record_identity(self, active: Active, identity: process.Identity) -> None:
        """Store the task's process (PID + start time) so that a restarted agent can
        re-attach. Lock held. Without room for it, follow the process all the
        same: the PID is stored with the task's next change, and a restart
        before that finds the process by its status file or command line; the
        state is unchanged, so this is no transition."""
        record = dataclasses.replace(active.record, pid=identity.pid,
                                     pid_create_time=identity.create_time,
                                     launched_by=__version__)
        try:
            await self._commit(active, record)
        except errors.StorageFull:
            log.warning("task %s: cannot store its pid %s yet: the state directory is full",
                        active.id, identity.pid)
            active.record = record
            self.changes.bump()

    async def record_end(self, active: Active, record: TaskRecord) -> bool:
        """Store a task's final record and let it go; False if the state
        directory has no room for it (``active.unrecorded`` then holds it)."""
        async with active.lock:
            try:
                await self._commit(active, record, reset=record.stop is not None
                                   and record.stop.get("reason") == "reset")
            except errors.StorageFull:
                if active.unrecorded is None:
                    log.error("task %s: ended (%s) but the state directory is full: its end "
                              "is recorded as soon as there is room", record.id, record.state)
                active.unrecorded = record
                return False
            active.unrecorded = None
            self._retire(active)
            return True

    def accepted(self, record: TaskRecord) -> None:
        """A new task is committed and adopted: tell the listeners, and the scheduler
        when a slot is free (else the next free slot wakes it: _retire)."""
        self.changes.bump()
        self._emit(None, record)
        if self.table.slots_used() < self.config.max_running_tasks:
            self.supervisor.wake.set()

    def _retire(self, active: Active) -> None:
        """Forget a task that became final: free its resources and wake whoever waits."""
        self.supervisor.unwatch(active)
        self.table.forget(active)
        active.finished.set()
        active.output_pulse.fire()
        self.supervisor.wake.set()
        self.retention.wake.set()

    def _emit(self, previous: State | None, record: TaskRecord) -> None:
        event = {"taskID": record.id, "kind": record.kind,
                 "from": str(previous) if previous else None, "to": str(record.state),
                 "at": clock.rfc3339(clock.now()), "progress": dict(record.progress),
                 # Wall-clock seconds, for the task duration metric (metrics/agent.py).
                 "startedAt": record.started_at, "endedAt": record.ended_at}
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("task event listener failed")

    def emit_progress(self, record: TaskRecord) -> None:
        event = {"taskID": record.id, "kind": record.kind, "state": str(record.state),
                 "progress": dict(record.progress), "at": clock.rfc3339(clock.now())}
        for listener in self._progress_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("task progress listener failed")

    # -- checks and look-ups the parts share -------------------------------------------------

    def check_room(self) -> None:
        """StorageFull while the state directory is full: a new task would fail at
        its first write (and queued ones wait for room)."""
        if self.store.space.full:
            raise errors.StorageFull(
                f"the state directory {self.state_dir} is full: no new task until it has "
                "room again", stateDir=str(self.state_dir))

    def check_end_recorded(self, active: Active) -> None:
        """StorageFull for a task whose process has ended but whose end cannot be
        stored yet: nothing can be done to it until it is (it will be as soon as
        the state directory has room)."""
        unrecorded = active.unrecorded
        if unrecorded is not None:
            raise errors.StorageFull(
                f"task {active.id} has ended ({unrecorded.state}) but the state directory "
                f"{self.state_dir} is full: its end is recorded as soon as there is room",
                stateDir=str(self.state_dir), taskID=active.id, ended=str(unrecorded.state))

    def task_files(self, task_id: str) -> files.TaskFiles:
        return files.task_files(self.state_dir, task_id)

    async def record(self, task_id: str) -> TaskRecord:
        """The task's record: in memory while unfinished, else from the store."""
        active = self.table.active.get(task_id)
        if active is not None:
            return active.record
        record = await self.store.run(repository.get, task_id)
        if record is None:
            raise errors.TaskNotFound(f"no task {task_id}", taskID=task_id)
        return record
