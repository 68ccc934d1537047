"""The unfinished tasks in memory: what each holds, the queue, the counts by state.

The task manager keeps one ``TaskTable``. It is bookkeeping only, with no
I/O and no decision of its own: an entry changes when a task is reserved (a
submit whose row is being committed), adopted (committed, or found at
start-up), moves state (``TaskManager._commit`` calls ``moved``) or becomes
final (``forget``). Every part of the manager reads it; only these methods
change it.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import KINDS
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.runtime import Active
from vdsm_agent.tasks.states import RUNNING_SLOT, State


class TaskTable:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.active: dict[str, Active] = {}
        # Subsets of ``active`` the monitor looks at, so that its rounds cost what
        # runs, not what is queued: tasks with a process watched at some point,
        # and tasks with a deadline.
        self.launched: dict[str, Active] = {}
        self.with_deadline: dict[str, Active] = {}
        self.queue: collections.deque[str] = collections.deque()  # accepted, FIFO
        # resource -> the unfinished tasks holding it, each True when it holds it
        # shared (its kind's ``shares_resources``): several shared holders, or one
        # exclusive holder (docs/tasks.md, "Resources").
        self.locks: dict[str, dict[str, bool]] = {}
        # resource -> one of its holders (the first): what holder_of answers.
        self.holders: dict[str, str] = {}
        self.counts: collections.Counter[State] = collections.Counter()  # of ``active``
        # Submits accepted in memory whose row is being committed (group commit):
        # the record, and an event set once the commit is over.
        self.pending: dict[str, tuple[TaskRecord, asyncio.Event]] = {}

    def known(self, task_id: str) -> bool:
        """Whether a task of this ID is unfinished, or being created."""
        return task_id in self.active or task_id in self.pending

    def slots_used(self) -> int:
        """Tasks holding a run slot (their process exists or is being made)."""
        return sum(self.counts[state] for state in RUNNING_SLOT)

    def queued(self) -> int:
        """Tasks waiting in state accepted (reserved ones included)."""
        return self.counts[State.ACCEPTED]

    def check_free(self, resources: list[str], shared: bool = False) -> None:
        """ResourceBusy naming every holder of the first resource that conflicts: any
        holder for an exclusive request, an exclusive holder for a shared one."""
        for resource in resources:
            holding = self.locks.get(resource)
            if not holding or (shared and all(holding.values())):
                continue
            holders = [self._holder_info(task_id, holding[task_id]) for task_id in holding]
            first = holders[0]
            named = ", ".join(f"{h['taskID']} ({h['state']}, "
                              f"{'shared' if h['shared'] else 'exclusive'})" for h in holders)
            raise errors.ResourceBusy(
                f"{resource} is held by task{'s' if len(holders) > 1 else ''} {named}",
                resource=resource, holder=first["taskID"], holderState=first["state"],
                holders=holders)

    def _holder_info(self, task_id: str, shared: bool) -> dict[str, object]:
        active = self.active.get(task_id)
        state = active.record.state if active else State.ACCEPTED
        return {"taskID": task_id, "state": str(state), "shared": shared}

    # -- changes ---------------------------------------------------------------------------

    def reserve(self, record: TaskRecord) -> asyncio.Event:
        """Hold a new task's resources and queue place while its row is committed;
        the event to set when the commit is over."""
        committed = asyncio.Event()
        self.pending[record.id] = (record, committed)
        self.counts[State.ACCEPTED] += 1
        self._hold(record)
        return committed

    def release(self, record: TaskRecord) -> None:
        """Give a reservation back (its commit failed, or found the ID taken)."""
        self.pending.pop(record.id, None)
        self.counts[State.ACCEPTED] -= 1
        self._free(record)

    def adopt(self, record: TaskRecord, reserved: bool = False) -> Active:
        """Track an unfinished task: its resources, its queue place (a reserved one
        was counted when it was reserved)."""
        self.pending.pop(record.id, None)
        active = Active(record=record, state_dir=self.state_dir)
        self.active[record.id] = active
        if not reserved:
            self.counts[record.state] += 1
        self._hold(record)
        if record.state is State.ACCEPTED:
            self.queue.append(record.id)
        if record.deadline is not None:
            self.with_deadline[record.id] = active
        return active

    def moved(self, old: State, new: State) -> None:
        """A tracked task changed state."""
        self.counts[old] -= 1
        self.counts[new] += 1

    def launched_now(self, active: Active) -> None:
        """Its process is watched: the monitor follows it from now on."""
        self.launched[active.id] = active

    def forget(self, active: Active) -> None:
        """A task became final: stop tracking it and free its resources."""
        if self.active.pop(active.id, None) is not None:
            self.counts[active.record.state] -= 1
        self.launched.pop(active.id, None)
        self.with_deadline.pop(active.id, None)
        self._free(active.record)

    def _hold(self, record: TaskRecord) -> None:
        shared = shares(record.kind)
        for resource in record.resources:
            self.locks.setdefault(resource, {})[record.id] = shared
            self.holders.setdefault(resource, record.id)

    def _free(self, record: TaskRecord) -> None:
        for resource in record.resources:
            holding = self.locks.get(resource)
            if holding is None or holding.pop(record.id, None) is None:
                continue
            if not holding:
                del self.locks[resource]
                self.holders.pop(resource, None)
            elif self.holders.get(resource) == record.id:
                self.holders[resource] = next(iter(holding))


def shares(kind_name: str) -> bool:
    """Whether tasks of this kind hold their resources shared (an unknown kind: no)."""
    kind = KINDS.get(kind_name)
    return bool(kind and kind.shares_resources)
