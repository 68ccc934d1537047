"""The engine's aiohttp application: POST /jsonrpc, GET /health, GET / and its life cycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

import rpc_schema
from vdsm_agent import __version__
from vdsm_agent.engine import console, output
from vdsm_agent.engine.api import methods_table
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.settings import EngineConfig, redact_url
from vdsm_agent.engine.store import EngineStore
from vdsm_agent.metrics import engine as engine_metrics
from vdsm_agent.metrics import web as metrics_web
from vdsm_agent.server import home
from vdsm_agent.server.http import json_response, jsonrpc_response
from vdsm_agent.server.jsonrpc import Dispatcher

log = logging.getLogger(__name__)

CONFIG = web.AppKey("engine_config", EngineConfig)
ENGINE = web.AppKey("engine", Engine)
DISPATCHER = web.AppKey("engine_dispatcher", Dispatcher)


async def handle_jsonrpc(request: web.Request) -> web.Response:
    return await jsonrpc_response(request, request.app[DISPATCHER],
                                  request.app[CONFIG].max_body_size)


async def handle_health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    statuses: dict[str, int] = {}
    for worker in engine.workers.values():
        statuses[str(worker.status)] = statuses.get(str(worker.status), 0) + 1
    return json_response({"status": "ok", "version": __version__, "uptime": round(engine.uptime, 3),
                  "database": engine.store.kind, "hosts": statuses})


async def _engine_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.state_path.mkdir(parents=True, exist_ok=True)
    url = config.database_url
    log.info("engine store: %s", redact_url(url))
    store = await EngineStore.open(url)
    schema = rpc_schema.load("engine").compile()
    engine = Engine(config=config, schema=schema, store=store)
    app[ENGINE] = engine
    app[DISPATCHER] = Dispatcher(schema, methods_table(), engine, max_batch=config.max_batch)
    try:
        await engine.start()
        yield
    finally:
        await engine.close()
        await store.close()


def make_app(config: EngineConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_size)
    app[CONFIG] = config
    app.cleanup_ctx.append(_engine_context)
    app.router.add_post("/jsonrpc", handle_jsonrpc)
    app.router.add_get("/health", handle_health)
    # GET /metrics (docs/metrics.md): on the engine's loopback listener, like its API.
    metrics_web.install(app, lambda app: engine_metrics.setup(app[ENGINE], app[DISPATCHER]))
    output.install(app, lambda request: request.app[ENGINE])  # GET /hosts/H/tasks/T/output
    home.install(app, *home.engine_page(home.jsonrpc_url(config.listen)))  # GET /, GET /jsonrpc
    console.install(app, ENGINE, DISPATCHER, CONFIG)  # the web console: /console/, docs/console.md
    return app
