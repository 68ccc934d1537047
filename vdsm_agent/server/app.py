"""The aiohttp application: routes, and the agent's life cycle as cleanup contexts."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

import rpc_schema
from vdsm_agent import __version__, errors
from vdsm_agent.agent import Agent
from vdsm_agent.api import methods_table
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.devices.inventory import Inventory
from vdsm_agent.server.jsonrpc import Dispatcher, error_response
from vdsm_agent.settings import Config
from vdsm_agent.store import Store
from vdsm_agent.tasks import web as tasks_web

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
AGENT = web.AppKey("agent", Agent)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)

JSON = "application/json"


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON)


async def handle_jsonrpc(request: web.Request) -> web.Response:
    dispatcher = request.app[DISPATCHER]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_size
        return _json(error_response(
            errors.INVALID_REQUEST, "Invalid request",
            {"name": "LimitExceeded", "limit": "max_body_size", "max": limit,
             "detail": f"request body larger than {limit} bytes"}), status=413)
    try:
        answer = await dispatcher.dispatch(body)
    except Exception:
        # Dispatch itself failed (a bug): still a JSON-RPC answer, never HTTP 500.
        correlation_id = uuid.uuid4().hex[:16]
        log.exception("dispatch failed [correlation_id=%s]", correlation_id)
        return _json(error_response(errors.INTERNAL_ERROR, "Internal error",
                                    {"name": "InternalError", "correlationId": correlation_id}))
    if answer is None:
        return web.Response(status=204)
    return web.Response(body=answer, content_type=JSON)


async def handle_health(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    return _json({"status": "ok", "version": __version__, "uptime": round(agent.uptime, 3)})


async def _agent_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    store = await Store.open(state / "agent.db")
    schema = rpc_schema.load("agent").compile()
    agent = Agent(config=config, schema=schema, store=store, inventory=Inventory(config),
                  started=started)
    app[AGENT] = agent
    app[DISPATCHER] = Dispatcher(schema, methods_table(), agent, max_batch=config.max_batch)
    try:
        yield
    finally:
        await store.close()


async def _connections_context(app: web.Application) -> AsyncIterator[None]:
    """Storage connections: manage the persisted ones again; stop monitoring at exit
    (targets stay attached so that the next start adopts them)."""
    agent = app[AGENT]
    # The task manager's resource lookup is wired here once tasks hold connections:
    # ConnectionManager(..., resource_holder=<async (resource) -> task ID | None>).
    manager = ConnectionManager(agent.config, agent.store)
    agent.connections = manager
    await manager.start()
    try:
        yield
    finally:
        await manager.close()


def make_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.max_body_size)
    app[CONFIG] = config
    app.cleanup_ctx.append(_agent_context)
    tasks_web.install(app, AGENT)  # after _agent_context: needs the agent and its store
    app.cleanup_ctx.append(_connections_context)  # after _agent_context: needs the store
    app.router.add_post("/jsonrpc", handle_jsonrpc)
    app.router.add_get("/health", handle_health)
    return app
