"""The task manager: submit, queue, run, watch, stop, finish, retain.

All of it runs on the agent's event loop and never blocks it: sqlite goes
through ``Store.run`` (the one DB thread), file reads and process spawning go
to worker threads, and a task process's exit is learnt from a pidfd watched by
the loop. Each task runs in its own child process (``tasks.child``) that
records its own outcome, so the agent may restart at any time; at start-up it
reconciles every unfinished task (``_reconcile``).

Rules that hold everywhere:

* a state change is persisted before anything reports it (``_commit``);
* the legal moves are those of ``states`` (the one transition table);
* a task's resources are held from acceptance until it is final;
* a task becomes final only once its process is gone.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import orjson

from vdsm_agent import errors
from vdsm_agent.security import redact
from vdsm_agent.settings import Config
from vdsm_agent.store import Store
from vdsm_agent.system.space import is_no_space
from vdsm_agent.tasks import clock, files, output, process, repository, states
from vdsm_agent.tasks.kinds import KINDS, KindEnv, TaskKind, enabled
from vdsm_agent.tasks.record import TaskRecord, request_hash
from vdsm_agent.tasks.runtime import (
    Active,
    BatchInserter,
    FinalFiles,
    Snapshot,
    completed_progress,
    merge_progress,
    read_final,
    read_snapshots,
    wait_event,
    write_spec,
)
from vdsm_agent.tasks.states import FINAL, RUNNING_SLOT, State
from vdsm_agent.tasks.zygote import ZygoteGone, ZygoteKeeper

log = logging.getLogger(__name__)

MAX_OUTPUT_READ = 1024 * 1024  # getTaskOutput.maxBytes cap (also in the schema)
# Output stream read size: 1 MiB (the getTaskOutput cap) streams about 3x as fast as
# 64 KiB did (fewer worker-thread round trips; benchmarks/bench_tasks.py "output").
STREAM_CHUNK = MAX_OUTPUT_READ
RESET_KILL_WAIT = 10.0  # seconds to wait for a SIGKILLed process before giving up
RETENTION_GAP = 1.0  # at most one retention sweep per second, however busy
SPACE_CHECK_INTERVAL = 1.0  # seconds between looks at the state directory's room
# Waits between tries to store a final state while the state disk is full: the
# first try again is at once (the failed one gave the space reserve back).
END_RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)

Listener = Callable[[dict[str, Any]], None]
# Resolved paths a task uses -> more resources it must hold (the connections the
# paths are on: ``ConnectionManager.resources_for_paths``).
ResourceResolver = Callable[[list[str]], Awaitable[list[str]]]
# Resources a kind declares that name a path (the resolver maps their paths).
PATH_RESOURCES = ("file:", "device:")
# Resources the manager adds itself; the child checks only the kind's own ones.
DERIVED_RESOURCES = ("connection:",)


def _deadline_error(deadline: float | None) -> dict[str, Any]:
    return {"name": "DeadlineExceeded",
            "detail": f"the deadline {clock.rfc3339(deadline)} passed before the task ended"}


def _canonical_id(task_id: str) -> str:
    try:
        return files.canonical_task_id(task_id)
    except ValueError:
        raise errors.TaskNotFound(f"no task {task_id!r}", taskID=task_id) from None


def _submitted_id(task_id: str | None) -> str:
    if task_id is None:
        return str(uuid.uuid4())
    try:
        return files.canonical_task_id(task_id)
    except ValueError:
        raise errors.InvalidParams("taskID must be a UUID", field="params.taskID",
                                   rule="format") from None


def _not_found(task_id: str) -> errors.TaskNotFound:
    return errors.TaskNotFound(f"no task {task_id}", taskID=task_id)


class TaskManager:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.state_dir = config.state_path
        self.kinds: dict[str, type[TaskKind]] = enabled(config.enable_test_kinds)
        self.env = KindEnv(tuple(config.allowed_roots), int(config.task_io_rate_limit))
        self._loop = asyncio.get_running_loop()
        self._active: dict[str, Active] = {}
        # Subsets of _active the monitor looks at, so that its rounds cost what
        # runs, not what is queued: tasks with a process watched at some point,
        # and tasks with a deadline.
        self._launched: dict[str, Active] = {}
        self._with_deadline: dict[str, Active] = {}
        self._queue: collections.deque[str] = collections.deque()  # accepted, FIFO
        self._holders: dict[str, str] = {}  # resource -> unfinished task holding it
        self._counts: collections.Counter[State] = collections.Counter()  # of self._active
        # Submits accepted in memory whose row is being committed (group commit).
        self._pending: dict[str, tuple[TaskRecord, asyncio.Event]] = {}
        self._inserter = BatchInserter(self._insert_batch, self._on_written,
                                       self._on_insert_failed)
        self._wake_scheduler = asyncio.Event()
        self._wake_retention = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._listeners: list[Listener] = []
        self._progress_listeners: list[Listener] = []
        # Set by the app once connections are managed (server/app.py); None: no
        # connection resources are added.
        self.resource_resolver: ResourceResolver | None = None
        self.closing = asyncio.Event()
        self._zygotes = ZygoteKeeper(self.state_dir)

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
        await manager._reconcile()
        if config.task_zygote:
            manager._zygotes.start()
        manager._loops = [
            asyncio.create_task(manager._guard(manager._monitor_loop), name="tasks-monitor"),
            asyncio.create_task(manager._guard(manager._scheduler_loop), name="tasks-scheduler"),
            asyncio.create_task(manager._guard(manager._retention_loop), name="tasks-retention"),
            asyncio.create_task(manager._guard(manager._space_loop), name="tasks-space"),
        ]
        manager._wake_scheduler.set()
        manager._wake_retention.set()
        return manager

    def begin_shutdown(self) -> None:
        """Stop long-polls and output streams so the server can stop promptly."""
        self.closing.set()
        for active in self._active.values():
            active.output_pulse.fire()

    async def close(self) -> None:
        """Stop watching. Task processes keep running; the next agent re-attaches."""
        self.begin_shutdown()
        pending = [*self._loops, *self._background]
        for job in pending:
            job.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for active in self._active.values():
            self._unwatch(active)
        await self._zygotes.close()

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
        return self._holders.get(resource)

    def kind_names(self) -> list[str]:
        return sorted(self.kinds)

    def kinds_info(self) -> list[dict[str, Any]]:
        return [self.kinds[name].describe() for name in sorted(self.kinds)]

    # -- verbs -------------------------------------------------------------------------

    async def submit(self, kind_name: str, params: dict[str, Any], task_id: str | None = None,
                     deadline: str | None = None) -> dict[str, Any]:
        kind = self.kinds.get(kind_name)
        if kind is None:
            raise errors.UnknownTaskKind(f"no task kind {kind_name!r}", kind=kind_name,
                                         known=sorted(self.kinds))
        checked = kind.check_params(params)
        deadline_at = self._parse_deadline(deadline)
        task_id = _submitted_id(task_id)
        digest = request_hash(kind_name, checked, deadline_at)
        if task_id in self._active or task_id in self._pending:
            return await self._twin(task_id, digest)
        # A new ID is the common case, so the store is not asked up front whether
        # the ID is known: the group commit finds out in the same transaction
        # (``repository.insert_new``). Only a submit that fails its checks asks
        # first, so that a retry is answered as the first attempt was even when
        # the checks would now fail (a copy's destination exists: the first
        # attempt made it).
        try:
            if deadline_at is not None and deadline_at <= clock.now():
                raise errors.InvalidParams("the deadline has already passed",
                                           field="params.deadline", rule="future")
            self._check_room()
            resources = await self._with_derived(await self._validate(kind, checked))
            # From here to the reservation nothing awaits, so the checks and the
            # reservation are atomic on the event loop (no lock needed). Only this
            # process creates tasks, so memory is enough to see a concurrent twin.
            if task_id in self._active or task_id in self._pending:
                return await self._twin(task_id, digest)
            self._check_resources(resources)
            self._check_queue()
        except errors.RpcError:
            known = await self._existing(task_id, digest)
            if known is not None:
                return known
            raise
        record = TaskRecord(id=task_id, kind=kind_name, params=checked, request_hash=digest,
                            state=State.ACCEPTED, created_at=clock.now(),
                            deadline=deadline_at, resources=tuple(resources))
        self._reserve(record)
        # The inserter follows the commit up (_on_written) whether or not this
        # caller still waits: no row without a manager.
        answer: dict[str, Any] = await self._inserter.insert(record)
        return answer

    def _on_written(self, record: TaskRecord, stored: TaskRecord | None) -> dict[str, Any]:
        """A reserved new task's batch is committed: adopt and schedule it (its answer)."""
        committed = self._pending[record.id][1]
        try:
            if stored is not None:
                # The ID was stored already: a retry of a task that ended and left
                # memory, or an ID taken by another request.
                self._release_reservation(record)
                return self._known_answer(stored, record.request_hash)
            del self._pending[record.id]
            self._adopt(record, reserved=True)
        finally:
            committed.set()
        if log.isEnabledFor(logging.DEBUG):  # the audit log has the call at INFO
            log.debug("task %s: accepted %s params=%s", record.id, record.kind,
                      orjson.dumps(redact.value(record.params)).decode())
        self._emit(None, record)
        if self._slots_used() < self.config.max_running_tasks:
            self._wake_scheduler.set()  # else the next free slot wakes it (_retire)
        return {"taskID": record.id, "state": str(State.ACCEPTED)}

    def _on_insert_failed(self, record: TaskRecord, error: BaseException) -> None:
        committed = self._pending[record.id][1]
        self._release_reservation(record)
        committed.set()

    async def get(self, task_id: str) -> dict[str, Any]:
        return (await self._record(_canonical_id(task_id))).to_api()

    async def list_tasks(self, where: dict[str, Any] | None, page_size: int,
                         page_token: str | None) -> dict[str, Any]:
        query = _parse_filter(where or {})
        fingerprint = _filter_fingerprint(query)
        after = _decode_token(page_token, fingerprint) if page_token else None
        rows = await self.store.run(repository.list_page, query, after, page_size + 1)
        page = rows[:page_size]
        tasks = [self._active[row.id].record if row.id in self._active else row for row in page]
        token = None
        if len(rows) > page_size:
            last = page[-1]
            token = _encode_token(last.created_at, last.id, fingerprint)
        return {"tasks": [task.to_api() for task in tasks], "nextPageToken": token}

    async def read_output(self, task_id: str, offset: int, max_bytes: int,
                          encoding: str) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        # The state is taken before reading: a task final by then has all its
        # output on disk, so "eof" can never hide bytes written later.
        record = await self._record(task_id)
        final = record.state in FINAL
        chunk = await asyncio.to_thread(output.read, self._files(task_id).output, offset,
                                        min(max_bytes, MAX_OUTPUT_READ))
        eof = final and chunk.next_offset >= chunk.end
        data = chunk.data
        if encoding == "base64":
            text = base64.b64encode(data).decode()
        else:
            data = data if eof else _utf8_whole(data)
            text = data.decode("utf-8", "replace")
        return {"data": text, "encoding": encoding, "offset": chunk.offset,
                "nextOffset": chunk.offset + len(data), "eof": eof,
                "truncatedBefore": chunk.truncated_before, "size": chunk.end}

    async def stream_output(self, task_id: str, offset: int, follow: bool) -> AsyncIterator[bytes]:
        """Output bytes from ``offset``; with ``follow``, until the task is final."""
        directory = self._files(task_id).output
        while True:
            active = self._active.get(task_id)
            # Take the pulse before reading so a write in between still wakes us.
            pulse = active.output_pulse.current() if active else None
            chunk = await asyncio.to_thread(output.read, directory, offset, STREAM_CHUNK)
            if not chunk.data and (await self._record(task_id)).state in FINAL:
                # Final: every byte is on disk now; one more read gets the last ones.
                chunk = await asyncio.to_thread(output.read, directory, offset, STREAM_CHUNK)
                if not chunk.data:
                    return
            if chunk.data:
                offset = chunk.next_offset
                yield chunk.data
                continue
            if not follow or self.closing.is_set() or pulse is None:
                return
            await wait_event(pulse, 1.0)

    async def exists(self, task_id: str) -> bool:
        try:
            await self._record(_canonical_id(task_id))
        except errors.TaskNotFound:
            return False
        return True

    async def cancel(self, task_id: str) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self._active.get(task_id)
        if active is None:
            record = await self._record(task_id)
            raise errors.TaskNotActive(f"task {task_id} is already {record.state}",
                                       taskID=task_id, state=str(record.state))
        async with active.lock:
            if active.record.state in FINAL:
                raise errors.TaskNotActive(f"task {task_id} is already {active.record.state}",
                                           taskID=task_id, state=str(active.record.state))
            self._check_end_recorded(active)
            if active.record.state is State.ACCEPTED:
                await self._finish_unstarted(active, State.CANCELED, error={
                    "name": "Canceled", "detail": "canceled before it started"})
            elif not active.finalizing and active.record.stop is None:
                await self._set_stop(active, {"reason": "cancel", "at": clock.now()})
            else:
                log.info("task %s: cancel again: already stopping", task_id)
                return active.record.to_api()
        log.info("task %s: cancel requested", task_id)
        self._deliver_stop(active)
        return active.record.to_api()

    async def delete(self, task_id: str) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self._active.get(task_id)
        if active is not None:
            raise errors.TaskActive(f"task {task_id} is {active.record.state}; cancel it first",
                                    taskID=task_id, state=str(active.record.state))
        if not await self.store.run(repository.delete, task_id):
            raise _not_found(task_id)
        await asyncio.to_thread(shutil.rmtree, self._files(task_id).dir, True)
        log.info("task %s: deleted", task_id)
        return {"taskID": task_id, "deleted": True}

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        task_id = _canonical_id(task_id)
        active = self._active.get(task_id)
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
        task_id = _canonical_id(task_id)
        record = await self._record(task_id)
        target = states.parse(state_name)
        active = self._active.get(task_id)
        if target is None or active is None or target not in states.RESET_TRANSITIONS[record.state]:
            raise errors.InvalidStateTransition(
                f"cannot reset a task in state {record.state} to {state_name}",
                taskID=task_id, state=str(record.state), requested=state_name,
                allowed=sorted(states.RESET_TRANSITIONS[record.state]))
        self._check_end_recorded(active)
        result = await self._verify_for_reset(record, target)
        entry = {"at": clock.now(), "from": str(record.state), "to": str(target),
                 "reason": reason, "killedPid": None}
        killed = await self._apply_reset(active, target, result, entry)
        final = await self._record(task_id)
        log.warning("task %s: state reset %s -> %s by request, reason: %s%s", task_id,
                    entry["from"], final.state, reason,
                    f" (killed pid {record.pid})" if killed else "")
        return {"task": final.to_api(), "killed": killed,
                "killedPid": final.resets[-1].get("killedPid") if final.resets else None}

    # -- submit helpers ------------------------------------------------------------------

    def _parse_deadline(self, deadline: str | None) -> float | None:
        if deadline is None:
            return None
        try:
            return clock.parse_rfc3339(deadline)
        except ValueError as exc:
            raise errors.InvalidParams(f"deadline: {exc}", field="params.deadline",
                                       rule="format") from None

    async def _insert_batch(self, records: list[TaskRecord]) -> dict[str, TaskRecord]:
        return await self.store.run(repository.insert_new, records)

    def _reserve(self, record: TaskRecord) -> None:
        """Hold a new task's resources and queue place while its row is committed."""
        self._pending[record.id] = (record, asyncio.Event())
        self._counts[State.ACCEPTED] += 1
        for resource in record.resources:
            self._holders[resource] = record.id

    def _release_reservation(self, record: TaskRecord) -> None:
        self._pending.pop(record.id, None)
        self._counts[State.ACCEPTED] -= 1
        for resource in record.resources:
            if self._holders.get(resource) == record.id:
                del self._holders[resource]

    async def _twin(self, task_id: str, digest: str) -> dict[str, Any]:
        """The answer for a submit whose ID another submit is creating or created."""
        pending = self._pending.get(task_id)
        if pending is not None:
            if pending[0].request_hash != digest:
                raise errors.TaskIdConflict(
                    f"task {task_id} exists with a different request", taskID=task_id)
            await pending[1].wait()
        known = await self._existing(task_id, digest)
        if known is None:  # the twin's commit failed: so does this submit
            raise RuntimeError(f"task {task_id} could not be recorded")
        return known

    async def _existing(self, task_id: str, digest: str) -> dict[str, Any] | None:
        """The answer for a retried submit, None for a new ID; TaskIdConflict otherwise."""
        active = self._active.get(task_id)
        record = active.record if active else await self.store.run(repository.get, task_id)
        if record is None:
            return None
        return self._known_answer(record, digest)

    def _check_end_recorded(self, active: Active) -> None:
        """StorageFull for a task whose process has ended but whose end cannot be
        stored yet: nothing can be done to it until it is (it will be as soon as
        the state directory has room)."""
        unrecorded = active.unrecorded
        if unrecorded is not None:
            raise errors.StorageFull(
                f"task {active.id} has ended ({unrecorded.state}) but the state directory "
                f"{self.state_dir} is full: its end is recorded as soon as there is room",
                stateDir=str(self.state_dir), taskID=active.id, ended=str(unrecorded.state))

    @staticmethod
    def _known_answer(record: TaskRecord, digest: str) -> dict[str, Any]:
        if record.request_hash != digest:
            raise errors.TaskIdConflict(
                f"task {record.id} exists with a different request", taskID=record.id)
        return {"taskID": record.id, "state": str(record.state)}

    async def _validate(self, kind: type[TaskKind], params: dict[str, Any]) -> list[str]:
        """The kind's checks; the resources it will lock. Kinds that look at the
        filesystem are checked on a worker thread (a stat may hang on NFS)."""
        if kind.checks_filesystem:
            return await asyncio.to_thread(self._validate_now, kind, params)
        return self._validate_now(kind, params)

    def _validate_now(self, kind: type[TaskKind], params: dict[str, Any]) -> list[str]:
        kind.validate(params, self.env)
        return sorted(set(kind.resources(params, self.env)))

    async def _with_derived(self, resources: list[str]) -> list[str]:
        """The kind's resources plus those its paths imply (``connection:<id>``)."""
        resolver = self.resource_resolver
        paths = [resource.split(":", 1)[1] for resource in resources
                 if resource.startswith(PATH_RESOURCES)]
        if resolver is None or not paths:
            return resources
        return sorted(set(resources).union(await resolver(paths)))

    def _check_resources(self, resources: list[str]) -> None:
        for resource in resources:
            holder = self._holders.get(resource)
            if holder is not None:
                holding = self._active.get(holder)
                state = holding.record.state if holding else State.ACCEPTED
                raise errors.ResourceBusy(f"{resource} is held by task {holder} ({state})",
                                          resource=resource, holder=holder, holderState=str(state))

    def _check_room(self) -> None:
        """StorageFull while the state directory is full: a new task would fail at
        its first write (and queued ones wait for room)."""
        if self.store.space.full:
            raise errors.StorageFull(
                f"the state directory {self.state_dir} is full: no new task until it has "
                "room again", stateDir=str(self.state_dir))

    def _check_queue(self) -> None:
        queued = self._counts[State.ACCEPTED]
        free = max(self.config.max_running_tasks - self._slots_used(), 0)
        if queued + 1 > self.config.max_queued_tasks + free:
            raise errors.QueueFull(
                f"{queued} tasks are waiting (max_queued_tasks={self.config.max_queued_tasks})",
                queued=queued, limit=self.config.max_queued_tasks)

    def _adopt(self, record: TaskRecord, reserved: bool = False) -> Active:
        """Track an unfinished task in memory: its resources, its queue place."""
        active = Active(record=record, state_dir=self.state_dir)
        self._active[record.id] = active
        if not reserved:
            self._counts[record.state] += 1
        for resource in record.resources:
            self._holders[resource] = record.id
        if record.state is State.ACCEPTED:
            self._queue.append(record.id)
        if record.deadline is not None:
            self._with_deadline[record.id] = active
        return active

    # -- state changes ---------------------------------------------------------------------

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
        if record.state is not old.state:
            self._counts[old.state] -= 1
            self._counts[record.state] += 1
            log.info("task %s: %s -> %s", old.id, old.state, record.state)
            self._emit(old.state, record)

    async def _set_state(self, active: Active, target: State) -> None:
        """A non-final life-cycle move observed by the monitor (e.g. running -> stale)."""
        async with active.lock:
            if active.finalizing or not states.allowed(active.record.state, target):
                return
            try:
                await self._commit(active, dataclasses.replace(active.record, state=target))
            except errors.StorageFull:
                # Seen again at the monitor's next round, and tried again then.
                log.debug("task %s: cannot record %s yet: the state directory is full",
                          active.id, target)

    async def _set_stop(self, active: Active, stop: dict[str, Any]) -> None:
        """Record a stop request (cancel, deadline, reset) before acting on it."""
        await self._commit(active, dataclasses.replace(active.record, stop=stop))

    async def _finish_unstarted(self, active: Active, target: State,
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

    def _retire(self, active: Active) -> None:
        """Forget a task that became final: free its resources and wake whoever waits."""
        self._unwatch(active)
        if self._active.pop(active.id, None) is not None:
            self._counts[active.record.state] -= 1
        self._launched.pop(active.id, None)
        self._with_deadline.pop(active.id, None)
        for resource in active.record.resources:
            if self._holders.get(resource) == active.id:
                del self._holders[resource]
        active.finished.set()
        active.output_pulse.fire()
        self._wake_scheduler.set()
        self._wake_retention.set()

    def _emit(self, previous: State | None, record: TaskRecord) -> None:
        event = {"taskID": record.id, "kind": record.kind,
                 "from": str(previous) if previous else None, "to": str(record.state),
                 "at": clock.rfc3339(clock.now()), "progress": dict(record.progress)}
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("task event listener failed")

    def _emit_progress(self, record: TaskRecord) -> None:
        event = {"taskID": record.id, "kind": record.kind, "state": str(record.state),
                 "progress": dict(record.progress), "at": clock.rfc3339(clock.now())}
        for listener in self._progress_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("task progress listener failed")

    # -- running: launch, watch, stop -------------------------------------------------------

    def _slots_used(self) -> int:
        return sum(self._counts[state] for state in RUNNING_SLOT)

    async def _scheduler_loop(self) -> None:
        while True:
            await self._wake_scheduler.wait()
            self._wake_scheduler.clear()
            # While the state directory is full, queued tasks wait (_space_loop
            # wakes this loop when it has room again).
            while (self._queue and not self.closing.is_set() and not self.store.space.full
                   and self._slots_used() < self.config.max_running_tasks):
                active = self._active.get(self._queue.popleft())
                if active is None or active.record.state is not State.ACCEPTED:
                    continue
                try:
                    await self._launch(active)
                except errors.StorageFull:
                    if active.record.state is State.ACCEPTED:
                        self._queue.appendleft(active.id)  # first in line again

    def _spec(self, record: TaskRecord) -> dict[str, Any]:
        return {
            "taskID": record.id,
            "kind": record.kind,
            "params": record.params,
            # The kind's own resources (the child re-checks them); the derived
            # ones are held by this manager only.
            "resources": [r for r in record.resources if not r.startswith(DERIVED_RESOURCES)],
            "derivedResources": [r for r in record.resources if r.startswith(DERIVED_RESOURCES)],
            "allowedRoots": list(self.env.allowed_roots),
            "ioRateLimit": self.env.io_rate_limit,
            "nice": self.config.task_nice,
            "ioniceClass": self.config.task_ionice_class,
            "heartbeatInterval": self.config.heartbeat_interval,
            "outputMaxBytes": self.config.output_max_bytes,
        }

    async def _launch(self, active: Active) -> None:
        async with active.lock:
            record = active.record
            if record.state is not State.ACCEPTED:
                return
            if record.deadline is not None and record.deadline <= clock.now():
                await self._finish_unstarted(active, State.FAILED, _deadline_error(record.deadline))
                return
            try:
                await asyncio.to_thread(self._write_spec, active.task_files, self._spec(record))
            except OSError as exc:
                await self._finish_unstarted(active, State.FAILED, {
                    "name": "SpawnFailed", "detail": f"cannot write the task spec: {exc}"})
                return
            await self._commit(active, dataclasses.replace(
                record, state=State.INITIALIZING, started_at=clock.now()))
            try:
                identity, pidfd, forked = await self._start_process(active)
            except OSError as exc:
                await self._finish_unstarted(active, State.FAILED, {
                    "name": "SpawnFailed", "detail": f"cannot start the task process: {exc}"})
                return
            await self._record_identity(active, identity)
            active.zygote_child = forked
            self._watch(active, pidfd, own_child=True)
        log.info("task %s: started pid %s", record.id, identity.pid)

    def _write_spec(self, task_files: files.TaskFiles, spec: dict[str, Any]) -> None:
        """Blocking: the task's directory, spec and outcome room (StorageFull when
        the state disk has no room for them: the task stays queued)."""
        try:
            write_spec(task_files, spec)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self.store.space.note_full(f"a task's spec: {exc}")
            raise errors.StorageFull(f"cannot write {task_files.spec}: {exc}",
                                     stateDir=str(self.state_dir)) from exc

    async def _record_identity(self, active: Active, identity: process.Identity) -> None:
        """Store the task's process (PID + start time) so that a restarted agent can
        re-attach. Lock held. Without room for it, follow the process all the
        same: the PID is stored with the task's next change, and a restart
        before that finds the process by its status file or command line
        (``_find_identity``); the state is unchanged, so this is no transition."""
        record = dataclasses.replace(active.record, pid=identity.pid,
                                     pid_create_time=identity.create_time)
        try:
            await self._commit(active, record)
        except errors.StorageFull:
            log.warning("task %s: cannot store its pid %s yet: the state directory is full",
                        active.id, identity.pid)
            active.record = record

    async def _start_process(self, active: Active) -> tuple[process.Identity, int, bool]:
        """Fork the task process from the zygote, or spawn it: its identity, a
        pidfd, and whether the zygote forked it."""
        zygote = await self._zygotes.ready()
        if zygote is not None:
            try:
                pid, create_time, pidfd = await zygote.spawn(active.task_files.dir)
            except ZygoteGone:
                pass  # it said why in the log; spawn this one and the next
            else:
                return process.Identity(pid, create_time), pidfd, True
        identity, pidfd = await asyncio.to_thread(process.spawn, active.task_files)
        return identity, pidfd, False

    def _watch(self, active: Active, pidfd: int, own_child: bool) -> None:
        active.pidfd = pidfd
        active.own_child = own_child
        self._launched[active.id] = active
        active.last_beat = time.monotonic()
        self._loop.add_reader(pidfd, self._on_exit, active)

    def _unwatch(self, active: Active) -> None:
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
        self._background_job(self._finalize(active))

    def _deliver_stop(self, active: Active) -> bool:
        """Signal the process for the pending stop request; whether a signal was sent."""
        stop = active.record.stop
        if stop is None or active.pidfd is None:
            return False  # nothing to do yet: _launch delivers after spawning
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

    async def _finalize(self, active: Active) -> None:
        """The process is gone: apply its recorded outcome (or say why there is none)."""
        if active.finalizing:
            return
        active.finalizing = True
        exit_status = await self._release_process(active)
        final = await asyncio.to_thread(read_final, active.task_files)
        async with active.lock:
            record = self._concluded(active.record, final, exit_status)
        if (record.error or {}).get("name") == "StorageFull":
            await asyncio.to_thread(self.store.space.note_full, f"task {record.id} ended on it")
        if not await self._record_end(active, record):
            # Not at start-up's pace: the agent serves meanwhile.
            self._background_job(self._record_end_later(active, record))

    async def _record_end(self, active: Active, record: TaskRecord) -> bool:
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

    async def _record_end_later(self, active: Active, record: TaskRecord) -> None:
        """Try to store the final record again until there is room (a task must
        not stay unfinished for good because its end came while the disk was full)."""
        tries = 0
        while True:
            await asyncio.sleep(END_RETRY_DELAYS[min(tries, len(END_RETRY_DELAYS) - 1)])
            tries += 1
            if await self._record_end(active, record):
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
            return await self._zygotes.exit_status(pid) if pid is not None else None
        try:
            if active.own_child and active.record.pid is not None:
                process.kill_stragglers(active.record.pid)
                return process.reap(pidfd)
            return None
        finally:
            os.close(pidfd)

    def _concluded(self, record: TaskRecord, final: FinalFiles,
                   exit_status: int | None) -> TaskRecord:
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
        }
        if reason == "reset":
            target = State(stop["to"])
            entry = {**stop["entry"], "killedPid": record.pid if stop.get("killed") else None}
            changes["resets"] = (*record.resets, entry)
            changes["result"] = stop.get("result") if target is State.DONE else None
            changes["error"] = None if target is State.DONE else {
                "name": "ResetByAdministrator", "detail": stop["entry"]["reason"]}
        elif outcome.get("state") in ("done", "failed", "canceled"):
            target = State(outcome["state"])
            changes["result"] = outcome.get("result")
            changes["error"] = outcome.get("error")
            if reason == "deadline" and target is State.CANCELED:
                target, changes["error"] = State.FAILED, _deadline_error(record.deadline)
        elif reason == "cancel":
            target = State.CANCELED
            how = process.describe_exit(exit_status)
            changes["error"] = {"name": "Canceled", "detail": f"stopped on request ({how})"}
        elif reason == "deadline":
            target, changes["error"] = State.FAILED, _deadline_error(record.deadline)
        elif exit_status == files.EXIT_STORAGE_FULL:
            target, changes["error"] = State.FAILED, {
                "name": "StorageFull",
                "detail": "the task process could not record its outcome: the state "
                          "directory is full"}
        else:
            target = State.INTERRUPTED
            changes["error"] = {
                "name": "Interrupted",
                "detail": "the task process ended without recording an outcome "
                          f"({process.describe_exit(exit_status)})"}
        if target is State.DONE:
            progress = completed_progress(progress)
        return dataclasses.replace(record, state=target, progress=progress, **changes)

    # -- watching: heartbeat, progress, output, deadlines -----------------------------------

    def _monitor_interval(self) -> float:
        return min(max(float(self.config.heartbeat_interval) / 2, 0.05), 0.5)

    async def _monitor_loop(self) -> None:
        interval = self._monitor_interval()
        while True:
            await asyncio.sleep(interval)
            watched = [a for a in self._launched.values() if a.pidfd is not None]
            if watched:
                snapshots = await asyncio.to_thread(read_snapshots, [a.task_files for a in watched])
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
            active.output_pulse.fire()
        status = snapshot.status
        beat = False
        if status is not None and status.get("pid") == record.pid:
            seq = int(status.get("seq") or 0)
            if seq != active.last_seq:
                # The first status seen (e.g. just after a restart) is a baseline,
                # not proof that a stale task came back to life.
                beat = active.last_seq != -1
                active.last_seq = seq
                active.last_beat = time.monotonic()
                record.heartbeat_at = status.get("heartbeatAt")
                progress = merge_progress(record.progress, status.get("progress"))
                if progress != record.progress:
                    record.progress = progress
                    self._emit_progress(record)
            if record.state is State.INITIALIZING and status.get("phase") in ("running",
                                                                             "finished"):
                await self._set_state(active, State.RUNNING)
        if record.state is State.STALE and beat:
            log.info("task %s: heartbeat resumed", record.id)
            await self._set_state(active, State.RUNNING)
        elif (record.state is State.RUNNING
              and time.monotonic() - active.last_beat > self.config.stale_after):
            log.warning("task %s: no heartbeat for %.1fs (pid %s)", record.id,
                        time.monotonic() - active.last_beat, record.pid)
            await self._set_state(active, State.STALE)

    async def _enforce_deadlines(self) -> None:
        now = clock.now()
        for active in list(self._with_deadline.values()):
            record = active.record
            if record.deadline is None or record.deadline > now or active.finalizing:
                continue
            try:
                await self._enforce_deadline(active, now)
            except errors.StorageFull:
                continue  # tried again at the next round

    async def _enforce_deadline(self, active: Active, now: float) -> None:
        record = active.record
        async with active.lock:
            if active.record.state is State.ACCEPTED:
                await self._finish_unstarted(active, State.FAILED,
                                             _deadline_error(record.deadline))
                log.warning("task %s: deadline passed while queued", record.id)
                return
            if active.record.stop is not None or active.record.state in FINAL:
                return
            await self._set_stop(active, {"reason": "deadline", "at": now})
        log.warning("task %s: deadline passed; stopping it", record.id)
        self._deliver_stop(active)

    # -- reset ----------------------------------------------------------------------------------

    async def _verify_for_reset(self, record: TaskRecord, target: State) -> Any:
        if target is not State.DONE:
            return None
        kind = KINDS.get(record.kind)
        if kind is None:
            raise errors.InvalidStateTransition(f"unknown kind {record.kind}", taskID=record.id)
        # The kind may read the notes its child left in the task directory.
        env = dataclasses.replace(self.env, task_id=record.id,
                                  task_dir=str(self._files(record.id).dir))
        verdict = await asyncio.to_thread(kind.verify, record.params, env)
        if not verdict.complete:
            raise errors.InvalidStateTransition(
                f"cannot reset to done: {verdict.detail}", taskID=record.id,
                state=str(record.state), requested="done")
        return verdict.result

    async def _apply_reset(self, active: Active, target: State, result: Any,
                           entry: dict[str, Any]) -> bool:
        """Reset a task; whether its process had to be killed first."""
        async with active.lock:
            if active.record.state in FINAL:
                raise errors.InvalidStateTransition(
                    f"the task ended meanwhile as {active.record.state}", taskID=active.id,
                    state=str(active.record.state), requested=entry["to"])
            self._check_end_recorded(active)
            if active.record.state is State.ACCEPTED:
                await self._finish_unstarted(active, target, result=result, reset_entry=entry,
                                             error=None if target is State.DONE else {
                                                 "name": "ResetByAdministrator",
                                                 "detail": entry["reason"]})
                return False
            stop = {"reason": "reset", "at": clock.now(), "to": str(target), "result": result,
                    "entry": entry, "killed": False}
            if active.pidfd is not None and not process.exited(active.pidfd):
                stop["killed"] = True
            await self._set_stop(active, stop)
        self._deliver_stop(active)
        if not await wait_event(active.finished, RESET_KILL_WAIT):
            raise errors.InvalidStateTransition(
                f"the task process {active.record.pid} did not exit within "
                f"{RESET_KILL_WAIT:g}s of SIGKILL (uninterruptible I/O?); the reset "
                "will apply when it exits", taskID=active.id, pid=active.record.pid)
        return bool(stop["killed"])

    # -- restart: reconcile ----------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Take over the unfinished tasks of the store after a (re)start."""
        began = time.monotonic()
        records = await self.store.run(repository.load_unfinished)
        for record in records:
            self._adopt(record)
        counts: collections.Counter[str] = collections.Counter()
        for active in list(self._active.values()):
            if active.record.state in RUNNING_SLOT:
                counts[await self._reattach(active)] += 1
        log.info("tasks at start-up: %d unfinished (%d queued); %s; reconciled in %.1f ms",
                 len(records), len(self._queue), dict(counts) or "none running",
                 (time.monotonic() - began) * 1000)

    async def _reattach(self, active: Active) -> str:
        """Follow a task's process again, or conclude it; what happened, in a word."""
        record = active.record
        identity, status = await asyncio.to_thread(self._find_identity, active)
        pidfd = await asyncio.to_thread(process.attach, identity) if identity else None
        if pidfd is None:
            await self._finalize(active)
            return "concluded"
        # The store has the progress of the task's last state change, its status
        # file what it reported last: show that from the first answer on, not
        # after the first monitor round (progress never goes backwards).
        if status is not None and identity is not None and status.get("pid") == identity.pid:
            record.progress = merge_progress(record.progress, status.get("progress"))
        if identity is not None and record.pid != identity.pid:
            async with active.lock:
                await self._record_identity(active, identity)
        self._watch(active, pidfd, own_child=False)
        log.info("task %s: re-attached to pid %s (%s)", record.id, active.record.pid, record.state)
        if active.record.stop is not None:
            self._deliver_stop(active)
        return "re-attached"

    def _find_identity(self, active: Active) -> tuple[process.Identity | None,
                                                      dict[str, Any] | None]:
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

    # -- retention --------------------------------------------------------------------------------

    def _retention_interval(self) -> float:
        shortest = float(min(self.config.retention_done, self.config.retention_failed))
        return min(max(shortest / 4, RETENTION_GAP), 60.0)

    async def _retention_loop(self) -> None:
        while True:
            await wait_event(self._wake_retention, self._retention_interval())
            self._wake_retention.clear()
            with contextlib.suppress(errors.StorageFull):  # next time, then
                await self.sweep()
            await asyncio.sleep(RETENTION_GAP)

    # -- room on the state disk -------------------------------------------------------------------

    async def _space_loop(self) -> None:
        """Look at the state directory's room every second: the store and the
        tasks' writes say when it is full, this says when it has room again
        (then the queued tasks start), or that it is about to be full."""
        space = self.store.space
        while True:
            await asyncio.sleep(SPACE_CHECK_INTERVAL)
            was_full = space.full
            if not await asyncio.to_thread(space.check) and was_full:
                self._wake_scheduler.set()

    async def sweep(self) -> int:
        """Delete final tasks past retention or over the count cap; how many."""
        keep = {State.DONE: self.config.retention_done,
                State.CANCELED: self.config.retention_done,
                State.FAILED: self.config.retention_failed,
                State.INTERRUPTED: self.config.retention_failed}
        doomed = await self.store.run(repository.expired, clock.now(), keep,
                                      self.config.max_finished_tasks)
        if not doomed:
            return 0
        count = await self.store.run(repository.delete_many, doomed)
        await asyncio.to_thread(self._remove_dirs, doomed)
        log.info("tasks: retention removed %d finished tasks", count)
        return count

    def _remove_dirs(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            shutil.rmtree(self._files(task_id).dir, ignore_errors=True)

    # -- small helpers ----------------------------------------------------------------------

    def _files(self, task_id: str) -> files.TaskFiles:
        return files.task_files(self.state_dir, task_id)

    async def _record(self, task_id: str) -> TaskRecord:
        active = self._active.get(task_id)
        if active is not None:
            return active.record
        record = await self.store.run(repository.get, task_id)
        if record is None:
            raise _not_found(task_id)
        return record

    def _background_job(self, coro: Coroutine[Any, Any, None]) -> None:
        job = asyncio.create_task(self._logged(coro))
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        # A job cancelled at shutdown before its first step never starts ``coro``:
        # close it so it is not reported as "never awaited" (a no-op once it ran).
        job.add_done_callback(lambda _: coro.close())

    async def _logged(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task manager: background job failed")

    async def _guard(self, loop_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a manager loop; a bug in one round is logged, the loop goes on."""
        while True:
            try:
                await loop_fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task manager: %s failed; restarting it", loop_fn.__name__)
                await asyncio.sleep(1.0)


# -- listing: filter and page tokens ------------------------------------------------------


def _parse_time(where: dict[str, Any], name: str) -> float | None:
    text = where.get(name)
    if text is None:
        return None
    try:
        return clock.parse_rfc3339(text)
    except ValueError as exc:
        raise errors.InvalidParams(f"{name}: {exc}", field=f"params.filter.{name}",
                                   rule="format") from None


def _parse_filter(where: dict[str, Any]) -> repository.ListFilter:
    raw_states = where.get("state", [])
    names = [raw_states] if isinstance(raw_states, str) else list(raw_states)
    return repository.ListFilter(
        states=tuple(State(name) for name in names),
        kind=where.get("kind"),
        created_after=_parse_time(where, "createdAfter"),
        created_before=_parse_time(where, "createdBefore"),
    )


def _filter_fingerprint(query: repository.ListFilter) -> str:
    canonical = orjson.dumps(dataclasses.asdict(query), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def _encode_token(created_at: float, task_id: str, fingerprint: str) -> str:
    raw = orjson.dumps({"c": created_at, "i": task_id, "f": fingerprint})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, fingerprint: str) -> tuple[float, str]:
    bad = errors.InvalidParams("pageToken is not a token from listTasks with this filter",
                               field="params.pageToken", rule="pageToken")
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        created, task_id, owner = float(payload["c"]), str(payload["i"]), payload["f"]
    except (ValueError, TypeError, KeyError):
        raise bad from None
    if owner != fingerprint:
        raise bad
    return created, task_id


def _utf8_whole(data: bytes) -> bytes:
    """``data`` without a trailing, incomplete UTF-8 sequence (the rest follows later)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        if need > back and back < len(data):
            return data[:-back]
        return data
    return data
