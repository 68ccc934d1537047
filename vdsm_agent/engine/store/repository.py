"""The engine's queries and writes: plain functions that run on the DB thread.

Each public function is one call of ``EngineStore.run`` and holds its whole
transaction. Functions that change steps return the IDs of the jobs whose
state they may have changed, so that the caller can wake ``waitJob``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import peewee

from vdsm_agent import errors
from vdsm_agent.common.clock import parse_rfc3339, rfc3339
from vdsm_agent.engine.states import (
    STEP_FINAL,
    TASK_FINAL,
    UNKNOWN,
    HostStatus,
    StepState,
    job_state,
    step_state_for_task,
)
from vdsm_agent.engine.store.models import (
    EngineMeta,
    HostConnectionRow,
    HostRow,
    HostTaskRow,
    JobRow,
    ResourceLockRow,
    StepRow,
    engine_proxy,
)

ACTIVE_STEP_STATES = (StepState.PENDING.value, StepState.RUNNING.value)


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return parse_rfc3339(value)
        except ValueError:
            return None
    return None


def _atomic() -> Any:
    return engine_proxy.atomic()


def instance_id() -> str:
    return str(EngineMeta.get_by_id("instance_id").value)


# -- hosts ------------------------------------------------------------------------------


def add_host(name: str, url: str, ca_file: str | None, cert_file: str | None,
             key_file: str | None, maintenance: bool, now: float) -> HostRow:
    with _atomic():
        if HostRow.get_or_none(HostRow.name == name) is not None:
            raise errors.HostExists(f"host {name} is already registered", host=name)
        return HostRow.create(
            name=name, url=url, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            maintenance=maintenance, status=HostStatus.CONNECTING.value, failures=0,
            created_at=now)


def get_host(name: str) -> HostRow:
    row = HostRow.get_or_none(HostRow.name == name)
    if row is None:
        raise errors.HostNotFound(f"no host named {name}", host=name)
    return row


def list_hosts() -> list[HostRow]:
    return list(HostRow.select().order_by(HostRow.name))


def set_maintenance(name: str, maintenance: bool) -> HostRow:
    with _atomic():
        row = get_host(name)
        row.maintenance = maintenance
        row.save()
        return row


def update_host(name: str, **fields: Any) -> None:
    if fields:
        HostRow.update(**fields).where(HostRow.name == name).execute()


def remove_host(name: str, now: float) -> set[str]:
    """Forget a host and what was learned of it; its unfinished steps fail."""
    with _atomic():
        get_host(name)
        steps = list(StepRow.select().where((StepRow.host == name)
                                            & StepRow.state.in_(ACTIVE_STEP_STATES)))
        for step in steps:
            _finish_step(step, StepState.FAILED, now,
                         error=errors.Failure.HOST_REMOVED.error(f"host {name} was removed"))
        for model in (HostTaskRow, HostConnectionRow, ResourceLockRow):
            model.delete().where(model.host == name).execute()
        HostRow.delete().where(HostRow.name == name).execute()
        jobs = {step.job_id for step in steps}
        _recompute_jobs(jobs, now)
        return jobs


def host_counts() -> dict[str, dict[str, dict[str, int]]]:
    """Per host: tasks by state and managed connections by state."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for model in (HostTaskRow, HostConnectionRow):
        key = "tasks" if model is HostTaskRow else "connections"
        query: Any = (model.select(model.host, model.state, peewee.fn.COUNT(model.host))
                      .group_by(model.host, model.state).tuples())
        for host, state, number in query:
            per_host = counts.setdefault(host, {"tasks": {}, "connections": {}})
            per_host[key][state] = int(number)
    return counts


# -- tasks learned from hosts ------------------------------------------------------------


def _task_fields(doc: Mapping[str, Any], now: float) -> dict[str, Any]:
    return {
        "kind": str(doc.get("kind", "")),
        "state": str(doc.get("state", "")),
        "progress": dumps(doc.get("progress")),
        "created_at": _timestamp(doc.get("createdAt")) or now,
        "started_at": _timestamp(doc.get("startedAt")),
        "ended_at": _timestamp(doc.get("endedAt")),
        "detail": dumps(doc),
    }


def _engine_step(host: str, task_id: str) -> StepRow | None:
    """The startTask step that made this task, if the engine made it."""
    return StepRow.get_or_none((StepRow.host == host) & (StepRow.task_id == task_id)
                               & (StepRow.action == "startTask"))


def _insert_task(host: str, task_id: str, fields: dict[str, Any], now: float) -> None:
    step = _engine_step(host, task_id)
    HostTaskRow.insert(
        host=host, task_id=task_id, external=step is None,
        job_id=step.job_id if step else None, step_id=step.id if step else None,
        updated_at=now, **fields).execute()


def _on_task_state(host: str, task_id: str, state: str, now: float, jobs: set[str]) -> None:
    """Side effects of what a host says of a task: locks, steps bound to it."""
    final = state in TASK_FINAL
    if final:
        ResourceLockRow.delete().where((ResourceLockRow.host == host)
                                       & (ResourceLockRow.task_id == task_id)).execute()
    steps = StepRow.select().where((StepRow.host == host) & (StepRow.task_id == task_id)
                                   & StepRow.state.in_(ACTIVE_STEP_STATES))
    for step in steps:
        if step.action == "startTask":
            if final:
                _finish_step(step, step_state_for_task(state), now, result={"taskState": state})
            elif step.state == StepState.PENDING:
                # The host has the task although its answer never came: bound.
                step.state = StepState.RUNNING.value
                step.updated_at = now
                step.save()
            else:
                continue
            jobs.add(step.job_id)
        elif step.action == "cancelTask" and final and step.state == StepState.RUNNING:
            _finish_step(step, StepState.DONE, now, result={"taskState": state})
            jobs.add(step.job_id)


def _on_task_gone(host: str, task_id: str, now: float, jobs: set[str]) -> None:
    ResourceLockRow.delete().where((ResourceLockRow.host == host)
                                   & (ResourceLockRow.task_id == task_id)).execute()
    steps = StepRow.select().where((StepRow.host == host) & (StepRow.task_id == task_id)
                                   & (StepRow.state == StepState.RUNNING.value))
    for step in steps:
        _finish_step(step, StepState.FAILED, now, error=errors.Failure.TASK_GONE.error(
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
    with _atomic():
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
        for begin in range(0, len(fresh), 100):
            HostTaskRow.insert_many(fresh[begin:begin + 100]).execute()
        outcome.inserted = len(fresh)
        for begin in range(0, len(ended), 100):
            ResourceLockRow.delete().where((ResourceLockRow.host == host)
                                           & ResourceLockRow.task_id.in_(ended[begin:begin + 100])
                                           ).execute()
        gone = [task_id for task_id, row in existing.items()
                if task_id not in seen and row.updated_at <= started_at]
        for begin in range(0, len(gone), 100):
            HostTaskRow.delete().where((HostTaskRow.host == host)
                                       & HostTaskRow.task_id.in_(gone[begin:begin + 100])
                                       ).execute()
        outcome.deleted = len(gone)
        step_rows: Any = StepRow.select(StepRow.task_id).where(
            (StepRow.host == host) & StepRow.state.in_(ACTIVE_STEP_STATES)
            & StepRow.task_id.is_null(False)).tuples()
        bound = {str(task_id) for (task_id,) in step_rows}
        for task_id in gone:
            if task_id in bound or task_id in locked:
                _on_task_gone(host, task_id, now, outcome.jobs)
        _reconcile_steps(host, now, outcome.jobs)
        _recompute_jobs(outcome.jobs, now)
    return outcome


def apply_task_doc(host: str, doc: Mapping[str, Any], now: float,
                   replace_locks: bool = False) -> set[str]:
    """One task document from the host (getTask, cancelTask, startTask's follow-up);
    ``replace_locks``: the task's reported resources become its locks."""
    jobs: set[str] = set()
    task_id = str(doc["id"])
    fields = _task_fields(doc, now)
    with _atomic():
        row = HostTaskRow.get_or_none((HostTaskRow.host == host)
                                      & (HostTaskRow.task_id == task_id))
        state = _effective_state(row, fields["state"])
        if row is None:
            _insert_task(host, task_id, fields, now)
        elif state == fields["state"]:
            HostTaskRow.update(updated_at=now, **fields).where(
                (HostTaskRow.host == host) & (HostTaskRow.task_id == task_id)).execute()
        if replace_locks and state not in TASK_FINAL:
            _replace_locks(host, task_id, [str(r) for r in doc.get("resources") or ()], now)
        _on_task_state(host, task_id, state, now, jobs)
        _recompute_jobs(jobs, now)
    return jobs


def knows_task(host: str, task_id: str) -> bool:
    return bool(HostTaskRow.select().where((HostTaskRow.host == host)
                                           & (HostTaskRow.task_id == task_id)).exists())


def apply_task_event(host: str, event: Mapping[str, Any], doc: Mapping[str, Any] | None,
                     now: float) -> set[str]:
    """A task event of the host's feed; ``doc``: its getTask, for a task new to us."""
    jobs: set[str] = set()
    task_id = str(event["taskID"])
    with _atomic():
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
                          "created_at": _timestamp(event.get("at")) or now,
                          "started_at": None, "ended_at": None, "detail": None}
            _insert_task(host, task_id, fields, now)
        elif state == event.get("state"):
            changes: dict[str, Any] = {"state": state, "updated_at": now}
            if "progress" in event:
                changes["progress"] = dumps(event["progress"])
            if state in TASK_FINAL and row.ended_at is None:
                changes["ended_at"] = _timestamp(event.get("at")) or now
            if row.started_at is None and state not in ("accepted", *TASK_FINAL):
                changes["started_at"] = _timestamp(event.get("at")) or now
            HostTaskRow.update(**changes).where((HostTaskRow.host == host)
                                                & (HostTaskRow.task_id == task_id)).execute()
        _on_task_state(host, task_id, state, now, jobs)
        _recompute_jobs(jobs, now)
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
    """Tasks by (createdAt, host, ID); ``not_current`` hosts' tasks count as unknown."""
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
        if known:
            known_condition = HostTaskRow.state.in_(known)
            if not_current:
                known_condition &= HostTaskRow.host.not_in(list(not_current))
            conditions.append(known_condition)
        if UNKNOWN in query.states and not_current:
            conditions.append(HostTaskRow.host.in_(list(not_current)))
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


# -- connections learned from hosts --------------------------------------------------------


def _connected(state: str) -> bool:
    return state in ("connected", "degraded")


def apply_connection_snapshot(host: str, mapping: Mapping[str, Mapping[str, Any]],
                              now: float) -> int:
    """getStorageConnectionList: the managed IDs replace what was known of the host.

    Only differences are written; returns how many rows changed."""
    wanted = {
        connection_id: {"uri": str(doc.get("uri", "")), "connected": bool(doc.get("connected")),
                        "state": str(doc.get("state", UNKNOWN)),
                        "last_error": dumps(doc.get("lastError"))}
        for connection_id, doc in mapping.items() if doc.get("managed")
    }
    changed = 0
    with _atomic():
        existing = {row.connection_id: row for row in HostConnectionRow.select().where(
            HostConnectionRow.host == host)}
        gone = sorted(set(existing) - set(wanted))
        if gone:
            changed += HostConnectionRow.delete().where(
                (HostConnectionRow.host == host)
                & HostConnectionRow.connection_id.in_(gone)).execute()
        fresh = []
        for connection_id, fields in wanted.items():
            row = existing.get(connection_id)
            if row is None:
                fresh.append({"host": host, "connection_id": connection_id, "managed": True,
                              "updated_at": now, **fields})
            elif any(getattr(row, key) != value for key, value in fields.items()):
                HostConnectionRow.update(updated_at=now, **fields).where(
                    (HostConnectionRow.host == host)
                    & (HostConnectionRow.connection_id == connection_id)).execute()
                changed += 1
        for begin in range(0, len(fresh), 100):
            HostConnectionRow.insert_many(fresh[begin:begin + 100]).execute()
        changed += len(fresh)
    return changed


def apply_resync(host: str, tasks: Sequence[Mapping[str, Any]],
                 connections: Mapping[str, Mapping[str, Any]], started_at: float, now: float,
                 host_fields: Mapping[str, Any]) -> SyncResult:
    """A whole resynchronisation of one host in one transaction (one DB hop, one commit)."""
    with _atomic():
        outcome = apply_task_snapshot(host, tasks, started_at, now)
        outcome.connections = apply_connection_snapshot(host, connections, now)
        update_host(host, **host_fields)
    return outcome


def apply_connection_doc(host: str, connection_id: str, doc: Mapping[str, Any],
                         now: float) -> None:
    """One managed connection as the host described it (manageStorageConnection's answer)."""
    with _atomic():
        HostConnectionRow.delete().where((HostConnectionRow.host == host)
                                         & (HostConnectionRow.connection_id == connection_id)
                                         ).execute()
        HostConnectionRow.insert(
            host=host, connection_id=connection_id, uri=str(doc.get("uri", "")), managed=True,
            connected=bool(doc.get("connected")), state=str(doc.get("state", UNKNOWN)),
            last_error=dumps(doc.get("lastError")), updated_at=now).execute()


def forget_connection(host: str, connection_id: str) -> None:
    HostConnectionRow.delete().where((HostConnectionRow.host == host)
                                     & (HostConnectionRow.connection_id == connection_id)
                                     ).execute()


def apply_connection_event(host: str, event: Mapping[str, Any], now: float) -> bool:
    """A connection event; True when it names an ID the engine does not know yet."""
    state = str(event.get("state", UNKNOWN))
    unknown = False
    with _atomic():
        for connection_id in event.get("connectionIDs") or ():
            changed = HostConnectionRow.update(
                state=state, connected=_connected(state),
                last_error=dumps(event.get("error")), updated_at=now,
            ).where((HostConnectionRow.host == host)
                    & (HostConnectionRow.connection_id == connection_id)).execute()
            if not changed:
                unknown = True
    return unknown


def list_connections(connection_id: str | None) -> list[HostConnectionRow]:
    select = HostConnectionRow.select()
    if connection_id is not None:
        select = select.where(HostConnectionRow.connection_id == connection_id)
    return list(select.order_by(HostConnectionRow.connection_id, HostConnectionRow.host))


def pending_connection_steps(connection_id: str | None) -> list[StepRow]:
    """Unfinished manage steps: their hosts should have the connection."""
    select = StepRow.select().where((StepRow.action == "manageStorageConnection")
                                    & StepRow.state.in_(ACTIVE_STEP_STATES))
    if connection_id is not None:
        select = select.where(StepRow.connection_id == connection_id)
    return list(select)


# -- jobs, steps and locks ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    host: str
    action: str
    request: dict[str, Any]
    task_id: str | None = None
    connection_id: str | None = None


def _check_resources(host: str, resources: Iterable[str]) -> None:
    wanted = set(resources)
    if not wanted:
        return
    held = ResourceLockRow.get_or_none((ResourceLockRow.host == host)
                                       & ResourceLockRow.resource.in_(sorted(wanted)))
    if held is not None:
        raise errors.ResourceBusy(
            f"{held.resource} on host {host} is held by task {held.task_id} "
            f"(job {held.job_id})",
            resource=held.resource, holder=held.task_id, host=host, jobID=held.job_id)
    # Tasks the engine did not start (or whose locks were replaced) hold what
    # their host reported in their resources.
    unfinished = HostTaskRow.select(HostTaskRow.task_id, HostTaskRow.state,
                                    HostTaskRow.detail).where(
        (HostTaskRow.host == host) & HostTaskRow.state.not_in(sorted(TASK_FINAL)))
    for row in unfinished:
        doc = loads(row.detail) or {}
        overlap = wanted & set(doc.get("resources") or ())
        if overlap:
            resource = sorted(overlap)[0]
            raise errors.ResourceBusy(
                f"{resource} on host {host} is held by task {row.task_id} ({row.state})",
                resource=resource, holder=row.task_id, host=host, holderState=row.state)


def create_job(job_id: str, action: str, params: dict[str, Any], steps: Sequence[StepSpec],
               step_ids: Sequence[str], resources: Sequence[str], now: float) -> None:
    """A job and its steps; for a startTask, the locks of its resources (or ResourceBusy)."""
    with _atomic():
        for spec in steps:
            get_host(spec.host)
        if resources:
            (spec,) = steps
            assert spec.task_id is not None
            _check_resources(spec.host, resources)
            ResourceLockRow.insert_many([
                {"host": spec.host, "resource": resource, "task_id": spec.task_id,
                 "job_id": job_id, "created_at": now} for resource in sorted(set(resources))
            ]).execute()
        JobRow.create(id=job_id, action=action, state="pending", params=dumps(params),
                      created_at=now, updated_at=now)
        for position, (step_id, spec) in enumerate(zip(step_ids, steps, strict=True)):
            StepRow.create(id=step_id, job_id=job_id, position=position, host=spec.host,
                           action=spec.action, state=StepState.PENDING.value,
                           task_id=spec.task_id, connection_id=spec.connection_id,
                           request=dumps(spec.request), created_at=now, updated_at=now)


def _replace_locks(host: str, task_id: str, resources: Sequence[str], now: float) -> None:
    """An engine-started task's resources, as its host reports them, become its locks."""
    step = _engine_step(host, task_id)
    if step is None:
        return  # not ours: the host's own checks keep it exclusive
    ResourceLockRow.delete().where((ResourceLockRow.host == host)
                                   & (ResourceLockRow.task_id == task_id)).execute()
    wanted = sorted(set(resources))
    if not wanted:
        return
    taken = {row.resource for row in ResourceLockRow.select(ResourceLockRow.resource).where(
        (ResourceLockRow.host == host) & ResourceLockRow.resource.in_(wanted))}
    rows = [{"host": host, "resource": resource, "task_id": task_id, "job_id": step.job_id,
             "created_at": now} for resource in wanted if resource not in taken]
    if rows:
        ResourceLockRow.insert_many(rows).execute()


def locks_of(host: str | None = None) -> list[ResourceLockRow]:
    select = ResourceLockRow.select()
    if host is not None:
        select = select.where(ResourceLockRow.host == host)
    return list(select.order_by(ResourceLockRow.host, ResourceLockRow.resource))


def _finish_step(step: StepRow, state: StepState, now: float, *,
                 result: Any = None, error: Any = None) -> None:
    step.state = state.value
    step.updated_at = now
    step.ended_at = now
    if result is not None:
        step.result = dumps(result)
    if error is not None:
        step.last_error = dumps(error)
    step.save()
    if step.action == "startTask" and step.task_id is not None and state != StepState.DONE:
        # A task that never ran (or ended) holds nothing any more.
        ResourceLockRow.delete().where((ResourceLockRow.host == step.host)
                                       & (ResourceLockRow.task_id == step.task_id)).execute()


def _recompute_jobs(job_ids: Iterable[str], now: float) -> None:
    for job_id in set(job_ids):
        job = JobRow.get_or_none(JobRow.id == job_id)
        if job is None:
            continue
        rows: Any = StepRow.select(StepRow.state).where(StepRow.job_id == job_id).tuples()
        states = [str(state) for (state,) in rows]
        new = job_state(states) if states else job.state
        if new != job.state:
            final = all(state in STEP_FINAL for state in states)
            JobRow.update(state=str(new), updated_at=now,
                          ended_at=now if final else None).where(JobRow.id == job_id).execute()


def pending_steps(host: str) -> list[StepRow]:
    return list(StepRow.select().where((StepRow.host == host)
                                       & (StepRow.state == StepState.PENDING.value))
                .order_by(StepRow.created_at, StepRow.position))


def get_step(step_id: str) -> StepRow | None:
    return StepRow.get_or_none(StepRow.id == step_id)


def step_accepted(step_id: str, state: StepState, now: float, result: Any = None) -> set[str]:
    """The host accepted the step's call: running (a task step) or final."""
    with _atomic():
        step = get_step(step_id)
        if step is None or step.state in STEP_FINAL:
            return set()
        step.attempts += 1
        if state in STEP_FINAL:
            _finish_step(step, state, now, result=result)
        else:
            step.state = state.value
            step.updated_at = now
            if result is not None:
                step.result = dumps(result)
            step.save()
        _recompute_jobs({step.job_id}, now)
        return {step.job_id}


def step_attempt_failed(step_id: str, error: Any, now: float) -> set[str]:
    """No answer from the host: the step stays pending, to be retried."""
    StepRow.update(attempts=StepRow.attempts + 1, last_error=dumps(error), updated_at=now
                   ).where((StepRow.id == step_id)
                           & (StepRow.state == StepState.PENDING.value)).execute()
    return set()


def step_failed(step_id: str, error: Any, now: float) -> set[str]:
    """The host refused the step (an error answer): final."""
    with _atomic():
        step = get_step(step_id)
        if step is None or step.state in STEP_FINAL:
            return set()
        step.attempts += 1
        _finish_step(step, StepState.FAILED, now, error=error)
        _recompute_jobs({step.job_id}, now)
        return {step.job_id}


def get_job(job_id: str) -> dict[str, Any]:
    job = JobRow.get_or_none(JobRow.id == job_id)
    if job is None:
        raise errors.JobNotFound(f"no job {job_id}", jobID=job_id)
    steps = list(StepRow.select().where(StepRow.job_id == job_id).order_by(StepRow.position))
    return job_document(job, steps)


def job_document(job: JobRow, steps: Sequence[StepRow]) -> dict[str, Any]:
    return {
        "jobID": job.id,
        "action": job.action,
        "state": job.state,
        "params": loads(job.params),
        "createdAt": rfc3339(job.created_at),
        "updatedAt": rfc3339(job.updated_at),
        "endedAt": rfc3339(job.ended_at),
        "steps": [step_document(step) for step in steps],
    }


def step_document(step: StepRow) -> dict[str, Any]:
    return {
        "stepID": step.id,
        "host": step.host,
        "action": step.action,
        "state": step.state,
        "taskID": step.task_id,
        "connectionID": step.connection_id,
        "attempts": step.attempts,
        "lastError": loads(step.last_error),
        "result": loads(step.result),
        "createdAt": rfc3339(step.created_at),
        "updatedAt": rfc3339(step.updated_at),
        "endedAt": rfc3339(step.ended_at),
    }


@dataclasses.dataclass(frozen=True)
class JobQuery:
    states: tuple[str, ...] = ()
    action: str | None = None
    host: str | None = None


def list_jobs_page(query: JobQuery, after: tuple[float, str] | None,
                   limit: int) -> list[dict[str, Any]]:
    select = JobRow.select()
    if query.states:
        select = select.where(JobRow.state.in_(query.states))
    if query.action is not None:
        select = select.where(JobRow.action == query.action)
    if query.host is not None:
        select = select.where(JobRow.id.in_(
            StepRow.select(StepRow.job_id).where(StepRow.host == query.host)))
    if after is not None:
        created, job_id = after
        select = select.where((JobRow.created_at > created)
                              | ((JobRow.created_at == created) & (JobRow.id > job_id)))
    jobs = list(select.order_by(JobRow.created_at, JobRow.id).limit(limit))
    by_job: dict[str, list[StepRow]] = {job.id: [] for job in jobs}
    if jobs:
        for step in StepRow.select().where(StepRow.job_id.in_(list(by_job))).order_by(
                StepRow.job_id, StepRow.position):
            by_job[step.job_id].append(step)
    # ``_createdAt``: the exact time, for the caller's page token (removed before answering).
    return [{**job_document(job, by_job[job.id]), "_createdAt": job.created_at} for job in jobs]


def delete_finished_jobs(ended_before: float) -> int:
    """Retention: finished jobs that ended before the time, with their steps."""
    with _atomic():
        rows: Any = JobRow.select(JobRow.id).where(
            JobRow.ended_at.is_null(False) & (JobRow.ended_at < ended_before)).tuples()
        expired = [str(job_id) for (job_id,) in rows]
        for start in range(0, len(expired), 100):
            chunk = expired[start:start + 100]
            StepRow.delete().where(StepRow.job_id.in_(chunk)).execute()
            JobRow.delete().where(JobRow.id.in_(chunk)).execute()
        return len(expired)
