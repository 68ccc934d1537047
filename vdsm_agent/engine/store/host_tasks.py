"""The tasks the engine learns from its hosts: listings, documents, events (DB thread).

A task row changes only forwards: a final state is never replaced by an
unfinished one (an older report), and a full listing does not overwrite rows
changed (by events) after it was taken. What a host says of a task also
moves the job step bound to it and frees the task's resource locks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import peewee

from vdsm_agent import errors
from vdsm_agent.engine.states import TASK_FINAL, UNKNOWN, StepState, step_state_for_task
from vdsm_agent.engine.store.compiled import Compiled
from vdsm_agent.engine.store.models import HostTaskRow, ResourceLockRow, StepRow
from vdsm_agent.engine.store.rows import BATCH, atomic, dumps, timestamp
from vdsm_agent.engine.store.steps import (
    ACTIVE_STEP_STATES,
    move_step,
    recompute_jobs,
    replace_task_locks,
)
from vdsm_agent.metrics.counters import RESOURCE_LOCK_CHANGES as LOCK_CHANGES


def _task_fields(doc: Mapping[str, Any], now: float) -> dict[str, Any]:
    return {
        "kind": str(doc.get("kind", "")),
        "state": str(doc.get("state", "")),
        "progress": dumps(doc.get("progress")),
        "created_at": timestamp(doc.get("createdAt")) or now,
        "started_at": timestamp(doc.get("startedAt")),
        "ended_at": timestamp(doc.get("endedAt")),
        "detail": dumps(doc),
    }


# The queries of every event and every resync, their SQL built once (compiled.py).
_TASK = Compiled(lambda host, task_id: HostTaskRow.select().where(
    (HostTaskRow.host == host) & (HostTaskRow.task_id == task_id)), 2)
_ENGINE_STEP = Compiled(lambda host, task_id: StepRow.select(StepRow.job_id, StepRow.id).where(
    (StepRow.host == host) & (StepRow.task_id == task_id) & (StepRow.action == "startTask")), 2)
_RELEASE_LOCKS = Compiled(lambda host, task_id: ResourceLockRow.delete().where(
    (ResourceLockRow.host == host) & (ResourceLockRow.task_id == task_id)), 2)
_ACTIVE_STEPS = Compiled(lambda host, task_id: StepRow.select().where(
    (StepRow.host == host) & (StepRow.task_id == task_id)
    & StepRow.state.in_(ACTIVE_STEP_STATES)), 2)
_HOST_TASKS = Compiled(lambda host: HostTaskRow.select(
    HostTaskRow.task_id, HostTaskRow.state, HostTaskRow.updated_at, HostTaskRow.detail).where(
    HostTaskRow.host == host), 1)
_HOST_ENGINE_STEPS = Compiled(lambda host: StepRow.select(
    StepRow.task_id, StepRow.job_id, StepRow.id).where(
    (StepRow.host == host) & (StepRow.action == "startTask") & StepRow.task_id.is_null(False)), 1)
_HOST_LOCKED = Compiled(lambda host: ResourceLockRow.select(ResourceLockRow.task_id).where(
    ResourceLockRow.host == host).distinct(), 1)
_HOST_BOUND = Compiled(lambda host: StepRow.select(StepRow.task_id).where(
    (StepRow.host == host) & StepRow.state.in_(ACTIVE_STEP_STATES)
    & StepRow.task_id.is_null(False)), 1)
_WRITES: dict[tuple[str, tuple[str, ...]], Compiled] = {}


def _write(kind: str, host: str, task_id: str, values: dict[str, Any]) -> None:
    """UPDATE (kind "update") or INSERT ("insert") of one task row with ``values``
    (as the database takes them), compiled once per set of columns."""
    keys = tuple(values)
    compiled = _WRITES.get((kind, keys))
    if compiled is None:
        def build(host: Any, task_id: Any, *marks: Any) -> peewee.Query:
            columns = {getattr(HostTaskRow, key): mark
                       for key, mark in zip(keys, marks, strict=True)}
            if kind == "insert":
                return HostTaskRow.insert({HostTaskRow.host: host, HostTaskRow.task_id: task_id,
                                           **columns})
            return HostTaskRow.update(columns).where((HostTaskRow.host == host)
                                                     & (HostTaskRow.task_id == task_id))
        compiled = _WRITES[(kind, keys)] = Compiled(build, 2 + len(keys))
    compiled.execute(host, task_id, *values.values())


def _insert_task(host: str, task_id: str, fields: dict[str, Any], now: float) -> None:
    step = next(iter(_ENGINE_STEP.tuples(host, task_id)), None)
    _write("insert", host, task_id, {
        "external": step is None, "job_id": step[0] if step else None,
        "step_id": step[1] if step else None, "updated_at": now, **fields})


def _on_task_state(host: str, task_id: str, state: str, now: float, jobs: set[str]) -> None:
    """Side effects of what a host says of a task: locks, steps bound to it."""
    final = state in TASK_FINAL
    if final:
        LOCK_CHANGES["released"] += _RELEASE_LOCKS.execute(host, task_id)
    for step in _ACTIVE_STEPS.rows(StepRow, host, task_id):
        if step.action == "startTask":
            if final:
                move_step(step, step_state_for_task(state), now, result={"taskState": state})
            elif step.state == StepState.PENDING:
                # The host has the task although its answer never came: bound.
                move_step(step, StepState.RUNNING, now)
            else:
                continue
            jobs.add(step.job_id)
        elif step.action == "cancelTask" and final and step.state == StepState.RUNNING:
            move_step(step, StepState.DONE, now, result={"taskState": state})
            jobs.add(step.job_id)


def _on_task_gone(host: str, task_id: str, now: float, jobs: set[str]) -> None:
    LOCK_CHANGES["released"] += ResourceLockRow.delete().where(
        (ResourceLockRow.host == host) & (ResourceLockRow.task_id == task_id)).execute()
    steps = StepRow.select().where((StepRow.host == host) & (StepRow.task_id == task_id)
                                   & (StepRow.state == StepState.RUNNING.value))
    for step in steps:
        move_step(step, StepState.FAILED, now, error=errors.Failure.TASK_GONE.error(
            "the host no longer lists the task; its end was not seen"))
        jobs.add(step.job_id)


@dataclasses.dataclass
class SyncResult:
    jobs: set[str] = dataclasses.field(default_factory=set)
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    connections: int = 0  # connection rows changed


def _effective_state(known: str | None, state: str) -> str:
    """A final state is never replaced by an unfinished one (an older report);
    ``known``: the row's state (None: no row)."""
    if known is not None and known in TASK_FINAL and state not in TASK_FINAL:
        return known
    return state


def _reconcile_steps(host: str, now: float, jobs: set[str], task_ids: set[str]) -> None:
    """Bind or finish the host's unfinished task steps (``task_ids``: their tasks)
    from what is known of their tasks."""
    if not task_ids:
        return
    rows = HostTaskRow.select(HostTaskRow.task_id, HostTaskRow.state).where(
        (HostTaskRow.host == host) & HostTaskRow.task_id.in_(sorted(task_ids)))
    for row in rows:
        _on_task_state(host, row.task_id, row.state, now, jobs)


def apply_task_snapshot(host: str, docs: Sequence[Mapping[str, Any]], started_at: float,
                        now: float) -> SyncResult:
    """A full listing of the host's tasks, taken from ``started_at`` on.

    Rows changed after ``started_at`` (by events) are newer than the listing
    and kept; a final state is never replaced by an unfinished one; rows the
    listing lacks are deleted (the agent removed the task) unless newer. New
    rows go in with bulk inserts; steps and locks are settled once at the end.
    """
    outcome = SyncResult()
    with atomic():
        # task ID -> (state, updated_at, detail)
        existing = {str(task_id): (state, updated_at, detail)
                    for task_id, state, updated_at, detail in _HOST_TASKS.tuples(host)}
        made_by_us: dict[str, tuple[Any, ...]] | None = None  # read when a task is new
        locked = {str(task_id) for (task_id,) in _HOST_LOCKED.tuples(host)}
        seen: set[str] = set()
        fresh: list[dict[str, Any]] = []
        ended: list[str] = []
        for doc in docs:
            task_id = str(doc["id"])
            seen.add(task_id)
            fields = _task_fields(doc, now)
            row = existing.get(task_id)
            if row is None:
                if made_by_us is None:
                    made_by_us = {str(step[0]): step for step in _HOST_ENGINE_STEPS.tuples(host)}
                step = made_by_us.get(task_id)
                fresh.append({"host": host, "task_id": task_id, "external": step is None,
                              "job_id": step[1] if step else None,
                              "step_id": step[2] if step else None, "updated_at": now,
                              **fields})
            elif (row[1] > started_at or row[2] == fields["detail"]
                  or _effective_state(row[0], fields["state"]) != fields["state"]):
                continue
            else:
                _write("update", host, task_id, {"updated_at": now, **fields})
                outcome.updated += 1
            if fields["state"] in TASK_FINAL and task_id in locked:
                ended.append(task_id)
        for rows in peewee.chunked(fresh, BATCH):
            HostTaskRow.insert_many(rows).execute()
        outcome.inserted = len(fresh)
        for task_ids in peewee.chunked(ended, BATCH):
            LOCK_CHANGES["released"] += ResourceLockRow.delete().where(
                (ResourceLockRow.host == host)
                & ResourceLockRow.task_id.in_(task_ids)).execute()
        gone = [task_id for task_id, row in existing.items()
                if task_id not in seen and row[1] <= started_at]
        for task_ids in peewee.chunked(gone, BATCH):
            HostTaskRow.delete().where((HostTaskRow.host == host)
                                       & HostTaskRow.task_id.in_(task_ids)).execute()
        outcome.deleted = len(gone)
        bound = {str(task_id) for (task_id,) in _HOST_BOUND.tuples(host)}
        for task_id in gone:
            if task_id in bound or task_id in locked:
                _on_task_gone(host, task_id, now, outcome.jobs)
        _reconcile_steps(host, now, outcome.jobs, bound)
        recompute_jobs(outcome.jobs, now)
    return outcome


def apply_task_doc(host: str, doc: Mapping[str, Any], now: float,
                   replace_locks: bool = False) -> set[str]:
    """One task document from the host (getTask, cancelTask, startTask's follow-up);
    ``replace_locks``: the task's reported resources become its locks."""
    jobs: set[str] = set()
    task_id = str(doc["id"])
    fields = _task_fields(doc, now)
    with atomic():
        row = _TASK.first(HostTaskRow, host, task_id)
        state = _effective_state(row.state if row else None, fields["state"])
        if row is None:
            _insert_task(host, task_id, fields, now)
        elif state == fields["state"]:
            _write("update", host, task_id, {"updated_at": now, **fields})
        if replace_locks and state not in TASK_FINAL:
            replace_task_locks(host, task_id, [str(r) for r in doc.get("resources") or ()], now)
        _on_task_state(host, task_id, state, now, jobs)
        recompute_jobs(jobs, now)
    return jobs


def knows_task(host: str, task_id: str) -> bool:
    return bool(_TASK.tuples(host, task_id))


def apply_known_task_event(host: str, event: Mapping[str, Any], now: float) -> set[str] | None:
    """``apply_task_event`` for a task the engine has (one DB hop for the feed's common
    case); None, and nothing written, for a task new to it."""
    with atomic():
        if not knows_task(host, str(event["taskID"])):
            return None
        return apply_task_event(host, event, None, now)


def apply_task_event(host: str, event: Mapping[str, Any], doc: Mapping[str, Any] | None,
                     now: float) -> set[str]:
    """A task event of the host's feed; ``doc``: its getTask, for a task new to us."""
    jobs: set[str] = set()
    task_id = str(event["taskID"])
    with atomic():
        row = _TASK.first(HostTaskRow, host, task_id)
        state = _effective_state(row.state if row else None, str(event.get("state", "")))
        if row is None:
            if doc is not None:
                fields = _task_fields(doc, now)
                # The document (fetched after the event) is the newer of the two.
                state = fields["state"]
            else:
                fields = {"kind": str(event.get("kind", "")), "state": state,
                          "progress": dumps(event.get("progress")),
                          "created_at": timestamp(event.get("at")) or now,
                          "started_at": None, "ended_at": None, "detail": None}
            _insert_task(host, task_id, fields, now)
        elif state == event.get("state"):
            changes: dict[str, Any] = {"state": state, "updated_at": now}
            if "progress" in event:
                changes["progress"] = dumps(event["progress"])
            if state in TASK_FINAL and row.ended_at is None:
                changes["ended_at"] = timestamp(event.get("at")) or now
            if row.started_at is None and state not in ("accepted", *TASK_FINAL):
                changes["started_at"] = timestamp(event.get("at")) or now
            _write("update", host, task_id, changes)
        _on_task_state(host, task_id, state, now, jobs)
        recompute_jobs(jobs, now)
    return jobs


def get_task(host: str, task_id: str) -> HostTaskRow | None:
    return _TASK.first(HostTaskRow, host, task_id)


@dataclasses.dataclass(frozen=True)
class TaskQuery:
    hosts: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    kind: str | None = None
    external: bool | None = None
    job_id: str | None = None


def list_tasks_page(query: TaskQuery, not_current: Sequence[str],
                    after: tuple[float, str, str] | None, limit: int) -> list[HostTaskRow]:
    """Tasks by (createdAt, host, ID); ``not_current`` hosts' unfinished tasks count as
    unknown (a finished task keeps its final state: nothing can change it any more)."""
    select = HostTaskRow.select()
    if query.hosts:
        select = select.where(HostTaskRow.host.in_(query.hosts))
    if query.kind is not None:
        select = select.where(HostTaskRow.kind == query.kind)
    if query.external is not None:
        select = select.where(HostTaskRow.external == query.external)
    if query.job_id is not None:
        select = select.where(HostTaskRow.job_id == query.job_id)
    if query.states:
        known = [state for state in query.states if state != UNKNOWN]
        conditions = []
        final = sorted(TASK_FINAL)
        if known:
            known_condition = HostTaskRow.state.in_(known)
            if not_current:
                known_condition &= (HostTaskRow.host.not_in(list(not_current))
                                    | HostTaskRow.state.in_(final))
            conditions.append(known_condition)
        if UNKNOWN in query.states and not_current:
            conditions.append(HostTaskRow.host.in_(list(not_current))
                              & HostTaskRow.state.not_in(final))
        if not conditions:
            return []
        condition = conditions[0]
        for other in conditions[1:]:
            condition |= other
        select = select.where(condition)
    if after is not None:
        created, host, task_id = after
        select = select.where(
            (HostTaskRow.created_at > created)
            | ((HostTaskRow.created_at == created)
               & ((HostTaskRow.host > host)
                  | ((HostTaskRow.host == host) & (HostTaskRow.task_id > task_id)))))
    return list(select.order_by(HostTaskRow.created_at, HostTaskRow.host, HostTaskRow.task_id)
                .limit(limit))
