"""Aggregated views across hosts, served from the engine's store.

Views never wait for a host: they read what the engine has learned, and say
which hosts they could not see (``unreachableHosts``) instead of failing. An
unfinished task or a connection of a host whose state is not current
(non-responsive, not yet reached, in maintenance) is shown as ``unknown``,
with its last known state beside it; a finished task keeps its final state.

The views make every document the engine answers from its store (hosts,
tasks, connections' health, jobs and steps): the store returns rows. They
see the engine through ``ports.ViewContext`` and a host's worker through
``ports.HostView``/``ports.HostHandle``, never the poller itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vdsm_agent import __version__, errors
from vdsm_agent.common import paging
from vdsm_agent.common.clock import rfc3339
from vdsm_agent.engine.agentclient import AgentError, AgentUnreachable
from vdsm_agent.engine.ports import HostView, ViewContext
from vdsm_agent.engine.states import TASK_FINAL, UNKNOWN, HostStatus
from vdsm_agent.engine.store import EngineStore, migrations, repository
from vdsm_agent.engine.store import leases as store_leases
from vdsm_agent.engine.store.models import HostRow, HostTaskRow, JobRow, StepRow

# -- hosts ------------------------------------------------------------------------------


def host_document(row: HostRow, worker: HostView | None,
                  counts: Mapping[str, Mapping[str, int]] | None,
                  lease: tuple[str | None, int | None] = (None, None)) -> dict[str, Any]:
    status = worker.status if worker is not None else (
        HostStatus.MAINTENANCE if row.maintenance else HostStatus(row.status))
    return {
        "name": row.name,
        "url": row.url,
        "status": str(status),
        "maintenance": bool(row.maintenance),
        "lastSeen": rfc3339(worker.last_seen if worker else row.last_seen),
        "lastError": worker.last_error if worker else row.last_error,
        "failures": worker.failures if worker else row.failures,
        "agentVersion": worker.agent_version if worker else row.agent_version,
        "syncedAt": rfc3339(worker.synced_at if worker else row.synced_at),
        "eventsFeed": worker.events_supported if worker else None,
        "tls": {"caFile": row.ca_file, "certFile": row.cert_file, "keyFile": row.key_file},
        "counts": {"tasks": dict((counts or {}).get("tasks", {})),
                   "connections": dict((counts or {}).get("connections", {}))},
        "createdAt": rfc3339(row.created_at),
        "polledBy": lease[0],
        "leaseGeneration": lease[1],
    }


async def leases_of(engine: ViewContext, names: list[str]) -> dict[str, tuple[str | None,
                                                                          int | None]]:
    """host -> (the name of the engine that polls it, its lease's generation): from
    the database on PostgreSQL (several engines), this engine itself on sqlite."""
    if engine.store.kind != "postgresql":
        return {name: (engine.name, None) for name in names}
    found = await engine.store.run(store_leases.lease_of, names)
    return {name: (found[name][1], found[name][2]) if name in found else (None, None)
            for name in names}


async def list_engines(engine: ViewContext, lease_time: float) -> dict[str, Any]:
    """listEngines: the engines sharing the database and their leases."""
    if engine.store.kind != "postgresql":
        hosts = [row.name for row in await engine.store.run(repository.list_hosts)]
        started = engine.now() - engine.uptime
        infos = [store_leases.EngineInfo(engine.engine_id, engine.name, os.getpid(),
                                         __version__, migrations.latest_version(), started,
                                         engine.now(), True, hosts)]
    else:
        infos = await engine.store.run(store_leases.list_engines, lease_time)
    return {"leaseTime": lease_time, "engines": [
        {"id": info.id, "name": info.name, "pid": info.pid, "version": info.version,
         "schemaVersion": info.schema_version, "startedAt": rfc3339(info.started_at),
         "heartbeatAt": rfc3339(info.heartbeat_at), "alive": info.alive,
         "self": info.id == engine.engine_id, "hostCount": len(info.hosts),
         "hosts": info.hosts} for info in infos]}


# listHosts has no filter: its tokens are tied to the verb alone.
HOSTS_FINGERPRINT = paging.fingerprint("listHosts")


async def list_hosts(engine: ViewContext, page_size: int, page_token: str | None) -> dict[str, Any]:
    """A page of hosts by name; counts of the page's hosts only (one DB hop)."""
    after = None
    if page_token:
        (after,) = paging.decode_token(page_token, HOSTS_FINGERPRINT, "listHosts", (str,))
    page = await engine.store.run(repository.list_hosts_page, after, page_size)
    token = (paging.encode_token([page.rows[-1].name], HOSTS_FINGERPRINT)
             if page.more and page.rows else None)
    leases = await leases_of(engine, [row.name for row in page.rows])
    return {"hosts": [host_document(row, engine.host(row.name), page.counts.get(row.name),
                                    leases[row.name]) for row in page.rows],
            "nextPageToken": token}


async def get_host(engine: ViewContext, name: str) -> dict[str, Any]:
    row, counts = await engine.store.run(repository.get_host_with_counts, name)
    leases = await leases_of(engine, [name])
    return host_document(row, engine.host(name), counts.get(name), leases[name])


# -- tasks --------------------------------------------------------------------------------


def task_item(row: HostTaskRow, current: bool, host_status: str) -> dict[str, Any]:
    # A host the engine cannot see makes its unfinished tasks unknown; a finished
    # task keeps its final state (nothing on the host can change it any more).
    return {
        "host": row.host,
        "id": row.task_id,
        "kind": row.kind,
        "state": row.state if current or row.state in TASK_FINAL else UNKNOWN,
        "lastKnownState": row.state,
        "external": bool(row.external),
        "progress": repository.loads(row.progress),
        "createdAt": rfc3339(row.created_at),
        "startedAt": rfc3339(row.started_at),
        "endedAt": rfc3339(row.ended_at),
        "updatedAt": rfc3339(row.updated_at),
        "jobID": row.job_id,
        "stepID": row.step_id,
        "hostStatus": host_status,
    }


def _status_of(engine: ViewContext, host: str, row: HostRow | None = None,
               unseen: frozenset[str] = frozenset()) -> tuple[bool, str]:
    worker = engine.host(host)
    if worker is None:
        if row is not None and engine.store.kind == "postgresql":
            # Polled by another engine (several engines): the status it wrote; not
            # current when that engine does not see it or nobody leases it (unseen).
            status = HostStatus.MAINTENANCE if row.maintenance else HostStatus(row.status)
            return status == HostStatus.UP and host not in unseen, str(status)
        peer = engine.seen(host)  # several engines: what the host's engine last wrote
        if peer is not None:
            return peer.current, str(peer.status)
        return False, UNKNOWN
    return worker.current, str(worker.status)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _depends_on_hosts(query: repository.TaskQuery) -> bool:
    """Whether the hosts not seen change which rows a state filter selects: not for
    final states only (a final state stays what it is). Leaving them out spares
    the query a list of every such host (5,000 names on PostgreSQL: ~35 ms)."""
    return any(state not in TASK_FINAL for state in query.states)


async def list_tasks(engine: ViewContext, where: Mapping[str, Any] | None, page_size: int,
                     page_token: str | None) -> dict[str, Any]:
    where = dict(where or {})
    query = repository.TaskQuery(
        hosts=_as_tuple(where.get("host")), states=_as_tuple(where.get("state")),
        kind=where.get("kind"), external=where.get("external"), job_id=where.get("jobID"))
    fingerprint = paging.fingerprint(where)
    after = None
    if page_token:
        created, host, task_id = paging.decode_token(page_token, fingerprint, "listTasks",
                                                     (float, str, str))
        after = (created, host, task_id)
    not_current = engine.not_current() if _depends_on_hosts(query) else []
    unreachable = engine.unreachable()
    rows = await engine.store.run(repository.list_tasks_page, query, not_current, after,
                                  page_size + 1)
    page = rows[:page_size]
    token = None
    if len(rows) > page_size:
        last = page[-1]
        token = paging.encode_token([last.created_at, last.host, last.task_id], fingerprint)
    others = sorted({row.host for row in page if engine.host(row.host) is None})
    host_rows = {}
    if others and engine.store.kind == "postgresql":  # polled by other engines
        host_rows = {host.name: host for host in await engine.store.run(
            store_leases.hosts_named, others)}
    unseen = frozenset(engine.not_current()) if others else frozenset()
    items = [task_item(row, *_status_of(engine, row.host, host_rows.get(row.host), unseen))
             for row in page]
    return {"tasks": items, "nextPageToken": token, "unreachableHosts": unreachable}


async def get_task(engine: ViewContext, host: str, task_id: str, refresh: bool) -> dict[str, Any]:
    host_row = await engine.store.run(repository.get_host, host)
    worker = engine.host(host)
    refreshed = False
    if refresh and worker is not None and not worker.maintenance:
        try:
            doc = await worker.call("getTask", {"taskID": task_id})
        except AgentUnreachable:
            pass
        except AgentError as exc:
            if exc.name != "TaskNotFound":
                raise errors.HostUnreachable(f"host {host} refused getTask: {exc}",
                                             host=host) from None
            raise errors.TaskNotFound(f"no task {task_id} on host {host}", host=host,
                                      taskID=task_id) from None
        else:
            worker.changed()
            engine.jobs_changed(await engine.store.run(repository.apply_task_doc, host, doc,
                                                       engine.now()))
            refreshed = True
    row = await engine.store.run(repository.get_task, host, task_id)
    unreachable = [host] if host in engine.unreachable() else []
    if row is None:
        if host in engine.not_current():
            raise errors.HostUnreachable(
                f"host {host} does not answer and the engine has no task {task_id} there",
                host=host)
        raise errors.TaskNotFound(f"no task {task_id} on host {host}", host=host,
                                  taskID=task_id)
    item = task_item(row, *_status_of(engine, host, host_row,
                                      frozenset(engine.not_current())))
    item["detail"] = repository.loads(row.detail)
    return {"task": item, "refreshed": refreshed, "unreachableHosts": unreachable}


# -- connections ------------------------------------------------------------------------------

HEALTH_OF_STATE = {
    "connected": "connected",
    "degraded": "degraded",
    "connecting": "degraded",
    "disconnected": "disconnected",
}
HEALTH_BUCKETS = ("connected", "degraded", "disconnected", "unknown")


async def connection_health(engine: ViewContext, connection_id: str | None) -> dict[str, Any]:
    rows = await engine.store.run(repository.list_connections, connection_id)
    steps = await engine.store.run(repository.pending_connection_steps, connection_id)
    by_id: dict[str, dict[str, Any]] = {}

    def entry(cid: str) -> dict[str, Any]:
        return by_id.setdefault(cid, {"connectionID": cid, "uris": [], "hosts": {}})

    for row in rows:
        current, _ = _status_of(engine, row.host)
        item = entry(row.connection_id)
        if row.uri not in item["uris"]:
            item["uris"].append(row.uri)
        item["hosts"][row.host] = {
            "health": HEALTH_OF_STATE.get(row.state, UNKNOWN) if current else UNKNOWN,
            "state": row.state if current else UNKNOWN,
            "lastKnownState": row.state,
            "lastError": repository.loads(row.last_error),
            "updatedAt": rfc3339(row.updated_at),
        }
    for step in steps:
        # A host still to be told to manage it: unknown until it is.
        item = entry(str(step.connection_id))
        uri = repository.loads(step.request).get("uri")
        if uri and uri not in item["uris"]:
            item["uris"].append(uri)
        item["hosts"].setdefault(step.host, {
            "health": UNKNOWN, "state": UNKNOWN, "lastKnownState": None, "lastError": None,
            "updatedAt": None})
    connections = []
    for cid in sorted(by_id):
        item = by_id[cid]
        for bucket in HEALTH_BUCKETS:
            item[bucket] = sorted(host for host, value in item["hosts"].items()
                                  if value["health"] == bucket)
        connections.append(item)
    return {"connections": connections, "unreachableHosts": engine.unreachable()}


# -- jobs ------------------------------------------------------------------------------------


def job_document(job: JobRow, steps: Sequence[StepRow]) -> dict[str, Any]:
    return {
        "jobID": job.id,
        "action": job.action,
        "state": job.state,
        "params": repository.loads(job.params),
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
        "lastError": repository.loads(step.last_error),
        "result": repository.loads(step.result),
        "createdAt": rfc3339(step.created_at),
        "updatedAt": rfc3339(step.updated_at),
        "endedAt": rfc3339(step.ended_at),
    }


async def get_job(store: EngineStore, job_id: str) -> dict[str, Any]:
    """The job's document (``JobNotFound``)."""
    found = await store.run(repository.get_job, job_id)
    return job_document(found.job, found.steps)


async def list_jobs(engine: ViewContext, where: Mapping[str, Any] | None, page_size: int,
                    page_token: str | None) -> dict[str, Any]:
    where = dict(where or {})
    query = repository.JobQuery(states=_as_tuple(where.get("state")),
                                action=where.get("action"), host=where.get("host"))
    fingerprint = paging.fingerprint(where)
    after = None
    if page_token:
        created, job_id = paging.decode_token(page_token, fingerprint, "listJobs", (float, str))
        after = (created, job_id)
    jobs = await engine.store.run(repository.list_jobs_page, query, after, page_size + 1)
    page = jobs[:page_size]
    token = None
    if len(jobs) > page_size:
        last = page[-1].job
        token = paging.encode_token([last.created_at, last.id], fingerprint)
    return {"jobs": [job_document(found.job, found.steps) for found in page],
            "nextPageToken": token}
