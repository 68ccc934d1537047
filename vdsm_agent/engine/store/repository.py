"""The engine's queries and writes: plain functions that run on the DB thread.

Each public function is one call of ``EngineStore.run`` and holds its whole
transaction. Functions that change steps return the IDs of the jobs whose
state they may have changed, so that the caller can wake ``waitJob``.

The functions live by area, and this module gathers them for the engine
(``repository.get_job`` ...) with the two that span areas:

* ``rows``: JSON columns, timestamps, transactions;
* ``hosts``: registration and maintenance;
* ``steps``: jobs, steps and the locks of engine-started tasks;
* ``host_tasks``, ``host_connections``: what the engine learns from hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vdsm_agent import errors
from vdsm_agent.engine.states import StepState
from vdsm_agent.engine.store.host_connections import (
    apply_connection_doc,
    apply_connection_event,
    apply_connection_snapshot,
    forget_connection,
    list_connections,
    pending_connection_steps,
)
from vdsm_agent.engine.store.host_tasks import (
    SyncResult,
    TaskQuery,
    apply_task_doc,
    apply_task_event,
    apply_task_snapshot,
    get_task,
    knows_task,
    list_tasks_page,
)
from vdsm_agent.engine.store.hosts import (
    Counts,
    HostsPage,
    add_host,
    get_host,
    get_host_with_counts,
    host_counts,
    instance_id,
    list_hosts,
    list_hosts_page,
    set_maintenance,
    update_host,
)
from vdsm_agent.engine.store.models import (
    HostConnectionRow,
    HostRow,
    HostTaskRow,
    ResourceLockRow,
    StepRow,
)
from vdsm_agent.engine.store.rows import BATCH, atomic, dumps, loads
from vdsm_agent.engine.store.steps import (
    ACTIVE_STEP_STATES,
    JobQuery,
    JobWithSteps,
    StepSpec,
    claim_step,
    create_job,
    delete_finished_jobs,
    get_job,
    get_step,
    list_jobs_page,
    locks_of,
    move_job,
    move_step,
    pending_steps,
    recompute_jobs,
    step_accepted,
    step_attempt_failed,
    step_failed,
)

__all__ = [
    "ACTIVE_STEP_STATES", "BATCH", "Counts", "HostsPage", "JobQuery", "JobWithSteps",
    "StepSpec",
    "SyncResult", "TaskQuery", "add_host", "apply_connection_doc", "apply_connection_event",
    "apply_connection_snapshot", "apply_resync", "apply_task_doc", "apply_task_event",
    "apply_task_snapshot", "claim_step", "create_job", "delete_finished_jobs", "dumps",
    "forget_connection", "get_host", "get_host_with_counts", "get_job", "get_step",
    "get_task", "host_counts", "instance_id", "knows_task",
    "list_connections", "list_hosts", "list_hosts_page", "list_jobs_page",
    "list_tasks_page", "loads", "locks_of", "move_job", "move_step", "pending_connection_steps",
    "pending_steps", "recompute_jobs", "remove_host", "set_maintenance", "step_accepted",
    "step_attempt_failed", "step_failed", "update_host",
]


def remove_host(name: str, now: float) -> set[str]:
    """Forget a host and what was learned of it; its unfinished steps fail."""
    with atomic():
        get_host(name)
        steps = list(StepRow.select().where((StepRow.host == name)
                                            & StepRow.state.in_(ACTIVE_STEP_STATES)))
        for step in steps:
            move_step(step, StepState.FAILED, now,
                      error=errors.Failure.HOST_REMOVED.error(f"host {name} was removed"))
        for model in (HostTaskRow, HostConnectionRow, ResourceLockRow):
            model.delete().where(model.host == name).execute()
        HostRow.delete().where(HostRow.name == name).execute()
        jobs = {step.job_id for step in steps}
        recompute_jobs(jobs, now)
        return jobs


def apply_resync(host: str, tasks: Sequence[Mapping[str, Any]] | None,
                 connections: Mapping[str, Mapping[str, Any]] | None, started_at: float,
                 now: float, host_fields: Mapping[str, Any]) -> SyncResult:
    """A whole resynchronisation of one host in one transaction (one DB hop, one commit).

    None for a list the host answered "not modified" (conditional resync): what
    the store has of it stays as it is."""
    with atomic():
        outcome = (apply_task_snapshot(host, tasks, started_at, now) if tasks is not None
                   else SyncResult())
        if connections is not None:
            outcome.connections = apply_connection_snapshot(host, connections, now)
        if host_fields:
            update_host(host, **host_fields)
    return outcome
