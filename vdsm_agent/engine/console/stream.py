"""``GET /console/events``: a page's live updates, as server-sent events.

The page passes its own view and query (``?view=tasks&host=h1&page=1``); the
stream works out once which rows that page shows (its scope) and then sends
only changes to those rows, or new rows the page should show on top (a new
task matching the page's filters, a new job, on the first page). Each message
is ``event: patch`` with ``{"rows": [{"id", "html", "prepend"|"after"}]}``:
the browser swaps each row by its ID (``html`` empty: remove it), never the
whole table. A change the page cannot patch (a host resynchronised in bulk,
or too many changes at once) is ``event: reload``: the page fetches itself
again. A comment line every ``HEARTBEAT`` seconds keeps proxies and the
browser's reconnect logic honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from vdsm_agent.engine.console import data, render
from vdsm_agent.engine.console.bus import RELOAD, ChangeBus, Key
from vdsm_agent.engine.console.routes import Console, page_number
from vdsm_agent.engine.engine import Engine

log = logging.getLogger(__name__)

HEARTBEAT = 15.0
COALESCE = 0.1  # seconds a burst of changes is gathered before it is written
Rows = list[dict[str, str]]


class Scope:
    """What one page shows, and how to render the changes it wants."""

    def __init__(self, engine: Engine, view: render.View) -> None:
        self.engine = engine
        self.view = view
        self.reload = False

    def wants(self, key: Key) -> bool:
        return key == RELOAD

    async def rows(self, keys: list[Key]) -> Rows:
        return []

    async def initial(self) -> Rows:
        """The page's rows as they are now, sent first: whatever changed between the
        page's rendering and this stream (or while it reconnected) is not lost."""
        return []


class HostsScope(Scope):
    def __init__(self, engine: Engine, view: render.View, names: list[str],
                 back: str) -> None:
        super().__init__(engine, view)
        self.names = set(names)
        self.back = back

    def wants(self, key: Key) -> bool:
        kind, host, _ = key
        return key == RELOAD or (kind in ("host", "task", "connection", "resync")
                                 and host in self.names)

    async def rows(self, keys: list[Key]) -> Rows:
        names = sorted({host for _, host, _ in keys})
        found = {host["name"]: host for host in await data.hosts_by_name(self.engine, names)}
        return [{"id": render.dom_id("host", name),
                 "html": render.host_row(found[name], self.view, self.back)
                 if name in found else ""} for name in names]

    async def initial(self) -> Rows:
        return await self.rows([("host", name, None) for name in sorted(self.names)])


class TasksScope(Scope):
    def __init__(self, engine: Engine, view: render.View, shown: list[dict[str, Any]],
                 where: data.TaskFilter, first_page: bool, back: str) -> None:
        super().__init__(engine, view)
        self.items = shown
        self.shown = {(item["host"], item["id"]) for item in shown}
        self.where = where
        self.first_page = first_page
        self.back = back

    def wants(self, key: Key) -> bool:
        kind, host, task_id = key
        if kind == "task":
            return (host, task_id) in self.shown or (
                self.first_page and (not self.where.host or host == self.where.host))
        if kind in ("host", "resync"):
            return any(shown_host == host for shown_host, _ in self.shown) or (
                kind == "resync" and self.first_page)
        return key == RELOAD

    async def rows(self, keys: list[Key]) -> Rows:
        wanted = {(host, str(task_id)) for kind, host, task_id in keys if kind == "task"}
        changed_hosts = {host for kind, host, _ in keys if kind == "host"}
        wanted |= {pair for pair in self.shown if pair[0] in changed_hosts}
        if any(kind == "resync" for kind, _, _ in keys):
            self.reload = True
        rows: Rows = []
        for item in await data.tasks_by_id(self.engine, sorted(wanted)):
            pair = (item["host"], item["id"])
            html = render.task_row(item, self.view, self.back)
            if pair in self.shown:
                rows.append({"id": render.dom_id("task", *pair), "html": html})
            elif self.where.matches(item):
                self.shown.add(pair)
                rows.append({"id": render.dom_id("task", *pair), "html": html,
                             "prepend": "rows"})
        if any("prepend" in row for row in rows):
            total = await data.count_tasks(self.engine, self.where)
            rows.append({"id": "count", "html": render.task_count(total)})
        return rows

    async def initial(self) -> Rows:
        # Oldest first: each new row goes on top, so the newest ends first.
        return [{"id": render.dom_id("task", item["host"], item["id"]),
                 "html": render.task_row(item, self.view, self.back), "prepend": "rows"}
                for item in reversed(self.items)]


class TaskScope(Scope):
    def __init__(self, engine: Engine, view: render.View, host: str, task_id: str) -> None:
        super().__init__(engine, view)
        self.host = host
        self.task_id = task_id

    def wants(self, key: Key) -> bool:
        kind, host, task_id = key
        return host == self.host and (kind == "host" or task_id == self.task_id)

    async def rows(self, keys: list[Key]) -> Rows:
        item = await data.task_detail(self.engine, self.host, self.task_id)
        if item is None:
            return []
        back = f"/console/tasks/{urllib.parse.quote(self.host, safe='')}/{self.task_id}"
        return [{"id": render.dom_id("task", self.host, self.task_id),
                 "html": render.task_summary(item, self.view, back)}]

    async def initial(self) -> Rows:
        return await self.rows([])


class JobsScope(Scope):
    def __init__(self, engine: Engine, view: render.View, shown: list[dict[str, Any]],
                 first_page: bool) -> None:
        super().__init__(engine, view)
        self.jobs = shown
        self.shown = {job["jobID"] for job in shown}
        self.first_page = first_page

    def wants(self, key: Key) -> bool:
        kind, _, job_id = key
        return key == RELOAD or (kind == "job" and (job_id in self.shown or self.first_page))

    async def rows(self, keys: list[Key]) -> Rows:
        ids = sorted({str(job_id) for kind, _, job_id in keys if kind == "job"})
        rows: Rows = []
        for job in await data.jobs_by_id(self.engine, ids):
            row = {"id": render.dom_id("job", job["jobID"]), "html": render.job_block(job)}
            if job["jobID"] not in self.shown:
                self.shown.add(job["jobID"])
                row["after"] = "jobs-head"
            rows.append(row)
        return rows

    async def initial(self) -> Rows:
        return [{"id": render.dom_id("job", job["jobID"]), "html": render.job_block(job),
                 "after": "jobs-head"} for job in reversed(self.jobs)]


class ConnectionsScope(Scope):
    def __init__(self, engine: Engine, view: render.View, matrix: data.Matrix,
                 signature: str) -> None:
        super().__init__(engine, view)
        self.ids = set(matrix.ids)
        self.hosts = set(matrix.hosts)
        # Rows or columns came or went since the page was made: it fetches itself.
        self.reload = signature != matrix.signature()

    def wants(self, key: Key) -> bool:
        kind, host, cid = key
        if kind == "connection":
            if cid in self.ids and host in self.hosts:
                return True
            return True  # a new connection or host column: the page reloads
        return key == RELOAD or (kind in ("host", "resync") and host in self.hosts)

    async def rows(self, keys: list[Key]) -> Rows:
        ids: set[str] = set()
        hosts: set[str] = set()
        for kind, host, cid in keys:
            if kind == "connection" and (cid not in self.ids or host not in self.hosts):
                self.reload = True
            elif kind == "connection":
                ids.add(str(cid))
                hosts.add(host)
            elif kind == "host":
                ids |= self.ids
                hosts.add(host)
            elif kind == "resync":
                self.reload = True
        matrix = await data.cells(self.engine, sorted(ids), sorted(hosts))
        return [{"id": render.dom_id("cell", cid, host),
                 "html": render.matrix_cell(cid, host, matrix.cells[(cid, host)])}
                for cid in matrix.ids for host in matrix.hosts]

    async def initial(self) -> Rows:
        return await self.rows([("host", host, None) for host in sorted(self.hosts)])


async def scope_for(console: Console, request: web.Request) -> Scope:
    engine = console.engine_of(request.app)
    view = console.view(request)
    query = request.query
    page = page_number(request)
    kind = query.get("view", "")
    if kind == "hosts":
        status = query.get("status", "")
        paged = await data.hosts_page(engine, page, status or None)
        back = render.link("/console/", {"status": status, "page": paged.page})
        return HostsScope(engine, view, [host["name"] for host in paged.items], back)
    if kind == "tasks":
        where = data.TaskFilter.from_query(query)
        paged_tasks = await data.tasks_page(engine, where, page)
        back = render.link("/console/tasks", {**where.query_string(), "page": paged_tasks.page})
        return TasksScope(engine, view, paged_tasks.items, where, paged_tasks.page == 1, back)
    if kind == "task":
        return TaskScope(engine, view, query.get("host", ""), query.get("task", "").lower())
    if kind == "jobs":
        paged_jobs = await data.jobs_page(engine, page)
        return JobsScope(engine, view, paged_jobs.items, paged_jobs.page == 1)
    if kind == "connections":
        matrix = await data.matrix(engine, page, page_number(request, "hpage"))
        return ConnectionsScope(engine, view, matrix, query.get("sig", ""))
    return Scope(engine, view)


def _event(name: str, payload: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def handler(console: Console, bus_of: Callable[[web.Application], ChangeBus]
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def events(request: web.Request) -> web.StreamResponse:
        if not console.readable(request):
            return console.refuse(request, 403, "Reading the console needs the read role.")
        bus = bus_of(request.app)
        # Listen first, then read the page's scope: a change in between is kept.
        chosen: list[Scope] = []
        subscriber = bus.subscribe(lambda key: chosen[0].wants(key) if chosen else True)
        try:
            scope = await scope_for(console, request)
        except BaseException:
            bus.unsubscribe(subscriber)
            raise
        chosen.append(scope)
        subscriber.pending = {key: None for key in subscriber.pending if scope.wants(key)}
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n\n" + _event("hello", {"at": render.stamp()}))
            rows = await scope.initial()
            if scope.reload:
                scope.reload = False
                await response.write(_event("reload", {}))
            elif rows:
                await response.write(_event("patch", {"rows": rows}))
            while not bus.closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT):
                        await subscriber.wake.wait()
                if bus.closed:
                    break
                if not subscriber.wake.is_set():
                    await response.write(b": keep-alive\n\n")
                    continue
                await asyncio.sleep(COALESCE)
                keys = subscriber.take()
                if RELOAD in keys:
                    await response.write(_event("reload", {}))
                    continue
                rows = await scope.rows(keys)
                if scope.reload:
                    scope.reload = False
                    await response.write(_event("reload", {}))
                if rows:
                    await response.write(_event("patch", {"rows": rows}))
        except ConnectionError:
            pass  # the page went away
        finally:
            bus.unsubscribe(subscriber)
        return response

    return events

