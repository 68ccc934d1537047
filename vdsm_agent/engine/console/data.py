"""What the console's pages show, read from the engine: one page of rows at a time.

The store functions here run on the engine's DB thread (``store.run``) and
read only; paging is by offset (a page number in the URL, so plain links page
without JavaScript) and every query is bounded by the page's size, so a fleet
of 5,000 hosts costs one page of rows per request, never the whole fleet.
Host status, last seen and agent version are the host workers' in-memory
values, as the engine's own views show them (``engine/views.py``); with several
engines, another engine's host is what that engine wrote (``engine/peers.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import peewee

from vdsm_agent.common.clock import rfc3339
from vdsm_agent.engine import views
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.states import TASK_FINAL, UNKNOWN
from vdsm_agent.engine.store import repository
from vdsm_agent.engine.store.models import HostConnectionRow, HostTaskRow, JobRow, StepRow

HOSTS_PER_PAGE = 100
TASKS_PER_PAGE = 50
JOBS_PER_PAGE = 25
CONNECTIONS_PER_PAGE = 50
HOST_COLUMNS_PER_PAGE = 40
HOST_TASKS_PATCHED = 200  # a host's unfinished tasks re-rendered when its status changes


@dataclasses.dataclass(frozen=True)
class Paged:
    items: list[Any]
    page: int
    pages: int
    total: int


def pages_of(total: int, per_page: int) -> int:
    return max(1, -(-total // per_page))


# -- hosts -------------------------------------------------------------------------------


def host_summary(engine: Engine, name: str,
                 counts: Mapping[str, Mapping[str, int]] | None) -> dict[str, Any] | None:
    worker = engine.seen(name)
    if worker is None:
        return None
    counts = counts or {}
    return {"name": name, "url": worker.url, "status": str(worker.status),
            "maintenance": worker.maintenance, "lastSeen": rfc3339(worker.last_seen),
            "lastError": worker.last_error, "agentVersion": worker.agent_version,
            "tasks": dict(counts.get("tasks", {})),
            "connections": dict(counts.get("connections", {}))}


def _counts(hosts: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Tasks and connections by state, for these hosts only."""
    counts: dict[str, dict[str, dict[str, int]]] = {
        host: {"tasks": {}, "connections": {}} for host in hosts}
    if not hosts:
        return counts
    for model, key in ((HostTaskRow, "tasks"), (HostConnectionRow, "connections")):
        query: Any = (model.select(model.host, model.state, peewee.fn.COUNT(model.host))
                      .where(model.host.in_(list(hosts)))
                      .group_by(model.host, model.state).tuples())
        for host, state, number in query:
            counts[host][key][state] = int(number)
    return counts


def host_names(engine: Engine, status: str | None) -> list[str]:
    # Every engine's hosts (several engines: others' as their engine wrote them).
    return sorted(host.name for host in engine.every_host()
                  if not status or str(host.status) == status)


async def hosts_page(engine: Engine, page: int, status: str | None) -> Paged:
    names = host_names(engine, status)
    pages = pages_of(len(names), HOSTS_PER_PAGE)
    page = min(max(page, 1), pages)
    chosen = names[(page - 1) * HOSTS_PER_PAGE:page * HOSTS_PER_PAGE]
    return Paged(await hosts_by_name(engine, chosen), page, pages, len(names))


async def hosts_by_name(engine: Engine, names: Sequence[str]) -> list[dict[str, Any]]:
    counts = await engine.store.run(_counts, list(names))
    found = (host_summary(engine, name, counts.get(name)) for name in names)
    return [host for host in found if host is not None]


# -- tasks -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskFilter:
    host: str = ""
    state: str = ""
    kind: str = ""
    external: str = ""  # "", "yes", "no"

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> TaskFilter:
        external = query.get("external", "")
        return cls(host=query.get("host", "").strip(), state=query.get("state", "").strip(),
                   kind=query.get("kind", "").strip(),
                   external=external if external in ("yes", "no") else "")

    def query_string(self) -> dict[str, str]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value}

    def matches(self, item: Mapping[str, Any]) -> bool:
        return ((not self.host or item["host"] == self.host)
                and (not self.state or item["state"] == self.state)
                and (not self.kind or item["kind"] == self.kind)
                and (not self.external or item["external"] == (self.external == "yes")))


def _task_select(where: TaskFilter, not_current: Sequence[str]) -> Any:
    select = HostTaskRow.select()
    if where.host:
        select = select.where(HostTaskRow.host == where.host)
    if where.kind:
        select = select.where(HostTaskRow.kind == where.kind)
    if where.external:
        select = select.where(HostTaskRow.external == (where.external == "yes"))
    if where.state == UNKNOWN:
        # What the views call unknown: unfinished on a host the engine cannot see.
        select = select.where(HostTaskRow.host.in_(list(not_current))
                              & HostTaskRow.state.not_in(list(TASK_FINAL)))
    elif where.state:
        select = select.where(HostTaskRow.state == where.state)
        if where.state not in TASK_FINAL and not_current:
            select = select.where(HostTaskRow.host.not_in(list(not_current)))
    return select


def _tasks_page(where: TaskFilter, not_current: Sequence[str], page: int
                ) -> tuple[list[HostTaskRow], int]:
    select = _task_select(where, not_current)
    total = select.count()
    rows = list(select.order_by(HostTaskRow.created_at.desc(), HostTaskRow.host,
                                HostTaskRow.task_id)
                .offset((page - 1) * TASKS_PER_PAGE).limit(TASKS_PER_PAGE))
    return rows, total


def _count_tasks(where: TaskFilter, not_current: Sequence[str]) -> int:
    return int(_task_select(where, not_current).count())


async def count_tasks(engine: Engine, where: TaskFilter) -> int:
    return int(await engine.store.run(_count_tasks, where, engine.not_current()))


def task_document(engine: Engine, row: HostTaskRow) -> dict[str, Any]:
    worker = engine.seen(row.host)
    current, status = (worker.current, str(worker.status)) if worker else (False, UNKNOWN)
    return views.task_item(row, current, status)


async def tasks_page(engine: Engine, where: TaskFilter, page: int) -> Paged:
    rows, total = await engine.store.run(_tasks_page, where, engine.not_current(),
                                         max(page, 1))
    pages = pages_of(total, TASKS_PER_PAGE)
    return Paged([task_document(engine, row) for row in rows], min(max(page, 1), pages),
                 pages, total)


def _tasks_by_id(keys: Sequence[tuple[str, str]]) -> list[HostTaskRow]:
    rows: list[HostTaskRow] = []
    for host, task_id in keys:
        row = repository.get_task(host, task_id)
        if row is not None:
            rows.append(row)
    return rows


async def tasks_by_id(engine: Engine, keys: Sequence[tuple[str, str]]
                      ) -> list[dict[str, Any]]:
    rows = await engine.store.run(_tasks_by_id, list(keys))
    return [task_document(engine, row) for row in rows]


async def task_detail(engine: Engine, host: str, task_id: str) -> dict[str, Any] | None:
    rows = await engine.store.run(_tasks_by_id, [(host, task_id)])
    if not rows:
        return None
    item = task_document(engine, rows[0])
    item["detail"] = repository.loads(rows[0].detail)
    return item


# -- jobs --------------------------------------------------------------------------------


def _jobs_page(page: int) -> tuple[list[dict[str, Any]], int]:
    total = JobRow.select().count()
    jobs = list(JobRow.select().order_by(JobRow.created_at.desc(), JobRow.id)
                .offset((page - 1) * JOBS_PER_PAGE).limit(JOBS_PER_PAGE))
    return _with_steps(jobs), total


def _with_steps(jobs: Sequence[JobRow]) -> list[dict[str, Any]]:
    steps: dict[str, list[StepRow]] = {job.id: [] for job in jobs}
    if jobs:
        for step in (StepRow.select().where(StepRow.job_id.in_(list(steps)))
                     .order_by(StepRow.position)):
            steps[step.job_id].append(step)
    return [views.job_document(job, steps[job.id]) for job in jobs]


def _jobs_by_id(job_ids: Sequence[str]) -> list[dict[str, Any]]:
    return _with_steps(list(JobRow.select().where(JobRow.id.in_(list(job_ids)))))


async def jobs_page(engine: Engine, page: int) -> Paged:
    jobs, total = await engine.store.run(_jobs_page, max(page, 1))
    pages = pages_of(total, JOBS_PER_PAGE)
    return Paged(jobs, min(max(page, 1), pages), pages, total)


async def jobs_by_id(engine: Engine, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    return await engine.store.run(_jobs_by_id, list(job_ids))


# -- connections -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One page of connection IDs (rows) by one page of hosts (columns)."""

    ids: list[str]
    hosts: list[str]
    uris: dict[str, list[str]]
    cells: dict[tuple[str, str], dict[str, Any]]  # (connection ID, host) -> cell
    page: int
    pages: int
    host_page: int
    host_pages: int

    def signature(self) -> str:
        """Which rows and columns the matrix has (a page compares it with the stream's)."""
        return hashlib.blake2s("\0".join([*self.ids, "", *self.hosts]).encode(),
                               digest_size=8).hexdigest()


def _connection_ids(page: int) -> tuple[list[str], int]:
    distinct = HostConnectionRow.select(HostConnectionRow.connection_id).distinct()
    total = distinct.count()
    ids = [row.connection_id for row in distinct.order_by(HostConnectionRow.connection_id)
           .offset((page - 1) * CONNECTIONS_PER_PAGE).limit(CONNECTIONS_PER_PAGE)]
    return ids, total


def _hosts_with(ids: Sequence[str]) -> list[str]:
    return [row.host for row in HostConnectionRow.select(HostConnectionRow.host).distinct()
            .where(HostConnectionRow.connection_id.in_(list(ids)))
            .order_by(HostConnectionRow.host)]


def _connection_rows(ids: Sequence[str], hosts: Sequence[str]) -> list[HostConnectionRow]:
    return list(HostConnectionRow.select().where(
        HostConnectionRow.connection_id.in_(list(ids))
        & HostConnectionRow.host.in_(list(hosts))))


def cell(engine: Engine, row: HostConnectionRow | None) -> dict[str, Any]:
    if row is None:
        return {"health": "none", "state": "not managed", "lastError": None}
    worker = engine.seen(row.host)
    current = worker is not None and worker.current
    error = repository.loads(row.last_error)
    return {"health": views.HEALTH_OF_STATE.get(row.state, UNKNOWN) if current else UNKNOWN,
            "state": row.state if current else UNKNOWN, "lastKnownState": row.state,
            "lastError": error.get("message") if isinstance(error, dict) else error,
            "updatedAt": rfc3339(row.updated_at)}


async def matrix(engine: Engine, page: int, host_page: int) -> Matrix:
    ids, total = await engine.store.run(_connection_ids, max(page, 1))
    all_hosts = await engine.store.run(_hosts_with, ids) if ids else []
    host_pages = pages_of(len(all_hosts), HOST_COLUMNS_PER_PAGE)
    host_page = min(max(host_page, 1), host_pages)
    hosts = all_hosts[(host_page - 1) * HOST_COLUMNS_PER_PAGE:
                      host_page * HOST_COLUMNS_PER_PAGE]
    return await cells(engine, ids, hosts, page=min(max(page, 1), pages_of(
        total, CONNECTIONS_PER_PAGE)), pages=pages_of(total, CONNECTIONS_PER_PAGE),
        host_page=host_page, host_pages=host_pages)


async def cells(engine: Engine, ids: Sequence[str], hosts: Sequence[str], page: int = 1,
                pages: int = 1, host_page: int = 1, host_pages: int = 1) -> Matrix:
    rows = await engine.store.run(_connection_rows, list(ids), list(hosts)) if ids else []
    by_key = {(row.connection_id, row.host): row for row in rows}
    uris: dict[str, list[str]] = {cid: [] for cid in ids}
    for row in rows:
        if row.uri not in uris[row.connection_id]:
            uris[row.connection_id].append(row.uri)
    table = {(cid, host): cell(engine, by_key.get((cid, host))) for cid in ids
             for host in hosts}
    return Matrix(list(ids), list(hosts), uris, table, page, pages, host_page, host_pages)
