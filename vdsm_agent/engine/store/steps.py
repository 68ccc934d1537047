"""Jobs, their steps, and the resource locks of engine-started tasks (DB thread).

A step changes state only through ``move_step`` (the table is
``engine.states.STEP_TRANSITIONS``), a job only through ``move_job``
(``engine.states.JOB_TRANSITIONS``), which ``recompute_jobs`` calls with the
state its steps make (``engine.states.job_state``). Functions that change
steps return the IDs of the jobs whose state they may have changed, so that
the caller can wake ``waitJob``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import peewee

from vdsm_agent import errors
from vdsm_agent.engine.states import (
    JOB_FINAL,
    STEP_FINAL,
    TASK_FINAL,
    JobState,
    StepState,
    check_job_move,
    check_step_move,
    job_state,
)
from vdsm_agent.engine.store.compiled import Compiled
from vdsm_agent.engine.store.hosts import get_host
from vdsm_agent.engine.store.leases import is_postgresql, notify, notify_steps
from vdsm_agent.engine.store.models import (
    HostRow,
    HostTaskRow,
    JobRow,
    ResourceLockRow,
    StepRow,
)
from vdsm_agent.engine.store.rows import BATCH, atomic, dumps, loads
from vdsm_agent.metrics.counters import RESOURCE_LOCK_CHANGES as LOCK_CHANGES
from vdsm_agent.tasks.table import shares

ACTIVE_STEP_STATES = (StepState.PENDING.value, StepState.RUNNING.value)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    host: str
    action: str
    request: dict[str, Any]
    task_id: str | None = None
    connection_id: str | None = None


def engine_step(host: str, task_id: str) -> StepRow | None:
    """The startTask step that made this task, if the engine made it."""
    return StepRow.get_or_none((StepRow.host == host) & (StepRow.task_id == task_id)
                               & (StepRow.action == "startTask"))


def kind_shares(kind: object) -> bool:
    """Whether tasks of ``kind`` hold their resources shared (they only read them:
    checksum). The agent's own kind table says (``shares_resources``, reported in
    getTaskKinds as sharesResources), so the engine and its agents agree."""
    return isinstance(kind, str) and shares(kind)


def _holders(host: str, wanted: set[str]) -> list[dict[str, Any]]:
    """Every holder of any of ``wanted`` on ``host``: the engine's locks, then the
    host's unfinished tasks the engine did not lock for (what they reported)."""
    found: list[dict[str, Any]] = []
    locked: set[str] = set()
    for held in ResourceLockRow.select().where(
            (ResourceLockRow.host == host) & ResourceLockRow.resource.in_(sorted(wanted))
    ).order_by(ResourceLockRow.created_at, ResourceLockRow.task_id):
        locked.add(held.task_id)
        found.append({"taskID": held.task_id, "resource": held.resource,
                      "shared": bool(held.shared), "jobID": held.job_id})
    # Tasks the engine did not start (or whose locks were replaced) hold what
    # their host reported in their resources.
    unfinished = HostTaskRow.select(HostTaskRow.task_id, HostTaskRow.state, HostTaskRow.kind,
                                    HostTaskRow.detail).where(
        (HostTaskRow.host == host) & HostTaskRow.state.not_in(sorted(TASK_FINAL)))
    for row in unfinished:
        if row.task_id in locked:
            continue
        doc = loads(row.detail) or {}
        for resource in sorted(wanted & set(doc.get("resources") or ())):
            found.append({"taskID": row.task_id, "resource": resource,
                          "shared": kind_shares(row.kind), "state": row.state})
    return found


def _check_resources(host: str, resources: Iterable[str], shared: bool = False) -> None:
    """ResourceBusy naming every holder, unless there is none or all of them and the
    request are shared."""
    wanted = set(resources)
    if not wanted:
        return
    holders = _holders(host, wanted)
    if not holders or (shared and all(holder["shared"] for holder in holders)):
        return
    first = next((h for h in holders if not (shared and h["shared"])), holders[0])
    named = ", ".join(f"task {h['taskID']} ({'shared' if h['shared'] else 'exclusive'})"
                      for h in holders)
    extra = {"jobID": first["jobID"]} if "jobID" in first else {
        "holderState": first.get("state")}
    raise errors.ResourceBusy(
        f"{first['resource']} on host {host} is held by {named}",
        resource=first["resource"], holder=first["taskID"], host=host,
        holders=holders,
        **extra)


def create_job(job_id: str, action: str, params: dict[str, Any], steps: Sequence[StepSpec],
               step_ids: Sequence[str], resources: Sequence[str], now: float) -> None:
    """A job and its steps; for a startTask, the locks of its resources (or ResourceBusy).

    Idempotent: run again after its COMMIT was lost with the connection (the store's
    one retry, ``db.EngineStore._call``), a job already written with this ID and this
    request is answered as created, not as a conflict (its own locks, taken by the
    first run, are not another task's)."""
    with atomic():
        if _already_created(job_id, action, params, step_ids):
            return
        for spec in steps:
            get_host(spec.host)
        if resources and is_postgresql():
            # Engines that take a startTask for one host at once check its locks
            # one after the other (the host's row is the mutex).
            HostRow.select().where(HostRow.name == steps[0].host).for_update().execute()
        if resources:
            (spec,) = steps
            assert spec.task_id is not None
            shared = kind_shares(spec.request.get("kind"))
            _check_resources(spec.host, resources, shared)
            ResourceLockRow.insert_many([
                {"host": spec.host, "resource": resource, "task_id": spec.task_id,
                 "job_id": job_id, "created_at": now, "shared": shared}
                for resource in sorted(set(resources))
            ]).execute()
            LOCK_CHANGES["taken"] += len(set(resources))
        JobRow.create(id=job_id, action=action, state=JobState.PENDING.value,
                      params=dumps(params),
                      created_at=now, updated_at=now)
        for position, (step_id, spec) in enumerate(zip(step_ids, steps, strict=True)):
            StepRow.create(id=step_id, job_id=job_id, position=position, host=spec.host,
                           action=spec.action, state=StepState.PENDING.value,
                           task_id=spec.task_id, connection_id=spec.connection_id,
                           request=dumps(spec.request), created_at=now, updated_at=now)
        # The engines that lease these hosts run the new steps now (LISTEN/NOTIFY).
        notify_steps(list(dict.fromkeys(spec.host for spec in steps)))


def _already_created(job_id: str, action: str, params: dict[str, Any],
                     step_ids: Sequence[str]) -> bool:
    """Whether this very job (ID, action, params, step IDs) is already written; a job
    of this ID with another request is left to the insert's unique violation."""
    row = JobRow.get_or_none(JobRow.id == job_id)
    if row is None:
        return False
    written = [step.id for step in StepRow.select(StepRow.id).where(
        StepRow.job_id == job_id).order_by(StepRow.position)]
    return (row.action == action and loads(row.params) == loads(dumps(params))
            and written == list(step_ids))


def replace_task_locks(host: str, task_id: str, resources: Sequence[str], now: float) -> None:
    """An engine-started task's resources, as its host reports them, become its locks."""
    step = engine_step(host, task_id)
    if step is None:
        return  # not ours: the host's own checks keep it exclusive
    LOCK_CHANGES["released"] += ResourceLockRow.delete().where(
        (ResourceLockRow.host == host) & (ResourceLockRow.task_id == task_id)).execute()
    wanted = sorted(set(resources))
    if not wanted:
        return
    shared = kind_shares(loads(step.request).get("kind"))
    # A resource another task holds exclusively (it took it meanwhile) stays its own;
    # a shared one is shared once more.
    condition = (ResourceLockRow.host == host) & ResourceLockRow.resource.in_(wanted)
    if shared:
        condition &= ~ResourceLockRow.shared
    taken = {row.resource for row in ResourceLockRow.select(ResourceLockRow.resource).where(
        condition)}
    rows = [{"host": host, "resource": resource, "task_id": task_id, "job_id": step.job_id,
             "created_at": now, "shared": shared} for resource in wanted if resource not in taken]
    if rows:
        ResourceLockRow.insert_many(rows).execute()
        LOCK_CHANGES["taken"] += len(rows)


def locks_of(host: str | None = None) -> list[ResourceLockRow]:
    select = ResourceLockRow.select()
    if host is not None:
        select = select.where(ResourceLockRow.host == host)
    return list(select.order_by(ResourceLockRow.host, ResourceLockRow.resource))


def move_step(step: StepRow, state: StepState, now: float, *,
              result: Any = None, error: Any = None) -> None:
    """The one function that changes a step's state (``states.STEP_TRANSITIONS``;
    staying running is no move; ``states.IllegalMove`` otherwise), with its result
    or error, saved (no error given: lastError is cleared). A startTask step that
    ends other than done frees its task's locks."""
    check_step_move(StepState(step.state), state, f"step {step.id}")
    step.state = state.value
    step.updated_at = now
    final = state in STEP_FINAL
    if final:
        step.ended_at = now
    if result is not None:
        step.result = dumps(result)
    # A move says how the step stands now: an error from an earlier attempt (the host
    # did not answer, then did) is not the step's error any more.
    step.last_error = dumps(error) if error is not None else None
    step.save()
    if final and step.action == "startTask" and step.task_id is not None \
            and state != StepState.DONE:
        # A task that never ran (or ended) holds nothing any more.
        LOCK_CHANGES["released"] += ResourceLockRow.delete().where(
            (ResourceLockRow.host == step.host)
            & (ResourceLockRow.task_id == step.task_id)).execute()


def move_job(job: JobRow, state: JobState, now: float) -> None:
    """The one function that changes a job's state (``states.JOB_TRANSITIONS``;
    ``states.IllegalMove`` otherwise); a final job gets its end time."""
    current = JobState(job.state)
    check_job_move(current, state, f"job {job.id}")
    if state == current:
        return
    job.state = state.value
    job.updated_at = now
    job.ended_at = now if state in JOB_FINAL else None
    JobRow.update(state=job.state, updated_at=now, ended_at=job.ended_at).where(
        JobRow.id == job.id).execute()
    notify(f"job {job.id}")  # waitJob on every engine (sent at the commit)


def recompute_jobs(job_ids: Iterable[str], now: float) -> None:
    """Each job's state from its steps' (``states.job_state``), moved by ``move_job``."""
    for job_id in sorted(set(job_ids)):
        select = JobRow.select().where(JobRow.id == job_id)
        if is_postgresql():
            # Two engines ending two steps of one job at once would each read the
            # other's step as still running and leave the job running for good: the
            # job's row lock orders them, and the second reads the steps the first
            # committed (READ COMMITTED: each statement sees what committed before it).
            select = select.for_update()
        job = select.first()
        if job is None:
            continue
        rows: Any = StepRow.select(StepRow.state).where(StepRow.job_id == job_id).tuples()
        states = [str(state) for (state,) in rows]
        new = job_state(states) if states else JobState(job.state)
        if new != job.state:  # a final job's steps no longer move: it is left alone
            move_job(job, new, now)


# Every worker's steps loop asks it every minute or so: its SQL built once.
_PENDING_STEPS = Compiled(lambda host: StepRow.select().where(
    (StepRow.host == host) & (StepRow.state == StepState.PENDING.value)).order_by(
    StepRow.created_at, StepRow.position), 1)


def pending_steps(host: str) -> list[StepRow]:
    return list(_PENDING_STEPS.rows(StepRow, host))


def get_step(step_id: str) -> StepRow | None:
    return StepRow.get_or_none(StepRow.id == step_id)


def claim_step(step_id: str) -> bool:
    """Before a step is sent to its host: whether it is still pending (its row locked
    until the transaction ends). Called fenced by the host's worker, so a step is
    sent only by the engine that holds the host's lease at that moment; an engine
    that lost it after the claim may still send it once more, which the agent's
    idempotent IDs make harmless (the same task ID, connection ID)."""
    with atomic():
        select = StepRow.select(StepRow.state).where(StepRow.id == step_id)
        if is_postgresql():
            select = select.for_update()
        row = select.first()
        return row is not None and row.state == StepState.PENDING.value


def step_accepted(step_id: str, state: StepState, now: float, result: Any = None) -> set[str]:
    """The host accepted the step's call: running (a task step) or final."""
    with atomic():
        step = get_step(step_id)
        if step is None or step.state in STEP_FINAL:
            return set()
        step.attempts += 1
        move_step(step, state, now, result=result)
        recompute_jobs({step.job_id}, now)
        return {step.job_id}


def step_attempt_failed(step_id: str, error: Any, now: float) -> set[str]:
    """No answer from the host: the step stays pending, to be retried."""
    StepRow.update(attempts=StepRow.attempts + 1, last_error=dumps(error), updated_at=now
                   ).where((StepRow.id == step_id)
                           & (StepRow.state == StepState.PENDING.value)).execute()
    return set()


def step_failed(step_id: str, error: Any, now: float) -> set[str]:
    """The host refused the step (an error answer): final."""
    with atomic():
        step = get_step(step_id)
        if step is None or step.state in STEP_FINAL:
            return set()
        step.attempts += 1
        move_step(step, StepState.FAILED, now, error=error)
        recompute_jobs({step.job_id}, now)
        return {step.job_id}


@dataclasses.dataclass(frozen=True)
class JobWithSteps:
    """A job's row and its steps' rows, in order (the views make the document)."""

    job: JobRow
    steps: list[StepRow]


def get_job(job_id: str) -> JobWithSteps:
    job = JobRow.get_or_none(JobRow.id == job_id)
    if job is None:
        raise errors.JobNotFound(f"no job {job_id}", jobID=job_id)
    steps = list(StepRow.select().where(StepRow.job_id == job_id).order_by(StepRow.position))
    return JobWithSteps(job, steps)


@dataclasses.dataclass(frozen=True)
class JobQuery:
    states: tuple[str, ...] = ()
    action: str | None = None
    host: str | None = None


def list_jobs_page(query: JobQuery, after: tuple[float, str] | None,
                   limit: int) -> list[JobWithSteps]:
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
    return [JobWithSteps(job, by_job[job.id]) for job in jobs]


def delete_finished_jobs(ended_before: float) -> int:
    """Retention: finished jobs that ended before the time, with their steps."""
    with atomic():
        rows: Any = JobRow.select(JobRow.id).where(
            JobRow.ended_at.is_null(False) & (JobRow.ended_at < ended_before)).tuples()
        expired = [str(job_id) for (job_id,) in rows]
        for job_ids in peewee.chunked(expired, BATCH):
            StepRow.delete().where(StepRow.job_id.in_(job_ids)).execute()
            JobRow.delete().where(JobRow.id.in_(job_ids)).execute()
        return len(expired)
