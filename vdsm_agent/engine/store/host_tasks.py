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
from vdsm_agent.engine.store.models import HostTaskRow, ResourceLockRow, StepRow
from vdsm_agent.engine.store.rows import BATCH, atomic, dumps, timestamp
from vdsm_agent.engine.store.steps import (
    ACTIVE_STEP_STATES,
    engine_step,
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


def _insert_task(host: str, task_id: str, fields: dict[str, Any], now: float) -> None:
    step = engine_step(host, task_id)
    HostTaskRow.insert(
        host=host, task_id=task_id, external=step is None,
        job_id=step.job_id if step else None, step_id=step.id if step else None,
        updated_at=now, **fields).execute()


def _on_task_state(host: str, task_id: str, state: str, now: float, jobs: set[str]) -> None:
    """Side effects of what a host says of a task: locks, steps bound to it."""
    final = state in TASK_FINAL
    if final:
        LOCK_CHANGES["released"] += ResourceLockRow.delete().where(
            (ResourceLockRow.host == host) & (ResourceLockRow.task_id == task_id)).execute()
    steps = StepRow.select().where((StepRow.host == host) & (StepRow.task_id == task_id)
                                   & StepRow.state.in_(ACTIVE_STEP_STATES))
    for step in steps:
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


def _effective_state(row: HostTaskRow | None, state: str) -> str:
    """A final state is never replaced by an unfinished one (an older report)."""
    if row is not None and row.state in TASK_FINAL and state not in TASK_FINAL:
        return str(row.state)
    return state


def _reconcile_steps(host: str, now: float, jobs: set[str]) -> None:
    """Bind or finish the host's unfinished task steps from what is known of their tasks."""
    steps = StepRow.select(StepRow.task_id).where(
        (StepRow.host == host) & StepRow.state.in_(ACTIVE_STEP_STATES)
        & StepRow.task_id.is_null(False))
    task_ids = {step.task_id for step in steps}
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
        existing = {row.task_id: row for row in HostTaskRow.select(
            HostTaskRow.task_id, HostTaskRow.state, HostTaskRow.updated_at,
            HostTaskRow.detail).where(HostTaskRow.host == host)}
        made_by_us = {step.task_id: step for step in StepRow.select(
            StepRow.task_id, StepRow.job_id, StepRow.id).where(
            (StepRow.host == host) & (StepRow.action == "startTask")
            & StepRow.task_id.is_null(False))}
        lock_rows: Any = ResourceLockRow.select(ResourceLockRow.task_id).where(
            ResourceLockRow.host == host).distinct().tuples()
        locked = {str(task_id) for (task_id,) in lock_rows}
        seen: set[str] = set()
        fresh: list[dict[str, Any]] = []
        ended: list[str] = []
        for doc in docs:
            task_id = str(doc["id"])
            seen.add(task_id)
            fields = _task_fields(doc, now)
            row = existing.get(task_id)
            if row is None:
                step = made_by_us.get(task_id)
                fresh.append({"host": host, "task_id": task_id, "external": step is None,
                              "job_id": step.job_id if step else None,
                              "step_id": step.id if step else None, "updated_at": now,
                              **fields})
            elif (row.updated_at > started_at or row.detail == fields["detail"]
                  or _effective_state(row, fields["state"]) != fields["state"]):
                continue
            else:
                HostTaskRow.update(updated_at=now, **fields).where(
                    (HostTaskRow.host == host) & (HostTaskRow.task_id == task_id)).execute()
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
                if task_id not in seen and row.updated_at <= started_at]
        for task_ids in peewee.chunked(gone, BATCH):
            HostTaskRow.delete().where((HostTaskRow.host == host)
                                       & HostTaskRow.task_id.in_(task_ids)).execute()
        outcome.deleted = len(gone)
        step_rows: Any = StepRow.select(StepRow.task_id).where(
            (StepRow.host == host) & StepRow.state.in_(ACTIVE_STEP_STATES)
            & StepRow.task_id.is_null(False)).tuples()
        bound = {str(task_id) for (task_id,) in step_rows}
        for task_id in gone:
            if task_id in bound or task_id in locked:
                _on_task_gone(host, task_id, now, outcome.jobs)
        _reconcile_steps(host, now, outcome.jobs)
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
        row = HostTaskRow.get_or_none((HostTaskRow.host == host)
                                      & (HostTaskRow.task_id == task_id))
        state = _effective_state(row, fields["state"])
        if row is None:
            _insert_task(host, task_id, fields, now)
        elif state == fields["state"]:
            HostTaskRow.update(updated_at=now, **fields).where(
                (HostTaskRow.host == host) & (HostTaskRow.task_id == task_id)).execute()
        if replace_locks and state not in TASK_FINAL:
            replace_task_locks(host, task_id, [str(r) for r in doc.get("resources") or ()], now)
        _on_task_state(host, task_id, state, now, jobs)
        recompute_jobs(jobs, now)
    return jobs


def knows_task(host: str, task_id: str) -> bool:
    return bool(HostTaskRow.select().where((HostTaskRow.host == host)
                                           & (HostTaskRow.task_id == task_id)).exists())


def apply_task_event(host: str, event: Mapping[str, Any], doc: Mapping[str, Any] | None,
                     now: float) -> set[str]:
    """A task event of the host's feed; ``doc``: its getTask, for a task new to us."""
    jobs: set[str] = set()
    task_id = str(event["taskID"])
    with atomic():
        row = HostTaskRow.get_or_none((HostTaskRow.host == host)
                                      & (HostTaskRow.task_id == task_id))
        state = _effective_state(row, str(event.get("state", "")))
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
            HostTaskRow.update(**changes).where((HostTaskRow.host == host)
                                                & (HostTaskRow.task_id == task_id)).execute()
        _on_task_state(host, task_id, state, now, jobs)
        recompute_jobs(jobs, now)
    return jobs


def get_task(host: str, task_id: str) -> HostTaskRow | None:
    return HostTaskRow.get_or_none((HostTaskRow.host == host)
                                   & (HostTaskRow.task_id == task_id))


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
