"""The engine's web console: hosts, tasks, jobs and connection health, live.

``install(app, ENGINE, DISPATCHER)`` (from ``engine/app.py``) adds:

* ``GET /console/`` (hosts), ``/console/tasks``, ``/console/tasks/{host}/{id}``
  (one task, its output followed live), ``/console/jobs``,
  ``/console/connections`` (the health matrix): server-rendered HTML that
  reads without JavaScript (``routes.py``, ``render.py``, ``data.py``);
* ``GET /console/events``: the open page's live updates (server-sent events,
  ``stream.py``) from the engine's change broadcast (``bus.py``);
* ``POST /console/action``: cancel a task, start or stop a host's maintenance,
  manage or unmanage a connection, for the roles that may (``access.py``);
* ``GET /console/static/...``: the page's small script and style sheet,
  shipped in this package (no CDN, no build step);
* ``GET /`` for a browser (``Accept: text/html``) with the read role: the
  hosts page. curl (and a caller without the read role) still gets the
  engine's short text page (``server/home.py``).

docs/console.md says what each page shows and who may do what.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from vdsm_agent.engine.console import stream
from vdsm_agent.engine.console.bus import ChangeBus
from vdsm_agent.engine.console.routes import Console
from vdsm_agent.engine.engine import Engine
from vdsm_agent.server.jsonrpc import Dispatcher

STATIC = Path(__file__).with_name("static")
BUS = web.AppKey("console_bus", ChangeBus)


def _root(console: Console) -> Middleware:
    @web.middleware
    async def console_root(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A browser's ``GET /`` is the console (for a caller who may read it)."""
        if (request.path == "/" and request.method == "GET"
                and "text/html" in request.headers.get("Accept", "")
                and console.readable(request)):
            return await console.hosts(request)
        return await handler(request)

    return console_root


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


def install(app: web.Application, engine_key: web.AppKey[Engine],
                dispatcher_key: web.AppKey[Dispatcher]) -> None:
    """Add the console's routes; after the engine's cleanup context (it needs the engine)
    and after the gate (its middleware identifies the caller first)."""
    console = Console(lambda app: app[engine_key], lambda app: app[dispatcher_key])

    async def bus_context(app: web.Application) -> AsyncIterator[None]:
        bus = ChangeBus(app[engine_key])
        app[BUS] = bus
        try:
            yield
        finally:
            await bus.close()

    async def end_streams(app: web.Application) -> None:
        if BUS in app:
            await app[BUS].close()

    app.cleanup_ctx.append(bus_context)
    app.on_shutdown.append(end_streams)
    app.middlewares.append(_root(console))
    router = app.router
    router.add_get("/console", _to_console)
    router.add_get("/console/", console.hosts)
    router.add_get("/console/tasks", console.tasks)
    router.add_get("/console/tasks/{host}/{task_id}", console.task)
    router.add_get("/console/jobs", console.jobs)
    router.add_get("/console/connections", console.connections)
    router.add_get("/console/events", stream.handler(console, lambda app: app[BUS]))
    router.add_post("/console/action", console.action)
    router.add_static("/console/static/", STATIC, append_version=False)
