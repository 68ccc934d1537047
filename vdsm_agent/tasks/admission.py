"""startTask: checks, reservation, the group commit, and idempotent retries.

A submit is checked (kind, params, deadline, room on the state disk, the
kind's own checks and resources, the connections its paths are on, the
queue), then reserved in the task table and written with other concurrent
submits in one durable transaction (``runtime.BatchInserter``); only then is
it answered, adopted and scheduled. From the checks to the reservation
nothing awaits, so the two are atomic on the event loop (no lock needed).

A submit with a known ID is a retry: the same request (kind, params with
defaults, deadline) gets the first attempt's answer, another request
``TaskIdConflict``. A submit whose twin is still being committed waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.security import redact
from vdsm_agent.tasks import files, repository
from vdsm_agent.tasks.kinds import TaskKind
from vdsm_agent.tasks.record import TaskRecord, request_hash
from vdsm_agent.tasks.runtime import BatchInserter
from vdsm_agent.tasks.states import State

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

# Resources a kind declares that name a path (the resolver maps their paths to
# the connections they are on).
PATH_RESOURCES = ("file:", "device:")


def _submitted_id(task_id: str | None) -> str:
    if task_id is None:
        return str(uuid.uuid4())
    try:
        return files.canonical_task_id(task_id)
    except ValueError:
        raise errors.InvalidParams("taskID must be a UUID", field="params.taskID",
                                   rule="format") from None


def _known_answer(record: TaskRecord, digest: str) -> dict[str, Any]:
    if record.request_hash != digest:
        raise errors.TaskIdConflict(
            f"task {record.id} exists with a different request", taskID=record.id)
    return {"taskID": record.id, "state": str(record.state)}


class Admission:
    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        self.table = manager.table
        self._inserter = BatchInserter(self._insert_batch, self._on_written,
                                       self._on_insert_failed)

    async def submit(self, kind_name: str, params: dict[str, Any], task_id: str | None,
                     deadline: str | None) -> dict[str, Any]:
        manager = self.manager
        kind = manager.kinds.get(kind_name)
        if kind is None:
            raise errors.UnknownTaskKind(f"no task kind {kind_name!r}", kind=kind_name,
                                         known=sorted(manager.kinds))
        checked = kind.check_params(params)
        deadline_at = None if deadline is None else clock.parse_param(deadline,
                                                                       "params.deadline")
        task_id = _submitted_id(task_id)
        digest = request_hash(kind_name, checked, deadline_at)
        if self.table.known(task_id):
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
            manager.check_room()
            resources = await self._with_derived(await self._validate(kind, checked))
            # From here to the reservation nothing awaits, so the checks and the
            # reservation are atomic on the event loop (no lock needed). Only this
            # process creates tasks, so memory is enough to see a concurrent twin.
            if self.table.known(task_id):
                return await self._twin(task_id, digest)
            self.table.check_free(resources, shared=kind.shares_resources)
            self._check_queue()
        except errors.RpcError:
            known = await self._existing(task_id, digest)
            if known is not None:
                return known
            raise
        record = TaskRecord(id=task_id, kind=kind_name, params=checked, request_hash=digest,
                            state=State.ACCEPTED, created_at=clock.now(),
                            deadline=deadline_at, resources=tuple(resources))
        self.table.reserve(record)
        # The inserter follows the commit up (_on_written) whether or not this
        # caller still waits: no row without a manager.
        answer: dict[str, Any] = await self._inserter.insert(record)
        return answer

    # -- the group commit ------------------------------------------------------------------

    async def _insert_batch(self, records: list[TaskRecord]) -> dict[str, TaskRecord]:
        stored = await self.manager.store.run(repository.insert_new, records)
        self.manager.changes.bump()  # the new rows are in listTasks' listing
        return stored

    def _on_written(self, record: TaskRecord, stored: TaskRecord | None) -> dict[str, Any]:
        """A reserved new task's batch is committed: adopt and schedule it (its answer)."""
        committed = self.table.pending[record.id][1]
        try:
            if stored is not None:
                # The ID was stored already: a retry of a task that ended and left
                # memory, or an ID taken by another request.
                self.table.release(record)
                return _known_answer(stored, record.request_hash)
            self.table.adopt(record, reserved=True)
        finally:
            committed.set()
        if log.isEnabledFor(logging.DEBUG):  # the audit log has the call at INFO
            log.debug("task %s: accepted %s params=%s", record.id, record.kind,
                      orjson.dumps(redact.value(record.params)).decode())
        self.manager.accepted(record)
        return {"taskID": record.id, "state": str(State.ACCEPTED)}

    def _on_insert_failed(self, record: TaskRecord, error: BaseException) -> None:
        committed = self.table.pending[record.id][1]
        self.table.release(record)
        committed.set()

    # -- retries ---------------------------------------------------------------------------

    async def _twin(self, task_id: str, digest: str) -> dict[str, Any]:
        """The answer for a submit whose ID another submit is creating or created."""
        pending = self.table.pending.get(task_id)
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
        active = self.table.active.get(task_id)
        record = (active.record if active
                  else await self.manager.store.run(repository.get, task_id))
        if record is None:
            return None
        return _known_answer(record, digest)

    # -- checks ----------------------------------------------------------------------------

    async def _validate(self, kind: type[TaskKind], params: dict[str, Any]) -> list[str]:
        """The kind's checks; the resources it will lock. Kinds that look at the
        filesystem are checked on a worker thread (a stat may hang on NFS)."""
        if kind.checks_filesystem:
            return await asyncio.to_thread(self._validate_now, kind, params)
        return self._validate_now(kind, params)

    def _validate_now(self, kind: type[TaskKind], params: dict[str, Any]) -> list[str]:
        kind.validate(params, self.manager.env)
        return sorted(set(kind.resources(params, self.manager.env)))

    async def _with_derived(self, resources: list[str]) -> list[str]:
        """The kind's resources plus those its paths imply (``connection:<id>``)."""
        resolver = self.manager.resource_resolver
        paths = [resource.split(":", 1)[1] for resource in resources
                 if resource.startswith(PATH_RESOURCES)]
        if resolver is None or not paths:
            return resources
        return sorted(set(resources).union(await resolver(paths)))

    def _check_queue(self) -> None:
        config = self.manager.config
        queued = self.table.queued()
        free = max(config.max_running_tasks - self.table.slots_used(), 0)
        if queued + 1 > config.max_queued_tasks + free:
            raise errors.QueueFull(
                f"{queued} tasks are waiting (max_queued_tasks={config.max_queued_tasks})",
                queued=queued, limit=config.max_queued_tasks)
